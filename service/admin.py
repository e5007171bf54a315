"""Operator commands on the deployed resources: queue status, replaying an event, test events.

The preflight lives in :mod:`service.admin_check`, the dead-letter queues in :mod:`service.dlq`
and the CodeBuild build listing in :mod:`service.admin_builds`; this module also holds what
they share (the AWS clients and plain-text tables).
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import aioboto3
from aiobotocore.config import AioConfig

from .aws import translated
from .errors import BranchbuildError
from .events import (
    OtherEvent,
    Push,
    RefChange,
    check_ref_name,
    check_repository,
    codecommit_event,
    parse_event,
)
from .queue import Queue
from .settings import Settings

if TYPE_CHECKING:
    from types_aiobotocore_cloudwatch import CloudWatchClient
    from types_aiobotocore_codebuild import CodeBuildClient
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_sqs import SQSClient

# An operator waits for the answer: fail fast rather than retry for long.
_CONFIG = AioConfig(
    retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=30
)
EVENTBRIDGE_GROUP = "codecommit"  # the static MessageGroupId of the EventBridge rule's target


class AwsClients:
    """The AWS clients of one admin command, each opened on first use and closed at the end.

    Endpoints, region and credentials come from the standard AWS variables.
    """

    def __init__(self, stack: AsyncExitStack) -> None:
        self._stack = stack
        self._session = aioboto3.Session(region_name=default_region())
        self._sqs: SQSClient | None = None
        self._s3: S3Client | None = None
        self._codebuild: CodeBuildClient | None = None
        self._cloudwatch: CloudWatchClient | None = None

    async def sqs(self) -> SQSClient:
        if self._sqs is None:
            client = self._session.client("sqs", config=_CONFIG)
            self._sqs = await self._stack.enter_async_context(client)
        return self._sqs

    async def s3(self) -> S3Client:
        if self._s3 is None:
            client = self._session.client("s3", config=_CONFIG)
            self._s3 = await self._stack.enter_async_context(client)
        return self._s3

    async def codebuild(self) -> CodeBuildClient:
        if self._codebuild is None:
            client = self._session.client("codebuild", config=_CONFIG)
            self._codebuild = await self._stack.enter_async_context(client)
        return self._codebuild

    async def cloudwatch(self) -> CloudWatchClient:
        if self._cloudwatch is None:
            client = self._session.client("cloudwatch", config=_CONFIG)
            self._cloudwatch = await self._stack.enter_async_context(client)
        return self._cloudwatch


@asynccontextmanager
async def aws_clients() -> AsyncIterator[AwsClients]:
    async with AsyncExitStack() as stack:
        yield AwsClients(stack)


def default_region() -> str | None:
    """``AWS_REGION``, else the region botocore would use (``AWS_DEFAULT_REGION``, the profile).

    botocore itself does not read ``AWS_REGION`` (the SDKs and the ECS agent set it).
    """
    region = os.environ.get("AWS_REGION") or aioboto3.Session().region_name
    return str(region) if region else None


# -- status -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueStatus:
    """The backlog of one queue; ``oldest_age_seconds`` is None when CloudWatch has no data."""

    queue: str  # intake, intake-dlq, work, work-dlq
    url: str
    visible: int
    in_flight: int
    delayed: int
    oldest_age_seconds: float | None


async def queue_status(settings: Settings, clients: AwsClients) -> list[QueueStatus]:
    """The intake and work queues and their dead-letter queues.

    Raises:
        AccessDenied: a queue does not exist, may not be read, or is not FIFO.
        TransientError: SQS could not be reached.
    """
    sqs = await clients.sqs()
    cloudwatch = await clients.cloudwatch()
    found: list[QueueStatus] = []
    for name, url in (("intake", settings.queue_url), ("work", settings.work_queue_url)):
        queue = Queue(sqs, url, name=name)
        await queue.describe()
        found.append(await _one_status(sqs, cloudwatch, name, url))
        if queue.dead_letter_url is not None:
            dlq = queue.dead_letter_url
            found.append(await _one_status(sqs, cloudwatch, f"{name}-dlq", dlq))
    return found


async def _one_status(
    sqs: SQSClient, cloudwatch: CloudWatchClient, name: str, url: str
) -> QueueStatus:
    with translated(f"read attributes of the {name} queue"):
        reply = await sqs.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ],
        )
    attributes = reply.get("Attributes", {})
    return QueueStatus(
        queue=name,
        url=url,
        visible=int(attributes.get("ApproximateNumberOfMessages", 0)),
        in_flight=int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0)),
        delayed=int(attributes.get("ApproximateNumberOfMessagesDelayed", 0)),
        oldest_age_seconds=await oldest_age(cloudwatch, queue_name(url)),
    )


async def oldest_age(cloudwatch: CloudWatchClient, name: str) -> float | None:
    """``ApproximateAgeOfOldestMessage`` of the last 5 minutes (its newest 1-minute maximum),
    or None when CloudWatch has no datapoint (emulators) or may not be read."""
    now = datetime.now(UTC)
    try:
        with translated(f"read the age of the oldest message of {name} from CloudWatch"):
            reply = await cloudwatch.get_metric_statistics(
                Namespace="AWS/SQS",
                MetricName="ApproximateAgeOfOldestMessage",
                Dimensions=[{"Name": "QueueName", "Value": name}],
                StartTime=now - timedelta(minutes=5),
                EndTime=now,
                Period=60,
                Statistics=["Maximum"],
            )
    except BranchbuildError:
        return None
    points = [p for p in reply.get("Datapoints", []) if "Maximum" in p]
    if not points:
        return None
    newest = max(points, key=lambda p: p.get("Timestamp", now - timedelta(days=1)))
    return float(newest["Maximum"])


def queue_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def render_status(rows: Sequence[QueueStatus]) -> str:
    header = ("QUEUE", "VISIBLE", "IN FLIGHT", "DELAYED", "OLDEST", "URL")
    return table(
        [header]
        + [
            (
                r.queue,
                str(r.visible),
                str(r.in_flight),
                str(r.delayed),
                age(r.oldest_age_seconds),
                r.url,
            )
            for r in rows
        ]
    )


def age(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


# -- replay and test events -------------------------------------------------------------------


def event_body(text: str) -> tuple[str, Push | OtherEvent]:
    """The SQS body EventBridge would deliver for an event file, and what it parses to.

    Raises:
        MalformedEvent: the event would be dead-lettered by the service.
    """
    parsed = parse_event(text)  # also refuses anything that is not a JSON object
    return json.dumps(json.loads(text), separators=(",", ":")), parsed


def build_test_event(
    repository: str, name: str, commit: str, *, tag: bool, account: str, region: str
) -> dict[str, Any]:
    """A ``CodeCommit Repository State Change`` event for a new branch (or tag) at ``commit``.

    Raises:
        MalformedEvent: a name, the commit, the account or the region is invalid.
    """
    check_repository(repository)
    check_ref_name(name)
    ref = ("refs/tags/" if tag else "refs/heads/") + name
    event = codecommit_event(
        RefChange(repository, ref, None, commit), account=account, region=region
    )
    parse_event(json.dumps(event))  # the same checks the service makes
    return event


async def put_event(sqs: SQSClient, url: str, body: str, *, group: str) -> str:
    """Put an event on the intake queue as the EventBridge rule does; returns the message id.

    Raises:
        AccessDenied, TransientError: the queue refused it or could not be reached.
    """
    with translated("send to the intake queue"):
        reply = await sqs.send_message(
            QueueUrl=url,
            MessageBody=body,
            MessageGroupId=group,
            MessageDeduplicationId=uuid.uuid4().hex,
        )
    return reply["MessageId"]


def describe_event(parsed: Push | OtherEvent) -> str:
    if isinstance(parsed, OtherEvent):
        return f"{parsed.event} event {parsed.event_id}"
    commit = (parsed.commit or parsed.old_commit or "")[:12]
    return (
        f"{parsed.action.value} {parsed.repository} {parsed.ref} {commit} (event {parsed.event_id})"
    )


# -- output -----------------------------------------------------------------------------------


def table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns; the last one is not padded (it is often a long URL)."""
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines) + "\n"


def marks() -> tuple[str, str, str]:
    """Ok, failed and skipped marks; plain words when stdout cannot encode the symbols."""
    try:
        "✓✗–".encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "ok", "FAIL", "skip"
    return "✓", "✗", "–"
