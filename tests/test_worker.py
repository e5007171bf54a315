"""The consumer in-process: ``Worker.run`` and ``Leases`` against moto's SQS over HTTP, with a
stub job instead of git, S3 and CodeBuild. Seconds, not minutes, and each test names the
behaviour it guards: supersede, poison memory, the ``CONCURRENCY + 9`` bound, heartbeats,
release on stop, the retry delay."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio

from service.errors import AccessDenied, BranchbuildError, TransientError
from service.events import Push
from service.health import Health
from service.intake import work_message
from service.job import JobResult
from service.metrics import Metrics
from service.outcome import Outcome
from service.queue import Leases, Message, Queue, release_delay, retry_delay
from service.settings import Settings
from service.worker import Worker
from tests.helpers import AwsResources, push_for, wait_for


class StubJobs:
    """The job runner: records each push it is given; a commit's job fails with the error
    set for it, or waits until its gate opens (``gated``)."""

    def __init__(self, *, gated: bool = False) -> None:
        self.gated = gated
        self.started: list[Push] = []
        self.running: list[Push] = []
        self.gates: dict[str | None, anyio.Event] = {}
        self.errors: dict[str | None, BranchbuildError] = {}

    async def __call__(self, push: Push, recovering: bool) -> JobResult:
        self.started.append(push)
        if push.commit in self.errors:
            raise self.errors[push.commit]
        self.running.append(push)
        try:
            if self.gated:
                await self.gates.setdefault(push.commit, anyio.Event()).wait()
        finally:
            self.running.remove(push)
        return JobResult(Outcome.BUILT, f"build-{push.commit}", "key")

    def finish(self, push: Push) -> None:
        self.gates.setdefault(push.commit, anyio.Event()).set()


class Consumer:
    def __init__(self, aws: AwsResources, worker: Worker, leases: Leases) -> None:
        self.aws = aws
        self.worker = worker
        self.leases = leases
        self.metrics = worker.metrics
        self.stopping = anyio.Event()

    def count(self, outcome: Outcome) -> float:
        return self.sample("branchbuild_jobs_total", outcome=outcome.value)

    def heartbeats(self) -> float:
        return self.sample("branchbuild_visibility_extensions_total")

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def settings_for(aws: AwsResources, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "queue_url": aws.intake_url,
        "work_queue_url": aws.work_url,
        "bucket": aws.bucket,
        "wait_time": 1,
        "visibility_timeout": 30,
        "retry_base_delay": 1,
        "retry_max_delay": 2,
        "shutdown_grace": 5,
    }
    return Settings(**(values | overrides))


@asynccontextmanager
async def running(aws: AwsResources, jobs: StubJobs, **overrides: Any) -> AsyncIterator[Consumer]:
    """``Worker.run`` and its heartbeat as the service runs them; stopped on exit."""
    s = settings_for(aws, **overrides)
    metrics = Metrics()
    queue = Queue(aws.sqs, aws.work_url, name="work")
    await queue.describe()
    leases = Leases(
        visibility=s.visibility_timeout, interval=s.visibility_timeout / 3, metrics=metrics
    )
    health = Health(liveness_timeout=s.liveness_timeout)
    worker = Worker(queue, leases, health, settings=s, metrics=metrics, job=jobs)
    consumer = Consumer(aws, worker, leases)
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(leases.run)
            await tg.start(worker.run, consumer.stopping)
            yield consumer
            consumer.stopping.set()
            await wait_for(lambda: _stopped(worker), what="the worker to stop")
            tg.cancel_scope.cancel()


async def _stopped(worker: Worker) -> bool:
    return worker.health.draining and worker._active == 0


async def send(aws: AwsResources, *pushes: Push) -> None:
    for push in pushes:
        message = work_message(push)
        await aws.sqs.send_message(
            QueueUrl=aws.work_url,
            MessageBody=message.body,
            MessageGroupId=message.group,
            MessageDeduplicationId=message.dedup,
        )


async def in_queue(aws: AwsResources) -> tuple[int, int]:
    """(visible, in flight) messages of the work queue."""
    reply = await aws.sqs.get_queue_attributes(
        QueueUrl=aws.work_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )
    a = reply["Attributes"]
    return int(a["ApproximateNumberOfMessages"]), int(a["ApproximateNumberOfMessagesNotVisible"])


def until(condition: Callable[[], bool]) -> Callable[[], Any]:
    async def probe() -> bool:
        return condition()

    return probe


async def drained(aws: AwsResources) -> bool:
    return await in_queue(aws) == (0, 0)


async def test_the_newest_waiting_push_of_a_branch_supersedes_the_older_ones(
    aws: AwsResources,
) -> None:
    a1, a2, a3 = (push_for("r", "a", f"{n:040x}") for n in (1, 2, 3))
    b1 = push_for("r", "b")
    await send(aws, a1, a2, a3, b1)  # all waiting before the worker's first receive
    jobs = StubJobs()
    async with running(aws, jobs) as consumer:
        await wait_for(lambda: drained(aws), what="every message settled")
        assert len(jobs.started) == 2
        assert {p.commit for p in jobs.started} == {a3.commit, b1.commit}
        assert consumer.count(Outcome.SUPERSEDED) == 2
        assert consumer.count(Outcome.BUILT) == 2


async def test_a_permanent_failure_is_refused_from_memory_then_dead_lettered(
    aws: AwsResources,
) -> None:
    push = push_for("r", "poison")
    jobs = StubJobs()
    jobs.errors[push.commit] = AccessDenied("no such project")
    await send(aws, push)
    # A permanent error is released at once, whatever the backoff: its next receive is its last.
    async with running(aws, jobs, retry_base_delay=600, retry_max_delay=600) as consumer:
        await wait_for(until(lambda: consumer.count(Outcome.DEAD_LETTERED) == 1))
        assert consumer.count(Outcome.FAILED) == 1  # the first receive: visible again at once
        assert len(jobs.started) == 1  # the second receive did not redo the work
        [(body, attributes)] = await aws.dlq_messages(aws.work_dlq_url)
        assert attributes["branchbuild.reason"] == "no such project"
        assert await drained(aws)


async def test_at_most_concurrency_plus_nine_messages_are_held(aws: AwsResources) -> None:
    concurrency = 2
    pushes = [push_for("r", f"b{n}") for n in range(25)]
    await send(aws, *pushes)
    jobs = StubJobs(gated=True)
    held: list[int] = []
    async with running(aws, jobs, concurrency=concurrency) as consumer:
        while len(jobs.started) < len(pushes) or jobs.running:
            await wait_for(
                until(lambda: len(jobs.running) == min(concurrency, len(pushes) - done(jobs))),
                what="every slot busy",
            )
            held.append((await in_queue(aws))[1])
            jobs.finish(jobs.running[0])
            await wait_for(until(lambda: consumer.count(Outcome.BUILT) == done(jobs)))
        await wait_for(lambda: drained(aws))
    # A receive happens only with a slot free and no received job waiting for one; it
    # asks for 10, so one job left running plus ten new ones is the most ever held.
    assert max(held) == concurrency + 9


def done(jobs: StubJobs) -> int:
    return sum(gate.is_set() for gate in jobs.gates.values())


async def test_heartbeats_keep_a_job_longer_than_its_visibility_from_a_second_consumer(
    aws: AwsResources,
) -> None:
    push = push_for("r", "slow")
    await send(aws, push)
    jobs = StubJobs(gated=True)
    async with running(aws, jobs, visibility_timeout=2) as consumer:  # a beat every 0.67 s
        await wait_for(until(lambda: consumer.heartbeats() >= 9), what="three timeouts' beats")
        assert await in_queue(aws) == (0, 1)
        assert len(jobs.started) == 1  # never received a second time
        jobs.finish(push)
        await wait_for(lambda: drained(aws))
    assert len(jobs.started) == 1


async def test_stop_releases_waiting_jobs_at_once_and_running_ones_after_the_grace(
    aws: AwsResources,
) -> None:
    pushes = [push_for("r", f"s{n}") for n in range(3)]
    await send(aws, *pushes)
    jobs = StubJobs(gated=True)
    async with running(aws, jobs, concurrency=1, shutdown_grace=0.5) as consumer:
        await wait_for(until(lambda: len(jobs.running) == 1))
        assert await in_queue(aws) == (0, 3)
        consumer.stopping.set()
        await wait_for(lambda: _stopped(consumer.worker), what="the worker to stop")
        # Visible again for another instance, not held for the 30 s visibility timeout.
        assert await in_queue(aws) == (3, 0)
        assert consumer.count(Outcome.RELEASED) == 3


async def test_a_transient_failure_is_visible_again_only_after_a_backoff(
    aws: AwsResources,
) -> None:
    push = push_for("r", "flaky")
    jobs = StubJobs()
    jobs.errors[push.commit] = TransientError("SSH dropped")
    await send(aws, push)
    async with running(aws, jobs, retry_base_delay=600, retry_max_delay=600) as consumer:
        await wait_for(until(lambda: consumer.count(Outcome.RETRIED) == 1))
        assert await in_queue(aws) == (0, 1)  # invisible for its backoff, not released
        assert not consumer.leases._held  # nor kept by the heartbeat
    assert len(jobs.started) == 1


def test_the_retry_delay_doubles_per_receive_with_jitter_and_a_cap() -> None:
    message = Message(id="m", receipt="r", body="", group="g", receive_count=1, sent_at_ms=0)
    assert release_delay(AccessDenied("x"), message, base=10, cap=300) == 0
    for count, expected in ((1, 10), (2, 20), (3, 40), (9, 300)):
        delays = {retry_delay(count, base=10, cap=300) for _ in range(200)}
        assert min(delays) >= expected * 0.8 and max(delays) <= expected * 1.2 + 1
        assert len(delays) > 1  # jittered
    assert retry_delay(40, base=43200, cap=43200) <= 43200  # SQS's limit


async def test_leases_extend_what_is_held_and_count_a_lost_lease(aws: AwsResources) -> None:
    metrics = Metrics()
    queue = Queue(aws.sqs, aws.work_url, name="work")
    await send(aws, push_for("r", "kept"), push_for("r", "gone"))
    messages: list[Message] = []
    while len(messages) < 2:
        messages += await queue.receive(10, wait=1, visibility=2)
    leases = Leases(visibility=600, interval=1, metrics=metrics)
    leases.hold(queue, messages)
    [kept] = [m for m in messages if '"kept"' in m.body]
    [gone] = [m for m in messages if '"gone"' in m.body]
    assert await queue.delete([gone]) == []
    await leases.extend_all()
    assert metrics.registry.get_sample_value("branchbuild_visibility_extensions_total") == 1
    assert (
        metrics.registry.get_sample_value("branchbuild_errors_total", {"kind": "lease_lost"}) == 1
    )
    assert leases.lost == {gone.receipt}
    # Extended to 600 s: a poll that outlasts its 2 s receive visibility gets nothing.
    assert await queue.receive(10, wait=3, visibility=2) == []
    assert await in_queue(aws) == (0, 1)
    leases.drop([kept, gone])
    assert len(leases) == 0
