"""An always-on process stays flat, and falls back only by stated, counted decisions (issue 21):
assumed-role clients are closed once replaced and each account has its own lock; git's
per-repository maps hold only repositories in use; every git command has a time limit; an
unreadable commit or document is never silently taken for an empty one; stale uploads are
listed page by page (LocalStack: moto does not paginate ListMultipartUploads)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aioboto3
import anyio
import pytest

from service.aws import AccountClients, open_clients
from service.changes import changed_paths, commit_message
from service.errors import CommitNotFound, GitAccessDenied, GitError
from service.git import Fetched, Git
from service.ledger import branch_keys
from service.metrics import Metrics
from service.records import Records
from service.settings import MiB, Settings
from service.storage import Storage
from tests.helpers import AwsResources, push_for
from tests.test_localstack import localstack_endpoint  # noqa: F401 - the fixture

ROLE = "arn:aws:iam::{account}:role/branchbuild-pull-requests"


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "queue_url": "q",
        "work_queue_url": "w",
        "bucket": "bkt",
        "cache_dir": tmp_path / "cache",
        "git_url_template": f"file://{tmp_path}/missing/{{repository}}.git",
    }
    return Settings(**(values | overrides))


async def test_replaced_role_clients_are_closed_and_accounts_never_wait_for_each_other(
    aws: AwsResources,
) -> None:
    async with AsyncExitStack() as stack:
        accounts = AccountClients(await open_clients(stack, max_pool=2), stack, ROLE)
        first = await accounts.codecommit("111111111111")
        assert await accounts.codecommit("111111111111") is first  # cached while valid
        for _ in range(30):  # an hour goes by, thirty times: each refresh replaces the client
            accounts._assumed["111111111111"].expires = datetime.now(UTC)
            await accounts.codecommit("111111111111")
        assert accounts.open_clients() == 2  # the current one and the one just replaced
        assert accounts.closed == 29
        # Another account's role is assumed while the first account's lock is held.
        async with accounts._locks["111111111111"]:
            with anyio.fail_after(10):
                await accounts.codecommit("222222222222")
        assert accounts.open_clients() == 3
    assert accounts.open_clients() == 0 and accounts.closed == 32  # all closed at shutdown


async def test_the_per_repository_maps_hold_only_repositories_in_use(tmp_path: Path) -> None:
    git = Git(settings(tmp_path))
    limit = anyio.Semaphore(16)

    async def fetch(number: int) -> None:
        async with limit:
            with pytest.raises(GitAccessDenied):  # (no such repository: fails at once)
                await git.fetch(push_for(f"repo-{number}", "main", "a" * 40))

    async with anyio.create_task_group() as tg:
        for number in range(400):
            tg.start_soon(fetch, number)
    assert (len(git._locks), len(git._wanted), len(git._users)) == (0, 0, 0)


async def test_looking_for_a_commit_has_the_git_time_limit(tmp_path: Path) -> None:
    git = Git(settings(tmp_path, git_timeout=1e-6))
    with pytest.raises(GitError, match="timed out"):
        await git._has_commit(tmp_path, "a" * 40)


class BrokenGit(Git):
    """git failing as it can on a busy or damaged cache: what can't be reached otherwise."""

    error: Exception = GitError("git diff-tree failed: fatal: unable to read tree")

    async def query(self, git_dir: Path, *args: str) -> tuple[int, bytes]:
        return 128, b""

    async def changed_paths(self, push: Any, base: str) -> list[str]:
        raise self.error


async def test_a_git_failure_while_screening_is_retried_never_built_blind(tmp_path: Path) -> None:
    metrics = Metrics()
    git = BrokenGit(settings(tmp_path), metrics)
    push = push_for("repo", "main", "b" * 40, old_commit="c" * 40)
    with pytest.raises(GitError, match="cat-file"):  # skip markers are never skipped
        await commit_message(git, Fetched(tmp_path, "b" * 40, cache_hit=True))
    with pytest.raises(GitError, match="diff-tree"):  # path filters are never skipped
        await changed_paths(push, git)
    # The one stated fallback: the old commit is gone (a rewritten history): built, counted.
    git.error = CommitNotFound("not there")
    assert await changed_paths(push, git) is None
    counted = metrics.registry.get_sample_value(
        "branchbuild_fallbacks_total", {"decision": "paths_unknown_built"}
    )
    assert counted == 1


async def test_an_unreadable_document_is_counted(aws: AwsResources) -> None:
    metrics = Metrics()
    await aws.s3.put_object(Bucket=aws.bucket, Key="doc.json", Body=b"{not json")
    found = await Records(aws.s3, aws.bucket, metrics).read("doc.json")
    assert found is not None and found.data == {} and found.etag
    counted = metrics.registry.get_sample_value(
        "branchbuild_fallbacks_total", {"decision": "unreadable_document"}
    )
    assert counted == 1


@pytest.mark.e2e
@pytest.mark.timeout(300)
async def test_stale_uploads_beyond_the_first_page_are_aborted(
    localstack_endpoint: str,  # noqa: F811
) -> None:
    session = aioboto3.Session(aws_access_key_id="test", aws_secret_access_key="test")
    async with session.client("s3", endpoint_url=localstack_endpoint) as s3:
        bucket = "stale-uploads"
        await s3.create_bucket(
            Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
        )
        push = push_for("repo", "feature/a", "f" * 40)
        limit = anyio.Semaphore(16)

        async def create(number: int) -> None:
            async with limit:
                key = f"repo/feature/a/{number:040x}.zip"
                await s3.create_multipart_upload(Bucket=bucket, Key=key)

        async with anyio.create_task_group() as tg:
            for number in range(1010):
                tg.start_soon(create, number)
        first = await s3.list_multipart_uploads(Bucket=bucket, Prefix="repo/")
        assert first["IsTruncated"] and len(first["Uploads"]) == 1000  # S3 pages them
        storage = Storage(s3, bucket, part_size=5 * MiB, concurrency=1, max_bytes=1 << 30)
        keys = branch_keys("{repository}/{branch}/{commit}.zip", push)
        assert await storage.abort_stale(keys) == 1010
        assert not (await s3.list_multipart_uploads(Bucket=bucket)).get("Uploads")
