"""The intake stage in-process: ``Intake.run`` against moto's SQS over HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from service.errors import StorageError
from service.events import Push
from service.health import Health
from service.intake import Intake
from service.metrics import Metrics
from service.queue import Leases, Message, Queue
from tests.helpers import AwsResources, event_for, wait_for
from tests.test_worker import settings_for


class WatchedQueue(Queue):
    """The real queue, telling when a receive has been sent."""

    polling = anyio.Event()

    async def receive(self, limit: int, *, wait: int, visibility: int) -> list[Message]:
        self.polling.set()
        return await super().receive(limit, wait=wait, visibility=visibility)


@dataclass
class Running:
    intake: Intake
    stopping: anyio.Event
    done: anyio.Event

    def events(self, **labels: str) -> float:
        registry = self.intake.metrics.registry
        return registry.get_sample_value("branchbuild_events_total", labels) or 0.0


@asynccontextmanager
async def running(
    aws: AwsResources, on_push: Callable[[Push], Awaitable[None]] | None = None, **overrides: Any
) -> AsyncIterator[Running]:
    s = settings_for(aws, **overrides)
    metrics = Metrics()
    intake_queue = WatchedQueue(aws.sqs, aws.intake_url, name="intake")
    intake_queue.polling = anyio.Event()
    work_queue = Queue(aws.sqs, aws.work_url, name="work")
    await intake_queue.describe()
    visibility = s.intake_visibility_timeout
    leases = Leases(visibility=visibility, interval=visibility / 3, metrics=metrics)
    intake = Intake(
        intake_queue, work_queue, s, metrics, Health(liveness_timeout=60), leases, on_push=on_push
    )
    state = Running(intake, anyio.Event(), anyio.Event())

    async def run() -> None:
        await intake.run(state.stopping)
        state.done.set()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(leases.run)
            tg.start_soon(run)
            yield state
            state.stopping.set()
            await state.done.wait()
            tg.cancel_scope.cancel()


async def counts(aws: AwsResources, url: str) -> tuple[int, int]:
    reply = await aws.sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )
    a = reply["Attributes"]
    return int(a["ApproximateNumberOfMessages"]), int(a["ApproximateNumberOfMessagesNotVisible"])


async def work_bodies(aws: AwsResources) -> list[dict[str, Any]]:
    reply = await aws.sqs.receive_message(
        QueueUrl=aws.work_url, MaxNumberOfMessages=10, VisibilityTimeout=0
    )
    return [json.loads(m["Body"]) for m in reply.get("Messages", [])]


async def test_buildable_pushes_are_forwarded_skips_acknowledged_poison_dead_lettered(
    aws: AwsResources,
) -> None:
    commit = "a" * 40
    await aws.send_event(event_for("r", "refs/heads/feature/x", commit))
    await aws.send_event(event_for("r", "refs/heads/develop", commit))  # protected
    await aws.send_event("not json")
    async with running(aws) as state:

        async def settled() -> bool:  # the poison's count follows its move to the DLQ
            return await counts(aws, aws.intake_url) == (0, 0) and (
                state.events(event="malformed", outcome="dead_lettered") == 1
            )

        await wait_for(settled, what="the intake queue emptied")
        assert state.events(event="created", outcome="queued") == 1
        assert state.events(event="created", outcome="protected") == 1
        assert state.events(event="malformed", outcome="failed") == 1
        assert state.events(event="malformed", outcome="dead_lettered") == 1
    [forwarded] = await work_bodies(aws)
    assert (forwarded["name"], forwarded["commit"]) == ("feature/x", commit)
    assert await aws.dlq_bodies(aws.intake_dlq_url) == ["not json"]


async def test_a_body_nested_too_deeply_is_dead_lettered_at_once_as_malformed(
    aws: AwsResources,
) -> None:
    """json's RecursionError is a malformed event with its reason, not an unexpected error
    retried until the queue gives up."""
    deep = "[" * 50_000 + "]" * 50_000
    await aws.send_event(deep)
    async with running(aws) as state:

        async def settled() -> bool:
            return await counts(aws, aws.intake_url) == (0, 0)

        await wait_for(settled, what="the intake queue emptied")
        assert state.events(event="malformed", outcome="dead_lettered") == 1
    [(body, attributes)] = await aws.dlq_messages(aws.intake_dlq_url)
    assert body == deep
    assert attributes["branchbuild.error_kind"] == "malformed_event"
    assert "nested deeper than the parser allows" in attributes["branchbuild.reason"]


async def test_stop_lets_the_parked_poll_finish_and_forwards_what_it_brings(
    aws: AwsResources,
) -> None:
    """An abandoned receive would still take the push, invisible to every consumer for the
    visibility timeout (600 s here); the last poll is let finish and its batch handled."""
    async with running(aws, wait_time=5, intake_visibility_timeout=600) as state:
        assert isinstance(state.intake.intake, WatchedQueue)
        await state.intake.intake.polling.wait()  # parked in its 5 s long poll
        state.stopping.set()
        await aws.send_event(event_for("r", "refs/heads/feature/late", "b" * 40))
        await state.done.wait()
    assert await counts(aws, aws.intake_url) == (0, 0)
    [forwarded] = await work_bodies(aws)
    assert forwarded["name"] == "feature/late"


async def test_a_failing_push_hook_never_holds_the_push_back(aws: AwsResources) -> None:
    """The on_push hook (merge builds) runs once the push's own build is queued: when it fails
    (CodeCommit or S3 down), the push is built all the same; the hook is retried with its
    message until the last receive, then given up, and nothing is dead-lettered."""
    seen: list[str] = []

    async def failing(push: Push) -> None:
        seen.append(push.name)
        raise StorageError("S3 is down")

    commit = "b" * 40
    await aws.send_event(event_for("r", "refs/heads/feature/y", commit))
    await aws.send_event(event_for("r", "refs/heads/develop", commit))  # protected: hook too
    async with running(aws, on_push=failing, retry_base_delay=0, retry_max_delay=0) as state:

        async def settled() -> bool:
            return await counts(aws, aws.intake_url) == (0, 0)

        await wait_for(settled, within=60, what="the intake queue emptied")
        assert state.events(event="created", outcome="queued") >= 1
    [forwarded] = await work_bodies(aws)
    assert (forwarded["name"], forwarded["commit"]) == ("feature/y", commit)
    assert sorted(seen) == ["develop", "develop", "feature/y", "feature/y"]  # two receives
    assert await aws.dlq_bodies(aws.intake_dlq_url) == []
