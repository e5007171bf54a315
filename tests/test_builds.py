"""StartBuild: parameters, idempotency token, and in-process retries of throttling.

The retry test uses a stand-in client because no emulator can be told to throttle
StartBuild (moto and LocalStack community never do); the end-to-end tests check the real
request against moto.
"""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from service.builds import BuildRequest, CodeBuild, project_name
from service.errors import AccessDenied, BuildError, PermanentError
from service.events import RefType
from tests.helpers import push_for

PUSH = push_for("shop", "feature/x", "a" * 40)


class FlakyCodeBuild:
    def __init__(self, *codes: str) -> None:
        self.codes = list(codes)
        self.calls: list[dict[str, Any]] = []

    async def start_build(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        if self.codes:
            code = self.codes.pop(0)
            raise ClientError({"Error": {"Code": code, "Message": "slow down"}}, "StartBuild")
        return {"build": {"id": "shop:1234"}}


def request() -> BuildRequest:
    return BuildRequest(push=PUSH, project="shop", bucket="b", key="shop/feature/x/a.zip")


async def test_throttling_and_account_limit_are_retried_with_the_same_token() -> None:
    client = FlakyCodeBuild("ThrottlingException", "AccountLimitExceededException")
    backend = CodeBuild(client, attempts=5, max_wait=0.01)  # type: ignore[arg-type]
    started = await backend.start(request())
    assert started.build_id == "shop:1234"
    assert len(client.calls) == 3
    assert len({call["idempotencyToken"] for call in client.calls}) == 1


async def test_persistent_throttling_becomes_transient() -> None:
    client = FlakyCodeBuild(*["AccountLimitExceededException"] * 5)
    backend = CodeBuild(client, attempts=3, max_wait=0.01)  # type: ignore[arg-type]
    with pytest.raises(BuildError, match="AccountLimitExceededException"):
        await backend.start(request())
    assert len(client.calls) == 3


async def test_missing_project_is_permanent_and_not_retried() -> None:
    client = FlakyCodeBuild("ResourceNotFoundException")
    backend = CodeBuild(client, attempts=5, max_wait=0.01)  # type: ignore[arg-type]
    with pytest.raises(AccessDenied):
        await backend.start(request())
    assert len(client.calls) == 1


def test_tags_get_tag_name_and_tokens_differ_per_ref() -> None:
    tag = BuildRequest(
        push=push_for("shop", "v1", "a" * 40, ref_type=RefType.TAG),
        project="shop",
        bucket="b",
        key="k",
    )
    assert tag.environment == {
        "COMMIT_ID": "a" * 40,
        "TAG_NAME": "v1",
        "REPOSITORY_NAME": "shop",
        "BRANCHBUILD_ARCHIVE": "k",
    }
    assert tag.idempotency_token != request().idempotency_token


def test_project_template_must_render_a_valid_name() -> None:
    assert project_name("{repository}-ci", PUSH) == "shop-ci"
    with pytest.raises(PermanentError, match="not a valid CodeBuild project name"):
        project_name("{branch}", PUSH)  # "feature/x" has a slash
