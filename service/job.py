"""One push, start to finish: ledger → fetch → archive → upload → start build → ledger."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from .builds import BuildBackend, BuildRequest, StartedBuild, codecommit_url, project_name
from .changes import screen
from .cleanup import clean_up_branch
from .errors import CapacityRefused, PermanentError
from .events import Action, Push, event_time, merged_pull_request
from .git import Extras, Git
from .ledger import Entry, Ledger, archive_key, branch_keys
from .metrics import Metrics
from .outcome import Outcome
from .pipelines import Pipelines, Rule, SourceMode
from .records import Records
from .scheduler import Scheduler
from .settings import Settings
from .storage import Storage

log = logging.getLogger("branchbuild.job")

# Runs once a push's build is started and recorded (and again on a redelivery): supersede the
# branch's older running build, post on pull requests (issue 13). Raises to retry the job.
StartedHook = Callable[[Push, StartedBuild, str], Awaitable[None]]


@dataclass(frozen=True)
class Services:
    """What a job needs; built once at start-up and shared by every job."""

    settings: Settings
    git: Git
    storage: Storage
    backend: BuildBackend
    backend_name: str
    metrics: Metrics
    pipelines: Pipelines | None = None  # None: the environment's settings are the only rule
    # Hook for the build-outcomes work: stop a deleted branch's running build (service.cleanup).
    on_branch_deleted: Callable[[Push, Rule], Awaitable[None]] | None = None
    started_hooks: tuple[StartedHook, ...] = ()
    # Capacity scheduling (service.scheduler): None starts every build at once, as before.
    scheduler: Scheduler | None = None
    # The commit of a later push of the branch whose build started (service.supersede), if
    # any: an older push that comes back after it is superseded, not built.
    newer_started: Callable[[Push], Awaitable[str | None]] | None = None

    @property
    def ledger(self) -> Ledger:
        return Ledger(Records(self.storage.s3, self.storage.bucket, self.metrics))

    def rule_for(self, push: Push) -> Rule:
        if self.pipelines is None:
            return Rule.from_settings(self.settings)
        return self.pipelines.rule_for(push.repository)


@dataclass(frozen=True)
class JobResult:
    outcome: Outcome
    build_id: str | None
    key: str


async def run_job(push: Push, services: Services, *, recovering: bool = True) -> JobResult:
    """Build one push.

    ``recovering``: an earlier attempt at this branch may have been killed mid-upload (the
    message, or an older one of its branch, was received before), so abort any multipart
    upload it left open. A first attempt skips that S3 listing: an upload is only ever left
    open by a killed process, and a killed job's message always comes back (or, after SQS
    dead-letters it, the bucket's lifecycle rule removes the upload).

    Raises:
        PermanentError: the push can never be built (see :mod:`service.errors`).
        TransientError: a retry may succeed; nothing half-done is left behind.
    """
    s = services
    rule = s.rule_for(push)
    if push.action is Action.DELETED:  # only queued for a rule with on_delete: delete
        if s.scheduler is not None:  # its archives go: a push of it must not wait to start
            await s.scheduler.forget(push)
        await clean_up_branch(push, rule, s.storage, s.ledger, s.on_branch_deleted)
        return JobResult(Outcome.DELETED, None, "")
    assert push.commit is not None
    key = archive_key(rule.key_template, push)
    project = project_name(rule.project_template, push)
    direct = rule.source is SourceMode.CODECOMMIT
    if direct and s.backend_name != "codebuild":
        raise PermanentError(f"{rule.name} has source: codecommit, which needs CodeBuild")

    if recovering and not direct:
        await s.storage.abort_stale(branch_keys(rule.key_template, push))
    previous = await s.ledger.read(key)
    if previous is not None and previous.commit == push.commit and previous.ref == push.ref:
        log.info("already built as %s", previous.build_id)
        for hook in s.started_hooks:  # issue 13: finish what an interrupted attempt began
            await hook(push, StartedBuild(previous.build_id, previous.project), key)
        return JobResult(Outcome.DUPLICATE, previous.build_id, key)

    if s.newer_started is not None:
        newer = await s.newer_started(push)
        if newer is not None:
            log.info("superseded: the build of a later push (%s) already started", newer)
            return JobResult(Outcome.SUPERSEDED, None, key)

    # Direct source: nothing is fetched unless the rule needs the commit (markers, paths).
    if not direct or rule.needs_commit:
        async with AsyncExitStack() as stack:
            with _timed(s.metrics, "fetch"):
                fetched = await stack.enter_async_context(s.git.fetched(push))
            s.metrics.fetches.labels(result="hit" if fetched.cache_hit else "fetched").inc()
            skip = await screen(push, rule, s.git, fetched)
            if skip is not None:
                log.info("not built: %s", skip.reason)
                return JobResult(skip.outcome, None, key)
            if not direct:
                with _timed(s.metrics, "archive"):
                    await s.git.check_sizes(fetched)
                with _timed(s.metrics, "upload"):
                    async with s.git.archive(fetched, extras(rule, push)) as stream:
                        uploaded = await s.storage.upload(key, stream)
                s.metrics.upload_bytes.inc(uploaded.size)
                log.info(
                    "uploaded %s bytes in %s part(s) to %s", uploaded.size, uploaded.parts, key
                )

    request = BuildRequest(
        push=push,
        project=project,
        bucket=s.storage.bucket,
        key=key,
        extra_environment=rule.environment,
        codecommit_url=codecommit_url(push) if direct else None,
        retries=rule.retries,
    )
    return await _start_or_wait(request, rule, s)


async def _start_or_wait(request: BuildRequest, rule: Rule, s: Services) -> JobResult:
    """Start the build now, or (CodeBuild full, a running limit reached, others waiting
    ahead) leave the push to the scheduler's waiting store; either way the message is done."""
    scheduler = s.scheduler
    if scheduler is None:
        started = await start_recorded(request, s, checked=True)
        return JobResult(Outcome.BUILT, started.build_id, request.key)
    waits = await scheduler.admit(request, rule)
    if waits is not None:
        return JobResult(await scheduler.wait(request, rule, waits), None, request.key)
    try:
        started = await start_recorded(request, s, checked=True)
    except CapacityRefused as exc:  # CodeBuild is full: the push waits, its message is done
        s.metrics.capacity_refusals.labels(reason=exc.reason).inc()
        await scheduler.release(request, rule)
        return JobResult(await scheduler.wait(request, rule, exc.reason), None, request.key)
    # Another failure keeps the reserved slot: the retry finds it its own (same token), and
    # reconciliation frees it should the push never start.
    return JobResult(Outcome.BUILT, started.build_id, request.key)


async def start_recorded(
    request: BuildRequest, services: Services, *, checked: bool = False
) -> StartedBuild:
    """StartBuild, then the ledger and the started hooks (supersede, pull requests); what a
    job does once its archive is uploaded, and what the scheduler does for a waiting push.

    Unless ``checked`` (the job read the ledger already), a build the ledger names for this
    commit is not started again: its hooks are finished and it is returned (a dispatcher that
    crashed after StartBuild).

    Raises:
        CapacityRefused: CodeBuild is full (the push should wait).
        BranchbuildError: as :func:`run_job`.
    """
    s = services
    push = request.push
    if not checked:
        previous = await s.ledger.read(request.key)
        if previous is not None and previous.commit == push.commit and previous.ref == push.ref:
            already = StartedBuild(previous.build_id, previous.project)
            if s.scheduler is not None:
                await s.scheduler.started(request, s.rule_for(push), already)
            for hook in s.started_hooks:
                await hook(push, already, request.key)
            return already
    with _timed(s.metrics, "start_build"):
        started = await s.backend.start(request)
    if s.scheduler is not None:
        await s.scheduler.started(request, s.rule_for(push), started)
    s.metrics.builds.labels(backend=s.backend_name).inc()
    pushed_at = event_time(push)
    if pushed_at is not None:
        s.metrics.latency.observe(max(0.0, (datetime.now(UTC) - pushed_at).total_seconds()))
    log.info("started build %s", started.build_id, extra={"build_id": started.build_id})

    await s.ledger.started(
        request.key,
        Entry(
            commit=request.commit,
            ref=push.ref,
            build_id=started.build_id,
            project=request.project,
            repository=push.repository,
            pushed_at=(pushed_at or datetime.now(UTC)).astimezone(UTC).isoformat(),
            retries=str(started.retries) if started.retries else None,
        ),
    )
    for hook in s.started_hooks:  # issue 13: supersede, pull request feedback
        await hook(push, started, request.key)
    return started


def extras(rule: Rule, push: Push) -> Extras:
    """What the rule adds to the archive (docs/build-contents.md)."""
    # A merge build's commit is on no branch: its .git gets a detached HEAD.
    ref = push.ref if merged_pull_request(push) is None else "merge"
    return Extras(git_metadata_ref=ref if rule.git_metadata else None, submodules=rule.submodules)


@contextmanager
def _timed(metrics: Metrics, stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        metrics.stage_seconds.labels(stage=stage).observe(time.perf_counter() - start)
