"""``branchbuild status``: the backlog of the queues and their dead-letter queues, and the
pushes waiting for CodeBuild capacity (service.scheduler)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from ..aws import translated
from ..errors import BranchbuildError
from ..queue import Queue
from ..records import Records
from ..scheduler import running_builds, waiting_pushes
from ..settings import Settings
from .common import AwsClients, table

if TYPE_CHECKING:
    from types_aiobotocore_cloudwatch import CloudWatchClient
    from types_aiobotocore_sqs import SQSClient


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


@dataclass(frozen=True)
class WaitingStatus:
    """One branch's push waiting to start, and why."""

    repository: str
    branch: str
    commit: str
    priority: int
    reason: str
    waited_seconds: float
    claimed: bool  # an instance is starting it now
    error: str = ""  # why its last start failed (reason start_failed)


async def capacity_status(
    settings: Settings, clients: AwsClients
) -> tuple[list[WaitingStatus], int]:
    """The waiting pushes, in no particular order, and how many builds hold a running slot.

    Raises:
        StorageError: S3 could not be reached or read.
    """
    records = Records(await clients.s3(), settings.bucket)
    now = datetime.now(UTC).timestamp()
    waiting = [
        WaitingStatus(
            repository=w.push.repository,
            branch=w.push.name,
            commit=str(w.push.commit),
            priority=w.priority,
            reason=w.reason,
            waited_seconds=round(max(0.0, now - w.since), 1),
            claimed=w.claim_owner is not None and w.claim_until > now,
            error=w.error,
        )
        for w in await waiting_pushes(records)
    ]
    waiting.sort(key=lambda w: (-w.priority, -w.waited_seconds))
    return waiting, len(await running_builds(records))


def render_capacity(waiting: Sequence[WaitingStatus], running: int) -> str:
    if not waiting:
        return f"\nnothing waits for CodeBuild capacity; {running} build(s) hold a running slot\n"
    header = ("WAITING", "BRANCH", "COMMIT", "PRIORITY", "REASON", "FOR")
    rows = [
        (w.repository, w.branch, w.commit[:12], str(w.priority), w.reason, age(w.waited_seconds))
        for w in waiting
    ]
    errors = "".join(
        f"{w.repository} {w.branch}: its last start failed: {w.error}\n" for w in waiting if w.error
    )
    return (
        f"\n{len(waiting)} push(es) wait for CodeBuild capacity; "
        f"{running} build(s) hold a running slot\n" + table([header, *rows]) + errors
    )


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
