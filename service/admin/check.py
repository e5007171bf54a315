"""``branchbuild check``: a preflight of everything the service needs, one line per check.

Each check is independent, so one failure never hides the others: the queues and their
dead-letter queues, the bucket (written and cleaned up), the CodeBuild project(s) and the git
host with its pinned key.
"""

from __future__ import annotations

import json
import string
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum

from ..aws import translated
from ..builds import project_name
from ..errors import BranchbuildError
from ..events import Action, Push, RefType
from ..git import Git
from ..queue import Queue
from ..settings import BuildBackend, Settings
from .common import AwsClients, marks

PROBE_PREFIX = "branchbuild-check/"


class Status(StrEnum):
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Check:
    """The result of one check: what was checked, how it went, and why."""

    subject: str
    status: Status
    detail: str


@dataclass(frozen=True)
class Target:
    """What to check beyond the settings: repositories (their projects and git access)."""

    repositories: tuple[str, ...] = ()
    branch: str = "main"
    region: str | None = None


async def run_checks(settings: Settings, clients: AwsClients, target: Target) -> list[Check]:
    """Run every check; failures are results, never exceptions."""
    results: list[Check] = []
    for name, url in (("intake", settings.queue_url), ("work", settings.work_queue_url)):
        results += await _queue(clients, name, url)
    results.append(await _guard("bucket", _bucket(settings, clients)))
    results += await _projects(settings, clients, target)
    results += await _git_host(settings, target)
    return results


async def _guard(subject: str, check: Awaitable[Check]) -> Check:
    try:
        return await check
    except BranchbuildError as exc:
        return Check(subject, Status.FAILED, str(exc))


async def _queue(clients: AwsClients, name: str, url: str) -> list[Check]:
    sqs = await clients.sqs()
    queue = Queue(sqs, url, name=name)
    subject = f"{name} queue"
    try:
        await queue.describe()
    except BranchbuildError as exc:
        return [Check(subject, Status.FAILED, str(exc))]
    if queue.max_receive_count is None:
        return [Check(subject, Status.FAILED, f"{url}: no redrive policy (failures retry forever)")]
    found = Check(
        subject, Status.OK, f"{url}: FIFO, dead-letter after {queue.max_receive_count} receives"
    )
    dlq_subject = f"{name} dead-letter queue"
    if queue.dead_letter_url is None:

        async def missing() -> Check:
            with translated(f"read the redrive policy of the {name} queue"):
                reply = await sqs.get_queue_attributes(
                    QueueUrl=url, AttributeNames=["RedrivePolicy"]
                )
            policy = json.loads(reply.get("Attributes", {}).get("RedrivePolicy", "{}"))
            target = policy.get("deadLetterTargetArn", "?")
            return Check(dlq_subject, Status.FAILED, f"{target}: not found or not readable")

        return [found, await _guard(dlq_subject, missing())]
    dlq = queue.dead_letter_url

    async def reachable() -> Check:
        with translated(f"read attributes of the {name} dead-letter queue"):
            reply = await sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["FifoQueue"])
        if reply.get("Attributes", {}).get("FifoQueue") != "true":
            return Check(dlq_subject, Status.FAILED, f"{dlq}: not a FIFO queue")
        return Check(dlq_subject, Status.OK, f"{dlq}: reachable")

    return [found, await _guard(dlq_subject, reachable())]


async def _bucket(settings: Settings, clients: AwsClients) -> Check:
    s3 = await clients.s3()
    key = f"{PROBE_PREFIX}{uuid.uuid4()}"
    with translated(f"write s3://{settings.bucket}/{key}"):
        await s3.put_object(Bucket=settings.bucket, Key=key, Body=b"")
    with translated(f"delete the probe object s3://{settings.bucket}/{key}"):
        await s3.delete_object(Bucket=settings.bucket, Key=key)
    return Check("bucket", Status.OK, f"{settings.bucket}: writable (probe object put and deleted)")


def project_names(settings: Settings, target: Target) -> list[str] | None:
    """The projects to look for; None when the template needs a repository and none was given.

    Raises:
        PermanentError: a rendered name is not a valid CodeBuild project name.
    """
    fields = {f for _, f, _, _ in string.Formatter().parse(settings.project_template) if f}
    repositories = target.repositories
    if not repositories:
        if "repository" in fields:
            return None
        repositories = ("-",)  # unused by the template
    names = []
    for repository in repositories:
        push = Push(
            event_id="check",
            account="000000000000",
            region=target.region or "us-east-1",
            repository=repository,
            ref_type=RefType.BRANCH,
            name=target.branch,
            action=Action.UPDATED,
            commit="0" * 40,
        )
        names.append(project_name(settings.project_template, push))
    return sorted(set(names))


async def _projects(settings: Settings, clients: AwsClients, target: Target) -> list[Check]:
    subject = "CodeBuild project"
    if settings.build_backend is BuildBackend.LOCAL:
        return [Check(subject, Status.SKIPPED, "local backend (BRANCHBUILD_BUILD_BACKEND=local)")]
    try:
        names = project_names(settings, target)
    except BranchbuildError as exc:
        return [Check(subject, Status.FAILED, str(exc))]
    if names is None:
        detail = f"give --repository R to check the projects of {settings.project_template!r}"
        return [Check(subject, Status.SKIPPED, detail)]
    codebuild = await clients.codebuild()
    try:
        with translated("look up CodeBuild projects"):
            reply = await codebuild.batch_get_projects(names=names)
    except BranchbuildError as exc:
        return [Check(subject, Status.FAILED, str(exc))]
    found = {p.get("name", "") for p in reply.get("projects", [])}
    return [
        Check(subject, Status.OK, f"{name}: exists")
        if name in found
        else Check(subject, Status.FAILED, f"{name}: not found")
        for name in names
    ]


async def _git_host(settings: Settings, target: Target) -> list[Check]:
    subject = "git host"
    if not target.repositories:
        return [Check(subject, Status.SKIPPED, "give --repository R to probe a repository")]
    try:
        git = Git(settings)
    except (BranchbuildError, OSError) as exc:
        return [Check(subject, Status.FAILED, str(exc))]
    region = target.region or ""
    results = []
    for repository in target.repositories:
        url = git.url_for(repository, region)

        async def probe(repository: str = repository, url: str = url) -> Check:
            branches = await git.probe(repository, region)
            detail = f"{url}: reachable, host key matches, {branches} branch(es)"
            return Check(subject, Status.OK, detail)

        results.append(await _guard(subject, probe()))
    return results


def exit_code(results: Sequence[Check]) -> int:
    return 1 if any(r.status is Status.FAILED for r in results) else 0


def render(results: Sequence[Check]) -> str:
    ok, failed, skipped = marks()
    symbol = {Status.OK: ok, Status.FAILED: failed, Status.SKIPPED: skipped}
    width = max((len(r.subject) for r in results), default=0)
    lines = [f"{symbol[r.status]} {r.subject.ljust(width)}  {r.detail}" for r in results]
    failures = sum(r.status is Status.FAILED for r in results)
    lines.append(f"{failures} check(s) failed" if failures else "all checks passed")
    return "\n".join(lines) + "\n"


def to_json(results: Sequence[Check]) -> str:
    checks = [asdict(r) | {"status": r.status.value} for r in results]
    return json.dumps({"ok": exit_code(results) == 0, "checks": checks}) + "\n"
