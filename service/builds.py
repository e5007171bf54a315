"""Start a CodeBuild build for an uploaded archive, at most once per (repository, ref, commit)."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from botocore.exceptions import ClientError

from .aws import error_code, translated
from .errors import BuildError, CapacityRefused, PermanentError
from .events import Push, RefType

if TYPE_CHECKING:
    from types_aiobotocore_codebuild import CodeBuildClient
    from types_aiobotocore_codebuild.type_defs import EnvironmentVariableTypeDef

log = logging.getLogger("branchbuild.builds")

_PROJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{1,254}")
# CodeBuild full: the push waits (service.scheduler) instead of retrying here; botocore's own
# retries already covered a throttle once the call gets here. Throttling, whatever its code:
# botocore's standard retry mode's throttle codes (tests/test_scheduler.py checks they are all
# here), and an HTTP 429 whatever its code.
THROTTLE_CODES = frozenset(
    {
        "BandwidthLimitExceeded",
        "EC2ThrottledException",
        "LimitExceededException",
        "PriorRequestNotComplete",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "SlowDown",
        "ThrottledException",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
        "TransactionInProgressException",
    }
)
_TOO_MANY_REQUESTS = 429
# BatchGetBuilds takes at most 100 ids.
_BATCH = 100


@dataclass(frozen=True)
class BuildRequest:
    push: Push
    project: str
    bucket: str
    key: str
    # The rule's extra build environment variables (names checked by service.pipelines).
    extra_environment: tuple[tuple[str, str], ...] = ()
    # Set for ``source: codecommit``: CodeBuild clones this URL itself (no archive).
    codecommit_url: str | None = None
    # The rule's ``retries``: CodeBuild's autoRetryLimitOverride (None: the project's own).
    retries: int | None = None

    @property
    def commit(self) -> str:
        assert self.push.commit is not None
        return self.push.commit

    @property
    def idempotency_token(self) -> str:
        """Stable for (repository, ref, commit): a redelivered message starts no second build."""
        seed = f"{self.push.repository}\0{self.push.ref}\0{self.commit}"
        return hashlib.sha256(seed.encode()).hexdigest()

    @property
    def environment(self) -> dict[str, str]:
        name_variable = "BRANCH_NAME" if self.push.ref_type is RefType.BRANCH else "TAG_NAME"
        return dict(self.extra_environment) | {
            "COMMIT_ID": self.commit,
            name_variable: self.push.name,
            "REPOSITORY_NAME": self.push.repository,
            # Correlates CodeBuild's state events with the ledger (service.build_state).
            "BRANCHBUILD_ARCHIVE": self.key,
        }


@dataclass(frozen=True)
class StartedBuild:
    build_id: str
    project: str
    # CodeBuild's autoRetryLimit for this build (service.retries): what its reply says, else
    # what was asked for.
    retries: int = 0


@dataclass(frozen=True)
class RetryLink:
    """A build's place in CodeBuild's auto-retry chain (``Build.autoRetryConfig``)."""

    build_id: str
    number: int  # autoRetryNumber: 0 for the build branchbuild started
    previous: str | None  # the build id it retries (None for the first)


class BuildBackend(Protocol):
    async def start(self, request: BuildRequest) -> StartedBuild: ...


def codecommit_url(push: Push) -> str:
    """The repository's HTTPS clone URL, as CodeBuild's CODECOMMIT source wants it."""
    return f"https://git-codecommit.{push.region}.amazonaws.com/v1/repos/{push.repository}"


def project_name(template: str, push: Push) -> str:
    """Render the CodeBuild project name for a push.

    Raises:
        PermanentError: the rendered name is not a valid CodeBuild project name.
    """
    name = template.format(repository=push.repository, branch=push.name)
    if not _PROJECT.fullmatch(name):
        raise PermanentError(f"{name!r} is not a valid CodeBuild project name")
    return name


def capacity_reason(error: BaseException | None) -> str | None:
    """The ``reason`` label of a capacity refusal: ``throttled``, ``project_limit`` (a
    project's concurrentBuildLimit) or ``account_queue_full`` (the account's queue); None
    when ``error`` is no capacity refusal."""
    if not isinstance(error, ClientError):
        return None
    code = error_code(error)
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in THROTTLE_CODES or status == _TOO_MANY_REQUESTS:
        return "throttled"
    if code != "AccountLimitExceededException":
        return None
    message = str(error.response.get("Error", {}).get("Message", "")).lower()
    return "project_limit" if "project" in message else "account_queue_full"


class CodeBuild:
    """The production backend: AWS CodeBuild's StartBuild with the source overridden."""

    def __init__(self, client: CodeBuildClient) -> None:
        self.client = client

    async def start(self, request: BuildRequest) -> StartedBuild:
        """Start the build (once: a refusal for capacity is the scheduler's to retry, with the
        same idempotency token).

        Raises:
            CapacityRefused: the account's queue is full, the project's concurrent build
                limit is reached, or StartBuild is throttled beyond botocore's retries.
            BuildError: another failure that may pass (transient).
            AccessDenied: the project does not exist or may not be started (permanent).
        """
        try:
            return await self._start_once(request)
        except BuildError as exc:
            cause = exc.__cause__
            reason = capacity_reason(cause)
            if reason is None:
                raise
            raise CapacityRefused(str(exc), reason=reason) from cause

    async def statuses(self, build_ids: list[str]) -> dict[str, str]:
        """``buildStatus`` of each build CodeBuild knows (a missing id is left out); of a build
        CodeBuild retried, its last attempt's.

        Raises:
            BuildError: BatchGetBuilds failed (transient).
            AccessDenied: not allowed (permanent).
        """
        found: dict[str, str] = {}
        # A build CodeBuild retried (its auto-retry) goes on as its retry: the last attempt's
        # status is the build's (at most 10 retries: as many rounds).
        following = {build_id: build_id for build_id in build_ids}
        for _ in range(11):
            if not following:
                break
            attempts = list(following)
            retried: dict[str, str] = {}
            for start in range(0, len(attempts), _BATCH):
                chunk = attempts[start : start + _BATCH]
                with translated("read the status of builds", transient=BuildError):
                    reply = await self.client.batch_get_builds(ids=chunk)
                for build in reply.get("builds", []):
                    if "id" not in build or "buildStatus" not in build:
                        continue
                    origin = following[build["id"]]
                    found[origin] = build["buildStatus"]
                    after = build.get("autoRetryConfig", {}).get("nextAutoRetry")
                    if after and build["buildStatus"] != "IN_PROGRESS":
                        retried[after.split(":build/", 1)[-1]] = origin
            following = retried
        return found

    async def retry_link(self, build_id: str) -> RetryLink | None:
        """Where ``build_id`` stands in its auto-retry chain; None when CodeBuild does not
        know the build or says nothing of auto-retry.

        Raises:
            BuildError: BatchGetBuilds failed (transient).
            AccessDenied: not allowed (permanent).
        """
        with translated("read the auto-retry chain of a build", transient=BuildError):
            reply = await self.client.batch_get_builds(ids=[build_id])
        for build in reply.get("builds", []):
            config = build.get("autoRetryConfig")
            if build.get("id") != build_id or not config:
                continue
            previous = config.get("previousAutoRetry")
            return RetryLink(
                build_id=build_id,
                number=int(config.get("autoRetryNumber", 0)),
                previous=previous.split(":build/", 1)[-1] if previous else None,
            )
        return None

    async def _start_once(self, request: BuildRequest) -> StartedBuild:
        variables: list[EnvironmentVariableTypeDef] = [
            {"name": name, "value": value, "type": "PLAINTEXT"}
            for name, value in request.environment.items()
        ]
        # A rule without ``retries`` leaves the project's own autoRetryLimit in force.
        retry: dict[str, int] = (
            {} if request.retries is None else {"autoRetryLimitOverride": request.retries}
        )
        with translated(f"start a build of project {request.project}", transient=BuildError):
            if request.codecommit_url is not None:
                reply = await self.client.start_build(
                    projectName=request.project,
                    sourceTypeOverride="CODECOMMIT",
                    sourceLocationOverride=request.codecommit_url,
                    sourceVersion=request.commit,
                    environmentVariablesOverride=variables,
                    artifactsOverride={"type": "NO_ARTIFACTS"},
                    idempotencyToken=request.idempotency_token,
                    **retry,  # type: ignore[arg-type]
                )
            else:
                reply = await self.client.start_build(
                    projectName=request.project,
                    sourceTypeOverride="S3",
                    sourceLocationOverride=f"{request.bucket}/{request.key}",
                    environmentVariablesOverride=variables,
                    artifactsOverride={"type": "NO_ARTIFACTS"},
                    idempotencyToken=request.idempotency_token,
                    **retry,  # type: ignore[arg-type]
                )
        build = reply["build"]
        limit = build.get("autoRetryConfig", {}).get("autoRetryLimit")
        retries = limit if isinstance(limit, int) else (request.retries or 0)
        return StartedBuild(build_id=build["id"], project=request.project, retries=retries)
