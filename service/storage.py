"""Stream an archive to S3 with a multipart upload (the ledger is :mod:`service.ledger`).

Memory is bounded by about ``part_size × BRANCHBUILD_MAX_PARTS_IN_FLIGHT`` for the whole
service, whatever the archives' sizes and the number of jobs: each part is read into one
in-memory file that botocore sends as it is (never copied into a second buffer), and nothing
is written to disk. Part sizes
double every 500 parts, so the 10,000-part limit is never reached before S3's 5 TiB object
limit. Any failure or cancellation aborts the upload.
"""

from __future__ import annotations

import ctypes
import io
import logging
import os
import platform
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import anyio.abc
from anyio.abc import ByteReceiveStream

from .aws import error_code, translated
from .errors import AccessDenied, ArchiveTooLarge, StorageError, unwrap_group

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

    from .ledger import BranchKeys

log = logging.getLogger("branchbuild.storage")

MAX_PARTS = 10_000
PARTS_PER_TIER = 500
MAX_PART = 5 * 1024**3


def return_freed_buffers_to_the_os() -> bool:
    """Make glibc give every freed part buffer back to the OS; True if it was set.

    glibc serves a block over ``M_MMAP_THRESHOLD`` (128 KiB) with its own mapping, unmapped
    when freed, but after the first such free it raises the threshold to that block's size:
    from then on the part buffers come from the heap, where fragmentation keeps them
    resident, and each burst of uploads leaves the process bigger (``make bench``: medium
    bursts 200-208 MB instead of 175-181 MB). Setting the threshold turns that adjustment
    off. Called once at start-up; does nothing off glibc or when the operator set
    ``MALLOC_MMAP_THRESHOLD_``.
    """
    if platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_mmap_threshold = -3
    return bool(mallopt(m_mmap_threshold, 128 * 1024))


def part_size(part_number: int, base: int) -> int:
    """The size of 1-based part ``part_number``: ``base`` doubled every 500 parts, at most 5 GiB.

    From a 5 MiB base, 10,000 parts hold more than S3's 5 TiB object limit.
    """
    return int(min(MAX_PART, base * 2 ** ((part_number - 1) // PARTS_PER_TIER)))


@dataclass(frozen=True)
class Uploaded:
    key: str
    size: int
    parts: int
    etag: str


class Storage:
    def __init__(
        self,
        s3: S3Client,
        bucket: str,
        *,
        part_size: int,
        concurrency: int,
        max_bytes: int,
        buffers: anyio.CapacityLimiter | None = None,
    ) -> None:
        """``buffers``: part buffers the whole service may hold at once (shared by every
        upload); by default this upload's own ``concurrency + 1``."""
        self.buffers = buffers or anyio.CapacityLimiter(concurrency + 1)
        self.s3 = s3
        self.bucket = bucket
        self.base_part_size = part_size
        self.concurrency = concurrency
        self.max_bytes = max_bytes

    async def check(self) -> None:
        """Fail fast at start-up on a missing or forbidden bucket.

        Raises:
            AccessDenied: the bucket does not exist or may not be used (permanent).
            StorageError: S3 could not be reached.
        """
        try:
            with translated(f"use bucket {self.bucket}", transient=StorageError):
                await self.s3.head_bucket(Bucket=self.bucket)
        except StorageError as exc:
            if error_code(exc.__cause__ or exc) in {"404", "403", "NoSuchBucket", "Forbidden"}:
                raise AccessDenied(f"bucket {self.bucket} does not exist or is not ours") from None
            raise

    async def upload(self, key: str, stream: ByteReceiveStream) -> Uploaded:
        """Upload everything ``stream`` yields to ``key``.

        Raises:
            StorageError: S3 failed (transient); the multipart upload was aborted.
            AccessDenied: the bucket is missing or not writable (permanent).
            ArchiveTooLarge: the stream exceeded ``max_bytes`` (permanent).
        """
        reader = _Reader(stream, self.max_bytes)
        first, token = await self._read_part(reader, 1)
        if reader.eof:  # small archive: one request, no multipart bookkeeping
            try:
                with translated(f"upload s3://{self.bucket}/{key}", transient=StorageError):
                    reply = await self.s3.put_object(
                        Bucket=self.bucket, Key=key, Body=first, ContentType="application/zip"
                    )
            finally:
                first.close()
                self.buffers.release_on_behalf_of(token)
            return Uploaded(key, reader.total, 1, reply.get("ETag", ""))
        try:
            with translated(f"start an upload to s3://{self.bucket}/{key}", transient=StorageError):
                created = await self.s3.create_multipart_upload(
                    Bucket=self.bucket, Key=key, ContentType="application/zip"
                )
        except BaseException:
            self.buffers.release_on_behalf_of(token)
            raise
        upload_id = created["UploadId"]
        try:
            parts = await self._upload_parts(key, upload_id, (first, token), reader)
            with translated(f"complete s3://{self.bucket}/{key}", transient=StorageError):
                done = await self.s3.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._abort(key, upload_id)
            raise
        return Uploaded(key, reader.total, len(parts), done.get("ETag", ""))

    async def _read_part(self, reader: _Reader, number: int) -> tuple[io.BytesIO, object]:
        """Read part ``number`` once a buffer is free in the service-wide budget; the token
        is released when the part is sent (or fails)."""
        token = object()
        await self.buffers.acquire_on_behalf_of(token)
        try:
            return await reader.read(part_size(number, self.base_part_size)), token
        except BaseException:
            self.buffers.release_on_behalf_of(token)
            raise

    async def _upload_parts(
        self, key: str, upload_id: str, first: tuple[io.BytesIO, object], reader: _Reader
    ) -> list[CompletedPartTypeDef]:
        parts: dict[int, str] = {}
        slots = anyio.Semaphore(self.concurrency)

        async def send(number: int, body: io.BytesIO, token: object) -> None:
            try:
                with translated(f"upload part {number} of {key}", transient=StorageError):
                    reply = await self.s3.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=body,
                    )
                parts[number] = reply["ETag"]
            finally:
                body.close()
                slots.release()
                self.buffers.release_on_behalf_of(token)

        with unwrap_group():
            async with anyio.create_task_group() as tg:
                number, (body, token) = 1, first
                while True:
                    # At most `concurrency` parts of this upload in flight, and at most
                    # `buffers` parts held by the whole service: memory stays bounded.
                    try:
                        await slots.acquire()
                    except BaseException:
                        body.close()
                        self.buffers.release_on_behalf_of(token)
                        raise
                    tg.start_soon(send, number, body, token)
                    if reader.eof:
                        break
                    number += 1
                    if number > MAX_PARTS:
                        raise ArchiveTooLarge(f"archive needs more than {MAX_PARTS} parts")
                    body, token = await self._read_part(reader, number)
                    if _length(body) == 0:
                        body.close()
                        self.buffers.release_on_behalf_of(token)
                        break
        return [{"PartNumber": n, "ETag": parts[n]} for n in sorted(parts)]

    async def abort_stale(self, keys: BranchKeys) -> int:
        """Abort the multipart uploads of one branch's archives (``keys``); every page of
        the listing is read. Returns how many were aborted.

        A job killed mid-upload (SIGKILL, a lost task) leaves its upload open. The next job of
        the same branch calls this: FIFO groups run one job per branch at a time, so any upload
        of that branch still open is a leftover. A template starting with ``{commit}`` has no
        branch prefix: nothing is listed (the bucket's lifecycle rule removes such leftovers).
        """
        if not keys.prefix:
            return 0
        stale: list[tuple[str, str]] = []
        paginator = self.s3.get_paginator("list_multipart_uploads")
        with translated(
            f"list uploads under s3://{self.bucket}/{keys.prefix}", transient=StorageError
        ):
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=keys.prefix):
                stale += [
                    (u["Key"], u["UploadId"])
                    for u in page.get("Uploads", [])
                    if keys.is_archive(u["Key"])
                ]
        for key, upload_id in stale:
            log.info("aborting a multipart upload left by an interrupted job: %s", key)
            await self._abort(key, upload_id)
        return len(stale)

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            await self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:  # the lifecycle rule removes what we could not
            log.warning("could not abort the multipart upload of %s: %s", key, exc)


class _Reader:
    """Reads exact-size parts from a byte stream and enforces the size limit."""

    def __init__(self, stream: ByteReceiveStream, limit: int) -> None:
        self.stream = stream
        self.limit = limit
        self.total = 0
        self.eof = False

    async def read(self, size: int) -> io.BytesIO:
        """Up to ``size`` bytes (fewer only at the end) in an in-memory file at offset 0."""
        buffer = io.BytesIO()
        filled = 0
        while filled < size and not self.eof:
            try:
                chunk = await self.stream.receive(min(size - filled, 1024 * 1024))
            except anyio.EndOfStream:
                self.eof = True
                break
            filled += buffer.write(chunk)
            self.total += len(chunk)
            if self.total > self.limit:
                raise ArchiveTooLarge(
                    f"the archive exceeds BRANCHBUILD_MAX_ARCHIVE_BYTES={self.limit}"
                )
        buffer.seek(0)
        return buffer


def _length(buffer: io.BytesIO) -> int:
    with buffer.getbuffer() as view:
        return view.nbytes
