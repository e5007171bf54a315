"""Stop the still-running build of an older commit once a newer commit of its branch started.

"The current build of this branch" is a small document in the artifact bucket
(``branchbuild-state/branches/<sha256(repository, ref)>.json``), replaced by compare-and-swap
(:mod:`service.records`): it survives restarts and holds across service instances. After
StartBuild, a job makes its build the current one and stops the one it replaced:

1. the older build's ledger entry is marked ``superseded_by`` the newer commit (first, so
   that its ``STOPPED`` event, however fast, is reported as superseded);
2. ``StopBuild`` (the local build backend's own stop under ``make run``); a build that
   already ended is left as it is.

Both steps are idempotent: a redelivered job (which finds its build already current) does
them again. Branches matching ``BRANCHBUILD_KEEP_RUNNING_BRANCHES`` and tags are left alone.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from botocore.exceptions import ClientError

from .aws import error_code, translated
from .build_state import FINAL
from .builds import StartedBuild
from .errors import BuildError, PermanentError
from .events import Push, RefType
from .ledger import Entry, Ledger
from .metrics import Metrics
from .pipelines import Pipelines, Rule
from .records import STATE_PREFIX, Document, Records
from .settings import Settings

if TYPE_CHECKING:
    from types_aiobotocore_codebuild import CodeBuildClient

log = logging.getLogger("branchbuild.supersede")

BRANCHES_PREFIX = STATE_PREFIX + "branches/"
# StopBuild on a build that already ended (or is gone): nothing left to stop.
_ENDED_CODES = {"InvalidInputException", "ResourceNotFoundException"}


@runtime_checkable
class LocalStop(Protocol):
    """A build backend that stops its own builds (``localdev.builder.LocalBuilds``)."""

    async def stop(self, build_id: str) -> bool: ...


def current_key(push: Push) -> str:
    digest = hashlib.sha256(f"{push.repository}\0{push.ref}".encode()).hexdigest()
    return BRANCHES_PREFIX + digest + ".json"


class Supersede:
    def __init__(
        self,
        records: Records,
        codebuild: CodeBuildClient | None,
        settings: Settings,
        metrics: Metrics,
        pipelines: Pipelines | None = None,
        *,
        local: LocalStop | None = None,
    ) -> None:
        """``codebuild`` None: builds are stopped with ``local`` (the local backend), or, with
        neither, only marked superseded (the branch's current build is still kept).
        ``pipelines``: a repository's rule may name its own keep-running branches."""
        self.records = records
        self.codebuild = codebuild
        self.local = local
        self.settings = settings
        self.metrics = metrics
        self.pipelines = pipelines

    def applies(self, push: Push) -> bool:
        kept = self.settings.keep_running_branches
        if self.pipelines is not None:
            rule = self.pipelines.rule_for(push.repository)
            if rule.keep_running_branches is not None:
                kept = rule.keep_running_branches
        return push.ref_type is RefType.BRANCH and not any(
            fnmatchcase(push.name, pattern) for pattern in kept
        )

    async def branch_deleted(self, push: Push, rule: Rule) -> None:
        """Stop the deleted branch's running build (a rule's ``on_delete: delete``), before
        its archives and ledger entries go. Kept branches are left alone.

        Raises:
            StorageError: S3 failed (transient: the deletion is retried).
            BuildError: StopBuild failed (transient).
        """
        if not self.applies(push):
            return
        current = await self.records.read(current_key(push))
        if current is None:
            return
        build_id, archive = current.data.get("build_id"), current.data.get("archive")
        if isinstance(build_id, str) and isinstance(archive, str):
            await self._stop(build_id, archive, push, reason="branch deleted")

    async def newer_started(self, push: Push) -> str | None:
        """The commit of a later push of ``push``'s branch whose build already started, if any.

        SQS FIFO hands a branch's pushes over in order, so this finds something only for a
        push that comes back out of order: redriven from the dead-letter queue, or re-sent
        after the queue's 5-minute deduplication window. Building it would make an older tree
        the branch's newest build.

        Raises:
            StorageError: S3 failed (transient).
        """
        if not self.applies(push):
            return None
        current = await self.records.read(current_key(push))
        if current is None or current.data.get("commit") == push.commit:
            return None
        if not _newer(current.data, push):
            return None
        return str(current.data.get("commit"))

    async def started(self, push: Push, build: StartedBuild, archive: str) -> None:
        """Make ``build`` the branch's current build and stop the one it replaced.

        Raises:
            StorageError: S3 failed (transient: the job is retried, and this runs again).
            BuildError: StopBuild failed (transient).
        """
        if not self.applies(push):
            return
        mine: Document = {
            "repository": push.repository,
            "ref": push.ref,
            "commit": push.commit,
            "build_id": build.build_id,
            "archive": archive,
            "time": push.time,
        }
        replaced: Document | None = None

        def change(current: Document | None) -> Document | None:
            nonlocal replaced
            replaced = None
            if current is not None and current.get("build_id") == build.build_id:
                replaced = current.get("replaced")  # a redelivery: finish what it started
                return None
            if current is not None and _newer(current, push):
                log.warning(
                    "not superseding %s: it is for a newer push than %s",
                    current.get("build_id"),
                    push.commit,
                )
                return None
            if current is not None:
                replaced = {k: current.get(k) for k in ("commit", "build_id", "archive")}
            return mine | {"replaced": replaced}

        await self.records.update(current_key(push), change)
        if replaced and replaced.get("build_id") and replaced.get("archive"):
            await self._stop(str(replaced["build_id"]), str(replaced["archive"]), push)

    async def _stop(self, build_id: str, archive: str, newer: Push, reason: str = "") -> None:
        ended = False
        # A deleted branch has no newer commit: its build is recorded as stopped for that.
        superseded_by = newer.commit or reason
        attempt = build_id  # CodeBuild's auto-retry of it, if the ledger follows one

        def mark(entry: Entry | None) -> Entry | None:
            nonlocal ended, attempt
            if entry is None or entry.build_id != build_id:
                return None
            attempt = entry.current_build
            ended = entry.status in FINAL
            if ended or entry.superseded_by == superseded_by:
                return None
            return replace(entry, superseded_by=superseded_by)

        await Ledger(self.records).update(archive, mark)
        if ended:
            log.info("the superseded build %s had already ended", build_id)
            return
        build_id = attempt
        if self.codebuild is None:
            if self.local is None:
                log.info("build %s is superseded; this build backend cannot stop it", build_id)
            elif await self.local.stop(build_id):
                self.metrics.builds_stopped.inc()
                log.info("stopped local build %s: superseded by %s", build_id, superseded_by)
            else:
                log.info("the superseded local build %s is not running here", build_id)
            return
        try:
            with translated(f"stop build {build_id}", transient=BuildError):
                await self.codebuild.stop_build(id=build_id)
        except PermanentError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and error_code(cause) in _ENDED_CODES:
                log.info("the superseded build %s has already ended: %s", build_id, exc)
                return
            # Never dead-letter a push whose own build started because of this: say it loudly.
            log.error("could not stop the superseded build %s: %s", build_id, exc)
            self.metrics.errors.labels(kind=exc.kind).inc()
            return
        self.metrics.builds_stopped.inc()
        log.info(
            "stopped build %s: superseded by %s",
            build_id,
            superseded_by,
            extra={"build_id": build_id},
        )


def _newer(current: Document, push: Push) -> bool:
    """Whether the current build is for a push later than ``push`` (a redriven old message)."""
    theirs, ours = current.get("time"), push.time
    return isinstance(theirs, str) and isinstance(ours, str) and theirs > ours
