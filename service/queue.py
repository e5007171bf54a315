"""SQS FIFO queues: receive, delete, release and heartbeat, always in batches of at most 10."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio

from .aws import translated
from .errors import AccessDenied, BranchbuildError, PermanentError, TransientError
from .outcome import Outcome

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import (
        ChangeMessageVisibilityBatchRequestEntryTypeDef,
        MessageAttributeValueTypeDef,
        SendMessageBatchRequestEntryTypeDef,
    )

    from .health import Health
    from .metrics import Metrics

log = logging.getLogger("branchbuild.queue")

BATCH = 10  # SQS's limit for ReceiveMessage and every *Batch call


@dataclass(frozen=True)
class Message:
    """A received SQS message; the receipt handle is valid for this receive only."""

    id: str
    receipt: str
    body: str
    group: str
    receive_count: int
    sent_at_ms: int


@dataclass(frozen=True)
class Outgoing:
    """A message to send to a FIFO queue."""

    body: str
    group: str
    dedup: str


#: Hears each message this queue dead-letters (the message, the reason, the error kind):
#: the work queue's tells service.notify about pushes that could not be built. Never raises.
DeadLetterHook = Callable[[Message, str, str], Awaitable[None]]


class Queue:
    """One SQS FIFO queue, with its dead-letter limit read from its RedrivePolicy."""

    def __init__(self, client: SQSClient, url: str, *, name: str) -> None:
        self.client = client
        self.url = url
        self.name = name
        self.max_receive_count: int | None = None
        self.dead_letter_url: str | None = None
        self.on_dead_letter: DeadLetterHook | None = None

    async def describe(self) -> None:
        """Read the queue's RedrivePolicy, to know when a failure is the last one.

        Raises:
            AccessDenied: the queue does not exist or may not be read.
            TransientError: SQS could not be reached.
        """
        with translated(f"read attributes of the {self.name} queue"):
            reply = await self.client.get_queue_attributes(
                QueueUrl=self.url, AttributeNames=["RedrivePolicy", "FifoQueue"]
            )
        attributes = reply.get("Attributes", {})
        if attributes.get("FifoQueue") != "true":
            raise AccessDenied(f"the {self.name} queue {self.url} is not a FIFO queue")
        policy = attributes.get("RedrivePolicy")
        if not policy:
            log.warning("the %s queue has no dead-letter queue: failures retry forever", self.name)
            return
        redrive = json.loads(policy)
        self.max_receive_count = int(redrive["maxReceiveCount"])
        # arn:aws:sqs:<region>:<account>:<name>
        *_, account, dlq_name = str(redrive["deadLetterTargetArn"]).split(":")
        try:
            with translated(f"find the dead-letter queue of the {self.name} queue"):
                found = await self.client.get_queue_url(
                    QueueName=dlq_name, QueueOwnerAWSAccountId=account
                )
            self.dead_letter_url = found["QueueUrl"]
        except BranchbuildError as exc:
            log.warning("%s; failed messages will reach it without their reason", exc)

    def is_last_attempt(self, message: Message) -> bool:
        return (
            self.max_receive_count is not None and message.receive_count >= self.max_receive_count
        )

    async def receive(self, limit: int, *, wait: int, visibility: int) -> list[Message]:
        """Long-poll for up to ``limit`` messages (at most 10)."""
        with translated(f"receive from the {self.name} queue"):
            reply = await self.client.receive_message(
                QueueUrl=self.url,
                MaxNumberOfMessages=max(1, min(BATCH, limit)),
                WaitTimeSeconds=wait,
                VisibilityTimeout=visibility,
                MessageSystemAttributeNames=[
                    "ApproximateReceiveCount",
                    "MessageGroupId",
                    "SentTimestamp",
                ],
            )
        return [
            Message(
                id=m["MessageId"],
                receipt=m["ReceiptHandle"],
                body=m.get("Body", ""),
                group=m.get("Attributes", {}).get("MessageGroupId", ""),
                receive_count=int(m.get("Attributes", {}).get("ApproximateReceiveCount", "1")),
                sent_at_ms=int(m.get("Attributes", {}).get("SentTimestamp", "0")),
            )
            for m in reply.get("Messages", [])
        ]

    async def dead_letter(
        self, message: Message, *, reason: str, kind: str, delete: bool = True
    ) -> bool:
        """Move a message that failed its last allowed receive to the dead-letter queue, with
        why it failed in its attributes (``branchbuild.*``), then delete it here (``delete``
        False: a push that waited too long, whose message was deleted when it began waiting).

        Returns False when that is not possible; SQS's redrive policy then moves the message
        (without the reason) at its next receive, so nothing is lost either way.
        """
        if self.dead_letter_url is None:
            return False
        attributes: dict[str, MessageAttributeValueTypeDef] = {
            "branchbuild.reason": {"DataType": "String", "StringValue": reason[:4000] or "-"},
            "branchbuild.error_kind": {"DataType": "String", "StringValue": kind},
            "branchbuild.receive_count": {
                "DataType": "Number",
                "StringValue": str(message.receive_count),
            },
            "branchbuild.source_queue": {"DataType": "String", "StringValue": self.url},
            "branchbuild.failed_at": {
                "DataType": "String",
                "StringValue": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        }
        try:
            with translated(f"dead-letter a message of the {self.name} queue"):
                await self.client.send_message(
                    QueueUrl=self.dead_letter_url,
                    MessageBody=message.body or "-",
                    MessageGroupId=message.group or "dead-letter",
                    # A retry after a crash between send and delete is absorbed by SQS.
                    MessageDeduplicationId=hashlib.sha256(message.id.encode()).hexdigest(),
                    MessageAttributes=attributes,
                )
        except BranchbuildError as exc:
            log.warning("could not dead-letter message %s itself: %s", message.id, exc)
            return False
        if delete and await self.delete([message]):
            log.warning("dead-lettered message %s but could not delete it here", message.id)
        if self.on_dead_letter is not None:
            await self.on_dead_letter(message, reason, kind)
        return True

    async def fail(
        self, message: Message, error: BranchbuildError, *, base: int, cap: int
    ) -> Outcome:
        """Settle a failed message, the one place that decides its fate; returns the outcome
        for the caller to count.

        After its last allowed receive it is dead-lettered with its reason (``DEAD_LETTERED``).
        Otherwise it is made visible again: at once for a permanent error (``FAILED``: its next
        receive is its last), after a backoff for a transient one (``RETRIED``). Runs shielded:
        a shutdown must not strand it. Never raises.
        """
        extra = {"message_id": message.id}
        with anyio.CancelScope(shield=True):
            if self.is_last_attempt(message):
                if await self.dead_letter(message, reason=str(error), kind=error.kind):
                    log.warning("moved to the dead-letter queue with its reason", extra=extra)
                    return Outcome.DEAD_LETTERED
                # SQS's redrive policy moves it at its next receive, without the reason.
                await self._release(message, 0, extra)
                if self.on_dead_letter is not None:
                    await self.on_dead_letter(message, str(error), error.kind)
                return Outcome.DEAD_LETTERED
            delay = release_delay(error, message, base=base, cap=cap)
            await self._release(message, delay, extra)
        return Outcome.FAILED if isinstance(error, PermanentError) else Outcome.RETRIED

    async def _release(self, message: Message, delay: int, extra: dict[str, str]) -> None:
        try:
            failed = await self.change_visibility([message], delay)
        except BranchbuildError as exc:
            failed = [message]
            log.warning("could not release the message: %s", exc, extra=extra)
        if failed:
            log.warning("the message is visible again after its visibility timeout", extra=extra)
        else:
            log.info("the message is visible again in %s s", delay, extra=extra)

    async def send(self, messages: Sequence[Outgoing]) -> None:
        """Send in order, in batches; raises if any entry was not accepted."""
        for start in range(0, len(messages), BATCH):
            chunk = messages[start : start + BATCH]
            entries: list[SendMessageBatchRequestEntryTypeDef] = [
                {
                    "Id": str(i),
                    "MessageBody": m.body,
                    "MessageGroupId": m.group,
                    "MessageDeduplicationId": m.dedup,
                }
                for i, m in enumerate(chunk)
            ]
            with translated(f"send to the {self.name} queue"):
                reply = await self.client.send_message_batch(QueueUrl=self.url, Entries=entries)
            failed = reply.get("Failed", [])
            if failed:
                first = failed[0]
                error = f"{first.get('Code')}: {first.get('Message', '')}"
                if first.get("SenderFault"):
                    raise AccessDenied(f"the {self.name} queue refused a message: {error}")
                raise TransientError(f"the {self.name} queue refused a message: {error}")

    async def delete(self, messages: Sequence[Message]) -> list[Message]:
        """Delete (acknowledge); returns the messages that could not be deleted."""
        failed: list[Message] = []
        for start in range(0, len(messages), BATCH):
            chunk = messages[start : start + BATCH]
            with translated(f"delete from the {self.name} queue"):
                reply = await self.client.delete_message_batch(
                    QueueUrl=self.url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": m.receipt} for i, m in enumerate(chunk)
                    ],
                )
            failed += [chunk[int(f["Id"])] for f in reply.get("Failed", [])]
        return failed

    async def change_visibility(self, messages: Sequence[Message], seconds: int) -> list[Message]:
        """Extend (heartbeat) or release (``seconds=0``); returns the messages that failed."""
        failed: list[Message] = []
        for start in range(0, len(messages), BATCH):
            chunk = messages[start : start + BATCH]
            entries: list[ChangeMessageVisibilityBatchRequestEntryTypeDef] = [
                {"Id": str(i), "ReceiptHandle": m.receipt, "VisibilityTimeout": seconds}
                for i, m in enumerate(chunk)
            ]
            with translated(f"change visibility on the {self.name} queue"):
                reply = await self.client.change_message_visibility_batch(
                    QueueUrl=self.url, Entries=entries
                )
            failed += [chunk[int(f["Id"])] for f in reply.get("Failed", [])]
        return failed


def retry_delay(receive_count: int, *, base: int, cap: int) -> int:
    """Exponential backoff keyed on the receive count, with jitter, capped (SQS max is 12 h)."""
    delay: int = min(cap, base * (1 << max(0, receive_count - 1)))
    return min(43200, math.ceil(delay * random.uniform(0.8, 1.2)))  # noqa: S311 - jitter, not crypto


class Leases:
    """Keeps received messages invisible while they are worked on (the visibility heartbeat).

    One task extends every held message of every queue each ``interval`` seconds, in batches,
    so a job that outlives the visibility timeout is never delivered twice.
    """

    def __init__(self, *, visibility: int, interval: float, metrics: Metrics) -> None:
        self.visibility = visibility
        self.interval = interval
        self.metrics = metrics
        self._held: dict[str, tuple[Queue, Message]] = {}
        self.lost: set[str] = set()

    def hold(self, queue: Queue, messages: Sequence[Message]) -> None:
        for message in messages:
            self._held[message.receipt] = (queue, message)

    def drop(self, messages: Sequence[Message]) -> None:
        for message in messages:
            self._held.pop(message.receipt, None)
            self.lost.discard(message.receipt)

    def __len__(self) -> int:
        return len(self._held)

    async def run(self) -> None:
        """Heartbeat forever; cancelled by the owner's task group."""
        while True:
            await anyio.sleep(self.interval)
            await self.extend_all()

    async def extend_all(self) -> None:
        by_queue: dict[int, tuple[Queue, list[Message]]] = {}
        for queue, message in list(self._held.values()):
            by_queue.setdefault(id(queue), (queue, []))[1].append(message)
        for queue, messages in by_queue.values():
            try:
                failed = await queue.change_visibility(messages, self.visibility)
            except BranchbuildError as exc:  # never let the heartbeat die: retry next beat
                log.warning("heartbeat failed on the %s queue, will retry: %s", queue.name, exc)
                self.metrics.errors.labels(kind="heartbeat").inc()
                continue
            self.metrics.heartbeats.inc(len(messages) - len(failed))
            for message in failed:
                if message.receipt in self._held and message.receipt not in self.lost:
                    self.lost.add(message.receipt)
                    self.metrics.errors.labels(kind="lease_lost").inc()
                    log.warning(
                        "lost the lease on message %s of the %s queue",
                        message.id,
                        queue.name,
                        extra={"message_id": message.id},
                    )


class Deleter:
    """Deletes settled messages of one queue in shared batches.

    Jobs tend to finish close together (their fetch was shared); a delete waits up to
    ``linger`` seconds for others to join it, so one DeleteMessageBatch settles several jobs.
    Never raises: each caller gets back its own messages that were not deleted.
    """

    def __init__(self, queue: Queue, *, linger: float = 0.05) -> None:
        self.queue = queue
        self.linger = linger
        self._pending: list[tuple[Sequence[Message], list[Message], anyio.Event]] = []
        self._full = anyio.Event()

    async def delete(self, messages: Sequence[Message]) -> list[Message]:
        """Delete ``messages`` (with whatever else is pending); returns the ones that failed."""
        failed: list[Message] = []
        done = anyio.Event()
        self._pending.append((messages, failed, done))
        if len(self._pending) > 1:  # a batch is being gathered: join it
            if sum(len(m) for m, _, _ in self._pending) >= BATCH:
                self._full.set()
            await done.wait()
            return failed
        # The gatherer settles the others too: cancelling it must not strand them.
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.linger):
                await self._full.wait()
            batch, self._pending, self._full = self._pending, [], anyio.Event()
            together = [m for messages_, _, _ in batch for m in messages_]
            not_deleted = {m.receipt for m in together}
            try:
                not_deleted = {m.receipt for m in await self.queue.delete(together)}
            except BranchbuildError as exc:
                log.warning("could not delete %s message(s): %s", len(together), exc)
            finally:
                for messages_, failed_, done_ in batch:
                    failed_ += [m for m in messages_ if m.receipt in not_deleted]
                    done_.set()
        return failed


async def consume(
    queue: Queue,
    stopping: anyio.Event,
    *,
    visibility: int,
    wait: Callable[[], int],
    health: Health,
    metrics: Metrics,
    loop: str,
) -> AsyncIterator[list[Message]]:
    """Receive batches of up to 10 messages until ``stopping`` is set (arq's ``poll()``).

    ``wait()`` gives each receive's long-poll seconds. A receive that is under way when
    ``stopping`` is set is let finish (within ``wait()`` seconds), never abandoned: SQS
    completes an abandoned receive anyway, and what it picks up would stay invisible to every
    consumer for ``visibility`` seconds. Its batch is yielded like any other.

    A failed receive is counted and logged and the loop backs off (2, 4, ... 30 s, cut short
    by ``stopping``); it never ends the loop. ``loop``'s health beat is written after every
    receive.
    """
    failures = 0
    while not stopping.is_set():
        try:
            messages = await queue.receive(BATCH, wait=wait(), visibility=visibility)
        except BranchbuildError as exc:
            failures += 1
            metrics.errors.labels(kind=exc.kind).inc()
            log.error("%s: %s", loop, exc)
            health.beat(loop)
            with anyio.move_on_after(min(30, 2**failures)):
                await stopping.wait()
            continue
        failures = 0
        health.beat(loop)
        metrics.batch_size.labels(queue=queue.name).observe(len(messages))
        if messages:
            yield messages


def release_delay(error: BaseException, message: Message, *, base: int, cap: int) -> int:
    """How long a failed message stays invisible: 0 for permanent errors (so SQS moves it to
    the dead-letter queue at once after maxReceiveCount), a backoff for transient ones."""
    if isinstance(error, PermanentError):
        return 0
    return retry_delay(message.receive_count, base=base, cap=cap)
