"""Shared delete batches against moto's SQS over HTTP: one request for jobs that finish
together, each caller told only about its own failures, never an exception."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import aioboto3
import anyio
from aiobotocore.config import AioConfig

from service.queue import Deleter, Message, Queue
from tests.helpers import AwsResources


class CountingQueue(Queue):
    """The real queue, counting the delete requests it makes."""

    requests = 0

    async def delete(self, messages: Sequence[Message]) -> list[Message]:
        self.requests += -(-len(messages) // 10)  # DeleteMessageBatch takes 10 at most
        return await super().delete(messages)


async def received(aws: AwsResources, queue: Queue, count: int) -> list[Message]:
    for n in range(count):
        await aws.sqs.send_message(
            QueueUrl=aws.work_url,
            MessageBody=f"m{n}",
            MessageGroupId=f"g{n}",
            MessageDeduplicationId=f"d{n}",
        )
    messages: list[Message] = []
    while len(messages) < count:
        messages += await queue.receive(10, wait=1, visibility=60)
    return messages


async def delete_each(deleter: Deleter, groups: list[list[Message]]) -> list[list[Message]]:
    """One delete call per group, all at once (as jobs finishing together); their results."""
    results: list[list[Message]] = [[] for _ in groups]

    async def one(index: int) -> None:
        results[index] = await deleter.delete(groups[index])

    async with anyio.create_task_group() as tg:
        for index in range(len(groups)):
            tg.start_soon(one, index)
    return results


async def test_jobs_finishing_together_share_one_delete_request(aws: AwsResources) -> None:
    queue = CountingQueue(aws.sqs, aws.work_url, name="work")
    messages = await received(aws, queue, 5)
    results = await delete_each(Deleter(queue), [[m] for m in messages])
    assert results == [[]] * 5
    assert queue.requests == 1
    assert await aws.count(aws.work_url) == 0


async def test_a_full_batch_goes_at_once_and_more_than_ten_are_split(aws: AwsResources) -> None:
    queue = CountingQueue(aws.sqs, aws.work_url, name="work")
    messages = await received(aws, queue, 12)
    deleter = Deleter(queue, linger=3600)  # only a full batch may end the wait
    results = await delete_each(deleter, [messages[:6], messages[6:]])
    assert results == [[], []]
    assert queue.requests == 2
    assert await aws.count(aws.work_url) == 0


async def test_each_caller_gets_back_only_its_own_failed_message(aws: AwsResources) -> None:
    queue = Queue(aws.sqs, aws.work_url, name="work")
    good, other = await received(aws, queue, 2)
    stale = replace(other, receipt="not-a-receipt-handle")
    results = await delete_each(Deleter(queue), [[good], [stale]])
    assert results == [[], [stale]]
    assert await aws.count(aws.work_url) == 1  # `other` was never deleted


async def test_an_unreachable_queue_fails_every_caller_without_raising(
    aws: AwsResources,
) -> None:
    queue = Queue(aws.sqs, aws.work_url, name="work")
    messages = await received(aws, queue, 3)
    session = aioboto3.Session()
    config = AioConfig(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=1)
    async with session.client("sqs", endpoint_url="http://127.0.0.1:9", config=config) as dead:
        unreachable = Queue(dead, aws.work_url, name="work")
        results = await delete_each(Deleter(unreachable), [[m] for m in messages])
    assert results == [[m] for m in messages]
    assert await aws.count(aws.work_url) == 3


async def test_moto_never_hands_one_fifo_group_to_two_receivers(aws: AwsResources) -> None:
    """The suite's moto (tests/motoserver.py) keeps SQS's FIFO promise that per-branch order
    rests on: while a group's message is held, no receiver gets another of that group. Plain
    ``moto.server`` broke it under concurrent receivers (two branches' pushes built out of
    order in tests/test_chaos.py after a SIGKILL)."""
    groups, per_group = 4, 60
    entries = [(g, k) for k in range(per_group) for g in range(groups)]
    for start in range(0, len(entries), 10):
        await aws.sqs.send_message_batch(
            QueueUrl=aws.work_url,
            Entries=[
                {
                    "Id": str(i),
                    "MessageBody": f"{g}:{k}",
                    "MessageGroupId": f"g{g}",
                    "MessageDeduplicationId": f"{g}-{k}",
                }
                for i, (g, k) in enumerate(entries[start : start + 10])
            ],
        )
    held: dict[int, list[int]] = {}
    overlaps: list[tuple[int, list[int], list[int]]] = []
    handled: dict[int, list[int]] = {g: [] for g in range(groups)}

    async def receiver() -> None:
        while sum(map(len, handled.values())) < len(entries):
            reply = await aws.sqs.receive_message(
                QueueUrl=aws.work_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
            )
            batch: dict[int, list[int]] = {}
            for message in reply.get("Messages", []):
                g, k = map(int, message["Body"].split(":"))
                batch.setdefault(g, []).append(k)
            for g, ks in batch.items():
                if g in held:
                    overlaps.append((g, held[g], ks))
                held[g] = ks
            await anyio.sleep(0.01)  # hold them, as a job does
            for g, ks in batch.items():
                held.pop(g, None)
                handled[g] += ks
            if reply.get("Messages"):
                await aws.sqs.delete_message_batch(
                    QueueUrl=aws.work_url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                        for i, m in enumerate(reply["Messages"])
                    ],
                )

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(receiver)
    assert overlaps == []
    assert handled == {g: list(range(per_group)) for g in range(groups)}
