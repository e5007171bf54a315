"""Faults of the dependencies, injected between the service and moto by a proxy.

Each fault ends in its documented outcome (retried then built, or dead-lettered with the
reason), the service stays healthy, and the metrics count it.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from service.events import codecommit_event
from tests.faultproxy import Fault, FaultProxy, json_error, s3_error, sqs_call, target, upload_part
from tests.helpers import (
    AwsResources,
    GitWorld,
    ServiceProcess,
    StartService,
    WorkCopy,
    create_project,
    wait_for,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
async def proxy(aws: AwsResources) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(upstream=aws.endpoint).running() as running:
        yield running
    assert running.errors == []


async def push_branch(
    aws: AwsResources, world: GitWorld, tmp: Path, name: str, files: dict[str, str | bytes]
) -> str:
    await create_project(aws, name)
    repo = await WorkCopy.create(world, tmp, name)
    commit = await repo.commit(files)
    await repo.push("main:feature/x")
    await aws.send_event(codecommit_event(world.changes[-1]))
    return commit


async def built(aws: AwsResources, service: ServiceProcess) -> list[str]:
    async def done() -> list[str] | None:
        commits = [r["environmentVariablesOverride"][0]["value"] for r in await aws.start_builds()]
        started = await service.metric("branchbuild_builds_started_total")
        return commits if commits and started >= 1 else None

    found = await wait_for(done, within=90, what="a build")
    assert (await service.get("/healthz"))[0] == 200
    return found


async def test_s3_slowdown_beyond_botocore_retries_is_retried_then_built(
    aws: AwsResources,
    git_world: GitWorld,
    tmp_path: Path,
    proxy: FaultProxy,
    start_service: StartService,
) -> None:
    # Six 503 SlowDown answers: botocore's 4 attempts fail the first upload, the message is
    # retried after the backoff, and the second attempt gets through.
    fault = proxy.add(s3_error("SlowDown", 503, match=upload_part, times=6))
    service = await start_service(
        AWS_ENDPOINT_URL=proxy.endpoint,
        BRANCHBUILD_PART_SIZE=str(5 * 1024 * 1024),
        BRANCHBUILD_UPLOAD_CONCURRENCY="1",  # one part at a time: part 1 takes 4 answers
    )
    commit = await push_branch(
        aws, git_world, tmp_path, "slow", {"big.bin": os.urandom(6 * 1024 * 1024)}
    )
    assert await built(aws, service) == [commit]
    assert fault.hits == 6
    assert await service.metric("branchbuild_jobs_total", outcome="retried") >= 1
    assert await service.metric("branchbuild_errors_total", kind="storage") >= 1
    assert await service.metric("branchbuild_aws_retries_total", service="s3") >= 3
    assert await aws.open_uploads() == 0
    assert await aws.dlq_bodies(aws.work_dlq_url) == []


async def test_s3_internal_error_is_absorbed_by_retries(
    aws: AwsResources,
    git_world: GitWorld,
    tmp_path: Path,
    proxy: FaultProxy,
    start_service: StartService,
) -> None:
    put = proxy.add(
        s3_error(
            "InternalError",
            500,
            match=lambda r: r.method == "PUT" and r.path.endswith(".zip"),
            times=2,
        )
    )
    service = await start_service(AWS_ENDPOINT_URL=proxy.endpoint)
    commit = await push_branch(aws, git_world, tmp_path, "five", {"a.txt": "small"})
    assert await built(aws, service) == [commit]
    assert put.hits == 2
    assert await service.metric("branchbuild_aws_retries_total", service="s3") >= 2
    assert await service.metric("branchbuild_jobs_total", outcome="retried") == 0


async def test_codebuild_throttling_and_account_limit_end_in_one_build(
    aws: AwsResources,
    git_world: GitWorld,
    tmp_path: Path,
    proxy: FaultProxy,
    start_service: StartService,
) -> None:
    throttled = proxy.add(json_error("ThrottlingException", match=target(".StartBuild"), times=2))
    limited = proxy.add(
        json_error("AccountLimitExceededException", match=target(".StartBuild"), times=2)
    )
    service = await start_service(
        AWS_ENDPOINT_URL=proxy.endpoint, BRANCHBUILD_CAPACITY_PROBE_INTERVAL="0.5"
    )
    commit = await push_branch(aws, git_world, tmp_path, "limits", {"a.txt": "x"})
    assert await built(aws, service) == [commit]  # exactly one StartBuild reached CodeBuild
    assert throttled.hits == 2 and limited.hits == 2
    # botocore retried the throttling; the account limit made the push wait, not fail
    assert await service.metric("branchbuild_aws_retries_total", service="codebuild") >= 2
    assert await service.metric("branchbuild_capacity_refusals_total") == 2
    assert await service.metric("branchbuild_jobs_total", outcome="waiting") == 1
    assert await service.metric("branchbuild_jobs_total", outcome="retried") == 0
    assert await aws.dlq_bodies(aws.work_dlq_url) == []


async def test_queue_endpoint_unreachable_for_a_while(
    aws: AwsResources,
    git_world: GitWorld,
    tmp_path: Path,
    proxy: FaultProxy,
    start_service: StartService,
) -> None:
    service = await start_service(AWS_ENDPOINT_URL=proxy.endpoint)
    outage = proxy.add(s3_error("", 0, match=sqs_call, times=10**6))
    outage.drop = True

    async def failing() -> bool:
        return await service.metric("branchbuild_errors_total", kind="transient") >= 2

    await wait_for(failing, within=90, what="the outage to be noticed")
    assert (await service.get("/healthz"))[0] == 200  # degraded, not dead: a restart won't help
    outage.times = 0  # the endpoint is back
    commit = await push_branch(aws, git_world, tmp_path, "outage", {"a.txt": "x"})
    assert await built(aws, service) == [commit]
    assert "cannot receive from the" in service.logs()


async def test_git_host_refusing_the_key_is_dead_lettered_with_the_reason(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    service = await start_service()
    repo = await WorkCopy.create(git_world, tmp_path, "refused")
    await repo.commit({"a.txt": "x"})
    await repo.push("main:feature/x")
    git_world.host.refuse_all_keys = True  # e.g. the key was deactivated in IAM
    await aws.send_event(codecommit_event(git_world.changes[-1]))

    async def dead() -> list[tuple[str, dict[str, str]]] | None:
        return await aws.dlq_messages(aws.work_dlq_url) or None

    [(_, attributes)] = await wait_for(dead, within=60, what="the job in the DLQ")
    assert attributes["branchbuild.error_kind"] == "git_access"
    assert "Permission denied" in attributes["branchbuild.reason"]
    assert await service.metric("branchbuild_errors_total", kind="git_access") == 2
    assert (await service.get("/healthz"))[0] == 200


async def test_a_failed_delete_after_a_build_neither_kills_the_worker_nor_builds_twice(
    aws: AwsResources,
    git_world: GitWorld,
    tmp_path: Path,
    proxy: FaultProxy,
    start_service: StartService,
) -> None:
    # Every attempt of the first work-queue DeleteMessageBatch fails (botocore tries up to 5
    # times); the rest of the 8 errors are absorbed by the next delete's retries.
    delete = proxy.add(json_error("InternalError", match=target(".DeleteMessageBatch"), times=8))
    delete.status = 500
    delete.body_contains = aws.work_url.encode()
    service = await start_service(AWS_ENDPOINT_URL=proxy.endpoint)
    commit = await push_branch(aws, git_world, tmp_path, "undeleted", {"a.txt": "x"})
    assert await built(aws, service) == [commit]

    # The message comes back after its visibility timeout, finds the ledger: no second build.
    async def duplicate() -> bool:
        return await service.metric("branchbuild_jobs_total", outcome="duplicate") == 1

    await wait_for(duplicate, within=60, what="the redelivery to be recognised")
    assert delete.hits >= 5  # the first delete failed in every attempt
    assert await service.metric("branchbuild_errors_total", kind="delete") == 1
    assert len(await aws.start_builds()) == 1
    assert (await service.get("/healthz"))[0] == 200


@pytest.mark.parametrize("newer_push", [False, True], ids=["redelivered", "superseded"])
async def test_an_upload_left_open_by_a_killed_job_is_aborted_by_the_next_attempt(
    aws: AwsResources,
    git_world: GitWorld,
    tmp_path: Path,
    proxy: FaultProxy,
    start_service: StartService,
    newer_push: bool,
) -> None:
    """SIGKILL while a part is in flight leaves a multipart upload open. The redelivered
    message's job (or, when a newer push of the branch arrived meanwhile, the newer push's
    job, which supersedes it) aborts it before doing its own work."""
    held = anyio.Event()
    part = proxy.add(Fault(match=upload_part, hold=held))
    settings = {"AWS_ENDPOINT_URL": proxy.endpoint, "BRANCHBUILD_PART_SIZE": str(5 * 1024**2)}
    first = await start_service(**settings)
    await create_project(aws, "killed")
    repo = await WorkCopy.create(git_world, tmp_path, "killed")
    commit = await repo.commit({"big.bin": os.urandom(6 * 1024 * 1024)})
    await repo.push("main:feature/x")
    await aws.send_event(codecommit_event(git_world.changes[-1]))

    async def part_in_flight() -> bool:
        return part.hits == 1

    await wait_for(part_in_flight, within=60, what="the first part upload")
    assert await aws.open_uploads() == 1
    if newer_push:  # queued behind the held message in the branch's group
        await repo.git("rm", "--quiet", "big.bin")
        commit = await repo.commit({"small.txt": "now small\n"}, message="newer")
        await repo.push("HEAD:feature/x")
        await aws.send_event(codecommit_event(git_world.changes[-1]))

        async def moved_to_the_work_queue() -> bool:
            return await aws.count(aws.intake_url) == 0

        await wait_for(moved_to_the_work_queue, within=30, what="the intake")
    first.signal(signal.SIGKILL)
    assert await first.wait() == -signal.SIGKILL
    held.set()

    second = await start_service(**settings)
    assert await built(aws, second) == [commit]
    assert await aws.open_uploads() == 0
    if newer_push:
        assert await second.metric("branchbuild_jobs_total", outcome="superseded") == 1


async def test_while_jobs_run_the_worker_polls_briefly_so_unlocked_branches_start_at_once(
    aws: AwsResources,
    git_world: GitWorld,
    tmp_path: Path,
    proxy: FaultProxy,
    start_service: StartService,
) -> None:
    """A finished job unlocks its branch's FIFO group; a long poll already waiting does not
    see that on every SQS (moto's doesn't). So while jobs run, work-queue receives wait at
    most 1 s; idle, they wait the full BRANCHBUILD_WAIT_TIME."""

    def work_receive_waits() -> list[int]:
        return [
            json.loads(body).get("WaitTimeSeconds", 0)
            for call, body in proxy.calls
            if call.endswith(".ReceiveMessage") and aws.work_url.encode() in body
        ]

    held = anyio.Event()
    git_world.host.upload_pack_gate = held
    service = await start_service(AWS_ENDPOINT_URL=proxy.endpoint, BRANCHBUILD_WAIT_TIME="5")

    async def idle_poll() -> bool:
        return 5 in work_receive_waits()

    await wait_for(idle_poll, what="an idle long poll")
    commit = await push_branch(aws, git_world, tmp_path, "brief", {"a.txt": "x"})

    async def fetch_held() -> bool:
        return git_world.host.upload_pack_waiting == 1

    await wait_for(fetch_held, within=60, what="the job's fetch")
    seen = len(work_receive_waits())

    async def brief_poll() -> bool:
        return 1 in work_receive_waits()[seen:]

    await wait_for(brief_poll, what="a brief poll while the job runs")
    held.set()
    assert await built(aws, service) == [commit]
