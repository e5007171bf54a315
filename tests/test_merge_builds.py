"""Pull requests built as merged (a rule's ``pull_requests: {merge_build: true}``), end to end:
the service as a real process, moto over HTTP, the real SSH git host, and the CodeCommit
stand-in, which makes the merge commits with real git in the host's repository (every request
validated against botocore's model). Pull requests are opened by a developer (another access
key); the stand-in's events go to the intake queue as the pipeline's rule would send them.
"""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aioboto3
import aiohttp
import anyio
import pytest

from localdev.codecommit import CodeCommitStandIn, git_resolver
from localdev.githost import codecommit_event
from service.errors import ConfigurationError, MalformedEvent
from service.events import RefChange, merge_branch, merged_pull_request, parse_event, parse_work
from service.pipelines import MergeStrategy, parse_config
from service.settings import load_settings
from tests.helpers import (
    AwsResources,
    GitWorld,
    ServiceProcess,
    StartService,
    WorkCopy,
    create_project,
    event_for,
    push_for,
    wait_for,
    zip_listing,
)
from tests.test_build_state import build_state_event, counted, ledger, send_build_event
from tests.test_intake import counts

if TYPE_CHECKING:
    from types_aiobotocore_codecommit import CodeCommitClient

pytestmark = pytest.mark.e2e

MERGE = "pr/{}/.merge"


def config(tmp_path: Path, strategy: str = "THREE_WAY_MERGE", more: str = "") -> str:
    path = tmp_path / "pipelines.yaml"
    path.write_text(
        "version: 1\n"
        "rules:\n"
        "  - repository: shop\n"
        "    branches: {protected: [main]}\n"
        f"    pull_requests: {{merge_build: true, merge_strategy: {strategy}}}\n" + more
    )
    return str(path)


@dataclass
class World:
    aws: AwsResources
    git: GitWorld
    standin: CodeCommitStandIn
    developer: CodeCommitClient
    repo: WorkCopy

    async def push(
        self, branch: str, files: dict[str, str | bytes], message: str = "change"
    ) -> str:
        await self.repo.checkout(branch, new=False)
        commit = await self.repo.commit(files, message=message)
        await self.repo.push(f"HEAD:{branch}")
        change = self.git.changes[-1]
        await self.standin.pushed(change)  # the pull requests from or into it move
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

    async def git_show(self, commit: str, form: str) -> str:
        path = self.git.host.repository_path("shop")
        result = await anyio.run_process(
            ["git", "--git-dir", str(path), "show", "-s", f"--format={form}", commit]
        )
        return result.stdout.decode().strip()

    async def merge_built(self, pull_request_id: str, count: int) -> list[str]:
        """The commits of the pull request's merge builds started so far, once ``count``."""

        async def probe() -> list[str] | None:
            found = [
                variables(r)["COMMIT_ID"]
                for r in await self.aws.start_builds()
                if variables(r)["BRANCH_NAME"] == MERGE.format(pull_request_id)
            ]
            return found if len(found) == count else None

        return await wait_for(probe, within=90, what=f"{count} merge build(s)")

    def comments(self, pull_request_id: str) -> list[str]:
        return [c.content for c in self.standin.comments_on(pull_request_id)]

    async def comments_saying(self, pull_request_id: str, *texts: str) -> list[str]:
        """The pull request's comments once each of ``texts`` is in one of them."""

        async def probe() -> list[str] | None:
            found = self.comments(pull_request_id)
            return found if all(any(t in c for c in found) for t in texts) else None

        return await wait_for(probe, within=90, what=f"comments saying {texts!r}")

    async def build_event(self, archive: str, status: str) -> None:
        build_id = (await ledger(self.aws, archive))["build_id"]
        event = build_state_event(build_id, status, archive=archive, at=datetime.now(UTC))
        await send_build_event(self.aws, event)


def variables(request: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: v["value"] for v in request["environmentVariablesOverride"]}


def merge_archive(pull_request_id: str, commit: str) -> str:
    return f"shop/{MERGE.format(pull_request_id)}/{commit}.zip"


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
    async with CodeCommitStandIn(
        resolve=git_resolver(git_world.host),
        on_event=forward,
        repositories=git_world.host.repository_path,
    ) as cc:
        monkeypatch.setenv("AWS_ENDPOINT_URL_CODECOMMIT", cc.endpoint)
        async with session.client("codecommit", endpoint_url=cc.endpoint) as developer:
            yield World(aws, git_world, cc, developer, repo)


async def start(start_service: StartService, tmp_path: Path, **more: str) -> ServiceProcess:
    return await start_service(
        BRANCHBUILD_CONFIG=config(
            tmp_path, more.pop("strategy", "THREE_WAY_MERGE"), more.pop("rule", "")
        ),
        BRANCHBUILD_PULL_REQUEST_FEEDBACK="comment",
        **more,
    )


async def test_a_pull_request_is_built_as_merged_and_again_when_either_side_moves(
    world: World, start_service: StartService, tmp_path: Path
) -> None:
    service = await start(start_service, tmp_path)
    await world.repo.checkout("feature/pay")
    source = await world.push("feature/pay", {"pay.py": "pass\n"})
    pr = await world.open_pull_request("feature/pay")
    main = world.standin.pull_requests[pr].destination_commit

    # Opened: CodeCommit merges source into destination, and that commit is built.
    [first] = await world.merge_built(pr, 1)
    assert first not in (source, main)
    assert (await world.git_show(first, "%P")).split() == [main, source]  # a three-way merge
    assert await world.git_show(first, "%an") == "branchbuild"
    listing = zip_listing(await world.aws.object(merge_archive(pr, first)))
    assert {"README.md", "pay.py"} <= set(listing)
    [call] = world.standin.calls("CreateUnreferencedMergeCommit")
    assert call["mergeOption"] == "THREE_WAY_MERGE"
    assert (call["sourceCommitSpecifier"], call["destinationCommitSpecifier"]) == (source, main)
    comments = await world.comments_saying(pr, "⏳ Merge build started", "Build started")
    [merged] = [c for c in comments if "Merge build started" in c]
    assert "This is the **merge build**: `feature/pay` merged into `main`" in merged
    assert f"`{first}`" in merged and f"`feature/pay` at `{source}`" in merged
    [branch] = [c for c in comments if c is not merged]
    assert "This is the **branch build**" in branch and f"`{source}`" in branch

    # The destination moves (a protected branch: not built itself): merged and built again;
    # the older merge build is superseded.
    moved = await world.push("main", {"other.txt": "x\n"})
    first_build = (await ledger(world.aws, merge_archive(pr, first)))["build_id"]
    _, second = await world.merge_built(pr, 2)
    assert (await world.git_show(second, "%P")).split() == [moved, source]
    assert "other.txt" in zip_listing(await world.aws.object(merge_archive(pr, second)))

    async def superseded() -> bool:
        entry = await ledger(world.aws, merge_archive(pr, first))
        return entry.get("superseded_by") == second

    await wait_for(superseded, within=60, what="the older merge build superseded")

    async def stopped() -> bool:
        return first_build in [r["id"] for r in await world.aws.recorded("StopBuild")]

    await wait_for(stopped, within=60, what="the older merge build stopped")
    await world.build_event(merge_archive(pr, first), "STOPPED")
    await world.comments_saying(pr, f"⏭️ Merge build superseded by `{second[:12]}`")

    # The source moves: merged and built again.
    newer = await world.push("feature/pay", {"pay.py": "pay()\n"})
    _, _, third = await world.merge_built(pr, 3)
    assert (await world.git_show(third, "%P")).split() == [moved, newer]
    await world.build_event(merge_archive(pr, third), "SUCCEEDED")
    done = await world.comments_saying(pr, "✅ Merge build succeeded")
    [succeeded] = [c for c in done if "✅ Merge build succeeded" in c]
    assert f"`{third}`" in succeeded and f"`main` at `{moved}`" in succeeded

    # A redelivered pull request event makes no second merge commit, and no second build.
    await counted(service, 3, "branchbuild_merge_builds_total", outcome="queued")
    created = world.standin.pull_requests[pr]
    await world.standin._emit(created, "pullRequestSourceBranchUpdated")
    await counted(service, 3, "branchbuild_events_total", event="pull_request", outcome="recorded")
    assert len(world.standin.calls("CreateUnreferencedMergeCommit")) == 3
    assert len(await world.merge_built(pr, 3)) == 3

    # A late event (an hour old, redriven) of the destination's first commit: its sides are
    # older than the merge built last, so nothing is merged or built from the older tree.
    late = RefChange("shop", "refs/heads/main", None, main)
    await world.aws.send_event(codecommit_event(late, time=datetime.now(UTC) - timedelta(hours=1)))
    await counted(service, 1, "branchbuild_events_total", event="created", outcome="protected")

    async def settled() -> bool:  # its merge hook, which runs after, is done too
        return await counts(world.aws, world.aws.intake_url) == (0, 0)

    await wait_for(settled, within=60, what="the late event settled")
    assert len(world.standin.calls("CreateUnreferencedMergeCommit")) == 3
    assert len(await world.merge_built(pr, 3)) == 3


async def test_a_conflict_is_reported_instead_of_a_build_until_it_is_resolved(
    world: World, start_service: StartService, tmp_path: Path
) -> None:
    # With the role assumed in the repository's account, as a multi-account deployment does.
    service = await start(
        start_service,
        tmp_path,
        BRANCHBUILD_PULL_REQUEST_ROLE_TEMPLATE="arn:aws:iam::{account}:role/branchbuild-pr",
        BRANCHBUILD_ALLOWED_ACCOUNTS="123456789012",
        rule="    git_metadata: true\n",  # the merge commit on no branch: a detached HEAD
    )
    await world.repo.checkout("feature/pay")
    await world.push("feature/pay", {"README.md": "# shop, paid\n"})
    await world.repo.checkout("main", new=False)
    await world.push("main", {"README.md": "# the shop\n"})
    pr = await world.open_pull_request("feature/pay")

    comments = await world.comments_saying(pr, "⚠️ No merge build")
    [conflict] = [c for c in comments if "No merge build" in c]  # (and the branch build's)
    assert "`feature/pay` does not merge into `main` without conflicts" in conflict
    assert "- `README.md`" in conflict
    await counted(service, 1, "branchbuild_merge_builds_total", outcome="conflict")
    assert [c["mergeOption"] for c in world.standin.calls("GetMergeConflicts")] == [
        "THREE_WAY_MERGE"
    ]
    assert [k for k in await world.aws.keys() if ".merge/" in k] == []
    [author] = {c.author for c in world.standin.comments_on(pr)}
    assert "/ASIA" in author  # the assumed role's

    # The source takes the destination's line: it merges now, and is built.
    resolved = await world.push("feature/pay", {"README.md": "# the shop\n"})
    [merge] = await world.merge_built(pr, 1)
    assert resolved in (await world.git_show(merge, "%P")).split()
    with zipfile.ZipFile(io.BytesIO(await world.aws.object(merge_archive(pr, merge)))) as z:
        assert z.read(".git/HEAD").decode() == merge + "\n"
    await world.comments_saying(pr, "⏳ Merge build started")


async def test_a_fast_forward_merge_build_is_the_source_and_a_diverged_one_is_refused(
    world: World, start_service: StartService, tmp_path: Path
) -> None:
    service = await start(start_service, tmp_path, strategy="FAST_FORWARD_MERGE")
    await world.repo.checkout("feature/pay")
    source = await world.push("feature/pay", {"pay.py": "pass\n"})
    pr = await world.open_pull_request("feature/pay")
    [merge] = await world.merge_built(pr, 1)
    assert merge == source  # main fast-forwards to the source

    await world.push("main", {"other.txt": "x\n"})
    comments = await world.comments_saying(pr, "⚠️ No merge build")
    [refused] = [c for c in comments if "No merge build" in c]
    assert "`main` cannot be fast-forwarded to `feature/pay` (FAST_FORWARD_MERGE)" in refused
    await counted(service, 1, "branchbuild_merge_builds_total", outcome="conflict")
    assert len(await world.merge_built(pr, 1)) == 1


async def test_the_stand_ins_merge_calls_refuse_what_codecommit_would_refuse(
    world: World,
) -> None:
    """The merge calls are checked against botocore's model as every other call."""

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

    base = {"repositoryName": "shop", "sourceCommitSpecifier": "main"}
    status, error = await call(
        "CreateUnreferencedMergeCommit", base | {"mergeOption": "SQUASH_MERGE"}
    )
    assert status == 400 and error["__type"] == "ValidationException"
    assert "destinationCommitSpecifier" in error["message"]
    status, error = await call(
        "GetMergeConflicts",
        base | {"destinationCommitSpecifier": "main", "mergeOption": "OCTOPUS"},
    )
    assert status == 400 and "is not one of FAST_FORWARD_MERGE" in error["message"]
    status, error = await call(
        "CreateUnreferencedMergeCommit",
        base | {"destinationCommitSpecifier": "nope", "mergeOption": "SQUASH_MERGE"},
    )
    assert error["__type"] == "CommitDoesNotExistException"
    status, error = await call(
        "GetMergeConflicts",
        base | {"destinationCommitSpecifier": "main", "mergeOption": "THREE_WAY_MERGE"},
    )
    assert status == 200 and error["mergeable"] is True and error["conflictMetadataList"] == []
    assert [name for name, _ in world.standin.requests] == [
        "CreateUnreferencedMergeCommit",
        "GetMergeConflicts",
    ]


def test_merge_build_rule_fields_are_validated() -> None:
    settings = load_settings(queue_url="q", work_queue_url="w", bucket="bucket")
    rule = "version: 1\nrules:\n  - repository: shop\n    pull_requests: {}\n"
    parsed = parse_config(rule.replace("{}", "{merge_build: true}"), "f.yaml", settings)
    shop = parsed.rule_for("shop")
    assert shop.merge_build and shop.merge_strategy is MergeStrategy.THREE_WAY_MERGE
    assert not parse_config(rule, "f.yaml", settings).rule_for("shop").merge_build
    with pytest.raises(ConfigurationError, match="merge_strategy"):
        parse_config(rule.replace("{}", "{merge_strategy: OCTOPUS}"), "f.yaml", settings)
    with pytest.raises(ConfigurationError, match="merge_build needs source: archive"):
        parse_config(
            rule.replace("{}", "{merge_build: true}") + "    source: codecommit\n",
            "f.yaml",
            settings,
        )


def test_only_a_merge_builds_exact_name_passes_where_git_would_refuse_it() -> None:
    """``pr/<id>/.merge`` is no branch git allows: a push event naming it is malformed, and the
    work queue takes it only in exactly that shape."""
    merge = push_for("shop", "pr/7/.merge", "a" * 40)
    assert merged_pull_request(parse_work(merge.to_json())) == "7"
    assert merged_pull_request(push_for("shop", "pr/7/merge", "a" * 40)) is None
    for name in ("pr/7/.merge/x", "pr/x/.merge", "pr/7/.merged", ".merge"):
        with pytest.raises(MalformedEvent, match="invalid ref name"):
            parse_work(push_for("shop", name, "a" * 40).to_json())
    with pytest.raises(MalformedEvent, match="invalid ref name"):
        parse_event(json.dumps(event_for("shop", "refs/heads/pr/7/.merge", "a" * 40)))
    with pytest.raises(MalformedEvent, match="invalid pull request id"):
        merge_branch("7/../x")
