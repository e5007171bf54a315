"""AWS client set-up: the standard variables apply, AWS_REGION included."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest

from service.aws import open_clients


async def test_aws_region_alone_sets_the_region(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", "ap-southeast-2")
    async with AsyncExitStack() as stack:
        clients = await open_clients(stack, max_pool=2)
        assert clients.sqs.meta.region_name == "ap-southeast-2"
        assert clients.codebuild.meta.region_name == "ap-southeast-2"


async def test_aws_default_region_still_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    async with AsyncExitStack() as stack:
        clients = await open_clients(stack, max_pool=2)
        assert clients.s3.meta.region_name == "us-west-2"
