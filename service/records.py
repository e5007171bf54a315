"""Small JSON documents in the artifact bucket, changed only by compare-and-swap.

Build state events, the superseding of running builds and pull request feedback all update
state that several service instances (and redeliveries) may touch at once. S3 conditional
writes (``If-None-Match: *`` to create, ``If-Match: <ETag>`` to replace) make every change a
compare-and-swap: a writer that lost the race re-reads and decides again, so state survives
restarts and holds across instances without a lock.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from .aws import error_code, translated
from .errors import StorageError

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

    from .metrics import Metrics

log = logging.getLogger("branchbuild.records")

# branchbuild's own documents in the artifact bucket (branch state, reconciliation), apart
# from the archives under {repository}/.
STATE_PREFIX = "branchbuild-state/"

_CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
MAX_ATTEMPTS = 10

Document = dict[str, Any]


@dataclass(frozen=True)
class Versioned:
    """A document as read, with the ETag a replacing write must match."""

    data: Document
    etag: str


class Conflict(StorageError):
    """Raised when a compare-and-swap lost to concurrent writers ``MAX_ATTEMPTS`` times."""

    kind = "conflict"


class Records:
    def __init__(self, s3: S3Client, bucket: str, metrics: Metrics | None = None) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.metrics = metrics

    async def read(self, key: str) -> Versioned | None:
        """The document at ``key``, or None if there is none.

        A document that is not a JSON object reads as ``{}`` with its ETag (so the next
        compare-and-swap replaces it, and nothing is lost that could be read): logged and
        counted as ``branchbuild_fallbacks_total{decision="unreadable_document"}``.

        Raises:
            StorageError: S3 failed (transient).
        """
        try:
            with translated(f"read s3://{self.bucket}/{key}", transient=StorageError):
                reply = await self.s3.get_object(Bucket=self.bucket, Key=key)
                body = await reply["Body"].read()
        except StorageError as exc:
            if error_code(exc.__cause__ or exc) in {"NoSuchKey", "404"}:
                return None
            raise
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            log.warning("an unreadable document at %s reads as empty", key)
            if self.metrics is not None:
                self.metrics.fallbacks.labels(decision="unreadable_document").inc()
            data = {}
        return Versioned(data=data, etag=reply.get("ETag", ""))

    async def write(self, key: str, data: Document, *, replacing: Versioned | None) -> bool:
        """Create ``key`` (``replacing=None``) or replace exactly the version read; False if
        another writer came first.

        Raises:
            StorageError: S3 failed (transient).
        """
        body = json.dumps(data, sort_keys=True).encode()
        condition = {"IfMatch": replacing.etag} if replacing else {"IfNoneMatch": "*"}
        try:
            with translated(f"write s3://{self.bucket}/{key}", transient=StorageError):
                await self.s3.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=body,
                    ContentType="application/json",
                    **condition,  # type: ignore[arg-type]
                )
        except StorageError as exc:
            code = error_code(exc.__cause__ or exc)
            if code in _CONFLICT_CODES or (replacing and code in {"NoSuchKey", "404"}):
                return False
            raise
        return True

    async def update(
        self,
        key: str,
        change: Callable[[Document | None], Document | None],
    ) -> Document | None:
        """Apply ``change`` to the current document until the write wins.

        ``change`` gets the current document (None if absent) and returns the new one, or None
        to leave it as it is. Returns what was written (or None when nothing was).

        Raises:
            Conflict: lost the race ``MAX_ATTEMPTS`` times in a row (transient).
            StorageError: S3 failed (transient).
        """
        for attempt in range(MAX_ATTEMPTS):
            if attempt:  # lost a race: let the winners finish (jittered, so racers spread out)
                await anyio.sleep(random.uniform(0, min(1.0, 0.02 * 2**attempt)))  # noqa: S311
            current = await self.read(key)
            new = change(dict(current.data) if current else None)
            if new is None:
                return None
            if await self.write(key, new, replacing=current):
                return new
        raise Conflict(f"s3://{self.bucket}/{key} kept changing under {MAX_ATTEMPTS} attempts")
