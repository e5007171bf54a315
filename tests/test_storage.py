"""Streaming multipart upload against moto over HTTP: content, part sizes, abort on failure."""

from __future__ import annotations

import os
import sys

import anyio
import pytest
from anyio.abc import ByteReceiveStream

from service.errors import ArchiveTooLarge
from service.ledger import branch_keys
from service.settings import MiB
from service.storage import (
    MAX_PARTS,
    Storage,
    part_size,
    return_freed_buffers_to_the_os,
)
from tests.helpers import ROOT, AwsResources, push_for, wait_for


class BytesStream(ByteReceiveStream):
    """A byte stream over a buffer, optionally failing after ``fail_after`` bytes."""

    def __init__(self, data: bytes, *, chunk: int = 65536, fail_after: int | None = None) -> None:
        self.data = memoryview(data)
        self.offset = 0
        self.chunk = chunk
        self.fail_after = fail_after

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()
        if self.fail_after is not None and self.offset >= self.fail_after:
            raise OSError("the archive process died")
        if self.offset >= len(self.data):
            raise anyio.EndOfStream
        end = min(len(self.data), self.offset + min(max_bytes, self.chunk))
        piece = bytes(self.data[self.offset : end])
        self.offset = end
        return piece

    async def aclose(self) -> None:
        return None


def storage(aws: AwsResources, *, max_bytes: int = 1 << 40) -> Storage:
    return Storage(aws.s3, aws.bucket, part_size=5 * MiB, concurrency=3, max_bytes=max_bytes)


def test_part_sizes_reach_s3s_object_limit_within_10000_parts() -> None:
    total = sum(part_size(n, 5 * MiB) for n in range(1, MAX_PARTS + 1))
    assert total >= 5 * 1024**4  # 5 TiB, S3 largest object
    assert max(part_size(n, 5 * MiB) for n in range(1, MAX_PARTS + 1)) <= 5 * 1024**3
    assert part_size(1, 5 * MiB) == part_size(500, 5 * MiB) == 5 * MiB
    assert part_size(501, 5 * MiB) == 10 * MiB


async def test_small_archive_is_one_put(aws: AwsResources) -> None:
    data = os.urandom(1000)
    uploaded = await storage(aws).upload("repo/a/1.zip", BytesStream(data))
    assert uploaded.parts == 1 and uploaded.size == 1000
    assert await aws.object("repo/a/1.zip") == data


async def test_large_archive_is_multipart_and_identical(aws: AwsResources) -> None:
    data = os.urandom(12 * MiB + 123)
    uploaded = await storage(aws).upload("repo/a/2.zip", BytesStream(data))
    assert uploaded.parts == 3 and uploaded.size == len(data)
    assert await aws.object("repo/a/2.zip") == data
    assert await aws.open_uploads() == 0


async def test_failure_mid_stream_aborts_the_upload(aws: AwsResources) -> None:
    with pytest.raises(OSError, match="died"):
        await storage(aws).upload(
            "repo/a/3.zip", BytesStream(os.urandom(12 * MiB), fail_after=11 * MiB)
        )
    assert await aws.open_uploads() == 0
    assert "repo/a/3.zip" not in await aws.keys()


async def test_archive_over_the_limit_is_permanent_and_leaves_nothing(aws: AwsResources) -> None:
    with pytest.raises(ArchiveTooLarge, match="BRANCHBUILD_MAX_ARCHIVE_BYTES"):
        await storage(aws, max_bytes=6 * MiB).upload(
            "repo/a/4.zip", BytesStream(os.urandom(12 * MiB))
        )
    assert await aws.open_uploads() == 0
    assert await aws.keys() == []


async def test_cancellation_aborts_the_upload(aws: AwsResources) -> None:
    class Stalling(BytesStream):
        async def receive(self, max_bytes: int = 65536) -> bytes:
            if self.offset >= 6 * MiB:
                await anyio.sleep_forever()
            return await super().receive(max_bytes)

    with anyio.move_on_after(5) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(storage(aws).upload, "repo/a/5.zip", Stalling(os.urandom(12 * MiB)))
            await wait_for(aws.open_uploads, what="an open multipart upload")
            tg.cancel_scope.cancel()
    assert not scope.cancelled_caught
    assert await aws.open_uploads() == 0


async def test_leftover_uploads_of_the_same_branch_are_aborted(aws: AwsResources) -> None:
    push = push_for("repo", "feature/a", "f" * 40)
    branch = branch_keys("{repository}/{branch}/{commit}.zip", push)
    assert branch.prefix == "repo/feature/a/"
    keys = {
        f"repo/feature/a/{'1' * 40}.zip": True,  # same branch, other commits: leftovers
        f"repo/feature/a/{'2' * 40}.zip": True,
        f"repo/feature/a/b/{'3' * 40}.zip": False,  # branch feature/a/b: another lane
        f"repo/feature/ab/{'4' * 40}.zip": False,
        f"repo/other/{'5' * 40}.zip": False,
    }
    for key in keys:
        await aws.s3.create_multipart_upload(Bucket=aws.bucket, Key=key)
    assert await storage(aws).abort_stale(branch) == 2
    reply = await aws.s3.list_multipart_uploads(Bucket=aws.bucket)
    left = sorted(u["Key"] for u in reply.get("Uploads", []))
    assert left == sorted(k for k, stale in keys.items() if not stale)
    custom = branch_keys("builds/{commit}/{repository}/{branch}/a.zip", push)
    assert custom.prefix == "builds/"
    assert custom.is_archive(f"builds/{'a' * 40}/repo/feature/a/a.zip")
    assert not custom.is_archive(f"builds/{'a' * 40}/repo/feature/a/b/a.zip")


async def test_the_service_wide_buffer_budget_bounds_parts_in_flight(
    aws: AwsResources, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two uploads with 4 parts in flight each, sharing a budget of 3 buffers: never more than
    3 parts exist at once, so memory is bounded however many jobs run."""
    in_flight = peak = 0
    real = aws.s3.upload_part

    async def counting(**kwargs: object) -> object:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await real(**kwargs)  # type: ignore[arg-type]
        finally:
            in_flight -= 1

    monkeypatch.setattr(aws.s3, "upload_part", counting)
    budget = anyio.CapacityLimiter(3)
    shared = Storage(
        aws.s3, aws.bucket, part_size=5 * MiB, concurrency=4, max_bytes=1 << 40, buffers=budget
    )
    data = {key: os.urandom(21 * MiB) for key in ("repo/b/1.zip", "repo/b/2.zip")}
    async with anyio.create_task_group() as tg:
        for key, body in data.items():
            tg.start_soon(shared.upload, key, BytesStream(body))
    assert 1 <= peak <= 3
    assert budget.borrowed_tokens == 0  # every buffer given back
    for key, body in data.items():
        assert await aws.object(key) == body


FREED_BUFFERS_SCRIPT = """
import sys
from service.storage import return_freed_buffers_to_the_os
if sys.argv[1] == "set":
    assert return_freed_buffers_to_the_os()
keep = []
for _ in range(6):  # bursts of four 8 MiB part buffers, each followed by a long-lived object
    parts = []
    for _ in range(4):
        part = bytearray(8 * 1024 * 1024)
        part[::4096] = b"x" * len(part[::4096])  # touch every page
        parts.append(part)
        keep.append(bytearray(200_000))
    del parts
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")))
"""


async def test_freed_part_buffers_go_back_to_the_os() -> None:
    """Without the setting, glibc keeps freed part buffers on its heap behind later
    allocations; with it, each buffer is its own mapping and is returned when freed."""

    async def rss_kib(mode: str) -> int:
        result = await anyio.run_process(
            [sys.executable, "-c", FREED_BUFFERS_SCRIPT, mode], cwd=ROOT
        )
        return int(result.stdout)

    assert await rss_kib("set") < await rss_kib("unset") - 16 * 1024


def test_an_operator_set_malloc_threshold_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert return_freed_buffers_to_the_os() is False
