"""End to end: the service as a real process, moto over HTTP, a real SSH git host, real pushes.

Events are the ones the git host derived from real `git push`es, put on the intake queue as the
EventBridge rule would (whole event as the body, one static message group).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sys
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from service.events import RefChange, codecommit_event
from tests.helpers import (
    AwsResources,
    GitWorld,
    StartService,
    WorkCopy,
    create_project,
    service_env,
    wait_for,
    zip_listing,
)

pytestmark = pytest.mark.e2e

MERGE_EVENT = (Path(__file__).parent / "events" / "merge-commit-unreferenced.json").read_text()


async def send_change(aws: AwsResources, change: RefChange) -> None:
    await aws.send_event(codecommit_event(change))


def token(repository: str, ref: str, commit: str) -> str:
    return hashlib.sha256(f"{repository}\0{ref}\0{commit}".encode()).hexdigest()


async def builds(aws: AwsResources, count: int) -> list[dict[str, Any]]:
    async def probe() -> list[dict[str, Any]] | None:
        found = await aws.start_builds()
        return found if len(found) >= count else None

    return await wait_for(probe, within=60, what=f"{count} StartBuild request(s)")


async def drained(aws: AwsResources, *urls: str) -> None:
    async def probe() -> bool:
        return all([await aws.count(url) == 0 for url in urls])

    await wait_for(probe, within=60, what="empty queues")


async def test_feature_branch_push_becomes_an_archive_and_a_build(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "shop")
    repo = await WorkCopy.create(git_world, tmp_path, "shop")
    await repo.commit({"README.md": "# shop\n"})
    await repo.push("main")
    await repo.checkout("feature/PAY-1-refunds")
    (repo.path / "link-to-passwd").symlink_to("/etc/passwd")
    commit = await repo.commit({"src/app.py": "print('hi')\n", "buildspec.yml": "version: 0.2\n"})
    await repo.push("feature/PAY-1-refunds")
    service = await start_service()
    await send_change(aws, git_world.changes[-1])

    [request] = await builds(aws, 1)
    key = f"shop/feature/PAY-1-refunds/{commit}.zip"
    assert request == {
        "projectName": "shop",
        "sourceTypeOverride": "S3",
        "sourceLocationOverride": f"{aws.bucket}/{key}",
        "environmentVariablesOverride": [
            {"name": "COMMIT_ID", "value": commit, "type": "PLAINTEXT"},
            {"name": "BRANCH_NAME", "value": "feature/PAY-1-refunds", "type": "PLAINTEXT"},
            {"name": "REPOSITORY_NAME", "value": "shop", "type": "PLAINTEXT"},
            {"name": "BRANCHBUILD_ARCHIVE", "value": key, "type": "PLAINTEXT"},
        ],
        "artifactsOverride": {"type": "NO_ARTIFACTS"},
        "idempotencyToken": token("shop", "refs/heads/feature/PAY-1-refunds", commit),
    }
    archive = await aws.object(key)
    assert zip_listing(archive) == await repo.archive_listing(commit)
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        assert z.read("link-to-passwd") == b"/etc/passwd"
    await drained(aws, aws.intake_url, aws.work_url)
    assert await service.metric("branchbuild_jobs_total", outcome="built") == 1
    assert await service.metric("branchbuild_events_total", event="created", outcome="queued") == 1
    assert await service.metric("branchbuild_builds_started_total") == 1
    assert await service.metric("branchbuild_upload_bytes_total") == len(archive)
    for stage in ("receive", "fetch", "archive", "upload", "start_build"):
        count = await service.metric("branchbuild_stage_duration_seconds_count", stage=stage)
        assert count == 1, stage
    assert await aws.dlq_bodies(aws.work_dlq_url) == []
    logs = [json.loads(line) for line in service.logs().splitlines() if line.startswith("{")]
    started = [entry for entry in logs if entry["message"].startswith("started build")]
    assert started and started[0]["build_id"]
    # Every line about the job carries the job's context (CloudWatch Logs Insights queries).
    job_lines = [entry for entry in logs if entry["logger"] == "branchbuild.job"]
    assert len(job_lines) >= 2
    for entry in job_lines:
        assert entry["commit"] == commit and entry["branch"] == "feature/PAY-1-refunds"
        assert entry["repository"] == "shop" and entry["message_id"] and entry["event_id"]


async def test_protected_deleted_tag_and_other_events_build_nothing(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "quiet")
    await repo.commit({"a": "1"})
    await repo.push("main:develop")
    await repo.push("main:staging")
    await repo.push("main:gone")
    await repo.push("--delete", "gone")
    await repo.git("tag", "v1.0.0")
    await repo.push("v1.0.0")
    service = await start_service()
    for change in git_world.changes:
        if change.ref != "refs/heads/gone" or change.new is None:
            await send_change(aws, change)
    merge = json.loads(MERGE_EVENT)
    await aws.send_event(merge)
    await drained(aws, aws.intake_url, aws.work_url)

    async def counted() -> bool:
        return await service.metric("branchbuild_events_total") == 5

    await wait_for(counted)
    assert await service.metric("branchbuild_events_total", outcome="protected") == 2
    assert await service.metric("branchbuild_events_total", event="deleted", outcome="deleted") == 1
    assert await service.metric("branchbuild_events_total", outcome="ignored") == 2
    assert await aws.start_builds() == []
    assert await aws.keys() == []
    assert git_world.host.upload_pack_count == 0  # decided before any fetch


async def test_malformed_message_is_dead_lettered_while_branches_keep_flowing(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "flow")
    repo = await WorkCopy.create(git_world, tmp_path, "flow")
    await repo.commit({"a": "1"})
    await repo.push("main:feature/one")
    await repo.commit({"a": "2"})
    await repo.push("HEAD:feature/two")
    service = await start_service()
    await aws.send_event("this is not json")
    bad = codecommit_event(git_world.changes[0])
    bad["detail"]["commitId"] = "not-a-commit"
    await aws.send_event(bad)
    for change in git_world.changes:
        await send_change(aws, change)

    await builds(aws, 2)

    async def dead_lettered() -> list[tuple[str, dict[str, str]]] | None:
        found = await aws.dlq_messages(aws.intake_dlq_url)
        return found if len(found) == 2 else None

    found = await wait_for(dead_lettered, within=60, what="two messages in the DLQ")
    reasons = dict(found)
    assert reasons["this is not json"]["branchbuild.error_kind"] == "malformed_event"
    assert reasons["this is not json"]["branchbuild.reason"].startswith("body is not JSON")
    assert reasons["this is not json"]["branchbuild.receive_count"] == "2"
    [bad_body] = [body for body in reasons if "not-a-commit" in body]
    assert "commitId is not a 40-character hex" in reasons[bad_body]["branchbuild.reason"]
    logs = service.logs()
    assert "body is not JSON" in logs and "commitId is not a 40-character hex commit id" in logs
    await service.metric_reaches(
        2, "branchbuild_events_total", event="malformed", outcome="dead_lettered"
    )
    status, _ = await service.get("/healthz")
    assert status == 200


async def test_commit_15_behind_the_tip_is_built_exactly(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "deep")
    repo = await WorkCopy.create(git_world, tmp_path, "deep")
    old = await repo.commit({"version.txt": "old\n", "only-in-old.txt": "x"})
    await repo.push("main:feature/deep")
    event = git_world.changes[-1]
    await repo.git("rm", "--quiet", "only-in-old.txt")
    for i in range(15):
        await repo.commit({"version.txt": f"{i}\n", f"f{i}.txt": "y"})
    await repo.push("HEAD:feature/deep")
    await start_service()
    await send_change(aws, event)
    [request] = await builds(aws, 1)
    assert request["environmentVariablesOverride"][0]["value"] == old
    archive = await aws.object(f"deep/feature/deep/{old}.zip")
    assert zip_listing(archive) == await repo.archive_listing(old)
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        assert z.read("version.txt") == b"old\n"


async def test_branches_run_in_parallel_one_branch_in_order_older_superseded(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    for name in ("left", "right"):
        await create_project(aws, name)
    left = await WorkCopy.create(git_world, tmp_path, "left")
    right = await WorkCopy.create(git_world, tmp_path, "right")
    a1 = await left.commit({"a": "1"})
    await left.push("main:feature/a")
    await right.commit({"b": "1"})
    await right.push("main:feature/b")
    gate = anyio.Event()
    git_world.host.upload_pack_gate = gate
    service = await start_service()
    for change in list(git_world.changes):
        await send_change(aws, change)

    # Both fetches are held at the git host at the same time: the branches run in parallel.
    async def both_waiting() -> bool:
        return git_world.host.upload_pack_waiting == 2

    await wait_for(both_waiting, within=30, what="two concurrent fetches")

    # Two more pushes to feature/a while its first job is still running.
    a2 = await left.commit({"a": "2"})
    await left.push("main:feature/a")
    a3 = await left.commit({"a": "3"})
    await left.push("main:feature/a")
    for change in git_world.changes[-2:]:
        await send_change(aws, change)

    async def queued() -> bool:
        return await aws.count(aws.work_url) == 4 and await aws.count(aws.intake_url) == 0

    await wait_for(queued, what="a2 and a3 waiting behind a1")
    gate.set()

    requests = await builds(aws, 3)
    await drained(aws, aws.work_url)
    commits = [r["environmentVariablesOverride"][0]["value"] for r in requests]
    assert a2 not in commits
    assert commits.index(a1) < commits.index(a3)
    assert len(commits) == 3
    assert await service.metric("branchbuild_jobs_total", outcome="superseded") == 1
    assert await service.metric("branchbuild_jobs_total", outcome="built") == 3


async def test_an_older_push_back_after_a_newer_ones_build_is_superseded_not_built(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    """A push redriven from the dead-letter queue, or re-sent after SQS's 5-minute
    deduplication window, comes back after a newer push of its branch was built: building it
    would make the older tree the branch's newest build."""
    await create_project(aws, "late")
    repo = await WorkCopy.create(git_world, tmp_path, "late")
    old = await repo.commit({"v": "old"})
    await repo.push("main:feature/late")
    new = await repo.commit({"v": "new"})
    await repo.push("main:feature/late")
    pushed = datetime.now(UTC)
    service = await start_service()
    ref = "refs/heads/feature/late"
    later = pushed + timedelta(minutes=1)
    await aws.send_event(codecommit_event(RefChange("late", ref, old, new), time=later))
    await builds(aws, 1)
    # The older push (dead-lettered once, say) is redriven after the newer one's build started.
    await aws.send_event(codecommit_event(RefChange("late", ref, None, old), time=pushed))

    async def settled() -> bool:
        return await service.metric("branchbuild_jobs_total", outcome="superseded") == 1

    await wait_for(settled, what="the late push superseded")
    await drained(aws, aws.intake_url, aws.work_url)
    commits = [r["environmentVariablesOverride"][0]["value"] for r in await aws.start_builds()]
    assert commits == [new]
    assert await aws.count(aws.work_dlq_url) == 0


async def test_sigterm_mid_job_releases_at_once_and_a_second_instance_builds_once(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "term")
    repo = await WorkCopy.create(git_world, tmp_path, "term")
    commit = await repo.commit({"a": "1"})
    await repo.push("main:feature/t")
    gate = anyio.Event()
    git_world.host.upload_pack_gate = gate
    first = await start_service(
        BRANCHBUILD_SHUTDOWN_GRACE="1", BRANCHBUILD_VISIBILITY_TIMEOUT="600"
    )
    await send_change(aws, git_world.changes[-1])

    async def fetching() -> bool:
        return git_world.host.upload_pack_waiting == 1

    await wait_for(fetching)
    first.signal(signal.SIGTERM)
    assert await first.wait(within=15) == 0
    assert "job cancelled at the end of the shutdown grace; message released" in first.logs()
    # Released with visibility 0 (not stranded for the 600 s visibility timeout).
    # (Counted, not received: a receive would use up one of the message's two deliveries.)
    attributes = await aws.sqs.get_queue_attributes(
        QueueUrl=aws.work_url, AttributeNames=["ApproximateNumberOfMessages"]
    )
    assert attributes["Attributes"]["ApproximateNumberOfMessages"] == "1"

    gate.set()
    await start_service()
    [request] = await builds(aws, 1)
    assert request["environmentVariablesOverride"][0]["value"] == commit
    await drained(aws, aws.work_url)
    assert len(await aws.start_builds()) == 1
    assert await aws.open_uploads() == 0


async def test_sigterm_lets_a_running_job_finish(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "finish")
    repo = await WorkCopy.create(git_world, tmp_path, "finish")
    await repo.commit({"a": "1"})
    await repo.push("main:feature/f")
    gate = anyio.Event()
    git_world.host.upload_pack_gate = gate
    service = await start_service(BRANCHBUILD_SHUTDOWN_GRACE="60")
    await send_change(aws, git_world.changes[-1])

    async def fetching() -> bool:
        return git_world.host.upload_pack_waiting == 1

    await wait_for(fetching)
    service.signal(signal.SIGTERM)

    async def draining() -> bool:
        status, _ = await service.get("/readyz")
        return status == 503

    await wait_for(draining)
    gate.set()
    assert await service.wait(within=30) == 0
    assert len(await aws.start_builds()) == 1
    await drained(aws, aws.work_url)


async def test_sigkill_mid_job_redelivers_and_exactly_one_build_results(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "kill")
    repo = await WorkCopy.create(git_world, tmp_path, "kill")
    commit = await repo.commit({"a": "1"})
    await repo.push("main:feature/k")
    gate = anyio.Event()
    git_world.host.upload_pack_gate = gate
    first = await start_service()
    await send_change(aws, git_world.changes[-1])

    async def fetching() -> bool:
        return git_world.host.upload_pack_waiting == 1

    await wait_for(fetching)
    first.signal(signal.SIGKILL)
    assert await first.wait() == -signal.SIGKILL
    gate.set()
    second = await start_service()
    [request] = await builds(aws, 1)
    assert request["environmentVariablesOverride"][0]["value"] == commit
    await drained(aws, aws.work_url)
    # A redelivery after SQS's 5-minute deduplication window finds the ledger: no second build.
    from service.events import Push, parse_event
    from service.intake import work_message

    push = parse_event(json.dumps(codecommit_event(git_world.changes[-1])))
    assert isinstance(push, Push)  # a ref change, not another event type
    message = work_message(push)
    await aws.sqs.send_message(
        QueueUrl=aws.work_url,
        MessageBody=message.body,
        MessageGroupId=message.group,
        MessageDeduplicationId=message.dedup + "-later",
    )

    async def duplicate() -> bool:
        return await second.metric("branchbuild_jobs_total", outcome="duplicate") == 1

    await wait_for(duplicate)
    await drained(aws, aws.work_url)
    assert len(await aws.start_builds()) == 1
    assert await aws.dlq_bodies(aws.work_dlq_url) == []


async def test_transient_ssh_drop_is_retried_after_backoff_then_built(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "flaky")
    repo = await WorkCopy.create(git_world, tmp_path, "flaky")
    await repo.commit({"big.bin": os.urandom(300_000)})
    await repo.push("main:feature/flaky")
    git_world.host.drop_after_bytes = 2000
    service = await start_service()
    await send_change(aws, git_world.changes[-1])

    async def retried() -> bool:
        return await service.metric("branchbuild_jobs_total", outcome="retried") == 1

    await wait_for(retried)
    git_world.host.drop_after_bytes = None
    await builds(aws, 1)
    await drained(aws, aws.work_url)
    assert len(await aws.start_builds()) == 1
    assert await service.metric("branchbuild_errors_total", kind="git") >= 1
    assert await service.metric("branchbuild_jobs_total", outcome="built") == 1
    assert await aws.dlq_bodies(aws.work_dlq_url) == []
    assert "visible again in" in service.logs()


async def test_permanent_failure_is_dead_lettered_with_its_reason(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "noproject")  # no CodeBuild project
    await repo.commit({"a": "1"})
    await repo.push("main:feature/x")
    service = await start_service()
    await send_change(aws, git_world.changes[-1])

    async def dead() -> list[tuple[str, dict[str, str]]] | None:
        return await aws.dlq_messages(aws.work_dlq_url) or None

    [(body, attributes)] = await wait_for(dead, within=60, what="the job in the work DLQ")
    assert json.loads(body)["repository"] == "noproject"
    assert "ResourceNotFoundException" in attributes["branchbuild.reason"]
    assert attributes["branchbuild.error_kind"] == "access_denied"
    assert attributes["branchbuild.source_queue"] == aws.work_url
    assert "ResourceNotFoundException" in service.logs()
    await service.metric_reaches(1, "branchbuild_jobs_total", outcome="dead_lettered")
    assert await service.metric("branchbuild_errors_total", kind="access_denied") == 2
    # The second delivery was refused from memory: one fetch, one upload, no build.
    assert git_world.host.upload_pack_count == 1
    assert await aws.start_builds() != []  # the refused StartBuild request itself
    assert await aws.open_uploads() == 0


async def test_a_job_longer_than_the_visibility_timeout_runs_once(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "slow")
    repo = await WorkCopy.create(git_world, tmp_path, "slow")
    await repo.commit({"a": "1"})
    await repo.push("main:feature/slow")
    gate = anyio.Event()
    git_world.host.upload_pack_gate = gate
    service = await start_service(BRANCHBUILD_VISIBILITY_TIMEOUT="3")  # a beat every 1 s
    await send_change(aws, git_world.changes[-1])

    # Hold the fetch for three visibility timeouts' worth of heartbeats.
    async def long_enough() -> bool:
        return await service.metric("branchbuild_visibility_extensions_total") >= 15

    await wait_for(long_enough, within=60, what="15 heartbeats")
    assert git_world.host.upload_pack_count == 1  # never handed out a second time
    gate.set()
    await builds(aws, 1)
    await drained(aws, aws.work_url)
    assert len(await aws.start_builds()) == 1
    assert git_world.host.upload_pack_count == 1


async def test_sigterm_strands_nothing_that_the_last_long_poll_brings(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    """The long polls parked at SIGTERM are let finish, not abandoned: SQS (and moto) would
    still hand an abandoned poll's messages to the dropped connection, invisible to everyone
    for the visibility timeout. A push arriving during them is worked on or handed back."""
    await create_project(aws, "late")
    repo = await WorkCopy.create(git_world, tmp_path, "late")
    commit = await repo.commit({"a": "1"})
    await repo.push("main:feature/late")
    service = await start_service(
        BRANCHBUILD_WAIT_TIME="20",
        BRANCHBUILD_INTAKE_VISIBILITY_TIMEOUT="600",
        BRANCHBUILD_VISIBILITY_TIMEOUT="600",
    )
    # Ready means both loops run; with empty queues each is parked in a 20 s ReceiveMessage.
    service.signal(signal.SIGTERM)

    async def draining() -> bool:
        status, _ = await service.get("/readyz")
        return status == 503

    await wait_for(draining)
    await send_change(aws, git_world.changes[-1])
    assert await service.wait(within=60) == 0
    assert '"message": "stopped"' in service.logs()
    for url in (aws.intake_url, aws.work_url):  # nothing held for the 600 s timeout
        reply = await aws.sqs.get_queue_attributes(
            QueueUrl=url, AttributeNames=["ApproximateNumberOfMessagesNotVisible"]
        )
        assert reply["Attributes"]["ApproximateNumberOfMessagesNotVisible"] == "0"
    if not await aws.start_builds():  # its last poll ended before the push: the next one
        await start_service()
    [request] = await builds(aws, 1)
    assert request["environmentVariablesOverride"][0]["value"] == commit
    await drained(aws, aws.intake_url, aws.work_url)
    assert len(await aws.start_builds()) == 1


async def test_sigterm_with_several_jobs_finishes_some_releases_the_rest(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    """Jobs in flight and a parked long poll: exit within the grace; the finished job is
    deleted, the unfinished ones are visible again at once and a second instance builds them
    once each."""
    names = ("done", "held1", "held2")
    commits = {}
    for name in names:
        await create_project(aws, name)
        repo = await WorkCopy.create(git_world, tmp_path, name)
        commits[name] = await repo.commit({"a.txt": name})
        await repo.push("main:feature/s")
        git_world.host.repository_gates[name] = anyio.Event()
    first = await start_service(
        BRANCHBUILD_SHUTDOWN_GRACE="4", BRANCHBUILD_VISIBILITY_TIMEOUT="600"
    )
    for change in git_world.changes:
        await send_change(aws, change)

    async def all_fetching() -> bool:
        return git_world.host.upload_pack_waiting == 3

    await wait_for(all_fetching)
    first.signal(signal.SIGTERM)
    git_world.host.repository_gates["done"].set()  # finishes within the grace
    assert await first.wait(within=20) == 0
    [request] = await aws.start_builds()
    assert request["projectName"] == "done"
    attributes = await aws.sqs.get_queue_attributes(
        QueueUrl=aws.work_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )
    # The finished job's message is gone; the two unfinished ones are visible right away
    # (not stranded for the 600 s visibility timeout).
    assert attributes["Attributes"]["ApproximateNumberOfMessages"] == "2"
    assert attributes["Attributes"]["ApproximateNumberOfMessagesNotVisible"] == "0"
    logs = first.logs()
    assert logs.count("cancelled at the end of the shutdown grace; message released") == 2

    for gate in git_world.host.repository_gates.values():
        gate.set()
    await start_service()
    requests = await builds(aws, 3)
    await drained(aws, aws.work_url)
    assert sorted(r["projectName"] for r in requests) == sorted(names)
    assert len(await aws.start_builds()) == 3
    assert await aws.open_uploads() == 0


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("BRANCHBUILD_QUEUE_URL", "missing", "cannot read attributes of the intake queue"),
        ("BRANCHBUILD_WORK_QUEUE_URL", "missing", "cannot read attributes of the work queue"),
        ("BRANCHBUILD_BUCKET", "no-such-bucket-here", "bucket no-such-bucket-here does not exist"),
    ],
)
async def test_missing_resources_stop_the_start_with_one_clear_line(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    env = service_env(
        git_world,
        tmp_path / "cache",
        intake_url=aws.intake_url,
        work_url=aws.work_url,
        bucket=aws.bucket,
    )
    if value == "missing":
        value = env[variable].replace(".fifo", "-gone.fifo")
    env[variable] = value
    with anyio.fail_after(60):
        result = await anyio.run_process(
            [sys.executable, "-m", "service", "run"], env=env, check=False
        )
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert lines[-1].startswith("branchbuild: cannot start:") and expected in lines[-1], lines
