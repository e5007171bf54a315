"""StartBuild: parameters, idempotency token, and capacity refusals told apart from failures.

The refusal tests use a stand-in client because moto never throttles StartBuild; the
CodeBuild stand-in (localdev/codebuild.py, tests/test_scheduler.py) refuses as
CodeBuild does, over HTTP.
"""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from service.builds import BuildRequest, CodeBuild, project_name
from service.errors import AccessDenied, BuildError, CapacityRefused, PermanentError
from service.events import RefType
from tests.helpers import push_for

PUSH = push_for("shop", "feature/x", "a" * 40)


class FlakyCodeBuild:
    def __init__(self, *codes: str) -> None:
        self.codes = list(codes)
        self.calls: list[dict[str, Any]] = []
        self.message = "slow down"

    async def start_build(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        if self.codes:
            code = self.codes.pop(0)
            raise ClientError({"Error": {"Code": code, "Message": self.message}}, "StartBuild")
        return {"build": {"id": "shop:1234"}}


def request() -> BuildRequest:
    return BuildRequest(push=PUSH, project="shop", bucket="b", key="shop/feature/x/a.zip")


@pytest.mark.parametrize(
    ("code", "message", "reason"),
    [
        ("ThrottlingException", "Rate exceeded", "throttled"),
        (
            "AccountLimitExceededException",
            "Cannot have more than 5 builds in queue for the account",
            "account_queue_full",
        ),
        (
            "AccountLimitExceededException",
            "Cannot have more than 1 active builds for the project",
            "project_limit",
        ),
        (  # the wording CodeBuild's quota page quotes for the account's running builds
            "AccountLimitExceededException",
            "Cannot have more than 1 active builds for the account",
            "account_queue_full",
        ),
        ("TooManyRequestsException", "Too Many Requests", "throttled"),
    ],
)
async def test_a_capacity_refusal_is_raised_at_once_with_its_reason(
    code: str, message: str, reason: str
) -> None:
    client = FlakyCodeBuild(code)
    client.message = message
    backend = CodeBuild(client)  # type: ignore[arg-type]
    with pytest.raises(CapacityRefused) as refused:
        await backend.start(request())
    assert refused.value.reason == reason
    assert isinstance(refused.value, BuildError)  # still transient for a caller without a scheduler
    assert len(client.calls) == 1  # the scheduler retries it, with the same token


async def test_missing_project_is_permanent_and_not_retried() -> None:
    client = FlakyCodeBuild("ResourceNotFoundException")
    backend = CodeBuild(client)  # type: ignore[arg-type]
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
