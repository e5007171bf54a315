"""Build outcomes and superseded running builds, end to end: the service as a real process,
moto over HTTP, the real SSH git host.

moto's CodeBuild sends no state events, so the tests put ``CodeBuild Build State Change``
events on the intake queue themselves, shaped as CodeBuild sends them, as the pipeline's
``BuildStateRule`` would (message group ``codebuild``). moto records StopBuild requests.
"""

from __future__ import annotations

import json
import signal
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from localdev.githost import codecommit_event
from service.build_state import Change, Outcomes, parse_build_state
from service.errors import NotificationRefused
from service.ledger import Entry, Ledger
from service.metrics import Metrics
from service.records import Records
from tests.helpers import (
    AwsResources,
    GitWorld,
    ServiceProcess,
    StartService,
    WorkCopy,
    create_project,
    wait_for,
)
from tests.test_worker import settings_for

pytestmark = pytest.mark.e2e

ACCOUNT = "123456789012"
REGION = "eu-west-1"
START = datetime(2026, 3, 2, 16, 12, 29, tzinfo=UTC)


def build_state_event(
    build_id: str,
    status: str,
    *,
    archive: str | None,
    at: datetime,
    start: datetime = START,
) -> dict[str, Any]:
    """A ``CodeBuild Build State Change`` event as CodeBuild sends it (the AWS sample's shape)."""
    project, _, uuid_part = build_id.partition(":")
    arn = f"arn:aws:codebuild:{REGION}:{ACCOUNT}:build/{build_id}"
    variables = [{"name": "COMMIT_ID", "value": "0" * 40, "type": "PLAINTEXT"}]
    if archive is not None:
        variables.append({"name": "BRANCHBUILD_ARCHIVE", "value": archive, "type": "PLAINTEXT"})
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "CodeBuild Build State Change",
        "source": "aws.codebuild",
        "account": ACCOUNT,
        "time": at.isoformat().replace("+00:00", "Z"),
        "region": REGION,
        "resources": [arn],
        "detail": {
            "build-status": status,
            "project-name": project,
            "build-id": arn,
            "additional-information": {
                "environment": {
                    "image": "aws/codebuild/standard:7.0",
                    "type": "LINUX_CONTAINER",
                    "environment-variables": variables,
                },
                "timeout-in-minutes": 60,
                "build-complete": status != "IN_PROGRESS",
                "initiator": "branchbuild",
                "build-start-time": start.strftime("%b %-d, %Y %-I:%M:%S %p"),
                "source": {"type": "S3", "location": f"bucket/{archive}"},
                "logs": {
                    "group-name": f"/aws/codebuild/{project}",
                    "stream-name": uuid_part,
                    "deep-link": f"https://console.aws.amazon.com/cloudwatch/home?region={REGION}"
                    f"#logEvent:group=/aws/codebuild/{project};stream={uuid_part}",
                },
            },
            "current-phase": "COMPLETED" if status != "IN_PROGRESS" else "BUILD",
            "current-phase-context": "[]",
            "version": "1",
        },
    }


async def send_build_event(aws: AwsResources, event: dict[str, Any] | str) -> None:
    """What the BuildStateRule does: the whole event, the static group ``codebuild``."""
    await aws.sqs.send_message(
        QueueUrl=aws.intake_url,
        MessageBody=event if isinstance(event, str) else json.dumps(event),
        MessageGroupId="codebuild",
        MessageDeduplicationId=uuid.uuid4().hex,
    )


async def ledger(aws: AwsResources, archive: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        if archive + ".build.json" not in await aws.keys():
            return None
        data: dict[str, Any] = json.loads(await aws.object(archive + ".build.json"))
        return data

    return await wait_for(probe, within=60, what=f"the ledger entry of {archive}")


async def counted(service: ServiceProcess, total: float, name: str, **labels: str) -> None:
    async def probe() -> bool:
        return await service.metric(name, **labels) >= total

    await wait_for(probe, within=60, what=f"{name}{labels} >= {total}")


async def push(aws: AwsResources, world: GitWorld, repo: WorkCopy, branch: str, n: int) -> str:
    commit = await repo.commit({"n.txt": f"{n}\n"}, message=f"change {n}")
    await repo.push(f"HEAD:{branch}")
    await aws.send_event(codecommit_event(world.changes[-1]))
    return commit


async def stop_builds(aws: AwsResources, count: int) -> list[str]:
    async def probe() -> list[str] | None:
        found = [r["id"] for r in await aws.recorded("StopBuild")]
        return found if len(found) >= count else None

    return await wait_for(probe, within=60, what=f"{count} StopBuild request(s)")


async def test_state_events_late_twice_and_out_of_order_end_in_one_final_state(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "shop")
    repo = await WorkCopy.create(git_world, tmp_path, "shop")
    service = await start_service()
    commit = await push(aws, git_world, repo, "feature/pay", 1)
    archive = f"shop/feature/pay/{commit}.zip"
    build_id = (await ledger(aws, archive))["build_id"]

    end = START + timedelta(seconds=95)
    succeeded = build_state_event(build_id, "SUCCEEDED", archive=archive, at=end)
    late = build_state_event(build_id, "IN_PROGRESS", archive=archive, at=START)
    await send_build_event(aws, succeeded)  # the final state first,
    await send_build_event(aws, late)  # then the IN_PROGRESS that was late,
    await send_build_event(aws, succeeded | {"id": str(uuid.uuid4())})  # then a duplicate
    await counted(service, 3, "branchbuild_events_total", event="build_state")

    entry = json.loads(await aws.object(archive + ".build.json"))
    assert entry["status"] == "SUCCEEDED"
    assert entry["started_at"] == "2026-03-02T16:12:29Z"
    assert entry["ended_at"] == "2026-03-02T16:14:04Z"
    assert entry["logs"].startswith("https://console.aws.amazon.com/cloudwatch/")
    assert entry["commit"] == commit and entry["build_id"] == build_id
    assert await service.metric("branchbuild_events_total", outcome="recorded") == 1
    assert await service.metric("branchbuild_events_total", outcome="stale") == 2
    assert await service.metric("branchbuild_build_results_total", status="succeeded") == 1
    assert await service.metric("branchbuild_build_results_total") == 1  # counted once
    assert await service.metric("branchbuild_build_duration_seconds_count") == 1
    assert await service.metric("branchbuild_build_duration_seconds_sum") == 95
    # A push arriving after the outcomes still flows.
    await push(aws, git_world, repo, "feature/other", 2)
    await counted(service, 2, "branchbuild_jobs_total", outcome="built")


async def test_foreign_builds_are_ignored_and_malformed_events_dead_lettered(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "shop")
    repo = await WorkCopy.create(git_world, tmp_path, "shop")
    service = await start_service()
    commit = await push(aws, git_world, repo, "feature/pay", 1)
    archive = f"shop/feature/pay/{commit}.zip"
    mine = await ledger(aws, archive)
    now = datetime.now(UTC)

    # Not started by branchbuild: no BRANCHBUILD_ARCHIVE, or a build the ledger does not
    # name (a console "retry" copies the variables).
    await send_build_event(
        aws, build_state_event("shop:" + str(uuid.uuid4()), "FAILED", archive=None, at=now)
    )
    await send_build_event(
        aws, build_state_event("shop:" + str(uuid.uuid4()), "FAILED", archive=archive, at=now)
    )
    broken = build_state_event(mine["build_id"], "SUCCEEDED", archive=archive, at=now)
    broken["detail"]["build-id"] = "not-an-arn"
    await send_build_event(aws, broken)
    unknown = build_state_event(mine["build_id"], "EXPLODED", archive=archive, at=now)
    await send_build_event(aws, unknown)

    async def dead_lettered() -> list[tuple[str, dict[str, str]]] | None:
        found = await aws.dlq_messages(aws.intake_dlq_url)
        return found if len(found) == 2 else None

    found = dict(await wait_for(dead_lettered, within=60, what="two messages in the DLQ"))
    reasons = sorted(attributes["branchbuild.reason"] for attributes in found.values())
    assert reasons[0].startswith("build-id is not a CodeBuild build ARN")
    assert reasons[1] == "unknown build-status 'EXPLODED'"
    assert {a["branchbuild.error_kind"] for a in found.values()} == {"malformed_event"}
    await counted(service, 2, "branchbuild_events_total", event="build_state", outcome="ignored")
    assert (
        await service.metric(
            "branchbuild_events_total", event="build_state", outcome="dead_lettered"
        )
        == 2
    )
    assert json.loads(await aws.object(archive + ".build.json")) == mine  # untouched
    assert await service.metric("branchbuild_build_results_total") == 0


async def test_a_newer_push_stops_the_older_running_build_across_a_restart(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "shop")
    repo = await WorkCopy.create(git_world, tmp_path, "shop")
    first = await start_service()
    old = await push(aws, git_world, repo, "feature/pay", 1)
    old_archive = f"shop/feature/pay/{old}.zip"
    old_build = (await ledger(aws, old_archive))["build_id"]
    await first.stop()  # nothing in memory survives

    second = await start_service()
    new = await push(aws, git_world, repo, "feature/pay", 2)
    new_build = (await ledger(aws, f"shop/feature/pay/{new}.zip"))["build_id"]
    assert await stop_builds(aws, 1) == [old_build]
    assert (await ledger(aws, old_archive))["superseded_by"] == new
    await counted(second, 1, "branchbuild_builds_stopped_total")

    # CodeBuild reports the stop: a superseded result, not a failure.
    at = datetime.now(UTC)
    await send_build_event(aws, build_state_event(old_build, "STOPPED", archive=old_archive, at=at))
    await counted(second, 1, "branchbuild_build_results_total", status="superseded")
    assert (await ledger(aws, old_archive))["status"] == "STOPPED"
    assert await aws.recorded("StopBuild") == [{"id": old_build}]  # the newer one runs on
    assert new_build != old_build


async def test_two_instances_share_the_current_build_of_a_branch(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "shop")
    repo = await WorkCopy.create(git_world, tmp_path, "shop")
    a = await start_service()
    old = await push(aws, git_world, repo, "feature/pay", 1)
    old_build = (await ledger(aws, f"shop/feature/pay/{old}.zip"))["build_id"]
    b = await start_service()
    a.signal(signal.SIGSTOP)  # A keeps running but can take no more work: B gets the next push
    try:
        await push(aws, git_world, repo, "feature/pay", 2)
        assert await stop_builds(aws, 1) == [old_build]
        await counted(b, 1, "branchbuild_builds_stopped_total")
    finally:
        a.signal(signal.SIGCONT)
    assert await a.metric("branchbuild_builds_stopped_total") == 0


async def test_kept_branches_and_a_finished_older_build_are_not_stopped(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "shop")
    repo = await WorkCopy.create(git_world, tmp_path, "shop")
    service = await start_service(BRANCHBUILD_KEEP_RUNNING_BRANCHES="main, release/*")
    await push(aws, git_world, repo, "release/1.0", 1)
    await push(aws, git_world, repo, "release/1.0", 2)
    old = await push(aws, git_world, repo, "feature/pay", 3)
    old_archive = f"shop/feature/pay/{old}.zip"
    old_build = (await ledger(aws, old_archive))["build_id"]
    at = datetime.now(UTC)
    await send_build_event(aws, build_state_event(old_build, "FAILED", archive=old_archive, at=at))
    await counted(service, 1, "branchbuild_build_results_total", status="failed")
    await push(aws, git_world, repo, "feature/pay", 4)
    await counted(service, 4, "branchbuild_jobs_total", outcome="built")
    assert await aws.recorded("StopBuild") == []
    assert "superseded_by" not in await ledger(aws, old_archive)


async def test_every_listener_hears_a_change_though_one_fails(aws: AwsResources) -> None:
    """A listener that raises (SNS refusing a notification) must not keep the others (the
    badge, the running slot) from the change; the first error is raised after them all, so the
    event is retried."""
    records = Records(aws.s3, aws.bucket)
    archive = "shop/feature/x/" + "c" * 40 + ".zip"
    build_id = "shop:" + str(uuid.uuid4())
    await Ledger(records).started(
        archive, Entry("c" * 40, "refs/heads/feature/x", build_id, "shop")
    )
    heard: list[str] = []

    async def refusing(change: Change) -> None:
        heard.append("refusing")
        raise NotificationRefused("SNS refused it")

    async def badge(change: Change) -> None:
        heard.append(f"badge {change.after.status if change.after else None}")

    outcomes = Outcomes(records, settings_for(aws), Metrics(), listeners=(refusing, badge))
    event = build_state_event(build_id, "SUCCEEDED", archive=archive, at=datetime.now(UTC))
    with pytest.raises(NotificationRefused):
        await outcomes.record(parse_build_state(json.dumps(event)))
    assert heard == ["refusing", "badge SUCCEEDED"]
    entry = await Ledger(records).read(archive)
    assert entry is not None and entry.status == "SUCCEEDED"
