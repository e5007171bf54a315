"""Pipeline rules end to end: the service as a real process with a configuration file, moto
over HTTP, the real SSH git host and real pushes.

Each push is sent and settled before the next (pushes of one branch received together would
supersede each other, which is not what these tests are about).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from localdev.githost import RefChange, codecommit_event
from service.reconcile import Lease
from service.records import Records
from tests.helpers import (
    ROOT,
    AwsResources,
    GitWorld,
    ServiceProcess,
    StartService,
    WorkCopy,
    create_project,
    wait_for,
)

pytestmark = pytest.mark.e2e


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pipelines.yaml"
    path.write_text(text)
    return str(path)


async def settle(
    aws: AwsResources, service: ServiceProcess, change: RefChange, *, metric: str
) -> None:
    """Send one push event and wait until the service has counted one more of ``metric``."""
    name = f"branchbuild_{metric}_total"
    before = await service.metric(name)
    await aws.send_event(codecommit_event(change))

    async def counted() -> bool:
        return await service.metric(name) > before

    await wait_for(counted, within=60, what=f"one more {name}")


def commits_built(requests: list[dict[str, Any]]) -> list[str]:
    return [
        next(v["value"] for v in r["environmentVariablesOverride"] if v["name"] == "COMMIT_ID")
        for r in requests
    ]


MONOREPO = """
version: 1
rules:
  - repository: mono
    branches:
      include: ["feature/*"]
      exclude: ["feature/wip-*"]
    paths:
      include: ["services/pay/*"]
      exclude: ["*.md"]
"""


async def test_branch_globs_and_monorepo_path_filters(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "mono")
    repo = await WorkCopy.create(git_world, tmp_path, "mono")
    await repo.commit({"services/pay/app.py": "1\n", "services/web/app.py": "1\n"})
    await repo.push("main")
    service = await start_service(BRANCHBUILD_CONFIG=write_config(tmp_path, MONOREPO))

    # Branch globs, decided at intake: wip and non-feature branches are excluded.
    await repo.push("main:feature/wip-1", "main:bugfix/b")
    for change in git_world.changes[-2:]:
        await settle(aws, service, change, metric="events")
    assert await service.metric("branchbuild_events_total", outcome="excluded") == 2

    # A new branch builds whatever it touches (no comparison for a new branch).
    await repo.checkout("feature/a")
    created = await repo.commit({"services/web/app.py": "2\n"})
    await repo.push("feature/a")
    await settle(aws, service, git_world.changes[-1], metric="jobs")
    # Only another team's paths, and only an excluded path in ours: filtered.
    web = await repo.commit({"services/web/app.py": "3\n"})
    await repo.push("feature/a")
    await settle(aws, service, git_world.changes[-1], metric="jobs")
    docs = await repo.commit({"services/pay/README.md": "docs\n"})
    await repo.push("feature/a")
    await settle(aws, service, git_world.changes[-1], metric="jobs")
    # Ours: built.
    pay = await repo.commit({"services/pay/app.py": "4\n", "services/web/app.py": "4\n"})
    await repo.push("feature/a")
    await settle(aws, service, git_world.changes[-1], metric="jobs")

    assert commits_built(await aws.start_builds()) == [created, pay]
    assert await service.metric("branchbuild_jobs_total", outcome="filtered") == 2
    assert await service.metric("branchbuild_jobs_total", outcome="built") == 2
    keys = await aws.keys()
    assert not any(web in key or docs in key for key in keys)  # nothing half-done
    assert f"mono/feature/a/{pay}.zip" in keys


async def test_a_force_push_that_cannot_be_compared_builds(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "forced")
    repo = await WorkCopy.create(git_world, tmp_path, "forced")
    await repo.commit({"services/pay/app.py": "1\n"})
    await repo.push("main")
    await repo.checkout("feature/f")
    old = await repo.commit({"services/pay/app.py": "2\n"})
    await repo.push("feature/f")
    # History rewritten: the branch is reset and gets a commit touching only other paths;
    # the host then forgets the old commit (as a server's gc would).
    await repo.git("reset", "--quiet", "--hard", "main")
    new = await repo.commit({"services/web/app.py": "x\n"})
    await repo.push("--force", "feature/f")
    forced = git_world.changes[-1]
    assert forced.old == old and forced.new == new
    host_repo = git_world.host.repository_path("forced")
    for command in (["reflog", "expire", "--expire=now", "--all"], ["gc", "--prune=now", "-q"]):
        await anyio.run_process(["git", f"--git-dir={host_repo}", *command])
    config = "version: 1\nrules:\n  - repository: forced\n    paths: {include: [services/pay/*]}\n"
    service = await start_service(BRANCHBUILD_CONFIG=write_config(tmp_path, config))

    await settle(aws, service, forced, metric="jobs")
    assert commits_built(await aws.start_builds()) == [new]
    assert await service.metric("branchbuild_jobs_total", outcome="built") == 1
    assert "built without a path comparison" in service.logs()


async def test_a_rewritten_branch_builds_and_later_pushes_are_compared_again(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "rewrite")
    repo = await WorkCopy.create(git_world, tmp_path, "rewrite")
    await repo.commit({"services/pay/app.py": "1\n"})
    await repo.push("main")
    config = "version: 1\nrules:\n  - repository: rewrite\n    paths: {include: [services/pay/*]}\n"
    service = await start_service(BRANCHBUILD_CONFIG=write_config(tmp_path, config))
    await repo.checkout("feature/f")
    old = await repo.commit({"services/pay/app.py": "2\n"})
    await repo.push("feature/f")
    await settle(aws, service, git_world.changes[-1], metric="jobs")
    # Force-pushed: the payments change is gone from the branch (another team's commit in
    # its place). The old commit is still on the server and in the cache: the push builds.
    await repo.git("reset", "--quiet", "--hard", "main")
    new = await repo.commit({"services/web/app.py": "x\n"})
    await repo.push("--force", "feature/f")
    assert git_world.changes[-1].old == old
    await settle(aws, service, git_world.changes[-1], metric="jobs")
    # A fast-forward after it touching only other paths is compared, and filtered.
    await repo.commit({"services/web/app.py": "y\n"})
    await repo.push("feature/f")
    await settle(aws, service, git_world.changes[-1], metric="jobs")
    assert commits_built(await aws.start_builds()) == [old, new]
    assert await service.metric("branchbuild_jobs_total", outcome="filtered") == 1


async def test_skip_markers(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "marks")
    await create_project(aws, "custom")
    repo = await WorkCopy.create(git_world, tmp_path, "marks")
    custom = await WorkCopy.create(git_world, tmp_path, "custom")
    config = "version: 1\nrules:\n  - repository: custom\n    skip_markers: ['[nobuild]']\n"
    service = await start_service(BRANCHBUILD_CONFIG=write_config(tmp_path, config))
    built = []
    for copy, message, skipped in (
        (repo, "Fix the tests\n\n[Skip CI] while we wait", True),
        (repo, "docs [ci skip]", True),
        (repo, "[skip branchbuild] release notes", True),
        (repo, "a real change", False),
        (custom, "[skip ci] is not a marker here", False),
        (custom, "tidy [nobuild]", True),
    ):
        commit = await copy.commit({"file.txt": message}, message=message)
        await copy.push("HEAD:feature/m")
        await settle(aws, service, git_world.changes[-1], metric="jobs")
        if not skipped:
            built.append(commit)
    assert commits_built(await aws.start_builds()) == built
    assert await service.metric("branchbuild_jobs_total", outcome="skipped") == 4
    assert [key for key in await aws.keys() if key.endswith(".zip")] == sorted(
        [f"marks/feature/m/{built[0]}.zip", f"custom/feature/m/{built[1]}.zip"]
    )


DIRECT = """
version: 1
rules:
  - repository: direct
    source: codecommit
    project: "{repository}-ci"
    skip_markers: []
    environment: {STAGE: preview, TEAM: payments}
"""


async def test_direct_codecommit_source_starts_the_build_without_an_archive(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "direct-ci")
    repo = await WorkCopy.create(git_world, tmp_path, "direct")
    commit = await repo.commit({"a": "1"})
    await repo.push("main:feature/d")
    service = await start_service(BRANCHBUILD_CONFIG=write_config(tmp_path, DIRECT))
    await settle(aws, service, git_world.changes[-1], metric="jobs")

    [request] = await aws.start_builds()
    assert request == {
        "projectName": "direct-ci",
        "sourceTypeOverride": "CODECOMMIT",
        "sourceLocationOverride": "https://git-codecommit.eu-west-1.amazonaws.com/v1/repos/direct",
        "sourceVersion": commit,
        "environmentVariablesOverride": [
            {"name": "STAGE", "value": "preview", "type": "PLAINTEXT"},
            {"name": "TEAM", "value": "payments", "type": "PLAINTEXT"},
            {"name": "COMMIT_ID", "value": commit, "type": "PLAINTEXT"},
            {"name": "BRANCH_NAME", "value": "feature/d", "type": "PLAINTEXT"},
            {"name": "REPOSITORY_NAME", "value": "direct", "type": "PLAINTEXT"},
            # No archive, but the key names the ledger entry that build outcomes correlate to.
            {
                "name": "BRANCHBUILD_ARCHIVE",
                "value": f"direct/feature/d/{commit}.zip",
                "type": "PLAINTEXT",
            },
        ],
        "artifactsOverride": {"type": "NO_ARTIFACTS"},
        "idempotencyToken": request["idempotencyToken"],
    }
    assert git_world.host.upload_pack_count == 0  # no fetch
    archives = [key for key in await aws.keys() if key.startswith("direct/")]
    assert archives == [f"direct/feature/d/{commit}.zip.build.json"]  # only the ledger
    assert await service.metric("branchbuild_upload_bytes_total") == 0


async def test_a_bad_configuration_refuses_to_start_naming_file_line_and_field(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path, "version: 1\nrules:\n  - repository: shop\n    paths:\n      inclde: [a]\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRANCHBUILD_")} | {
        "BRANCHBUILD_QUEUE_URL": aws.intake_url,
        "BRANCHBUILD_WORK_QUEUE_URL": aws.work_url,
        "BRANCHBUILD_BUCKET": aws.bucket,
        "BRANCHBUILD_GIT_URL_TEMPLATE": git_world.url_template,
        "BRANCHBUILD_SSH_KEY_FILE": str(git_world.key),
        "BRANCHBUILD_KNOWN_HOSTS_FILE": str(git_world.known_hosts),
        "BRANCHBUILD_CACHE_DIR": str(tmp_path / "cache"),
        "BRANCHBUILD_HTTP_HOST": "127.0.0.1",
        "BRANCHBUILD_HTTP_PORT": "0",
        "BRANCHBUILD_CONFIG": config,
    }
    with anyio.fail_after(60):
        result = await anyio.run_process(
            [sys.executable, "-m", "service", "run"], env=env, cwd=ROOT, check=False
        )
    assert result.returncode == 2
    assert (
        f"branchbuild: configuration error: {config}:5: rules[0].paths.inclde: "
        "Extra inputs are not permitted" in result.stderr.decode()
    )


async def test_reload_from_s3_and_a_bad_reload_keeps_the_last_good_version(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "shop")
    await create_project(aws, "shop-v2")
    repo = await WorkCopy.create(git_world, tmp_path, "shop")
    await repo.commit({"a": "1"})
    await repo.push("main:feature/r")
    first = git_world.changes[-1]

    async def put(text: str) -> None:
        await aws.s3.put_object(Bucket=aws.bucket, Key="config/pipelines.yaml", Body=text.encode())

    await put("version: 1\nrules:\n  - repository: shop\n    branches: {include: [topic/*]}\n")
    service = await start_service(
        BRANCHBUILD_CONFIG=f"s3://{aws.bucket}/config/pipelines.yaml",
        BRANCHBUILD_CONFIG_RELOAD_INTERVAL="0.2",
    )
    await settle(aws, service, first, metric="events")
    assert await service.metric("branchbuild_events_total", outcome="excluded") == 1

    await put("version: 1\nrules:\n  - repository: shop\n    project: shop-v2\n")

    async def reloaded() -> bool:
        return await service.metric("branchbuild_config_reloads_total", result="loaded") == 1

    await wait_for(reloaded, what="the new version in force")
    await settle(aws, service, first, metric="jobs")
    assert [r["projectName"] for r in await aws.start_builds()] == ["shop-v2"]

    await put("version: 1\nrules:\n  - repository: shop\n    project: [not, a, string]\n")

    async def refused() -> bool:
        return await service.metric("branchbuild_config_reloads_total", result="refused") == 1

    await wait_for(refused, what="the bad version refused")
    logs = [json.loads(line) for line in service.logs().splitlines() if line.startswith("{")]
    [error] = [e for e in logs if e["message"].startswith("pipeline configuration refused")]
    assert "pipelines.yaml:4: rules[0].project: Input should be a valid string" in error["message"]
    second = await repo.commit({"a": "2"})
    await repo.push("HEAD:feature/r")
    await settle(aws, service, git_world.changes[-1], metric="jobs")
    requests = await aws.start_builds()
    assert [r["projectName"] for r in requests] == ["shop-v2", "shop-v2"]
    assert commits_built(requests)[-1] == second


RECONCILE = """
version: 1
reconcile:
  repositories: [recon]
  account: "123456789012"
"""


async def total(services: list[ServiceProcess], name: str, **labels: str) -> float:
    return sum([await service.metric(name, **labels) for service in services])


async def test_reconciliation_builds_a_missed_push_once_with_no_storm_and_survives_its_holder(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "recon")
    repo = await WorkCopy.create(git_world, tmp_path, "recon")
    await repo.commit({"a": "1"})
    await repo.push("main", "main:feature/before")  # events never sent: missed
    config = write_config(tmp_path, RECONCILE)
    services = [
        await start_service(
            BRANCHBUILD_CONFIG=config,
            BRANCHBUILD_RECONCILE_INTERVAL="2",
            BRANCHBUILD_CACHE_DIR=str(tmp_path / f"cache-{n}"),
        )
        for n in range(2)
    ]

    async def runs(at_least: float) -> bool:
        return await total(services, "branchbuild_reconcile_runs_total", result="done") >= at_least

    # First contact: the branches are recorded, none is built (no storm).
    await wait_for(lambda: runs(2), what="two reconciliation runs")
    state = json.loads(await aws.object("branchbuild-state/heads/recon.json"))
    assert sorted(state) == ["refs/heads/feature/before", "refs/heads/main"]
    assert await aws.start_builds() == []

    # A push whose event is lost is found within an interval and built once, by one instance.
    await repo.checkout("feature/missed")
    missed = await repo.commit({"a": "2"})
    await repo.push("feature/missed")
    done = await total(services, "branchbuild_reconcile_runs_total", result="done")
    requests = await wait_for(aws.start_builds, what="the missed push's build")
    await wait_for(lambda: runs(done + 3), what="three more reconciliation runs")
    assert commits_built(await aws.start_builds()) == commits_built(requests) == [missed]
    assert await total(services, "branchbuild_reconciled_pushes_total") == 1
    assert await total(services, "branchbuild_reconcile_runs_total", result="not_leader") >= 1
    [holder] = [s for s in services if await s.metric("branchbuild_reconciled_pushes_total")]
    [other] = [s for s in services if s is not holder]
    assert "missed push queued: recon refs/heads/feature/missed" in holder.logs()

    # The holder dies: its lease lapses and the other instance reconciles from then on.
    holder.signal(signal.SIGKILL)
    await holder.wait()
    later = await repo.commit({"a": "3"})
    await repo.push("feature/missed")
    await wait_for(
        lambda: other.metric("branchbuild_reconciled_pushes_total"),
        what="the surviving instance reconciling",
    )
    await wait_for(lambda: _builds(aws, 2), what="the second missed push's build")
    assert commits_built(await aws.start_builds()) == [missed, later]


async def _builds(aws: AwsResources, count: int) -> bool:
    return len(await aws.start_builds()) >= count


async def test_a_dead_instances_lease_lapses(aws: AwsResources) -> None:
    first = Lease(Records(aws.s3, aws.bucket), duration=600)
    second = Lease(Records(aws.s3, aws.bucket), duration=600)
    assert await first.acquire() is True
    assert await second.acquire() is False
    assert await first.acquire() is True  # the holder renews
    assert await second.acquire() is False
    # Its last renewal is a short one, then it never renews again (it "died"): the lease
    # lapses and the second takes over.
    first.duration = 0.5
    assert await first.acquire() is True
    await wait_for(second.acquire, within=30, what="the lease to lapse")
    assert await first.acquire() is False
    # Released on shutdown: taken over at once.
    await second.release()
    assert await first.acquire() is True


CLEANUP = """
version: 1
rules:
  - repository: tidy
    on_delete: delete
"""


async def test_branch_deletion_clean_up_per_rule(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    for name in ("tidy", "kept"):
        await create_project(aws, name)
    tidy = await WorkCopy.create(git_world, tmp_path, "tidy")
    kept = await WorkCopy.create(git_world, tmp_path, "kept")
    service = await start_service(BRANCHBUILD_CONFIG=write_config(tmp_path, CLEANUP))
    for copy in (tidy, kept, tidy):
        await copy.commit({"a": str(len(git_world.changes))})
        await copy.push("HEAD:feature/x")
        await settle(aws, service, git_world.changes[-1], metric="jobs")
    await tidy.push("HEAD:feature/x-other")  # a neighbour whose keys share a prefix
    await settle(aws, service, git_world.changes[-1], metric="jobs")
    before = await aws.keys()
    assert len([k for k in before if k.startswith("tidy/feature/x/")]) == 4  # 2 zips, 2 ledgers
    # The second tidy push superseded the first: one StopBuild so far.
    [first_stop] = await aws.recorded("StopBuild")

    await tidy.push("--delete", "feature/x")
    await settle(aws, service, git_world.changes[-1], metric="jobs")
    await kept.push("--delete", "feature/x")
    await settle(aws, service, git_world.changes[-1], metric="events")

    after = await aws.keys()
    assert [k for k in after if k.startswith("tidy/feature/x/")] == []
    assert [k for k in after if not k.startswith("tidy/feature/x/")] == [
        k for k in before if not k.startswith("tidy/feature/x/")
    ]
    assert len([k for k in after if k.startswith("kept/feature/x/")]) == 2  # kept (default)
    assert await service.metric("branchbuild_jobs_total", outcome="deleted") == 1
    assert await service.metric("branchbuild_events_total", outcome="deleted") == 1
    # The deleted branch's running build was stopped before its archives went; the kept
    # repository's deletion stopped nothing.
    stops = await aws.recorded("StopBuild")
    assert len(stops) == 2 and stops[0] == first_stop and stops[1] != first_stop
