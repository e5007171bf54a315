"""Capacity scheduling: branchbuild decides when a build starts; CodeBuild only runs it.

When CodeBuild is full (``AccountLimitExceededException``: the account's queue; a project's
``concurrentBuildLimit``; ``ThrottlingException`` beyond botocore's retries), or one of
branchbuild's own running limits is reached, a push whose archive is uploaded **waits** here
instead of failing:

* **The waiting store**: one document per branch,
  ``branchbuild-state/waiting/<sha256(repository, ref)>.json``, written by compare-and-swap
  (:mod:`service.records`). It holds everything StartBuild needs. A newer push of the branch
  replaces an older waiting one (counted ``superseded``) and keeps its place in line, so after
  an outage one build per branch starts. Only once the document is written is the push's SQS
  message deleted: nothing depends on redeliveries while it waits. A started (or
  dead-lettered) push leaves ``{}`` behind (2 bytes, skipped by size when listing), never a
  delete: a delete cannot be made conditional everywhere, and an unconditional one could
  remove a newer push written meanwhile.
* **The dispatcher** (:meth:`Scheduler.run`, in every instance) lists the store and starts
  what it can: higher rule ``priority`` first, then round robin across repositories (each
  repository's oldest first, and the repository served longest ago first: the turns,
  ``branchbuild-state/served.json``, are the fleet's), each entry claimed by compare-and-swap
  (``claim``: owner and expiry) so that two instances never start the same one. StartBuild
  keeps the push's idempotency token, and the ledger is checked first, so a crash between
  StartBuild and the store's update starts nothing twice and loses nothing (the claim lapses after
  ``BRANCHBUILD_VISIBILITY_TIMEOUT``). While pushes wait it lists every
  ``BRANCHBUILD_CAPACITY_PROBE_INTERVAL`` seconds (and at once when a push begins to wait here
  or a build ends); with nothing waiting, every ``IDLE_INTERVAL`` seconds (another instance's
  pushes, should it die). A push waiting longer than ``BRANCHBUILD_MAX_WAIT`` is dead-lettered
  with that reason.
* **Admission control**: with ``BRANCHBUILD_MAX_RUNNING`` or a rule's ``max_running``, a slot
  is reserved in the running set (``branchbuild-state/running.json``, compare-and-swap) before
  StartBuild, given the build id after it, and freed by the build's final state event
  (:meth:`Scheduler.build_changed`, an outcomes listener) or, should that event be lost, by
  ``BatchGetBuilds`` every ``BRANCHBUILD_RUNNING_RECONCILE_INTERVAL`` seconds.

This module is the one owner of these documents.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import anyio

from .aws import translated
from .build_state import FINAL, Change
from .builds import BuildRequest, StartedBuild
from .errors import BranchbuildError, CapacityRefused, MalformedEvent, PermanentError, StorageError
from .events import Push, merged_pull_request, parse_work
from .intake import work_message
from .metrics import Metrics
from .outcome import Outcome
from .pipelines import Pipelines, Rule
from .queue import Message, Queue
from .records import STATE_PREFIX, Document, Records
from .settings import Settings

log = logging.getLogger("branchbuild.scheduler")

WAITING_PREFIX = STATE_PREFIX + "waiting/"
RUNNING_KEY = STATE_PREFIX + "running.json"
# When the dispatchers last started a waiting push of each repository (the round robin's
# memory across rounds, fleet-wide): {"repositories": {name: epoch seconds}}.
SERVED_KEY = STATE_PREFIX + "served.json"
SERVED_FORGET = 86400.0  # an entry older than this is dropped (it ranks as never served)
# Listing interval while nothing waits (seconds): only another instance's pushes, should it
# die, are found this way; a push that begins to wait here wakes the dispatcher at once.
IDLE_INTERVAL = 30.0
# Reasons a push waits (the ``reason`` label of branchbuild_waiting_pushes).
BEHIND = "behind"  # others were waiting already: it takes its turn
FLEET_LIMIT = "fleet_limit"  # BRANCHBUILD_MAX_RUNNING
RULE_LIMIT = "rule_limit"  # the rule's max_running
# Its StartBuild (or what records it) failed for a reason other than capacity that may pass
# (a timeout, a 5xx): it is tried again every round, until BRANCHBUILD_MAX_WAIT, and never
# holds back the pushes behind it. The error is kept in the document's "error".
START_FAILED = "start_failed"
_EMPTY_SIZE = 2  # "{}"
_STARTED = "started"

#: Starts a waiting push's build and records it (ledger, supersede, pull requests):
#: :func:`service.job.start_recorded` with the service's shared services.
StartWaiting = Callable[[BuildRequest], Awaitable[StartedBuild]]
#: ``buildStatus`` by build id (:meth:`service.builds.CodeBuild.statuses`).
Statuses = Callable[[list[str]], Awaitable[dict[str, str]]]


def waiting_key(push: Push) -> str:
    digest = hashlib.sha256(f"{push.repository}\0{push.ref}".encode()).hexdigest()
    return WAITING_PREFIX + digest + ".json"


@dataclass(frozen=True)
class WaitingPush:
    """One branch's waiting push, as stored."""

    key: str  # of the document
    request: BuildRequest
    rule: str
    priority: int
    reason: str
    since: float  # when it began to wait (epoch seconds)
    claim_owner: str | None
    claim_until: float
    error: str = ""  # the last failure of its start (reason START_FAILED)

    @property
    def push(self) -> Push:
        return self.request.push

    def to_document(self) -> Document:
        r = self.request
        return {
            "push": r.push.to_json(),
            "project": r.project,
            "bucket": r.bucket,
            "archive": r.key,
            "environment": [list(pair) for pair in r.extra_environment],
            "codecommit_url": r.codecommit_url,
            "rule": self.rule,
            "priority": self.priority,
            "reason": self.reason,
            "since": self.since,
            "token": r.idempotency_token,
            "claim": {"owner": self.claim_owner, "until": self.claim_until}
            if self.claim_owner
            else None,
            "retries": r.retries,
            "error": self.error or None,
        }

    @classmethod
    def from_document(cls, key: str, data: Document) -> WaitingPush:
        """Raises: MalformedEvent (the document is not one this module wrote)."""
        try:
            claim = data.get("claim") or {}
            return cls(
                key=key,
                request=BuildRequest(
                    push=parse_work(str(data["push"])),
                    project=str(data["project"]),
                    bucket=str(data["bucket"]),
                    key=str(data["archive"]),
                    extra_environment=tuple(
                        (str(name), str(value)) for name, value in data.get("environment", [])
                    ),
                    codecommit_url=data.get("codecommit_url"),
                    retries=_retries(data.get("retries")),
                ),
                rule=str(data.get("rule", "")),
                priority=int(data.get("priority", 0)),
                reason=str(data.get("reason", "")),
                since=float(data["since"]),
                claim_owner=claim.get("owner"),
                claim_until=float(claim.get("until", 0)),
                error=str(data.get("error") or ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedEvent(f"unreadable waiting document {key}: {exc}") from None


def priority_of(rule: Rule, push: Push) -> int:
    """A waiting push's priority: a merge build's (``pull_requests.priority``), else the
    rule's."""
    if rule.merge_priority is not None and merged_pull_request(push) is not None:
        return rule.merge_priority
    return rule.priority


def dispatch_order(
    entries: list[WaitingPush], served: dict[str, float] | None = None
) -> list[WaitingPush]:
    """Higher priority first; within a priority, round robin across repositories (the
    oldest of each repository, then the second oldest of each, ...), and within a turn the
    repository served longest ago first (``served``: when a push of each last started; a
    round that starts one push at a time still goes round), then older first."""
    served = served or {}
    by_repository: dict[tuple[int, str], list[WaitingPush]] = {}
    for entry in sorted(entries, key=lambda e: e.since):
        by_repository.setdefault((entry.priority, entry.push.repository), []).append(entry)
    ranked = [
        (-priority, turn, served.get(repository, 0.0), entry.since, entry)
        for (priority, repository), queue in by_repository.items()
        for turn, entry in enumerate(queue)
    ]
    return [entry for *_, entry in sorted(ranked, key=lambda r: r[:4])]


class Scheduler:
    def __init__(
        self,
        records: Records,
        settings: Settings,
        metrics: Metrics,
        pipelines: Pipelines,
        work: Queue,
        *,
        statuses: Statuses | None = None,
    ) -> None:
        """``statuses`` None: the running set is freed by state events only (local builds)."""
        self.records = records
        self.settings = settings
        self.metrics = metrics
        self.pipelines = pipelines
        self.work = work
        self.statuses = statuses
        self.owner = uuid.uuid4().hex
        self.claim_seconds = float(settings.visibility_timeout)
        self._wake = anyio.Event()
        self._next_reconcile = 0.0
        self._reasons: set[str] = set()  # gauge labels set so far (reset to 0 when none wait)

    # -- the job's side -------------------------------------------------------------------

    def limited(self, rule: Rule) -> bool:
        """Whether this rule's builds take a slot in the running set."""
        return self.settings.max_running is not None or rule.max_running is not None

    async def admit(self, request: BuildRequest, rule: Rule) -> str | None:
        """None when the push may start now (a slot is reserved if limits apply), else why
        it must wait (others waiting ahead of it, or a limit reached).

        Raises:
            StorageError: S3 failed (transient).
        """
        if await self._anyone_waiting():
            return BEHIND
        if self.limited(rule):
            return await self._reserve(request, rule)
        return None

    async def started(self, request: BuildRequest, rule: Rule, build: StartedBuild) -> None:
        """Name the build in its reserved slot (so reconciliation can check it)."""
        if not self.limited(rule):
            return
        token = request.idempotency_token

        def change(current: Document | None) -> Document | None:
            builds = dict((current or {}).get("builds", {}))
            entry = builds.get(token)
            if entry is not None and entry.get("build_id") == build.build_id:
                return None
            builds[token] = (entry or self._slot(request, rule)) | {"build_id": build.build_id}
            return {"builds": builds}

        await self.records.update(RUNNING_KEY, change)

    async def release(self, request: BuildRequest, rule: Rule) -> None:
        """Free a reserved slot whose build did not start. Never raises (a leaked
        reservation lapses at reconciliation)."""
        if not self.limited(rule):
            return
        token = request.idempotency_token
        try:
            await self.records.update(RUNNING_KEY, lambda c: _without(c, {token}))
        except BranchbuildError as exc:
            log.warning("could not free the reserved slot of %s: %s", request.key, exc)

    async def wait(self, request: BuildRequest, rule: Rule, reason: str) -> Outcome:
        """Put the push in the waiting store (replacing an older waiting push of its branch);
        returns ``WAITING``, or ``SUPERSEDED`` when a newer push of the branch already waits.

        Raises:
            StorageError: S3 failed (transient: the message is retried, nothing is lost).
        """
        push = request.push
        key = waiting_key(push)
        mine = WaitingPush(
            key=key,
            request=request,
            rule=rule.name,
            priority=priority_of(rule, push),
            reason=reason,
            since=time.time(),
            claim_owner=None,
            claim_until=0,
        )
        outcome = Outcome.WAITING
        replaced: WaitingPush | None = None

        def change(current: Document | None) -> Document | None:
            nonlocal outcome, replaced
            outcome, replaced = Outcome.WAITING, None
            if current and "push" in current:
                try:
                    theirs = WaitingPush.from_document(key, current)
                except MalformedEvent as exc:  # never let it block the branch: replace it
                    log.warning("%s", exc)
                    return mine.to_document()
                if theirs.request.idempotency_token == request.idempotency_token:
                    return None  # a redelivery: it already waits
                if _later(theirs.push, push):
                    outcome = Outcome.SUPERSEDED
                    return None
                replaced = theirs
                # The branch keeps its place in line (and its wait counts from then).
                return mine.to_document() | {"since": theirs.since}
            return mine.to_document()

        await self.records.update(key, change)
        if outcome is Outcome.SUPERSEDED:
            log.info("not waiting: a newer push of the branch already waits")
            return outcome
        if replaced is not None:
            self.metrics.jobs.labels(outcome=Outcome.SUPERSEDED.value).inc()
            log.info(
                "the waiting push of %s is superseded by %s", replaced.push.commit, push.commit
            )
        log.info("waiting to start (%s)", reason)
        self._wake.set()
        return outcome

    async def forget(self, push: Push) -> None:
        """Drop the branch's waiting push (the branch was deleted and its archives go).

        Raises:
            StorageError: S3 failed (transient).
        """

        def change(current: Document | None) -> Document | None:
            return {} if current and "push" in current else None

        if await self.records.update(waiting_key(push), change) is not None:
            log.info("the branch was deleted: its waiting push is dropped")

    # -- the dispatcher -------------------------------------------------------------------

    async def run(self, stopping: anyio.Event, start: StartWaiting) -> None:
        """Start waiting pushes until ``stopping``; never raises for a failed round."""
        while not stopping.is_set():
            waiting = 0
            try:
                waiting = await self.dispatch(start)
                if self.statuses is not None and time.monotonic() >= self._next_reconcile:
                    self._next_reconcile = (
                        time.monotonic() + self.settings.running_reconcile_interval
                    )
                    await self.reconcile_running()
            except BranchbuildError as exc:
                self.metrics.errors.labels(kind=exc.kind).inc()
                log.error("dispatching waiting pushes failed: %s", exc)
                waiting = 1
            except Exception:  # a bug: the dispatcher goes on, the waiting pushes stay
                self.metrics.errors.labels(kind="unexpected").inc()
                log.exception("dispatching waiting pushes failed unexpectedly")
                waiting = 1
            interval = self.settings.capacity_probe_interval if waiting else IDLE_INTERVAL
            if self.statuses is not None:
                interval = min(interval, max(0.0, self._next_reconcile - time.monotonic()))
            with anyio.move_on_after(interval):
                async with anyio.create_task_group() as tg:

                    async def until(event: anyio.Event) -> None:
                        await event.wait()
                        tg.cancel_scope.cancel()

                    tg.start_soon(until, stopping)
                    tg.start_soon(until, self._wake)
            self._wake = anyio.Event()
        log.info("dispatcher stopped")

    async def dispatch(self, start: StartWaiting) -> int:
        """One round: start what may start, in order; returns how many still wait.

        Raises:
            StorageError: S3 failed (transient: the next round tries again).
        """
        entries = await self.listing()
        served = await self._served() if entries else {}
        now = time.time()
        gone: set[str] = set()
        blocked: str | None = None  # why the round stopped: every push behind waits for it
        refused: dict[str, str] = {}  # this round's refusals, by key: the gauge's reasons
        try:
            ordered = dispatch_order(entries, served)
            # Every push is checked for its wait, not only those before a refusal ends the round.
            for entry in ordered:
                if now - entry.since > self.settings.max_wait:
                    await self._expire(entry)
                    gone.add(entry.key)
            for entry in ordered:
                if entry.key in gone:
                    continue
                if entry.claim_owner not in (None, self.owner) and entry.claim_until > now:
                    continue  # another instance is starting it
                result = await self._try(entry, start, refused)
                if result == _STARTED:
                    gone.add(entry.key)
                elif result is not None:
                    blocked = result
                    break
        finally:
            left = [
                replace(e, reason=refused.get(e.key, e.reason))
                for e in entries
                if e.key not in gone
            ]
            self._gauge(left, blocked)
        return len(left)

    async def _try(
        self, entry: WaitingPush, start: StartWaiting, refused: dict[str, str] | None = None
    ) -> str | None:
        """Start one waiting push: ``_STARTED``, None (skipped: its own limit, a lost claim, a
        project's limit) or the reason nothing more may start this round. A capacity refusal's
        reason goes in ``refused``, by the entry's key."""
        rule = self.pipelines.rule_for(entry.push.repository)
        if self.limited(rule):  # a full running set stops here, before any write but its reason
            why = _refusal(await running_builds(self.records), entry.request, rule, self.settings)
            if why is not None:
                await self._held(entry, why, refused)
                return why if why == FLEET_LIMIT else None
        # The claim first: only its holder reserves, names or frees this push's slot (an
        # instance that lost the claim must not free the slot the winner is starting with).
        if not await self._claim(entry):
            return None
        if self.limited(rule):
            why = await self._reserve(entry.request, rule)
            if why is not None:  # taken meanwhile by another instance
                await self._unclaim(entry, why)
                if refused is not None:
                    refused[entry.key] = why
                return why if why == FLEET_LIMIT else None
        try:
            build = await start(entry.request)
        except CapacityRefused as exc:
            await self.release(entry.request, rule)
            await self._unclaim(entry, exc.reason)
            self.metrics.capacity_refusals.labels(reason=exc.reason).inc()
            if refused is not None:
                refused[entry.key] = exc.reason
            log.info("still refused (%s): %s", exc.reason, exc)
            return None if exc.reason == "project_limit" else exc.reason
        # Other failures keep a reserved slot (the build may have started before the failure):
        # reconciliation frees it.
        except PermanentError as exc:
            await self._dead_letter(entry, str(exc), exc.kind)
            return _STARTED  # gone from the store, either way
        except Exception as exc:  # noqa: BLE001 (a bug included: it must not stop the round)
            # This push's failure, not the round's: it is tried again next round and the
            # pushes behind it go on (raising here stopped every round at this push, so all
            # behind it waited until BRANCHBUILD_MAX_WAIT and were dead-lettered as timed out).
            await self._unclaim(entry, START_FAILED, error=f"{type(exc).__name__}: {exc}")
            kind = exc.kind if isinstance(exc, BranchbuildError) else "unexpected"
            self.metrics.errors.labels(kind=kind).inc()
            if refused is not None:
                refused[entry.key] = START_FAILED
            log.warning(
                "starting the waiting push of %s %s failed; tried again next round: %s",
                entry.push.repository,
                entry.push.ref,
                exc,
            )
            return None
        await self._done(entry)
        await self._serve(entry.push.repository)
        waited = max(0.0, time.time() - entry.since)
        self.metrics.wait_seconds.observe(waited)
        log.info(
            "started build %s of %s %s after waiting %.0f s",
            build.build_id,
            entry.push.repository,
            entry.push.ref,
            waited,
            extra={"build_id": build.build_id},
        )
        return _STARTED

    async def listing(self) -> list[WaitingPush]:
        """Every waiting push of the fleet (see :func:`waiting_pushes`)."""
        return await waiting_pushes(self.records)

    async def _anyone_waiting(self) -> bool:
        return bool(await _waiting_keys(self.records, limit=1))

    def _gauge(self, entries: list[WaitingPush], blocked: str | None) -> None:
        counts: dict[str, int] = {}
        for entry in entries:
            # A push waiting its turn waits, in the end, for what stopped the round.
            reason = blocked if blocked and entry.reason == BEHIND else entry.reason
            counts[reason] = counts.get(reason, 0) + 1
        for reason in self._reasons | counts.keys():
            self.metrics.waiting.labels(reason=reason).set(counts.get(reason, 0))
        self._reasons |= counts.keys()

    async def _served(self) -> dict[str, float]:
        """When a waiting push of each repository last started (empty if unreadable: the
        order is then by age alone for a round)."""
        try:
            current = await self.records.read(SERVED_KEY)
        except BranchbuildError as exc:
            log.warning("could not read %s: %s", SERVED_KEY, exc)
            return {}
        found = (current.data if current else {}).get("repositories", {})
        if not isinstance(found, dict):
            return {}
        return {
            str(name): float(when) for name, when in found.items() if isinstance(when, int | float)
        }

    async def _serve(self, repository: str) -> None:
        """Record that a push of ``repository`` started (its turn is taken). Never raises."""
        now = time.time()

        def change(current: Document | None) -> Document | None:
            found = (current or {}).get("repositories", {})
            kept = {
                name: when
                for name, when in (found.items() if isinstance(found, dict) else [])
                if isinstance(when, int | float) and now - when < SERVED_FORGET
            }
            return {"repositories": kept | {repository: now}}

        try:
            await self.records.update(SERVED_KEY, change)
        except BranchbuildError as exc:
            log.warning("could not record the turn of %s: %s", repository, exc)

    async def _claim(self, entry: WaitingPush) -> bool:
        token = entry.request.idempotency_token
        now = time.time()
        won = False

        def change(current: Document | None) -> Document | None:
            nonlocal won
            won = False
            if not current or current.get("token") != token:
                return None  # started meanwhile, or replaced by a newer push
            claim = current.get("claim") or {}
            if claim.get("owner") not in (None, self.owner) and claim.get("until", 0) > now:
                return None
            won = True
            return current | {"claim": {"owner": self.owner, "until": now + self.claim_seconds}}

        await self.records.update(entry.key, change)
        return won

    async def _held(self, entry: WaitingPush, reason: str, refused: dict[str, str] | None) -> None:
        """A running limit holds ``entry`` back: the gauge and the store (``branchbuild
        status``) say so; written only when the reason changes. Never raises."""
        if refused is not None:
            refused[entry.key] = reason
        if entry.reason == reason:
            return
        token = entry.request.idempotency_token

        def change(current: Document | None) -> Document | None:
            if not current or current.get("token") != token or current.get("reason") == reason:
                return None
            return current | {"reason": reason}

        try:
            await self.records.update(entry.key, change)
        except BranchbuildError as exc:  # only what status shows; the next round tries again
            log.warning("could not record why %s waits: %s", entry.key, exc)

    async def _unclaim(self, entry: WaitingPush, reason: str, error: str | None = None) -> None:
        token = entry.request.idempotency_token

        def change(current: Document | None) -> Document | None:
            if not current or current.get("token") != token:
                return None
            return current | {"claim": None, "reason": reason, "error": error}

        try:
            await self.records.update(entry.key, change)
        except BranchbuildError as exc:  # the claim lapses by itself
            log.warning("could not release the claim on %s: %s", entry.key, exc)

    async def _done(self, entry: WaitingPush) -> None:
        """Empty the branch's document, unless a newer push replaced it meanwhile."""
        token = entry.request.idempotency_token

        def change(current: Document | None) -> Document | None:
            if not current or current.get("token") != token:
                return None
            return {}

        await self.records.update(entry.key, change)

    async def _expire(self, entry: WaitingPush) -> None:
        hours = self.settings.max_wait / 3600
        if entry.reason == START_FAILED:  # not capacity: say what failed
            reason = (
                f"its build could not be started within BRANCHBUILD_MAX_WAIT ({hours:g} h); "
                f"last error: {entry.error}"
            )
            kind = START_FAILED
        else:
            reason = (
                f"waited longer than BRANCHBUILD_MAX_WAIT ({hours:g} h) for CodeBuild capacity"
                f" (last: {entry.reason})"
            )
            kind = "capacity_timeout"
        if await self._claim(entry):
            await self._dead_letter(entry, reason, kind)

    async def _dead_letter(self, entry: WaitingPush, reason: str, kind: str) -> None:
        outgoing = work_message(entry.push)
        message = Message(
            id=f"waited:{entry.request.idempotency_token}",
            receipt="",
            body=outgoing.body,
            group=outgoing.group,
            receive_count=0,
            sent_at_ms=0,
        )
        if not await self.work.dead_letter(message, reason=reason, kind=kind, delete=False):
            await self._unclaim(entry, entry.reason)
            log.error("could not dead-letter the waiting push %s; kept", entry.push.commit)
            return
        await self._done(entry)
        self.metrics.jobs.labels(outcome=Outcome.DEAD_LETTERED.value).inc()
        self.metrics.wait_seconds.observe(max(0.0, time.time() - entry.since))
        log.error(
            "dead-lettered the waiting push of %s %s: %s",
            entry.push.repository,
            entry.push.ref,
            reason,
        )

    # -- the running set ------------------------------------------------------------------

    def _slot(self, request: BuildRequest, rule: Rule) -> Document:
        return {"rule": rule.name, "archive": request.key, "build_id": None, "since": time.time()}

    async def _reserve(self, request: BuildRequest, rule: Rule) -> str | None:
        token = request.idempotency_token
        why: str | None = None

        def change(current: Document | None) -> Document | None:
            nonlocal why
            builds = dict((current or {}).get("builds", {}))
            why = _refusal(builds, request, rule, self.settings)
            if why is not None or token in builds:
                return None  # refused, or already ours (a redelivery, a claim taken over)
            builds[token] = self._slot(request, rule)
            return {"builds": builds}

        await self.records.update(RUNNING_KEY, change)
        return why

    async def build_changed(self, change: Change) -> None:
        """Outcomes listener: a build's final state frees its slot, and wakes the dispatcher."""
        after = change.after
        if after is None or after.status not in FINAL:
            return
        build_id = after.build_id

        def remove(current: Document | None) -> Document | None:
            builds = (current or {}).get("builds", {})
            gone = {t for t, b in builds.items() if b.get("build_id") == build_id}
            return _without(current, gone)

        await self.records.update(RUNNING_KEY, remove)
        self._wake.set()

    async def reconcile_running(self) -> int:
        """Free the slots of builds that ended without their event reaching us (BatchGetBuilds)
        and of reservations whose StartBuild never happened; returns how many were freed.

        Raises:
            StorageError, BuildError: transient.
        """
        if self.statuses is None:
            return 0
        current = await self.records.read(RUNNING_KEY)
        builds: dict[str, Document] = (current.data if current else {}).get("builds", {})
        ids = [str(b["build_id"]) for b in builds.values() if b.get("build_id")]
        if not builds:
            return 0
        statuses = await self.statuses(ids) if ids else {}
        lapse = time.time() - max(60.0, 3 * self.claim_seconds)
        gone = {
            token
            for token, b in builds.items()
            if (b.get("build_id") and statuses.get(str(b["build_id"]), "SUCCEEDED") in FINAL)
            or (not b.get("build_id") and float(b.get("since", 0)) < lapse)
        }
        if gone:
            await self.records.update(RUNNING_KEY, lambda c: _without(c, gone))
            log.info("freed %s slot(s) of builds that ended without an event", len(gone))
            self._wake.set()
        return len(gone)


async def waiting_pushes(records: Records) -> list[WaitingPush]:
    """Every waiting push of the fleet (unreadable documents are logged and left out); also
    what ``branchbuild status`` shows.

    Raises:
        StorageError: S3 failed (transient).
    """
    entries: list[WaitingPush] = []
    for key in await _waiting_keys(records):
        current = await records.read(key)
        if current is None or "push" not in current.data:
            continue
        try:
            entries.append(WaitingPush.from_document(key, current.data))
        except MalformedEvent as exc:
            log.warning("%s", exc)
    return entries


async def running_builds(records: Records) -> dict[str, Document]:
    """The running set (builds holding a slot), by idempotency token.

    Raises:
        StorageError: S3 failed (transient).
    """
    current = await records.read(RUNNING_KEY)
    builds = (current.data if current else {}).get("builds", {})
    return dict(builds) if isinstance(builds, dict) else {}


async def _waiting_keys(records: Records, limit: int | None = None) -> list[str]:
    """The keys of the non-empty waiting documents (all, or the first ``limit``)."""
    keys: list[str] = []
    pages = records.s3.get_paginator("list_objects_v2")
    with translated(f"list {WAITING_PREFIX}", transient=StorageError):
        async for page in pages.paginate(Bucket=records.bucket, Prefix=WAITING_PREFIX):
            keys += [o["Key"] for o in page.get("Contents", []) if o.get("Size", 0) > _EMPTY_SIZE]
            if limit is not None and len(keys) >= limit:
                break  # no further page is requested
    return keys


def _refusal(
    builds: dict[str, Document], request: BuildRequest, rule: Rule, settings: Settings
) -> str | None:
    """Why the running set ``builds`` has no slot for ``request`` (None: it has one, or
    holds one for it already)."""
    if request.idempotency_token in builds:
        return None
    fleet, own = settings.max_running, rule.max_running
    if fleet is not None and len(builds) >= fleet:
        return FLEET_LIMIT
    if own is not None and sum(b.get("rule") == rule.name for b in builds.values()) >= own:
        return RULE_LIMIT
    return None


def _without(current: Document | None, tokens: set[str]) -> Document | None:
    builds = dict((current or {}).get("builds", {}))
    if not tokens & builds.keys():
        return None
    return {"builds": {t: b for t, b in builds.items() if t not in tokens}}


def _later(theirs: Push, ours: Push) -> bool:
    """Whether the waiting push is later than ``ours`` (a redriven old message)."""
    return isinstance(theirs.time, str) and isinstance(ours.time, str) and theirs.time > ours.time


def _retries(value: Any) -> int | None:
    """A waiting push's rule ``retries`` (absent in documents written before it existed)."""
    return value if isinstance(value, int) and 0 <= value <= 10 else None
