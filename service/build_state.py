"""How the builds branchbuild started end: ``CodeBuild Build State Change`` events → the ledger.

The pipeline's ``BuildStateRule`` puts CodeBuild's state events on the intake queue (message
group ``codebuild``, its own lane beside the pushes). Correlation is twofold:

* the build carries ``BRANCHBUILD_ARCHIVE`` (the archive's S3 key, set at StartBuild, never a
  secret), which names its ledger entry ``<archive>.build.json``;
* that ledger entry must name this very build id. A build without the variable, or one the
  ledger does not name (started by hand, a console "retry" that copied the variables), is
  ignored.

Events arrive late, twice and out of order, so the ledger only moves forward: nothing →
``IN_PROGRESS`` → a final state, and a final state is never replaced. Every change is a
compare-and-swap (:mod:`service.records`), so instances and redeliveries cannot clobber each
other, and a final state is counted once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Annotated, Self

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)

from .builds import RetryLink
from .errors import BranchbuildError, MalformedEvent, TransientError
from .events import Envelope, Model, detail_type, iso, load, parse_time, text, validated
from .ledger import Entry, Ledger, entry_key
from .metrics import Metrics
from .outcome import Outcome
from .queue import Message, Queue
from .records import Records
from .retries import RETRYING, Lookup, find_attempt, move, will_retry
from .settings import Settings

log = logging.getLogger("branchbuild.outcomes")

BUILD_DETAIL_TYPE = "CodeBuild Build State Change"
BUILD_SOURCE = "aws.codebuild"
PULL_REQUEST_DETAIL_TYPE = "CodeCommit Pull Request State Change"
ARCHIVE_VARIABLE = "BRANCHBUILD_ARCHIVE"

IN_PROGRESS = "IN_PROGRESS"
FINAL = frozenset({"SUCCEEDED", "FAILED", "FAULT", "STOPPED", "TIMED_OUT"})
# "superseded" is a stopped build that a newer commit of its branch replaced.
RESULT_LABELS = ("succeeded", "failed", "fault", "stopped", "timed_out", "superseded")

_BUILD_ARN = re.compile(
    r"arn:aws[a-z-]*:codebuild:[a-z0-9-]+:[0-9]{12}:build/"
    r"(?P<id>[A-Za-z0-9][A-Za-z0-9_-]{1,254}:[A-Za-z0-9-]{1,64})"
)


@dataclass(frozen=True)
class BuildState:
    """One ``CodeBuild Build State Change`` event, as far as branchbuild needs it."""

    event_id: str
    time: datetime
    build_id: str  # "project:uuid", as StartBuild returns it
    project: str
    status: str
    archive: str | None
    started_at: datetime | None
    logs: str | None


@dataclass(frozen=True)
class Change:
    """What recording an event did to the ledger entry of ``archive``; ``after`` is
    ``before`` when the event changed nothing (listeners re-check: a retried event whose
    first delivery changed the ledger but failed a listener reaches them again)."""

    archive: str
    before: Entry | None
    after: Entry | None

    @property
    def finished_now(self) -> bool:
        return (
            self.after is not None
            and self.after.status in FINAL
            and (self.before is None or self.before.status not in FINAL)
            and self.after is not self.before
        )


class _CodeBuild(Model):
    """A part of CodeBuild's event: a ``_`` in a field name is a ``-`` in the JSON."""

    model_config = ConfigDict(alias_generator=lambda name: name.replace("_", "-"))


def _as_object(value: object) -> object:
    return value if isinstance(value, dict) else None  # not an object: as if absent


def _skip_invalid(value: object, handler: ValidatorFunctionWrapHandler) -> object:
    try:
        return handler(value)
    except ValidationError:
        return None


def _start_time(value: object) -> datetime | None:
    """CodeBuild writes ``build-start-time`` as e.g. ``Sep 1, 2017 4:12:29 PM`` (UTC)."""
    try:
        return datetime.strptime(str(value), "%b %d, %Y %I:%M:%S %p").replace(tzinfo=UTC)
    except ValueError:
        return None


def _https(value: object) -> str | None:
    return value if isinstance(value, str) and value.startswith("https://") else None


def _time(value: object) -> datetime:
    parsed = parse_time(value)
    if parsed is None:
        shown = repr(value[:40]) if isinstance(value, str) else f"a JSON {type(value).__name__}"
        raise MalformedEvent(f"time is not an ISO 8601 time: {shown}")
    return parsed


def _status(value: str) -> str:
    if value != IN_PROGRESS and value not in FINAL:
        raise MalformedEvent(f"unknown build-status {value[:40]!r}")
    return value


def _build_id(arn: str) -> str:
    match = _BUILD_ARN.fullmatch(arn)
    if not match:
        raise MalformedEvent(f"build-id is not a CodeBuild build ARN: {arn[:120]!r}")
    return match["id"]


class _Variable(_CodeBuild):
    name: str
    value: str
    type: str = "PLAINTEXT"


class _Environment(_CodeBuild):
    # A variable CodeBuild would not send is skipped, not the event.
    environment_variables: list[Annotated[_Variable | None, WrapValidator(_skip_invalid)]] = []


class _Logs(_CodeBuild):
    deep_link: Annotated[str | None, BeforeValidator(_https)] = None


class _Information(_CodeBuild):
    environment: Annotated[_Environment | None, BeforeValidator(_as_object)] = None
    logs: Annotated[_Logs | None, BeforeValidator(_as_object)] = None
    build_start_time: Annotated[datetime | None, BeforeValidator(_start_time)] = None

    def variables(self) -> dict[str, str]:
        listed = self.environment.environment_variables if self.environment else []
        return {v.name: v.value for v in listed if v is not None and v.type == "PLAINTEXT"}


class _Detail(_CodeBuild):
    build_status: Annotated[str, text(2048), AfterValidator(_status)]
    build_id: Annotated[str, text(2048), AfterValidator(_build_id)]  # "project:uuid"
    project_name: Annotated[str, text(2048)]
    additional_information: _Information = _Information()

    @model_validator(mode="after")
    def _own_project(self) -> Self:
        if not self.build_id.startswith(self.project_name + ":"):
            raise MalformedEvent("build-id does not belong to project-name")
        return self


class _BuildStateEvent(Envelope):
    KIND = (BUILD_SOURCE, BUILD_DETAIL_TYPE)
    SENDER = "CodeBuild"

    id: Annotated[str, text(2048)]
    time: Annotated[datetime, BeforeValidator(_time)]
    detail: _Detail


def parse_build_state(body: str) -> BuildState:
    """Parse a ``CodeBuild Build State Change`` envelope.

    Raises:
        MalformedEvent: not such an event, or a field is missing or not what CodeBuild sends.
    """
    event = validated(_BuildStateEvent, load(body))
    detail, info = event.detail, event.detail.additional_information
    return BuildState(
        event_id=event.id,
        time=event.time,
        build_id=detail.build_id,
        project=detail.project_name,
        status=detail.build_status,
        archive=info.variables().get(ARCHIVE_VARIABLE),
        started_at=info.build_start_time,
        logs=info.logs.deep_link if info.logs else None,
    )


def advance(entry: Entry, state: BuildState) -> Entry | None:
    """The ledger entry after ``state``, or None when the event changes nothing (a duplicate,
    a late IN_PROGRESS after a final state, another build's or attempt's event). A failed
    attempt that CodeBuild retries is ``RETRYING``, not final (:mod:`service.retries`)."""
    if entry.current_build != state.build_id:
        return None
    current = entry.status
    if current in FINAL or current == RETRYING or (current == state.status):
        return None
    if state.status in FINAL and will_retry(entry, state.status):
        return replace(entry, status=RETRYING, logs=state.logs or entry.logs)
    new = replace(entry, status=state.status)
    # A retry's duration counts from the first attempt's start.
    if state.started_at is not None and (entry.attempt_number == 0 or new.started_at is None):
        new = replace(new, started_at=iso(state.started_at))
    elif new.started_at is None and state.status == IN_PROGRESS:
        new = replace(new, started_at=iso(state.time))
    if state.logs:
        new = replace(new, logs=state.logs)
    if state.status in FINAL:
        new = replace(new, ended_at=iso(state.time))
    return new


def result_label(entry: Entry) -> str:
    """The ``status`` label of ``branchbuild_build_results_total`` for a finished entry."""
    status = (entry.status or "").lower()
    if status == "stopped" and entry.superseded_by:
        return "superseded"
    return status if status in RESULT_LABELS else "other"


def duration(entry: Entry) -> float | None:
    start, end = parse_time(entry.started_at), parse_time(entry.ended_at)
    return None if start is None or end is None else max(0.0, (end - start).total_seconds())


# Called after each ledger change: the pull request feedback (service.pullrequests) listens.
Listener = Callable[[Change], Awaitable[None]]


class Outcomes:
    """Consumes the build state events of the intake queue and keeps the ledger current."""

    def __init__(
        self,
        records: Records,
        settings: Settings,
        metrics: Metrics,
        *,
        listeners: tuple[Listener, ...] = (),
        pull_requests: Callable[[str], Awaitable[str]] | None = None,
        retry_lookup: Lookup | None = None,
    ) -> None:
        """``retry_lookup``: where a build stands in CodeBuild's auto-retry chain
        (:meth:`service.builds.CodeBuild.retry_link`); None: retries are not followed."""
        self.ledger = Ledger(records)
        self.settings = settings
        self.metrics = metrics
        self.listeners = listeners
        self.pull_requests = pull_requests
        self.retry_lookup = retry_lookup

    @staticmethod
    def claims(body: str) -> bool:
        """Whether this handler (not the push intake) owns the message."""
        return detail_type(body) in {BUILD_DETAIL_TYPE, PULL_REQUEST_DETAIL_TYPE}

    async def handle(
        self,
        queue: Queue,
        message: Message,
        fail: Callable[[Message, BranchbuildError], Awaitable[Outcome]],
    ) -> None:
        """Record one event and settle its message (``fail``: the consumer's one settle path
        for a failed message); never raises for a bad event."""
        kind = "build_state"
        try:
            if detail_type(message.body) == PULL_REQUEST_DETAIL_TYPE:
                kind = "pull_request"
                if self.pull_requests is None:
                    outcome = "ignored"
                else:
                    outcome = await self.pull_requests(message.body)
            else:
                outcome = await self.record(parse_build_state(message.body))
        except BranchbuildError as exc:
            self.metrics.errors.labels(kind=exc.kind).inc()
            settled = await fail(message, exc)
            self.metrics.events.labels(event=kind, outcome=settled.value).inc()
            log.error(
                "%s event %s (receive %s): %s; %s",
                kind,
                message.id,
                message.receive_count,
                exc,
                settled.value,
                extra={"message_id": message.id},
            )
            return
        self.metrics.events.labels(event=kind, outcome=outcome).inc()
        if await queue.delete([message]):
            log.warning("could not delete event message %s; it will be recorded again", message.id)

    def _count(self, change: Change) -> None:
        if change.finished_now and change.after is not None:
            self.metrics.build_results.labels(status=result_label(change.after)).inc()
            took = duration(change.after)
            if took is not None:
                self.metrics.build_seconds.observe(took)

    def _maybe_retry(self, state: BuildState, entry: Entry) -> bool:
        """Whether an event of a build the entry does not name may be CodeBuild's retry."""
        return (
            state.build_id not in {entry.build_id, entry.current_build}
            and entry.retry_limit > 0
            and self.retry_lookup is not None
        )

    def _retried(
        self, state: BuildState, link: RetryLink, before: Entry | None, after: Entry | None
    ) -> None:
        if before is None or after is None or after.attempt_build_id != state.build_id:
            return
        if before.attempt_build_id != state.build_id:  # this event moved the entry to it
            self.metrics.build_retries.inc()
        log.info(
            "build %s is retry %s of %s",
            state.build_id,
            link.number,
            before.build_id,
            extra={"build_id": state.build_id, "event_id": state.event_id},
        )

    async def record(self, state: BuildState) -> str:
        """Apply one build state event to the ledger; returns the ``outcome`` label.

        Raises:
            TransientError: the ledger has no entry for the build yet (StartBuild returned
                but the job has not written it): retried, dead-lettered if it never appears.
            StorageError: S3 failed.
        """
        context = {"build_id": state.build_id, "event_id": state.event_id}
        if state.archive is None:
            log.info(
                "ignored: build %s was not started by branchbuild", state.build_id, extra=context
            )
            return "ignored"
        key = entry_key(state.archive)
        before: Entry | None = None
        link: RetryLink | None = None

        def change(entry: Entry | None) -> Entry | None:
            nonlocal before
            before = entry
            if entry is None:
                return None
            moved = move(entry, link) if link is not None else None
            return advance(moved or entry, state) or moved

        after = await self.ledger.update(state.archive, change)
        if before is None:
            raise TransientError(
                f"no ledger entry at {key} for build {state.build_id} (yet): "
                "not started by branchbuild, or StartBuild has not been recorded"
            )
        if self._maybe_retry(state, before):
            assert self.retry_lookup is not None
            link = await find_attempt(self.retry_lookup, before, state.build_id)
            if link is not None:
                after = await self.ledger.update(state.archive, change)
                self._retried(state, link, before, after)
                if before is None:  # the entry went meanwhile (the branch's clean-up)
                    return "ignored"
        if state.build_id not in {before.build_id, before.current_build} and link is None:
            log.info(
                "ignored: the ledger at %s names build %s, not %s",
                key,
                before.build_id,
                state.build_id,
                extra=context,
            )
            return "ignored"
        if after is None:
            log.info("stale %s event of %s", state.status, state.build_id, extra=context)
            await self._tell(Change(archive=state.archive, before=before, after=before))
            return "stale"
        change_ = Change(archive=state.archive, before=before, after=after)
        self._count(change_)
        log.info("build %s is %s", state.build_id, state.status, extra=context)
        await self._tell(change_)
        return "recorded"

    async def _tell(self, change: Change) -> None:
        """Every listener hears of the change, whatever another one raised (a notification SNS
        refuses must not keep the badge or the running slot behind); then the first error is
        raised, and the event is retried (each listener is idempotent)."""
        first: BaseException | None = None
        for listener in self.listeners:
            try:
                await listener(change)
            except Exception as exc:  # each listener on its own
                log.warning("a build state listener failed: %s", exc)
                first = first or exc
        if first is not None:
            raise first
