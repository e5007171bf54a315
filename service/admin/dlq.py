"""Dead-letter queues: list what failed and why without consuming it, and move it back.

The service dead-letters a message itself on its last allowed receive, with why it failed in
``branchbuild.*`` message attributes; a message without them was moved by SQS's redrive policy.

Both commands hold the messages they have seen invisible while they page through the queue,
and release what they did not move at the end. A FIFO queue hands out nothing more of a message
group while some of its messages are held, so at most 10 messages of one group can be seen
without moving them; listing also counts as a receive of each message (harmless: a dead-letter
queue has no redrive policy of its own).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio

from ..aws import translated
from ..errors import AccessDenied, BranchbuildError, MalformedEvent
from ..events import OtherEvent, parse_event, parse_work
from ..queue import BATCH, Message, Queue
from ..settings import Settings

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import (
        MessageAttributeValueOutputTypeDef,
        MessageAttributeValueTypeDef,
    )

ATTRIBUTE_PREFIX = "branchbuild."
LIST_VISIBILITY = 30  # seconds a listed message stays held before we release it ourselves
REDRIVE_VISIBILITY = 60
SENT_NOT_DELETED = "sent back but not deleted from the dead-letter queue"
CLOCK_SKEW_MS = 5000  # SentTimestamp is SQS's clock, not ours
WAIT = 1  # a long poll of 1 s asks every SQS server; a short poll may miss messages

Attributes = Mapping[str, "MessageAttributeValueOutputTypeDef"]


@dataclass(frozen=True)
class DeadLetterQueue:
    """The dead-letter queue of the intake or work queue, and where its messages came from."""

    name: str  # intake or work
    url: str
    source_url: str
    max_receive_count: int | None


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered message, decoded for a human."""

    queue: str
    message_id: str
    group: str
    sent_at: str | None
    receive_count: int
    reason: str
    moved_by: str  # branchbuild (with the reason) or sqs (redrive policy, no reason)
    error_kind: str | None = None
    failed_at: str | None = None
    failed_receive_count: int | None = None
    source_queue: str | None = None
    repository: str | None = None
    ref: str | None = None
    commit: str | None = None
    event: str | None = None
    undecodable: str | None = None  # why the body could not be decoded
    preview: str | None = None  # a short escaped preview of such a body


@dataclass(frozen=True)
class Listing:
    messages: list[DeadLetter]
    approximate_total: int
    limit: int


@dataclass(frozen=True)
class Redriven:
    moved: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (message id, why)
    not_found: list[str] = field(default_factory=list)


async def resolve(settings: Settings, sqs: SQSClient, name: str) -> DeadLetterQueue:
    """Find the dead-letter queue of the ``intake`` or ``work`` queue from its RedrivePolicy.

    Raises:
        AccessDenied: the queue is unreadable, not FIFO, or has no reachable dead-letter queue.
        TransientError: SQS could not be reached.
    """
    url = settings.work_queue_url if name == "work" else settings.queue_url
    queue = Queue(sqs, url, name=name)
    await queue.describe()
    if queue.dead_letter_url is None:
        raise AccessDenied(f"the {name} queue {url} has no reachable dead-letter queue")
    return DeadLetterQueue(name, queue.dead_letter_url, url, queue.max_receive_count)


async def approximate_count(sqs: SQSClient, url: str) -> int:
    with translated("count the messages of the dead-letter queue"):
        reply = await sqs.get_queue_attributes(
            QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]
        )
    return int(reply.get("Attributes", {}).get("ApproximateNumberOfMessages", 0))


async def list_dead_letters(sqs: SQSClient, dlq: DeadLetterQueue, *, limit: int) -> Listing:
    """Up to ``limit`` messages with their reasons; every message is left in the queue.

    Raises:
        AccessDenied, TransientError: the queue could not be read.
    """
    total = await approximate_count(sqs, dlq.url)
    seen: dict[str, DeadLetter] = {}
    held: list[Message] = []
    try:
        while len(seen) < limit:
            batch = await _receive(
                sqs, dlq, min(BATCH, limit - len(seen)), visibility=LIST_VISIBILITY
            )
            held += [message for message, _ in batch]
            fresh = [(m, a) for m, a in batch if m.id not in seen]
            if not fresh:
                break
            for message, attributes in fresh:
                seen[message.id] = describe(dlq, message, attributes)
    finally:
        await _release(sqs, dlq, held)
    return Listing(list(seen.values()), total, limit)


async def redrive(
    sqs: SQSClient,
    dlq: DeadLetterQueue,
    *,
    ids: frozenset[str] | None,
    on_moved: Callable[[], object] = lambda: None,
) -> Redriven:
    """Move messages (all, or those of ``ids``) back to their source queue, in order.

    Each is sent with its message group, a new deduplication id (the original one may still be
    remembered by SQS) and without the ``branchbuild.*`` attributes, then deleted here. After a
    failure, the rest of that message group stays here, so a group is never reordered.

    Raises:
        AccessDenied, TransientError: the dead-letter queue could not be read.
    """
    queue = Queue(sqs, dlq.url, name=f"{dlq.name} dead-letter")
    # A message that fails again while we work arrives here as a new message: leave it, or
    # a redrive before the cause is fixed would ping-pong until interrupted.
    began_ms = int(time.time() * 1000) + CLOCK_SKEW_MS
    wanted = set(ids) if ids is not None else None
    seen: set[str] = set()
    held: list[Message] = []
    stuck_groups: set[str] = set()
    moved = 0
    failed: list[tuple[str, str]] = []
    try:
        while wanted is None or wanted:
            batch = await _receive(sqs, dlq, BATCH, visibility=REDRIVE_VISIBILITY)
            fresh = [(m, a) for m, a in batch if m.id not in seen]
            held += [m for m, _ in batch if m.id in seen]
            if not fresh:
                break
            for message, attributes in fresh:
                seen.add(message.id)
                if wanted is not None and message.id not in wanted:
                    held.append(message)
                    continue
                if wanted is not None:
                    wanted.discard(message.id)
                if message.sent_at_ms > began_ms:
                    problem: str | None = "not moved: it failed again since this redrive began"
                else:
                    problem = await _move(sqs, queue, dlq, message, attributes, stuck_groups)
                if problem is None:
                    moved += 1
                    on_moved()
                    continue
                failed.append((message.id, problem))
                stuck_groups.add(message.group)
                if not problem.startswith(SENT_NOT_DELETED):  # gone from here if released
                    held.append(message)
    finally:
        await _release(sqs, dlq, held)
    return Redriven(moved, failed, sorted(wanted or ()))


async def _move(
    sqs: SQSClient,
    queue: Queue,
    dlq: DeadLetterQueue,
    message: Message,
    attributes: Attributes,
    stuck_groups: set[str],
) -> str | None:
    """Send one message back and delete it here; returns why it failed, or None."""
    if message.group in stuck_groups:
        return "not moved: an earlier message of its group could not be moved"
    target = _string(attributes, "source_queue") or dlq.source_url
    kept: dict[str, MessageAttributeValueTypeDef] = {
        name: _resend(value)
        for name, value in attributes.items()
        if not name.startswith(ATTRIBUTE_PREFIX)
    }
    try:
        with translated(f"send a message back to {target}"):
            if kept:
                await sqs.send_message(
                    QueueUrl=target,
                    MessageBody=message.body,
                    MessageGroupId=message.group or "redrive",
                    MessageDeduplicationId=uuid.uuid4().hex,
                    MessageAttributes=kept,
                )
            else:
                await sqs.send_message(
                    QueueUrl=target,
                    MessageBody=message.body,
                    MessageGroupId=message.group or "redrive",
                    MessageDeduplicationId=uuid.uuid4().hex,
                )
    except BranchbuildError as exc:
        return str(exc)
    with anyio.CancelScope(shield=True):  # sent: it must not stay here to be sent twice
        try:
            undeleted = await queue.delete([message])
        except BranchbuildError as exc:
            return f"{SENT_NOT_DELETED} ({exc})"
    if undeleted:
        return f"{SENT_NOT_DELETED} (receipt expired)"
    return None


def _resend(value: MessageAttributeValueOutputTypeDef) -> MessageAttributeValueTypeDef:
    out: MessageAttributeValueTypeDef = {"DataType": value["DataType"]}
    if "StringValue" in value:
        out["StringValue"] = value["StringValue"]
    if "BinaryValue" in value:
        out["BinaryValue"] = value["BinaryValue"]
    return out


async def _receive(
    sqs: SQSClient, dlq: DeadLetterQueue, limit: int, *, visibility: int
) -> list[tuple[Message, Attributes]]:
    with translated(f"receive from the {dlq.name} dead-letter queue"):
        reply = await sqs.receive_message(
            QueueUrl=dlq.url,
            MaxNumberOfMessages=max(1, min(BATCH, limit)),
            WaitTimeSeconds=WAIT,
            VisibilityTimeout=visibility,
            MessageSystemAttributeNames=[
                "ApproximateReceiveCount",
                "MessageGroupId",
                "SentTimestamp",
            ],
            MessageAttributeNames=["All"],
        )
    received: list[tuple[Message, Attributes]] = []
    for m in reply.get("Messages", []):
        system = m.get("Attributes", {})
        message = Message(
            id=m["MessageId"],
            receipt=m["ReceiptHandle"],
            body=m.get("Body", ""),
            group=system.get("MessageGroupId", ""),
            receive_count=int(system.get("ApproximateReceiveCount", "1")),
            sent_at_ms=int(system.get("SentTimestamp", "0")),
        )
        received.append((message, m.get("MessageAttributes", {})))
    return received


async def _release(sqs: SQSClient, dlq: DeadLetterQueue, held: Sequence[Message]) -> None:
    """Make held messages visible again at once; shielded, so an interrupt strands none."""
    if not held:
        return
    queue = Queue(sqs, dlq.url, name=f"{dlq.name} dead-letter")
    with anyio.CancelScope(shield=True):
        # A message seen twice has two receipts, the older one expired: its failure is moot.
        await queue.change_visibility(held, 0)


@dataclass(frozen=True)
class _Body:
    repository: str | None = None
    ref: str | None = None
    commit: str | None = None
    event: str | None = None
    undecodable: str | None = None
    preview: str | None = None


def describe(dlq: DeadLetterQueue, message: Message, attributes: Attributes) -> DeadLetter:
    """Decode a dead-lettered message and the reason it failed."""
    reason = _string(attributes, "reason")
    count = _string(attributes, "receive_count")
    after = dlq.max_receive_count if dlq.max_receive_count is not None else "?"
    sent_at = (
        datetime.fromtimestamp(message.sent_at_ms / 1000, UTC).isoformat(timespec="seconds")
        if message.sent_at_ms
        else None
    )
    body = _decode(dlq.name, message.body)
    return DeadLetter(
        queue=dlq.name,
        message_id=message.id,
        group=message.group,
        sent_at=sent_at,
        receive_count=message.receive_count,
        reason=reason
        if reason is not None
        else f"reason unknown (moved by SQS after {after} receives)",
        moved_by="sqs" if reason is None else "branchbuild",
        error_kind=_string(attributes, "error_kind"),
        failed_at=_string(attributes, "failed_at"),
        failed_receive_count=int(count) if count and count.isdigit() else None,
        source_queue=_string(attributes, "source_queue"),
        repository=body.repository,
        ref=body.ref,
        commit=body.commit,
        event=body.event,
        undecodable=body.undecodable,
        preview=body.preview,
    )


def _decode(queue: str, body: str) -> _Body:
    try:
        if queue == "work":
            push = parse_work(body)
            return _Body(push.repository, push.ref, push.commit)
        parsed = parse_event(body)
    except MalformedEvent as exc:
        return _Body(undecodable=str(exc), preview=preview(body))
    if isinstance(parsed, OtherEvent):
        return _Body(event=parsed.event)
    return _Body(
        parsed.repository, parsed.ref, parsed.commit or parsed.old_commit, parsed.action.value
    )


def preview(body: str, limit: int = 60) -> str:
    """A short, escaped rendering of an arbitrary body (control characters never reach a TTY)."""
    text = repr(body[:limit])
    return text + ("..." if len(body) > limit else "")


def _string(attributes: Attributes, name: str) -> str | None:
    value = attributes.get(ATTRIBUTE_PREFIX + name)
    return value.get("StringValue") if value is not None else None


# -- output -----------------------------------------------------------------------------------


def render_listing(dlq: DeadLetterQueue, listing: Listing) -> str:
    shown = len(listing.messages)
    lines = [f"{dlq.name} dead-letter queue {dlq.url}: {shown} message(s) shown"]
    if shown >= listing.limit:
        lines.append(
            f"(stopped at --limit {listing.limit}; about {listing.approximate_total} in it)"
        )
    elif shown < listing.approximate_total:
        lines.append(
            f"(about {listing.approximate_total} in it: a FIFO queue hands out at most 10 "
            "messages of one message group while they are held, so the rest stay hidden)"
        )
    for d in listing.messages:
        lines.append("")
        lines.append(f"{d.message_id}  sent {d.sent_at or '?'}  group {d.group[:16]}")
        if d.undecodable is not None:
            lines.append(f"  body    undecodable ({d.undecodable}): {d.preview}")
        elif d.repository is not None:
            lines.append(f"  push    {d.repository} {d.ref} {(d.commit or '-')[:12]}")
        else:
            lines.append(f"  event   {_one_line(d.event or '-')}")
        if d.moved_by == "sqs":
            lines.append(f"  reason  {d.reason}")
        else:
            lines.append(f"  reason  {d.error_kind}: {_one_line(d.reason)}")
            lines.append(f"  failed  {d.failed_at or '?'}, receive {d.failed_receive_count or '?'}")
    return "\n".join(lines) + "\n"


def _one_line(text: str) -> str:
    """Control characters escaped: a reason may quote a hostile value."""
    return "".join(repr(c)[1:-1] if c < " " or c == "\x7f" else c for c in text)


def to_json_lines(listing: Listing) -> str:
    return "".join(json.dumps(asdict(d)) + "\n" for d in listing.messages)
