"""Results on CodeCommit pull requests, end to end: the service as a real process, moto over
HTTP, the real SSH git host, and the local CodeCommit stand-in (requests validated against
botocore's model). Pull requests are opened by a developer (another access key) through the
stand-in; the events it emits are put on the intake queue as the pipeline's rule would.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aioboto3
import aiohttp
import pytest
from aiobotocore.config import AioConfig

from localdev.codecommit import CodeCommitStandIn, git_resolver
from localdev.githost import codecommit_event
from service.aws import AccountClients, Clients
from service.badges import Badges
from service.ledger import Entry, Ledger
from service.mergebuilds import MergeBuilds
from service.metrics import Metrics
from service.pipelines import Pipelines
from service.pullrequests import FEEDBACK_SUFFIX, PullRequests, comment_token
from service.queue import Queue
from service.records import Records
from tests.helpers import AwsResources, GitWorld, StartService, WorkCopy, create_project, wait_for
from tests.test_build_state import build_state_event, counted, ledger, send_build_event, stop_builds
from tests.test_worker import settings_for

if TYPE_CHECKING:
    from types_aiobotocore_codecommit import CodeCommitClient

pytestmark = pytest.mark.e2e

SERVICE = "arn:aws:iam::123456789012:user/testing"  # the service's access key in the tests


@dataclass
class World:
    aws: AwsResources
    git: GitWorld
    standin: CodeCommitStandIn
    developer: CodeCommitClient
    repo: WorkCopy

    async def push(self, branch: str, n: int) -> str:
        commit = await self.repo.commit({"n.txt": f"{n}\n"}, message=f"change {n}")
        await self.repo.push(f"HEAD:{branch}")
        change = self.git.changes[-1]
        await self.standin.pushed(change)  # an open pull request from the branch moves
        await self.aws.send_event(codecommit_event(change))
        return commit

    async def open_pull_request(self, branch: str) -> str:
        reply = await self.developer.create_pull_request(
            title=f"Merge {branch}",
            targets=[
                {
                    "repositoryName": "shop",
                    "sourceReference": branch,
                    "destinationReference": "main",
                }
            ],
        )
        return reply["pullRequest"]["pullRequestId"]

    async def build_event(self, commit: str, status: str, branch: str = "feature/pay") -> None:
        archive = f"shop/{branch}/{commit}.zip"
        build_id = (await ledger(self.aws, archive))["build_id"]
        at = datetime.now(UTC)
        await send_build_event(
            self.aws, build_state_event(build_id, status, archive=archive, at=at)
        )

    def comments(self, pull_request_id: str) -> list[str]:
        return [c.content for c in self.standin.comments_on(pull_request_id)]

    async def comment_saying(self, pull_request_id: str, text: str, count: int = 1) -> list[str]:
        async def probe() -> list[str] | None:
            found = self.comments(pull_request_id)
            return found if len(found) == count and text in found[-1] else None

        return await wait_for(probe, within=60, what=f"a comment saying {text!r}")


@pytest.fixture
async def world(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[World]:
    async def forward(event: dict[str, Any]) -> None:  # the pipeline's PullRequestRule
        await aws.sqs.send_message(
            QueueUrl=aws.intake_url,
            MessageBody=json.dumps(event),
            MessageGroupId="pullrequest",
            MessageDeduplicationId=uuid.uuid4().hex,
        )

    await create_project(aws, "shop")
    repo = await WorkCopy.create(git_world, tmp_path, "shop")
    await repo.commit({"README.md": "# shop\n"})
    await repo.push("main")
    session = aioboto3.Session(aws_access_key_id="developer", aws_secret_access_key="x")
    async with CodeCommitStandIn(resolve=git_resolver(git_world.host), on_event=forward) as cc:
        monkeypatch.setenv("AWS_ENDPOINT_URL_CODECOMMIT", cc.endpoint)
        async with session.client("codecommit", endpoint_url=cc.endpoint) as developer:
            yield World(aws, git_world, cc, developer, repo)


async def test_one_comment_follows_the_build_and_success_approves(
    world: World, start_service: StartService
) -> None:
    service = await start_service(BRANCHBUILD_PULL_REQUEST_FEEDBACK="comment+approval")
    await world.repo.checkout("feature/pay")
    await world.repo.commit({"pay.py": "pass\n"})
    await world.repo.push("feature/pay")  # no event yet: the pull request comes first
    pr = await world.open_pull_request("feature/pay")
    await counted(service, 1, "branchbuild_events_total", event="pull_request", outcome="ignored")

    commit = await world.push("feature/pay", 1)
    [started] = await world.comment_saying(pr, "Build started")
    assert f"`{commit}`" in started and "`feature/pay`" in started
    await world.build_event(commit, "IN_PROGRESS")
    await world.comment_saying(pr, "Build in progress")
    await world.build_event(commit, "SUCCEEDED")
    [done] = await world.comment_saying(pr, "✅ Build succeeded")
    assert "[CloudWatch Logs](https://console.aws.amazon.com/cloudwatch/" in done

    async def approved() -> bool:
        return world.standin.approvals(pr) == {SERVICE: "APPROVE"}

    await wait_for(approved, what="the service's approval")
    # Redelivered and duplicated state events: no second comment, no second call.
    await world.build_event(commit, "SUCCEEDED")
    await world.build_event(commit, "IN_PROGRESS")
    await counted(service, 4, "branchbuild_events_total", event="build_state")
    assert world.comments(pr) == [done]
    assert len(world.standin.calls("PostCommentForPullRequest")) == 1
    assert len(world.standin.calls("UpdateComment")) == 2
    assert len(world.standin.calls("UpdatePullRequestApprovalState")) == 1
    [post] = world.standin.calls("PostCommentForPullRequest")
    assert post["afterCommitId"] == commit and post["clientRequestToken"]
    assert await service.metric("branchbuild_pull_request_updates_total", action="approved") == 1


async def test_a_newer_push_supersedes_on_the_pull_request_and_failure_revokes(
    world: World, start_service: StartService
) -> None:
    service = await start_service(BRANCHBUILD_PULL_REQUEST_FEEDBACK="comment+approval")
    await world.repo.checkout("feature/pay")
    old = await world.push("feature/pay", 1)
    pr = await world.open_pull_request("feature/pay")
    await world.comment_saying(pr, "Build started")  # the pull request event found the build
    await world.build_event(old, "SUCCEEDED")
    await world.comment_saying(pr, "Build succeeded")

    async def approved() -> bool:
        return world.standin.approvals(pr) == {SERVICE: "APPROVE"}

    await wait_for(approved, what="the approval of the first commit")
    new = await world.push("feature/pay", 2)  # the pull request moves: approvals cleared
    await world.comment_saying(pr, "Build started", count=2)
    await world.build_event(new, "FAILED")
    comments = await world.comment_saying(pr, "❌ Build failed", count=2)
    assert f"`{old}`" in comments[0] and "Build succeeded" in comments[0]

    async def revoked() -> list[dict[str, Any]] | None:
        calls = world.standin.calls("UpdatePullRequestApprovalState")
        return [call for call in calls if call["approvalState"] == "REVOKE"] or None

    revokes = await wait_for(revoked, what="the approval revoked")
    assert len(revokes) == 1
    assert revokes[0]["revisionId"] == world.standin.pull_requests[pr].revision
    assert world.standin.approvals(pr) == {}
    assert await service.metric("branchbuild_pull_request_updates_total", action="revoked") == 1


async def test_an_approval_refused_as_not_current_is_retried_on_the_new_revision(
    world: World, start_service: StartService
) -> None:
    service = await start_service(BRANCHBUILD_PULL_REQUEST_FEEDBACK="comment+approval")
    await world.repo.checkout("feature/pay")
    commit = await world.push("feature/pay", 1)
    pr = await world.open_pull_request("feature/pay")
    await world.comment_saying(pr, "Build started")

    async def main_moves(_: dict[str, Any]) -> None:  # between GetPullRequest and the approval
        await world.repo.checkout("main", new=False)
        await world.repo.commit({"main.txt": "moved\n"})
        await world.repo.push("main")
        await world.standin.pushed(world.git.changes[-1])
        await world.repo.checkout("feature/pay", new=False)

    world.standin.before["UpdatePullRequestApprovalState"] = main_moves
    await world.build_event(commit, "SUCCEEDED")

    async def approved() -> bool:
        return world.standin.approvals(pr) == {SERVICE: "APPROVE"}

    await wait_for(approved, what="the approval of the new revision")
    first, second = world.standin.calls("UpdatePullRequestApprovalState")
    assert first["revisionId"] != second["revisionId"]
    assert second["revisionId"] == world.standin.pull_requests[pr].revision
    assert await service.metric("branchbuild_pull_request_updates_total", action="approved") == 1


async def test_a_running_build_superseded_says_so_on_its_comment(
    world: World, start_service: StartService
) -> None:
    await start_service(BRANCHBUILD_PULL_REQUEST_FEEDBACK="comment")
    await world.repo.checkout("feature/pay")
    old = await world.push("feature/pay", 1)
    pr = await world.open_pull_request("feature/pay")
    await world.comment_saying(pr, "Build started")
    old_build = (await ledger(world.aws, f"shop/feature/pay/{old}.zip"))["build_id"]
    new = await world.push("feature/pay", 2)
    assert await stop_builds(world.aws, 1) == [old_build]
    await world.build_event(old, "STOPPED")

    async def superseded() -> list[str] | None:
        found = world.comments(pr)
        return found if len(found) == 2 and "superseded by" in found[0] else None

    comments = await wait_for(superseded, within=60, what="the first comment superseded")
    assert f"⏭️ Build superseded by `{new[:12]}`" in comments[0]
    assert f"`{new}`" in comments[1]
    assert world.standin.calls("UpdatePullRequestApprovalState") == []  # comment only


async def test_no_pull_request_nothing_posted_then_one_opened_gets_the_result_at_once(
    world: World, start_service: StartService
) -> None:
    service = await start_service(
        BRANCHBUILD_PULL_REQUEST_FEEDBACK="comment+approval",
        BRANCHBUILD_PULL_REQUEST_ROLE_TEMPLATE="arn:aws:iam::{account}:role/branchbuild-pr",
        BRANCHBUILD_ALLOWED_ACCOUNTS="123456789012",
    )
    await world.repo.checkout("feature/pay")
    commit = await world.push("feature/pay", 1)
    await world.build_event(commit, "SUCCEEDED")
    await counted(service, 1, "branchbuild_build_results_total", status="succeeded")

    async def looked() -> list[dict[str, Any]] | None:
        return world.standin.calls("ListPullRequests") or None

    await wait_for(looked, what="a look for pull requests")
    await counted(service, 1, "branchbuild_jobs_total", outcome="built")
    assert world.standin.calls("PostCommentForPullRequest") == []  # nothing to post on

    pr = await world.open_pull_request("feature/pay")
    [comment] = await world.comment_saying(pr, "✅ Build succeeded")
    assert "running" not in comment and "Duration" in comment

    async def approved() -> dict[str, str] | None:
        return world.standin.approvals(pr) or None

    [(approver, state)] = (await wait_for(approved, what="an approval")).items()
    # The calls were made with the role assumed in the repository's account (moto's STS).
    assert state == "APPROVE" and approver != SERVICE and "/ASIA" in approver
    assert [c.author for c in world.standin.comments_on(pr)] == [approver]

    async def send(account: str, detail: dict[str, Any]) -> None:
        await world.aws.sqs.send_message(
            QueueUrl=world.aws.intake_url,
            MessageBody=json.dumps(
                {
                    "detail-type": "CodeCommit Pull Request State Change",
                    "source": "aws.codecommit",
                    "account": account,
                    "detail": detail,
                }
            ),
            MessageGroupId="pullrequest",
            MessageDeduplicationId=uuid.uuid4().hex,
        )

    # A malformed pull request event is dead-lettered with its reason.
    await send("123456789012", {"event": "pullRequestCreated", "pullRequestId": "1"})
    # A well-formed one naming an account not in BRANCHBUILD_ALLOWED_ACCOUNTS: refused with
    # its reason, no role assumed there (anyone who may send to the intake queue could).
    assumed = len(world.standin.calls("ListPullRequests"))
    await send(
        "999999999999",
        {
            "event": "pullRequestCreated",
            "pullRequestId": "1",
            "pullRequestStatus": "OPEN",
            "sourceReference": "refs/heads/feature/pay",
            "sourceCommit": commit,
            "repositoryNames": [world.repo.repository],
        },
    )

    async def dead_lettered() -> list[tuple[str, dict[str, str]]] | None:
        found = await world.aws.dlq_messages(world.aws.intake_dlq_url)
        return found if len(found) == 2 else None

    reasons = {
        a["branchbuild.reason"] for _, a in await wait_for(dead_lettered, within=60, what="DLQ")
    }
    assert reasons == {
        "sourceReference is missing or not a string",
        "account '999999999999' is not in BRANCHBUILD_ALLOWED_ACCOUNTS",
    }
    assert len(world.standin.calls("ListPullRequests")) == assumed


async def test_the_stand_in_refuses_what_codecommit_would_refuse(world: World) -> None:
    """Requests are checked against botocore's model: required members, types, enums,
    lengths and patterns."""

    async def call(operation: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                world.standin.endpoint,
                data=json.dumps(params),
                headers={
                    "X-Amz-Target": f"CodeCommit_20150413.{operation}",
                    "Content-Type": "application/x-amz-json-1.1",
                },
            ) as reply:
                return reply.status, await reply.json(content_type=None)

    status, error = await call("UpdateComment", {"commentId": "x"})
    assert status == 400 and error["__type"] == "ValidationException"
    assert "content" in error["message"]
    status, error = await call(
        "UpdatePullRequestApprovalState",
        {"pullRequestId": "1", "revisionId": "r", "approvalState": "MAYBE"},
    )
    assert status == 400 and "'MAYBE' is not one of APPROVE, REVOKE" in error["message"]
    status, error = await call("ListPullRequests", {"repositoryName": "no/slash"})
    assert status == 400 and "does not match" in error["message"]
    status, error = await call("ListPullRequests", {"repositoryName": "x" * 101})
    assert status == 400 and "100" in error["message"]
    status, error = await call("GetPullRequest", {"pullRequestId": 7})
    assert status == 400 and "pullRequestId" in error["message"]
    status, error = await call("DeleteRepository", {"repositoryName": "shop"})
    assert status == 400 and error["__type"] == "UnknownOperationException"
    status, error = await call("GetPullRequest", {"pullRequestId": "404"})
    assert error["__type"] == "PullRequestDoesNotExistException"
    assert world.standin.requests == [("GetPullRequest", {"pullRequestId": "404"})]


async def test_a_comment_whose_record_was_lost_is_found_by_its_token_beyond_the_first_page(
    world: World,
) -> None:
    """The record of a posted comment was lost: posting again with its token is refused
    (other content), and the comment is found by its token, on whichever page it is, and
    brought up to date."""
    await world.repo.checkout("feature/pay")
    commit = await world.repo.commit({"pay.py": "pass\n"})
    await world.repo.push("feature/pay")
    pr = await world.open_pull_request("feature/pay")
    [target] = (await world.developer.get_pull_request(pullRequestId=pr))["pullRequest"][
        "pullRequestTargets"
    ]
    before = target["destinationCommit"]
    for n in range(101):  # the first page holds 100
        await world.developer.post_comment_for_pull_request(
            pullRequestId=pr, repositoryName="shop", beforeCommitId=before, afterCommitId=commit,
            content=f"review {n}",
        )  # fmt: skip
    archive, build_id = f"shop/feature/pay/{commit}.zip", "shop:0f1e2d3c-4b5a-6978"
    settings = settings_for(world.aws, pull_request_feedback="comment")
    session = aioboto3.Session(aws_access_key_id="testing", aws_secret_access_key="x")
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(
            session.client("codecommit", endpoint_url=world.standin.endpoint)
        )
        earlier = await client.post_comment_for_pull_request(  # before its record was lost
            pullRequestId=pr, repositoryName="shop", beforeCommitId=before, afterCommitId=commit,
            content="an earlier state", clientRequestToken=comment_token(pr, commit, build_id),
        )  # fmt: skip
        records = Records(world.aws.s3, world.aws.bucket)
        await Ledger(records).started(
            archive, Entry(commit, "refs/heads/feature/pay", build_id=build_id, project="shop")
        )
        feedback: dict[str, Any] = {"repository": "shop", "account": "123456789012"}
        feedback |= {"ref": "refs/heads/feature/pay", "commit": commit, "build_id": build_id}
        await records.write(archive + FEEDBACK_SUFFIX, feedback | {"comments": {}}, replacing=None)
        clients = Clients(
            world.aws.sqs, world.aws.s3, world.aws.codebuild, client, session, AioConfig()
        )
        metrics = Metrics()
        await PullRequests(AccountClients(clients, stack, ""), records, settings, metrics).sync(
            archive
        )
    document = await records.read(archive + FEEDBACK_SUFFIX)
    assert document is not None
    assert document.data["comments"][pr]["id"] == earlier["comment"]["commentId"]
    pages = world.standin.calls("GetCommentsForPullRequest")
    assert len(pages) == 2 and pages[1]["nextToken"]
    assert len(world.comments(pr)) == 102  # nothing posted twice
    assert world.comments(pr)[-1].startswith(
        "**branchbuild**: ⏳ Build started"
    )  # brought up to date
    failed = metrics.registry.get_sample_value(
        "branchbuild_pull_request_updates_total", {"action": "failed"}
    )
    assert not failed


async def test_a_pull_request_badge_that_cannot_be_written_never_stops_the_comment(
    world: World,
) -> None:
    """Badges on, but the pull request's badge cannot be written (here: no such bucket, an
    access error): the comment is posted all the same, and the badge's error is counted."""
    await world.repo.checkout("feature/badge")
    commit = await world.repo.commit({"badge.py": "pass\n"})
    await world.repo.push("feature/badge")
    pr = await world.open_pull_request("feature/badge")
    archive, build_id = f"shop/feature/badge/{commit}.zip", "shop:1a2b3c4d-5e6f-7081"
    settings = settings_for(world.aws, pull_request_feedback="comment", badges=True)
    session = aioboto3.Session(aws_access_key_id="testing", aws_secret_access_key="x")
    records = Records(world.aws.s3, world.aws.bucket)
    metrics = Metrics()
    badges = Badges(Records(world.aws.s3, "branchbuild-no-such-bucket"), settings, metrics)
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(
            session.client("codecommit", endpoint_url=world.standin.endpoint)
        )
        await Ledger(records).started(
            archive, Entry(commit, "refs/heads/feature/badge", build_id=build_id, project="shop")
        )
        feedback: dict[str, Any] = {"repository": "shop", "account": "123456789012"}
        feedback |= {"ref": "refs/heads/feature/badge", "commit": commit, "build_id": build_id}
        await records.write(archive + FEEDBACK_SUFFIX, feedback | {"comments": {}}, replacing=None)
        clients = Clients(
            world.aws.sqs, world.aws.s3, world.aws.codebuild, client, session, AioConfig()
        )
        accounts = AccountClients(clients, stack, "")
        await PullRequests(accounts, records, settings, metrics, badges=badges).sync(archive)
    [comment] = world.comments(pr)
    assert comment.startswith("Badge: `") or "build status" in comment
    assert "**branchbuild**: ⏳ Build started" in comment
    sample = metrics.registry.get_sample_value
    assert sample("branchbuild_errors_total", {"kind": "access_denied"}) == 1
    assert not sample("branchbuild_pull_request_updates_total", {"action": "failed"})


async def test_a_merge_builds_comment_whose_record_was_lost_is_found_beyond_the_first_page(
    world: World,
) -> None:
    """After 101 reviews on the same commits, the merge build's comment (service.mergebuilds)
    was posted and its record lost: posting again is refused (other content) and the comment
    is found by its token on the second page (the first page alone was read: a permanent
    error, "cannot be found")."""
    await world.repo.checkout("feature/merge")
    commit = await world.repo.commit({"merge.py": "pass\n"})
    await world.repo.push("feature/merge")
    pr = await world.open_pull_request("feature/merge")
    [target] = (await world.developer.get_pull_request(pullRequestId=pr))["pullRequest"][
        "pullRequestTargets"
    ]
    data: dict[str, Any] = {
        "pull_request": pr, "repository": "shop", "commit": "9" * 40, "build_id": "shop:m-1",
        "source_commit": commit, "destination_commit": target["destinationCommit"],
    }  # fmt: skip
    session = aioboto3.Session(aws_access_key_id="testing", aws_secret_access_key="x")
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(
            session.client("codecommit", endpoint_url=world.standin.endpoint)
        )
        settings = settings_for(world.aws)
        clients = Clients(
            world.aws.sqs, world.aws.s3, world.aws.codebuild, client, session, AioConfig()
        )
        merges = MergeBuilds(
            AccountClients(clients, stack, ""),
            Records(world.aws.s3, world.aws.bucket),
            settings,
            Metrics(),
            Pipelines.from_settings(settings),
            Queue(world.aws.sqs, world.aws.work_url, name="work"),
        )
        for n in range(101):  # the first page holds 100
            await world.developer.post_comment_for_pull_request(
                pullRequestId=pr, repositoryName="shop",
                beforeCommitId=target["destinationCommit"], afterCommitId=commit,
                content=f"review {n}",
            )  # fmt: skip
        first = await merges._post(client, data, "merge build started")
        assert await merges._post(client, data, "merge build succeeded") == first
    assert len(world.comments(pr)) == 102  # nothing posted twice
