"""The intake stage: EventBridge's single FIFO lane → one work-queue lane per branch.

EventBridge gives every message of a rule the same static MessageGroupId, so the intake queue
is one serial lane. Intake is cheap (parse, decide, re-send), so that lane moves fast; the
expensive work happens on the work queue, where each repository+branch is its own group:
branches run in parallel, pushes to one branch stay in order.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc

from .build_state import Outcomes
from .decide import Skip, decide
from .errors import BranchbuildError, MalformedEvent, PermanentError, Unexpected, unexpected
from .events import OtherEvent, Push, parse_event
from .health import Health
from .metrics import Metrics
from .outcome import Outcome
from .pipelines import Pipelines
from .queue import Leases, Message, Outgoing, Queue, consume
from .settings import Settings

log = logging.getLogger("branchbuild.intake")


def work_message(push: Push) -> Outgoing:
    """Group per repository+ref (order within a branch); dedup per repository+ref+commit."""
    # A deletion (service.cleanup) has no commit: its own id, from the deleted commit.
    commit = push.commit or f"deleted:{push.old_commit}"
    group = hashlib.sha256(f"{push.repository}\0{push.ref}".encode()).hexdigest()
    dedup = hashlib.sha256(f"{push.repository}\0{push.ref}\0{commit}".encode()).hexdigest()
    return Outgoing(body=push.to_json(), group=group, dedup=dedup)


class Intake:
    def __init__(
        self,
        intake: Queue,
        work: Queue,
        settings: Settings,
        metrics: Metrics,
        health: Health,
        leases: Leases,
        pipelines: Pipelines | None = None,
        outcomes: Outcomes | None = None,
        on_push: Callable[[Push], Awaitable[None]] | None = None,
    ) -> None:
        self.pipelines = pipelines or Pipelines.from_settings(settings)
        self.outcomes = outcomes  # issue 13: build state and pull request events
        self.intake = intake
        self.work = work
        self.settings = settings
        self.metrics = metrics
        self.health = health
        self.leases = leases
        # Issue 25: every push, built or not (a protected destination too), to merge builds.
        self.on_push = on_push

    async def run(
        self,
        stopping: anyio.Event,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Consume until ``stopping`` is set; never raises for a bad message or a failed call.

        A batch is held (heartbeated) from its receive until it is settled: the intake lane
        is one FIFO group, so a short visibility timeout is what bounds its stall when an
        instance dies holding a batch.
        """
        self.health.beat("intake")
        task_status.started()
        batches = consume(
            self.intake,
            stopping,
            visibility=self.settings.intake_visibility_timeout,
            wait=lambda: self.settings.wait_time,
            health=self.health,
            metrics=self.metrics,
            loop="intake",
        )
        async for messages in batches:
            self.leases.hold(self.intake, messages)
            try:
                await self.handle(messages)
            except BranchbuildError as exc:  # the batch comes back after its visibility
                self.metrics.errors.labels(kind=exc.kind).inc()
                log.error("intake: %s", exc)
            except Exception:  # a bug: never end the loop; unsettled messages come back
                self.metrics.errors.labels(kind=Unexpected.kind).inc()
                log.exception("intake: unexpected error; the batch comes back after its timeout")
            finally:
                self.leases.drop(messages)

    async def handle(self, messages: list[Message]) -> None:
        """Forward buildable pushes in order, acknowledge skips, release poison."""
        forward: list[tuple[Message, Push]] = []
        skipped: list[tuple[Message, Push | OtherEvent]] = []
        for message in messages:
            try:
                if self.outcomes is not None and self.outcomes.claims(message.body):
                    await self.outcomes.handle(self.intake, message, self._fail)  # settles it
                    continue
                event = parse_event(message.body)
                rule = None
                if isinstance(event, Push):
                    rule = self.pipelines.rule_for(event.repository)
                decision = decide(event, self.settings, rule)
            except PermanentError as exc:
                await self._reject(message, exc)
                continue
            except Exception as exc:  # a bug or an unmapped failure: settle this one, go on
                await self._unexpected(message, exc)
                continue
            kind = _event_label(event)
            if isinstance(decision, Skip):
                log.info(
                    "skipped: %s",
                    decision.reason,
                    extra={"message_id": message.id, "event_id": event.event_id},
                )
                self.metrics.events.labels(event=kind, outcome=decision.outcome.value).inc()
                skipped.append((message, event))
            else:
                forward.append((message, decision))
        try:
            await self.work.send([work_message(push) for _, push in forward])
        except Exception as exc:  # a BranchbuildError, or a bug: the pushes are retried
            error = exc if isinstance(exc, BranchbuildError) else unexpected(exc)
            self.metrics.errors.labels(kind=error.kind).inc()
            for message, push in forward:
                outcome = await self._fail(message, error)
                self.metrics.events.labels(event=_event_label(push), outcome=outcome.value).inc()
                log.warning(
                    "could not queue the push: %s; %s",
                    error,
                    outcome.value,
                    extra={"message_id": message.id},
                )
            forward = []
        for message, push in forward:
            log.info(
                "queued %s %s at %s",
                push.repository,
                push.ref,
                push.commit,
                extra={"message_id": message.id, "event_id": push.event_id},
            )
            self.metrics.events.labels(event=_event_label(push), outcome=Outcome.QUEUED.value).inc()
        done = await self._after_queued([*forward, *skipped])
        undeleted = await self.intake.delete(done)
        for message in undeleted:
            log.warning("could not delete intake message %s; it will be deduplicated", message.id)

    async def _after_queued(
        self, settled: list[tuple[Message, Push | OtherEvent]]
    ) -> list[Message]:
        """Run the ``on_push`` hook (merge builds: a push may move a pull request's
        destination) for each push, built or skipped, once its own build is queued: the hook
        never holds a push back. A failed hook retries its message (the push's work message is
        deduplicated, and the ledger never builds a commit twice), except on its last receive,
        where it is logged and the message is done. Returns the messages that are done."""
        if self.on_push is None:
            return [message for message, _ in settled]
        done: list[Message] = []
        for message, event in settled:
            try:
                if isinstance(event, Push):
                    await self.on_push(event)
            except Exception as exc:
                error = exc if isinstance(exc, BranchbuildError) else unexpected(exc)
                self.metrics.errors.labels(kind=error.kind).inc()
                if not self.intake.is_last_attempt(message):
                    log.warning("after queueing message %s: %s; retried", message.id, error)
                    await self._fail(message, error)
                    continue
                log.error("after queueing message %s: %s; given up", message.id, error)
            done.append(message)
        return done

    async def _reject(self, message: Message, error: PermanentError) -> None:
        self.metrics.errors.labels(kind=error.kind).inc()
        outcome = await self._fail(message, error)
        label = "malformed" if isinstance(error, MalformedEvent) else "rejected"
        self.metrics.events.labels(event=label, outcome=outcome.value).inc()
        log.error(
            "rejected message %s (receive %s): %s; %s",
            message.id,
            message.receive_count,
            error,
            outcome.value,
            extra={"message_id": message.id},
        )

    async def _unexpected(self, message: Message, exc: Exception) -> None:
        """Settle a message whose handling raised what no code path expected: retried like a
        transient failure, dead-lettered with the exception as its reason after its last
        receive. Counted as ``errors_total{kind="unexpected"}``."""
        if isinstance(exc, BranchbuildError):  # e.g. an event's acknowledgement failed
            error: BranchbuildError = exc
            log.error("intake: message %s: %s", message.id, exc)
        else:
            error = unexpected(exc)
            log.exception("intake: unexpected error on message %s", message.id)
        self.metrics.errors.labels(kind=error.kind).inc()
        outcome = await self._fail(message, error)
        self.metrics.events.labels(event=Unexpected.kind, outcome=outcome.value).inc()

    async def _fail(self, message: Message, error: BranchbuildError) -> Outcome:
        self.leases.drop([message])  # no heartbeat may undo the release
        return await self.intake.fail(
            message, error, base=self.settings.retry_base_delay, cap=self.settings.retry_max_delay
        )


def _event_label(event: Push | OtherEvent) -> str:
    if isinstance(event, OtherEvent):
        return "other"
    return {
        "referenceCreated": "created",
        "referenceUpdated": "updated",
        "referenceDeleted": "deleted",
    }[event.action.value]
