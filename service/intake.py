"""The intake stage: EventBridge's single FIFO lane → one work-queue lane per branch.

EventBridge gives every message of a rule the same static MessageGroupId, so the intake queue
is one serial lane. Intake is cheap (parse, decide, re-send), so that lane moves fast; the
expensive work happens on the work queue, where each repository+branch is its own group:
branches run in parallel, pushes to one branch stay in order.
"""

from __future__ import annotations

import hashlib
import logging

import anyio

from .decide import Outcome, Skip, decide
from .errors import BranchbuildError, MalformedEvent, PermanentError
from .events import OtherEvent, Push, parse_event
from .health import Health
from .metrics import Metrics
from .outcomes import Outcomes
from .pipelines import Pipelines
from .queue import Message, Outgoing, Queue, receive_until
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
        pipelines: Pipelines | None = None,
        outcomes: Outcomes | None = None,
    ) -> None:
        self.pipelines = pipelines or Pipelines.from_settings(settings)
        self.outcomes = outcomes  # issue 13: build state and pull request events
        self.intake = intake
        self.work = work
        self.settings = settings
        self.metrics = metrics
        self.health = health

    async def run(
        self,
        stopping: anyio.Event,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Consume until ``stopping`` is set; never raises for a bad message or a failed call."""
        self.health.beat("intake")
        task_status.started()
        failures = 0
        while not stopping.is_set():
            try:
                messages = await receive_until(
                    self.intake,
                    stopping,
                    limit=10,
                    wait=self.settings.wait_time,
                    visibility=self.settings.visibility_timeout,
                )
                self.metrics.batch_size.labels(queue="intake").observe(len(messages))
                if messages:
                    await self.handle(messages)
                failures = 0
            except BranchbuildError as exc:
                failures += 1
                self.metrics.errors.labels(kind=exc.kind).inc()
                log.error("intake: %s", exc)
                with anyio.move_on_after(min(30, 2**failures)):
                    await stopping.wait()
            self.health.beat("intake")

    async def handle(self, messages: list[Message]) -> None:
        """Forward buildable pushes in order, acknowledge skips, release poison."""
        forward: list[tuple[Message, Push]] = []
        skipped: list[Message] = []
        for message in messages:
            if self.outcomes is not None and self.outcomes.claims(message.body):
                await self.outcomes.handle(self.intake, message)  # settles it itself
                continue
            try:
                event = parse_event(message.body)
                rule = None
                if isinstance(event, Push):
                    rule = self.pipelines.rule_for(event.repository)
                decision = decide(event, self.settings, rule)
            except PermanentError as exc:
                await self._reject(message, exc)
                continue
            kind = _event_label(event)
            if isinstance(decision, Skip):
                log.info(
                    "skipped: %s",
                    decision.reason,
                    extra={"message_id": message.id, "event_id": event.event_id},
                )
                self.metrics.events.labels(event=kind, outcome=decision.outcome.value).inc()
                skipped.append(message)
            else:
                forward.append((message, decision))
        try:
            await self.work.send([work_message(push) for _, push in forward])
        except BranchbuildError as exc:
            self.metrics.errors.labels(kind=exc.kind).inc()
            for message, _ in forward:
                settled = await self.intake.fail(
                    message,
                    exc,
                    base=self.settings.retry_base_delay,
                    cap=self.settings.retry_max_delay,
                )
                log.warning(
                    "could not queue the push: %s; %s",
                    exc,
                    settled,
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
        undeleted = await self.intake.delete([m for m, _ in forward] + skipped)
        for message in undeleted:
            log.warning("could not delete intake message %s; it will be deduplicated", message.id)

    async def _reject(self, message: Message, error: PermanentError) -> None:
        last = self.intake.is_last_attempt(message)
        outcome = "dead_lettered" if last else Outcome.FAILED.value
        label = "malformed" if isinstance(error, MalformedEvent) else "rejected"
        self.metrics.events.labels(event=label, outcome=outcome).inc()
        self.metrics.errors.labels(kind=error.kind).inc()
        settled = await self.intake.fail(
            message, error, base=self.settings.retry_base_delay, cap=self.settings.retry_max_delay
        )
        log.error(
            "rejected message %s (receive %s): %s; %s",
            message.id,
            message.receive_count,
            error,
            settled,
            extra={"message_id": message.id},
        )


def _event_label(event: Push | OtherEvent) -> str:
    if isinstance(event, OtherEvent):
        return "other"
    return {
        "referenceCreated": "created",
        "referenceUpdated": "updated",
        "referenceDeleted": "deleted",
    }[event.action.value]
