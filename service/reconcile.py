"""Pick up pushes whose events were lost (CodeCommit delivers its events on a best-effort basis).

Every ``BRANCHBUILD_RECONCILE_INTERVAL`` seconds, the instance holding the lease lists the
branches of every repository the configuration names for reconciliation (``git ls-remote``,
one call per repository, over the same SSH path as fetches) and compares them with the heads
it recorded last time (an S3 object per repository):

* a head that changed since then (or a new branch), which its rule would build and whose
  archive has no ledger entry (no build started), is queued on the work queue as a push with
  ``origin: reconcile``, its old commit being the recorded one (so path filters apply). A push
  still pending is not queued twice: the work queue's deduplication id is the same
  (repository, ref, commit) for a minute-old event's push, and a later duplicate finds the
  ledger (``duplicate``) or is superseded; StartBuild's idempotency token is the last guard;
* the first contact with a repository only records its heads: no storm of builds when the
  service, or a repository, is added.

Only one instance reconciles at a time: a lease document written by compare-and-swap
(:mod:`service.records`: create only if absent, renew or take over an expired one only if
it is still the version read).
A holder renews it at each run; a dead holder's lease lapses after 1.5 intervals.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import TYPE_CHECKING

import anyio

from .aws import translated
from .decide import Skip, decide
from .errors import BranchbuildError, StorageError
from .events import Action, Push, RefType
from .git import Git
from .intake import work_message
from .ledger import Ledger, archive_key
from .pipelines import Pipelines
from .queue import Queue
from .records import STATE_PREFIX, Records
from .settings import Settings
from .storage import Storage

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("branchbuild.reconcile")

LEASE_KEY = STATE_PREFIX + "reconcile.lease"


class Lease:
    """An S3 document naming the one instance that reconciles, until it expires; taken,
    renewed and released by compare-and-swap (:mod:`service.records`)."""

    def __init__(self, records: Records, *, duration: float) -> None:
        self.records = records
        self.duration = duration
        self.owner = uuid.uuid4().hex
        self._held = False

    async def release(self) -> None:
        """Let the lease lapse now (on shutdown), if it is still ours; never raises."""
        if not self._held:
            return
        self._held = False
        try:
            current = await self.records.read(LEASE_KEY)
            if current is not None and current.data.get("owner") == self.owner:
                lapsed = {"owner": self.owner, "expires": 0}
                await self.records.write(LEASE_KEY, lapsed, replacing=current)
        except StorageError as exc:
            log.warning("could not release the reconciliation lease: %s", exc)

    async def acquire(self) -> bool:
        """Take or renew the lease; False while another instance holds an unexpired one.

        Raises:
            StorageError: S3 failed (transient).
        """
        current = await self.records.read(LEASE_KEY)
        if current is not None and current.data.get("owner") != self.owner:
            try:
                expires = float(current.data.get("expires", 0))
            except (TypeError, ValueError):
                expires = 0.0  # an unreadable lease is no one's
            if expires > time.time():
                return False
        mine = {"owner": self.owner, "expires": time.time() + self.duration}
        self._held = await self.records.write(LEASE_KEY, mine, replacing=current)
        return self._held


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        pipelines: Pipelines,
        git: Git,
        storage: Storage,
        work: Queue,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.pipelines = pipelines
        self.git = git
        self.storage = storage
        self.work = work
        self.metrics = metrics
        self.records = Records(storage.s3, storage.bucket, metrics)
        self.ledger = Ledger(self.records)
        self.lease = Lease(self.records, duration=settings.reconcile_interval * 1.5)

    async def run(self, stopping: anyio.Event) -> None:
        """Reconcile every interval until stopping; never raises for a failed run. On the way
        out the lease is released, so another instance takes over at its next run."""
        try:
            await self._loop(stopping)
        finally:
            with anyio.CancelScope(shield=True):
                await self.lease.release()

    async def _loop(self, stopping: anyio.Event) -> None:
        while not stopping.is_set():
            with anyio.move_on_after(self.settings.reconcile_interval):
                await stopping.wait()
            if stopping.is_set() or not self.pipelines.current.reconcile_repositories:
                continue
            try:
                if not await self.lease.acquire():
                    self.metrics.reconcile_runs.labels(result="not_leader").inc()
                    continue
                await self.reconcile()
                self.metrics.reconcile_runs.labels(result="done").inc()
            except BranchbuildError as exc:
                self.metrics.reconcile_runs.labels(result="failed").inc()
                self.metrics.errors.labels(kind=exc.kind).inc()
                log.error("reconciliation failed: %s", exc)

    async def reconcile(self) -> int:
        """One run over every configured repository; returns how many pushes were queued."""
        config = self.pipelines.current
        assert config.reconcile_account is not None and config.reconcile_region is not None
        queued = 0
        for repository in config.reconcile_repositories:
            try:
                queued += await self._repository(
                    repository, config.reconcile_account, config.reconcile_region
                )
            except BranchbuildError as exc:  # one repository's failure never stops the rest
                self.metrics.errors.labels(kind=exc.kind).inc()
                log.error("reconciliation of %s failed: %s", repository, exc)
        return queued

    async def _repository(self, repository: str, account: str, region: str) -> int:
        heads = await self.git.list_heads(repository, region)
        state_key = f"{STATE_PREFIX}heads/{repository}.json"
        recorded = await self._read_state(state_key)
        if recorded is None:
            log.info(
                "first contact with %s: %s branch(es) recorded, none built", repository, len(heads)
            )
            await self._write_state(state_key, heads)
            return 0
        rule = self.pipelines.rule_for(repository)
        pushes = []
        for ref, commit in sorted(heads.items()):
            old = recorded.get(ref)
            if old == commit:
                continue
            push = Push(
                event_id=f"reconcile-{uuid.uuid4()}",
                account=account,
                region=region,
                repository=repository,
                ref_type=RefType.BRANCH,
                name=ref.removeprefix("refs/heads/"),
                action=Action.UPDATED if old else Action.CREATED,
                commit=commit,
                old_commit=old,
                origin="reconcile",
            )
            try:
                if isinstance(decide(push, self.settings, rule), Skip):
                    continue
            except BranchbuildError:
                continue  # not allowed (allow-lists): never queued
            entry = await self.ledger.read(archive_key(rule.key_template, push))
            if entry is not None and entry.commit == commit:
                continue
            pushes.append(push)
        if pushes:
            await self.work.send([work_message(push) for push in pushes])
            for push in pushes:
                log.info("missed push queued: %s %s at %s", repository, push.ref, push.commit)
            self.metrics.reconciled.inc(len(pushes))
        await self._write_state(state_key, heads)
        return len(pushes)

    async def _read_state(self, key: str) -> dict[str, str] | None:
        """The heads recorded last time; None when there are none (or they are unreadable):
        then this is a first contact, which records without building."""
        recorded = await self.records.read(key)
        if recorded is None or not recorded.data:
            return None
        return {str(k): str(v) for k, v in recorded.data.items()}

    async def _write_state(self, key: str, heads: dict[str, str]) -> None:
        with translated(f"write s3://{self.storage.bucket}/{key}", transient=StorageError):
            await self.storage.s3.put_object(
                Bucket=self.storage.bucket,
                Key=key,
                Body=json.dumps(heads, sort_keys=True).encode(),
                ContentType="application/json",
            )
