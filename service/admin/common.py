"""What the operator commands share: AWS clients that fail fast, plain-text tables."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING

import aioboto3
from aiobotocore.config import AioConfig

from ..aws import watch_calls

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
        watch_calls(self._session, role="admin")
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
