"""A local stand-in for CodeBuild that runs out of capacity as the real one does.

moto starts every build at once and never refuses one; CodeBuild does not. This HTTP server
speaks CodeBuild's JSON protocol (``X-Amz-Target: CodeBuild_20161006.<Op>``) for StartBuild,
BatchGetBuilds and StopBuild, every request validated against botocore's model of CodeBuild
(:mod:`localdev.awsjson`), and enforces:

* a **concurrency quota** (``quota`` builds run at once, account-wide); builds beyond it wait in
  CodeBuild's queue (``IN_PROGRESS``, phase ``QUEUED``), which holds at most ``queue_factor`` ×
  the quota; beyond that StartBuild fails with ``AccountLimitExceededException: Cannot have
  more than N builds in queue for the account``;
* a project's ``concurrentBuildLimit`` (``project_limits``): beyond it StartBuild fails
  (``AccountLimitExceededException``, the message naming the project);
* ``throttle(n)``: the next n StartBuild calls fail with ``ThrottlingException`` (or the
  ``code`` and HTTP ``status`` given: another service's throttle code, a bare 429);
* ``idempotencyToken``: the same token within 5 minutes returns the same build;
* **auto-retry** (``autoRetryLimitOverride``, or a project's ``retry_limits``): a build that
  ends ``FAILED``, ``FAULT`` or ``TIMED_OUT`` with retries left is retried as CodeBuild does,
  as a new build with the same variables, its ``autoRetryConfig`` linking the two
  (``previousAutoRetry``/``nextAutoRetry``, ``autoRetryNumber``), after the failed build's
  final event. What CodeBuild's own events carry of auto-retry is not known, so the events
  say nothing of it: branchbuild reads the chain with ``BatchGetBuilds``.

Builds never end by themselves: the test ends them (:meth:`CodeBuildStandIn.finish`), and a
queued build then takes the freed place. :meth:`occupy` fills the account with builds started
by someone else. Each state change is handed to ``on_event`` as the ``CodeBuild Build State
Change`` event CodeBuild would put on EventBridge (tests put it on the intake queue).

``branchbuild``'s service reaches it through ``AWS_ENDPOINT_URL_CODEBUILD``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from .awsjson import JsonStandIn, StandInError

__all__ = ["CodeBuildStandIn", "StandInBuild"]

TARGET_PREFIX = "CodeBuild_20161006."
IDEMPOTENCY_SECONDS = 300
# CodeBuild retries "a failed build"; a stopped one was stopped on purpose.
RETRIED = frozenset({"FAILED", "FAULT", "TIMED_OUT"})
OnEvent = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class StandInBuild:
    id: str
    project: str
    variables: dict[str, str]
    token: str | None
    status: str = "IN_PROGRESS"
    phase: str = "QUEUED"
    requested: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    retry_limit: int | None = None  # autoRetryLimit (None: no autoRetryConfig at all)
    retry_number: int = 0
    previous: str | None = None  # build ARNs, as autoRetryConfig names them
    next: str | None = None

    @property
    def active(self) -> bool:
        return self.status == "IN_PROGRESS"

    @property
    def running(self) -> bool:
        return self.active and self.phase != "QUEUED"


class CodeBuildStandIn(JsonStandIn):
    """The server; ``async with`` it, then point ``AWS_ENDPOINT_URL_CODEBUILD`` at
    :attr:`endpoint`."""

    target_prefix = TARGET_PREFIX
    service = "codebuild"

    def __init__(
        self,
        *,
        quota: int = 1,
        queue_factor: int = 5,
        project_limits: dict[str, int] | None = None,
        on_event: OnEvent | None = None,
        retry_limits: dict[str, int] | None = None,
        account: str = "123456789012",
        region: str = "eu-west-1",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.quota = quota
        self.queue_factor = queue_factor
        self.project_limits = dict(project_limits or {})
        self.on_event = on_event
        self.retry_limits = dict(retry_limits or {})  # projects' own autoRetryLimit
        self.account = account
        self.region = region
        self.builds: dict[str, StandInBuild] = {}
        self.order: list[str] = []  # build ids in the order StartBuild accepted them
        self.refusals: dict[str, int] = {}  # by error code
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.most_running = 0  # the most builds running at once (queued ones not counted)
        self.most_active = 0  # the most builds running or queued at once
        self._throttle = 0
        self._throttled_as = ("ThrottlingException", 400)
        self._tokens: dict[str, tuple[str, float]] = {}

    # -- what a test does -----------------------------------------------------------------

    @property
    def active(self) -> list[StandInBuild]:
        return [b for b in self.builds.values() if b.active]

    def started_by(self, variable: str = "BRANCHBUILD_ARCHIVE") -> list[StandInBuild]:
        """Accepted builds that carry ``variable`` (branchbuild's), in the order accepted."""
        return [self.builds[i] for i in self.order if variable in self.builds[i].variables]

    async def occupy(self, count: int, project: str = "someone-else") -> list[str]:
        """Start ``count`` builds outside branchbuild (they take quota and queue places)."""
        ids = []
        for _ in range(count):
            build = self._accept(project, {}, None)
            ids.append(build.id)
            await self._emit(build)
        return ids

    def throttle(self, times: int, code: str = "ThrottlingException", status: int = 400) -> None:
        """Refuse the next ``times`` StartBuild calls with ``code`` (empty: none) and ``status``."""
        self._throttle = times
        self._throttled_as = (code, status)

    async def finish(
        self, build_id: str, status: str = "SUCCEEDED", *, emit: bool = True
    ) -> StandInBuild | None:
        """End a build (``emit`` False: its final event is lost); a queued one takes its
        place. Returns CodeBuild's auto-retry of it, if it fails with retries left."""
        build = self.builds[build_id]
        if not build.active:
            return None
        build.status, build.phase, build.ended = status, "COMPLETED", time.time()
        if emit:
            await self._emit(build)
        retry = None
        if status in RETRIED and build.retry_number < (build.retry_limit or 0):
            retry = self._accept(build.project, dict(build.variables), None)
            retry.retry_limit, retry.retry_number = build.retry_limit, build.retry_number + 1
            retry.previous, build.next = self._arn(build), self._arn(retry)
            self.requests.append(("RetryBuild", {"id": build.id}))  # CodeBuild's own call
        await self._promote()
        if retry is not None:
            await self._emit(retry)
        return retry

    def attempts(self, build_id: str) -> list[StandInBuild]:
        """The build and its auto-retries, in order."""
        chain = [self.builds[build_id]]
        while chain[-1].next is not None:
            chain.append(self.builds[chain[-1].next.split(":build/", 1)[1]])
        return chain

    # -- the protocol ---------------------------------------------------------------------

    async def call(
        self, operation: str, params: dict[str, Any], request: web.Request
    ) -> dict[str, Any]:
        self.requests.append((operation, params))
        if operation == "StartBuild":
            return await self._start(params)
        if operation == "BatchGetBuilds":
            return self._batch_get(params)
        if operation == "StopBuild":
            return await self._stop(params)
        raise StandInError("UnknownOperationException", f"{operation} is not served here")

    def refused(self, error: StandInError) -> StandInError:
        return StandInError("InvalidInputException", str(error))

    def answered_error(self, error: StandInError) -> None:
        self.refusals[error.code] = self.refusals.get(error.code, 0) + 1

    async def _start(self, params: dict[str, Any]) -> dict[str, Any]:
        project = params["projectName"]
        token = params.get("idempotencyToken")
        now = time.time()
        if token and token in self._tokens and now - self._tokens[token][1] < IDEMPOTENCY_SECONDS:
            return {"build": self._to_api(self.builds[self._tokens[token][0]])}
        if self._throttle:
            self._throttle -= 1
            code, status = self._throttled_as
            raise StandInError(code, "Rate exceeded", status=status)
        limit = self.project_limits.get(project)
        if limit is not None and sum(b.project == project for b in self.active) >= limit:
            raise StandInError(
                "AccountLimitExceededException",
                f"Cannot have more than {limit} active builds for the project {project}",
            )
        queued = sum(not b.running for b in self.active)
        if len(self.active) >= self.quota and queued >= self.queue_factor * self.quota:
            raise StandInError(
                "AccountLimitExceededException",
                f"Cannot have more than {self.queue_factor * self.quota} builds in queue "
                "for the account",
            )
        variables = {
            v["name"]: v.get("value", "") for v in params.get("environmentVariablesOverride", [])
        }
        build = self._accept(project, variables, token)
        limit = params.get("autoRetryLimitOverride", self.retry_limits.get(project))
        build.retry_limit = limit if isinstance(limit, int) else None
        await self._emit(build)
        return {"build": self._to_api(build)}

    def _accept(self, project: str, variables: dict[str, str], token: str | None) -> StandInBuild:
        build = StandInBuild(
            id=f"{project}:{uuid.uuid4()}", project=project, variables=variables, token=token
        )
        if sum(b.running for b in self.active) < self.quota:
            build.phase, build.started = "BUILD", time.time()
        self.builds[build.id] = build
        self.order.append(build.id)
        if token:
            self._tokens[token] = (build.id, time.time())
        self._count()
        return build

    async def _promote(self) -> None:
        """Queued builds take free places, oldest first (CodeBuild's order is not promised)."""
        for build in sorted(self.active, key=lambda b: b.requested):
            if sum(b.running for b in self.active) >= self.quota:
                break
            if not build.running:
                build.phase, build.started = "BUILD", time.time()
        self._count()

    def _count(self) -> None:
        self.most_running = max(self.most_running, sum(b.running for b in self.active))
        self.most_active = max(self.most_active, len(self.active))

    def _batch_get(self, params: dict[str, Any]) -> dict[str, Any]:
        ids = params["ids"]
        return {
            "builds": [self._to_api(self.builds[i]) for i in ids if i in self.builds],
            "buildsNotFound": [i for i in ids if i not in self.builds],
        }

    async def _stop(self, params: dict[str, Any]) -> dict[str, Any]:
        build = self.builds.get(params["id"])
        if build is None:
            raise StandInError("ResourceNotFoundException", f"build {params['id']} not found")
        await self.finish(build.id, "STOPPED")
        return {"build": self._to_api(build)}

    def _arn(self, build: StandInBuild) -> str:
        return f"arn:aws:codebuild:{self.region}:{self.account}:build/{build.id}"

    def _to_api(self, build: StandInBuild) -> dict[str, Any]:
        retry: dict[str, Any] = {}
        if build.retry_limit is not None:
            config: dict[str, Any] = {
                "autoRetryLimit": build.retry_limit,
                "autoRetryNumber": build.retry_number,
            }
            if build.previous:
                config["previousAutoRetry"] = build.previous
            if build.next:
                config["nextAutoRetry"] = build.next
            retry = {"autoRetryConfig": config}
        return retry | {
            "id": build.id,
            "arn": self._arn(build),
            "projectName": build.project,
            "buildStatus": build.status,
            "currentPhase": build.phase,
            "buildComplete": not build.active,
            "startTime": build.requested,
            "environment": {
                "type": "LINUX_CONTAINER",
                "image": "aws/codebuild/standard:7.0",
                "computeType": "BUILD_GENERAL1_SMALL",
                "environmentVariables": [
                    {"name": k, "value": v, "type": "PLAINTEXT"} for k, v in build.variables.items()
                ],
            },
        }

    async def _emit(self, build: StandInBuild) -> None:
        if self.on_event is None:
            return
        started = datetime.fromtimestamp(build.requested, UTC)
        await self.on_event(
            {
                "version": "0",
                "id": str(uuid.uuid4()),
                "detail-type": "CodeBuild Build State Change",
                "source": "aws.codebuild",
                "account": self.account,
                "time": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
                "region": self.region,
                "resources": [self._arn(build)],
                "detail": {
                    "build-status": build.status,
                    "project-name": build.project,
                    "build-id": self._arn(build),
                    "current-phase": build.phase,
                    "additional-information": {
                        "environment": {
                            "environment-variables": [
                                {"name": k, "value": v, "type": "PLAINTEXT"}
                                for k, v in build.variables.items()
                            ],
                        },
                        "build-complete": not build.active,
                        "initiator": "branchbuild",
                        "build-start-time": started.strftime("%b %d, %Y %I:%M:%S %p"),
                    },
                },
            }
        )
