"""``branchbuild status``: the backlog of the queues and their dead-letter queues."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from ..aws import translated
from ..errors import BranchbuildError
from ..queue import Queue
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
