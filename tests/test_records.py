"""Compare-and-swap documents against a real S3 emulator (moto over HTTP)."""

from __future__ import annotations

import anyio

from service.build_state import BuildState, advance
from service.ledger import Entry
from service.records import Conflict, Document, Records
from tests.helpers import AwsResources


async def test_concurrent_updates_never_lose_a_change(aws: AwsResources) -> None:
    records = Records(aws.s3, aws.bucket)

    def increment(current: Document | None) -> Document:
        return {"count": (current or {}).get("count", 0) + 1}

    async def writer() -> None:
        for _ in range(10):
            while True:
                try:
                    await records.update("state/counter.json", increment)
                    break
                except Conflict:  # transient: the queue would redeliver, so try again
                    continue

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(writer)
    found = await records.read("state/counter.json")
    assert found is not None and found.data == {"count": 40}


async def test_a_stale_version_is_refused_and_creation_happens_once(aws: AwsResources) -> None:
    records = Records(aws.s3, aws.bucket)
    assert await records.write("doc.json", {"v": 1}, replacing=None)
    assert not await records.write("doc.json", {"v": 2}, replacing=None)  # exists already
    first = await records.read("doc.json")
    assert first is not None
    assert await records.write("doc.json", {"v": 3}, replacing=first)
    assert not await records.write("doc.json", {"v": 4}, replacing=first)  # stale ETag
    latest = await records.read("doc.json")
    assert latest is not None and latest.data == {"v": 3}
    assert await records.update("doc.json", lambda current: None) is None  # left as it is


def test_the_ledger_only_moves_forward() -> None:
    from datetime import UTC, datetime

    def state(status: str, build_id: str = "shop:1") -> BuildState:
        at = datetime(2026, 3, 2, 16, 14, 4, tzinfo=UTC)
        return BuildState("e", at, build_id, "shop", status, "k", None, None)

    entry = Entry(commit="c" * 40, ref="refs/heads/main", build_id="shop:1", project="shop")
    running = advance(entry, state("IN_PROGRESS"))
    assert running is not None and running.status == "IN_PROGRESS"
    done = advance(running, state("FAILED"))
    assert done is not None and done.status == "FAILED" and done.ended_at
    assert advance(done, state("IN_PROGRESS")) is None
    assert advance(done, state("SUCCEEDED")) is None  # one final state, the first
    assert advance(running, state("IN_PROGRESS")) is None
    assert advance(entry, state("SUCCEEDED", build_id="shop:2")) is None  # another build's
