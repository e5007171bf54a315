"""The admin commands, run as real ``python -m service`` processes against moto over HTTP, a
real SSH git host and, where a message must fail for real, the service as a real process."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from service.admin.build_history import render, to_run, with_outcomes
from service.builds import BuildRequest, StartedBuild
from service.cli import main as cli_main
from service.errors import BuildError
from service.events import Push, RefChange, codecommit_event, parse_event
from service.metrics import Metrics
from service.outcome import Outcome
from service.pipelines import Pipelines
from service.queue import Queue
from service.records import Records
from service.scheduler import Scheduler
from service.settings import Settings
from tests.helpers import (
    ROOT,
    AwsResources,
    GitWorld,
    ServiceProcess,
    WorkCopy,
    create_project,
    push_for,
    wait_for,
)

pytestmark = pytest.mark.e2e

COMMIT = "3f1c2a9b8d7e" + "0" * 28


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


async def branchbuild(env: dict[str, str], *args: str, stdin: int = subprocess.DEVNULL) -> Result:
    """``python -m service <args>`` as a real process; stdin is no terminal unless given one."""
    done = await anyio.run_process(
        [sys.executable, "-m", "service", *args], env=env, stdin=stdin, check=False, cwd=ROOT
    )
    return Result(done.returncode, done.stdout.decode(), done.stderr.decode())


def admin_env(aws: AwsResources, tmp_path: Path, **extra: str) -> dict[str, str]:
    return (
        dict(os.environ)
        | {
            "PYTHONIOENCODING": "utf-8",
            "BRANCHBUILD_QUEUE_URL": aws.intake_url,
            "BRANCHBUILD_WORK_QUEUE_URL": aws.work_url,
            "BRANCHBUILD_BUCKET": aws.bucket,
            "BRANCHBUILD_CACHE_DIR": str(tmp_path / "admin-cache"),
        }
        | extra
    )


def git_env(git_world: GitWorld, known_hosts: Path | None = None) -> dict[str, str]:
    return {
        "BRANCHBUILD_GIT_URL_TEMPLATE": git_world.url_template,
        "BRANCHBUILD_SSH_KEY_FILE": str(git_world.key),
        "BRANCHBUILD_KNOWN_HOSTS_FILE": str(known_hosts or git_world.known_hosts),
    }


StartService = Callable[..., Awaitable[ServiceProcess]]


async def visible(aws: AwsResources, url: str) -> int:
    reply = await aws.sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]
    )
    return int(reply["Attributes"]["ApproximateNumberOfMessages"])


async def receive_all(aws: AwsResources, url: str) -> list[dict[str, Any]]:
    """Every message of a queue with all its attributes (left in flight)."""
    found: list[dict[str, Any]] = []
    while True:
        reply = await aws.sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            VisibilityTimeout=60,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["All"],
        )
        messages = reply.get("Messages", [])
        if not messages:
            return found
        found += [dict(m) for m in messages]


def work_body(repository: str, branch: str, commit: str = COMMIT) -> str:
    return push_for(repository, branch, commit).to_json()


async def dead_letter(
    aws: AwsResources,
    body: str,
    *,
    group: str,
    intake: bool = False,
    source: str | None = None,
    reason: str = "boom",
) -> str:
    """Put a message into a DLQ exactly as the service's Queue.dead_letter does."""
    source = source or (aws.intake_url if intake else aws.work_url)
    reply = await aws.sqs.send_message(
        QueueUrl=aws.intake_dlq_url if intake else aws.work_dlq_url,
        MessageBody=body,
        MessageGroupId=group,
        MessageDeduplicationId=os.urandom(8).hex(),
        MessageAttributes={
            "branchbuild.reason": {"DataType": "String", "StringValue": reason},
            "branchbuild.error_kind": {"DataType": "String", "StringValue": "access_denied"},
            "branchbuild.receive_count": {"DataType": "Number", "StringValue": "2"},
            "branchbuild.source_queue": {"DataType": "String", "StringValue": source},
            "branchbuild.failed_at": {"DataType": "String", "StringValue": "2026-11-26T16:20:11Z"},
            "trace": {"DataType": "String", "StringValue": "kept"},
        },
    )
    return reply["MessageId"]


# -- usage and configuration ------------------------------------------------------------------

COMMANDS = [
    ["check"],
    ["status"],
    ["dlq", "list"],
    ["dlq", "redrive", "--all", "--yes"],
    ["replay", "event.json"],
    ["send-test-event", "--repository", "shop", "--branch", "main", "--commit", COMMIT],
]


@pytest.mark.parametrize(
    "command", [*COMMANDS, ["dlq"], ["builds"], ["run"], ["healthcheck"]], ids=" ".join
)
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli_main([*(command[:2] if command[0] == "dlq" else command[:1]), "--help"])
    assert exit_.value.code == 0
    assert "usage: branchbuild" in capsys.readouterr().out


async def test_a_missing_variable_is_one_line_and_exit_2() -> None:
    env = dict(os.environ) | {"BRANCHBUILD_BUCKET": "artifacts"}
    results: dict[str, Result] = {}

    async def run(command: list[str]) -> None:
        results[" ".join(command)] = await branchbuild(env, *command)

    async with anyio.create_task_group() as tg:
        for command in COMMANDS:
            tg.start_soon(run, command)
    for name, result in results.items():
        assert result.code == 2, name
        assert result.err == (
            "branchbuild: configuration error: BRANCHBUILD_QUEUE_URL is required but not set\n"
        ), name
        assert result.out == "", name


async def test_bad_usage_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = dict(os.environ) | {
        "BRANCHBUILD_QUEUE_URL": "http://127.0.0.1:9/1/intake.fifo",
        "BRANCHBUILD_WORK_QUEUE_URL": "http://127.0.0.1:9/1/work.fifo",
        "BRANCHBUILD_BUCKET": "artifacts",
    }
    cases = {
        ("dlq", "redrive"): "one of the arguments --all --message-id is required",
        ("dlq", "list", "--limit", "0"): "must be at least 1",
        ("builds", "--codebuild"): "needs at least one --project P",
        ("builds",): "needs at least one --project P (the local build backend's builds: "
        "python -m localdev builds)",
        ("buildspec", "check", "buildspec.yml"): "invalid choice: 'buildspec'",
        (
            "send-test-event",
            *("--repository", "shop", "--branch", "main", "--commit", "abc"),
        ): "--commit must be 40 lower-case hex characters, got 'abc'",
        (
            "send-test-event",
            *("--repository", "shop", "--branch", "a..b", "--commit", COMMIT),
        ): "invalid ref name 'a..b'",
        ("check", "--repository", "../etc"): "invalid repository name '../etc'",
        ("replay", str(tmp_path / "missing.json")): "cannot read",
    }
    results: dict[tuple[str, ...], Result] = {}

    async def run(args: tuple[str, ...]) -> None:
        results[args] = await branchbuild(env, *args)

    async with anyio.create_task_group() as tg:
        for args in cases:
            tg.start_soon(run, args)
    for args, message in cases.items():
        result = results[args]
        assert result.code == 2, args
        assert message in result.err, (args, result.err)
        assert result.err.count("\n") == 1, result.err


# -- check ------------------------------------------------------------------------------------


async def test_check_passes_when_everything_is_in_place(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path
) -> None:
    await create_project(aws, "shop")
    repo = await WorkCopy.create(git_world, tmp_path, "shop")
    await repo.commit({"README.md": "# shop\n"})
    await repo.push("main")
    env = admin_env(aws, tmp_path) | git_env(git_world)

    result = await branchbuild(env, "check", "--repository", "shop")

    assert result.code == 0, result
    lines = result.out.splitlines()
    assert lines[0] == (
        f"✓ intake queue              {aws.intake_url}: FIFO, dead-letter after 2 receives"
    )
    assert lines[1] == f"✓ intake dead-letter queue  {aws.intake_dlq_url}: reachable"
    assert lines[2].startswith(f"✓ work queue                {aws.work_url}")
    assert lines[3] == f"✓ work dead-letter queue    {aws.work_dlq_url}: reachable"
    assert lines[4] == (
        f"✓ bucket                    {aws.bucket}: writable (probe object put and deleted)"
    )
    assert lines[5] == "✓ CodeBuild project         shop: exists"
    assert lines[6] == (
        f"✓ git host                  ssh://git@127.0.0.1:{git_world.host.port}/v1/repos/shop: "
        "reachable, host key matches, 1 branch(es)"
    )
    assert lines[7:] == ["all checks passed"]
    assert await aws.keys() == []  # the probe object was deleted

    as_json = await branchbuild(env, "check", "--repository", "shop", "--json")
    report = json.loads(as_json.out)
    assert as_json.code == 0 and report["ok"] is True
    assert {c["status"] for c in report["checks"]} == {"ok"}


async def test_check_reports_every_failure_and_exits_1(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path
) -> None:
    await WorkCopy.create(git_world, tmp_path, "shop")  # on the git host, but no project
    missing = aws.work_url.replace(".fifo", "-gone.fifo")
    env = admin_env(aws, tmp_path, BRANCHBUILD_WORK_QUEUE_URL=missing) | git_env(git_world)

    result = await branchbuild(env, "check", "--repository", "shop", "--repository", "ghost")

    assert result.code == 1, result
    lines = result.out.splitlines()
    assert lines[0].startswith("✓ intake queue")
    assert lines[1].startswith("✓ intake dead-letter queue")
    assert re.fullmatch(r"✗ work queue +cannot read attributes of the work queue: .*", lines[2])
    assert "NonExistentQueue" in lines[2]
    assert lines[3].startswith("✓ bucket")
    assert lines[4] == "✗ CodeBuild project         ghost: not found"
    assert lines[5] == "✗ CodeBuild project         shop: not found"
    assert re.fullmatch(r"✓ git host .*/shop: reachable, host key matches, 0 branch.*", lines[6])
    assert re.fullmatch(r"✗ git host +git host refused access: .*", lines[7])
    assert lines[8:] == ["4 check(s) failed"]
    assert result.err == ""


async def test_check_fails_on_a_host_key_mismatch(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path
) -> None:
    await create_project(aws, "shop")
    await WorkCopy.create(git_world, tmp_path, "shop")
    impostor = tmp_path / "impostor"
    await anyio.run_process(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)])
    algorithm, key = impostor.with_suffix(".pub").read_text().split()[:2]
    known_hosts = tmp_path / "wrong_known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{git_world.host.port} {algorithm} {key}\n")
    env = admin_env(aws, tmp_path) | git_env(git_world, known_hosts)

    result = await branchbuild(env, "check", "--repository", "shop", "--json")

    assert result.code == 1
    checks = {c["subject"]: c for c in json.loads(result.out)["checks"]}
    assert checks["CodeBuild project"]["status"] == "ok"
    assert checks["git host"]["status"] == "failed"
    assert "the git host's key does not match known_hosts" in checks["git host"]["detail"]
    assert git_world.host.upload_pack_count == 0


async def test_check_of_the_project_follows_the_backend_and_template(
    aws: AwsResources, tmp_path: Path
) -> None:
    local = await branchbuild(admin_env(aws, tmp_path, BRANCHBUILD_BUILD_BACKEND="local"), "check")
    assert local.code == 0, local
    assert re.search(
        r"\n– CodeBuild project +local backend \(BRANCHBUILD_BUILD_BACKEND=local\)\n", local.out
    )
    assert re.search(r"\n– git host +give --repository R to probe a repository\n", local.out)

    env = admin_env(aws, tmp_path, BRANCHBUILD_PROJECT_TEMPLATE="branchbuild-all")
    missing = await branchbuild(env, "check")
    assert missing.code == 1
    assert re.search(r"\n✗ CodeBuild project +branchbuild-all: not found\n", missing.out)
    await create_project(aws, "branchbuild-all")
    present = await branchbuild(env, "check")
    assert present.code == 0, present
    assert re.search(r"\n✓ CodeBuild project +branchbuild-all: exists\n", present.out)


# -- status -----------------------------------------------------------------------------------


async def test_status_shows_the_backlog_of_every_queue(aws: AwsResources, tmp_path: Path) -> None:
    for _ in range(3):
        await aws.send_event("{}")
    await aws.sqs.receive_message(QueueUrl=aws.intake_url, VisibilityTimeout=60)
    await dead_letter(aws, work_body("shop", "a"), group="g")
    env = admin_env(aws, tmp_path)

    result = await branchbuild(env, "status", "--json")

    assert result.code == 0, result

    def row(queue: str, url: str, visible: int, in_flight: int) -> dict[str, Any]:
        counts = {"visible": visible, "in_flight": in_flight, "delayed": 0}
        return {"queue": queue, "url": url} | counts | {"oldest_age_seconds": None}

    assert json.loads(result.out) == {
        "queues": [
            row("intake", aws.intake_url, 2, 1),
            row("intake-dlq", aws.intake_dlq_url, 0, 0),
            row("work", aws.work_url, 0, 0),
            row("work-dlq", aws.work_dlq_url, 1, 0),
        ],
        "waiting": [],
        "running": 0,
    }
    text = await branchbuild(env, "status")
    assert text.out.splitlines() == [
        "QUEUE       VISIBLE  IN FLIGHT  DELAYED  OLDEST   URL",
        f"intake      2        1          0        unknown  {aws.intake_url}",
        f"intake-dlq  0        0          0        unknown  {aws.intake_dlq_url}",
        f"work        0        0          0        unknown  {aws.work_url}",
        f"work-dlq    1        0          0        unknown  {aws.work_dlq_url}",
        "",
        "nothing waits for CodeBuild capacity; 0 build(s) hold a running slot",
    ]


async def test_status_shows_what_waits_for_codebuild_and_why(
    aws: AwsResources, tmp_path: Path
) -> None:
    settings = Settings(
        queue_url=aws.intake_url, work_queue_url=aws.work_url, bucket=aws.bucket, max_running=1
    )
    work = Queue(aws.sqs, aws.work_url, name="work")
    pipelines = Pipelines.from_settings(settings)
    scheduler = Scheduler(Records(aws.s3, aws.bucket), settings, Metrics(), pipelines, work)
    rule = replace(pipelines.rule_for("shop"), priority=5)
    for branch, reason in (("feature/a", "account_queue_full"), ("feature/b", "behind")):
        push = push_for("shop", branch)
        request = BuildRequest(push=push, project="shop", bucket=aws.bucket, key=f"{branch}.zip")
        assert await scheduler.wait(request, rule, reason) is Outcome.WAITING
    running = BuildRequest(
        push=push_for("shop", "main"), project="shop", bucket=aws.bucket, key="main.zip"
    )
    assert await scheduler.admit(running, rule) == "behind"  # others wait: it takes its turn
    await scheduler.started(running, rule, StartedBuild("shop:1", "shop"))

    result = await branchbuild(admin_env(aws, tmp_path), "status", "--json")
    report = json.loads(result.out)
    assert report["running"] == 1
    assert sorted((w["branch"], w["reason"], w["priority"]) for w in report["waiting"]) == [
        ("feature/a", "account_queue_full", 5),
        ("feature/b", "behind", 5),
    ]
    text = (await branchbuild(admin_env(aws, tmp_path), "status")).out
    assert "2 push(es) wait for CodeBuild capacity; 1 build(s) hold a running slot" in text
    assert re.search(r"^shop\s+feature/a\s+[0-9a-f]{12}\s+5\s+account_queue_full\s", text, re.M)


async def test_status_shows_why_a_waiting_pushs_start_failed(
    aws: AwsResources, tmp_path: Path
) -> None:
    settings = Settings(queue_url=aws.intake_url, work_queue_url=aws.work_url, bucket=aws.bucket)
    work = Queue(aws.sqs, aws.work_url, name="work")
    pipelines = Pipelines.from_settings(settings)
    scheduler = Scheduler(Records(aws.s3, aws.bucket), settings, Metrics(), pipelines, work)
    push = push_for("shop", "feature/broken")
    request = BuildRequest(push=push, project="shop", bucket=aws.bucket, key="broken.zip")
    assert await scheduler.wait(request, pipelines.rule_for("shop"), "throttled") is Outcome.WAITING

    async def start(request: BuildRequest) -> StartedBuild:
        raise BuildError("CodeBuild answered InternalFailure")

    assert await scheduler.dispatch(start) == 1
    report = json.loads((await branchbuild(admin_env(aws, tmp_path), "status", "--json")).out)
    [waiting] = report["waiting"]
    assert (waiting["reason"], waiting["error"]) == (
        "start_failed",
        "BuildError: CodeBuild answered InternalFailure",
    )
    text = (await branchbuild(admin_env(aws, tmp_path), "status")).out
    assert (
        "shop feature/broken: its last start failed: BuildError: CodeBuild answered "
        "InternalFailure" in text
    )


async def test_status_of_an_unreachable_queue_is_one_line_and_exit_1(
    aws: AwsResources, tmp_path: Path
) -> None:
    # A port held (bound, never listening) for the test: connecting is refused, and no other
    # process can take it meanwhile.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{held.getsockname()[1]}"
        env = admin_env(aws, tmp_path, AWS_ENDPOINT_URL=endpoint)
        result = await branchbuild(env, "status")
    assert result.code == 1
    assert result.err.startswith("branchbuild status: cannot read attributes of the intake queue:")
    assert "Could not connect to the endpoint URL" in result.err
    assert result.err.count("\n") == 1


# -- dlq list ---------------------------------------------------------------------------------


async def test_dlq_list_shows_why_the_service_dead_lettered_events(
    aws: AwsResources, tmp_path: Path, start_service: StartService
) -> None:
    await start_service()
    await aws.send_event("this is not json")
    bad = codecommit_event(RefChange("shop", "refs/heads/feature/x", None, COMMIT))
    bad["detail"]["commitId"] = "not-a-commit"
    await aws.send_event(bad)

    async def both() -> bool:
        return await aws.count(aws.intake_dlq_url) == 2

    await wait_for(both, within=60, what="two events in the intake DLQ")
    env = admin_env(aws, tmp_path)

    result = await branchbuild(env, "dlq", "list", "--queue", "intake")

    assert result.code == 0, result
    out = result.out
    assert out.startswith(f"intake dead-letter queue {aws.intake_dlq_url}: 2 message(s) shown\n")
    assert "  body    undecodable (body is not JSON: " in out
    assert "'this is not json'" in out
    assert "  reason  malformed_event: body is not JSON" in out
    assert (
        "  reason  malformed_event: commitId is not a 40-character hex commit id: 'not-a-commit'"
    ) in out
    assert out.count("  failed  ") == 2 and ", receive 2" in out
    # Listing left both in the queue, visible at once.
    assert await visible(aws, aws.intake_dlq_url) == 2
    again = await branchbuild(env, "dlq", "list", "--queue", "intake", "--json")
    listed = [json.loads(line) for line in again.out.splitlines()]
    assert len(listed) == 2 and {d["moved_by"] for d in listed} == {"branchbuild"}
    assert {d["source_queue"] for d in listed} == {aws.intake_url}
    assert await visible(aws, aws.intake_dlq_url) == 2


async def test_dlq_list_decodes_work_messages_and_those_sqs_moved(
    aws: AwsResources, tmp_path: Path
) -> None:
    reason = "cannot start a build of project shop: ResourceNotFoundException\x1b[2J"
    ours = await dead_letter(aws, work_body("shop", "feature/x"), group="g1", reason=reason)
    # A message SQS's redrive policy moves: received twice without being settled.
    await aws.sqs.send_message(
        QueueUrl=aws.work_url,
        MessageBody=work_body("shop", "feature/y"),
        MessageGroupId="g2",
        MessageDeduplicationId="y",
    )
    for _ in range(3):  # the third receive moves it
        await aws.sqs.receive_message(QueueUrl=aws.work_url, VisibilityTimeout=0)
    assert await aws.count(aws.work_dlq_url) == 2
    env = admin_env(aws, tmp_path)

    result = await branchbuild(env, "dlq", "list", "--json")

    assert result.code == 0, result
    listed = {d["ref"]: d for d in map(json.loads, result.out.splitlines())}
    assert listed["refs/heads/feature/x"] | {"sent_at": None, "receive_count": 0} == {
        "queue": "work",
        "message_id": ours,
        "group": "g1",
        "sent_at": None,
        "receive_count": 0,
        "reason": "cannot start a build of project shop: ResourceNotFoundException\x1b[2J",
        "moved_by": "branchbuild",
        "error_kind": "access_denied",
        "failed_at": "2026-11-26T16:20:11Z",
        "failed_receive_count": 2,
        "source_queue": aws.work_url,
        "repository": "shop",
        "ref": "refs/heads/feature/x",
        "commit": COMMIT,
        "event": None,
        "undecodable": None,
        "preview": None,
    }
    sqs_moved = listed["refs/heads/feature/y"]
    assert sqs_moved["moved_by"] == "sqs"
    assert sqs_moved["reason"] == "reason unknown (moved by SQS after 2 receives)"
    text = await branchbuild(env, "dlq", "list")
    assert "  push    shop refs/heads/feature/x 3f1c2a9b8d7e\n" in text.out
    # A hostile reason never reaches the terminal raw.
    assert "ResourceNotFoundException\\x1b[2J" in text.out and "\x1b" not in text.out
    assert "  reason  reason unknown (moved by SQS after 2 receives)\n" in text.out


async def test_dlq_list_pages_limits_and_says_what_fifo_hides(
    aws: AwsResources, tmp_path: Path
) -> None:
    for i in range(12):
        await dead_letter(aws, f"raw {i}", group="same")
    for i in range(3):
        await dead_letter(aws, f"other {i}", group=f"g{i}")
    env = admin_env(aws, tmp_path)

    limited = await branchbuild(env, "dlq", "list", "--limit", "4", "--json")
    assert len(limited.out.splitlines()) == 4

    result = await branchbuild(env, "dlq", "list")

    assert result.code == 0
    # 10 of the held group, then the other groups; the last 2 of "same" stay hidden.
    assert "13 message(s) shown" in result.out
    assert "a FIFO queue hands out at most 10 messages of one message group" in result.out
    assert "undecodable (body is not JSON" in result.out and "'raw 0'" in result.out
    assert await visible(aws, aws.work_dlq_url) == 15


# -- dlq redrive ------------------------------------------------------------------------------


async def test_redrive_moves_a_dead_lettered_job_back_and_it_builds(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "late")  # no CodeBuild project yet
    await repo.commit({"a": "1"})
    await repo.push("main:feature/late")
    running = await start_service()
    await aws.send_event(codecommit_event(git_world.changes[-1]))

    async def dead() -> bool:
        return await aws.count(aws.work_dlq_url) == 1

    await wait_for(dead, within=60, what="the job in the work DLQ")
    env = admin_env(aws, tmp_path)
    listing = await branchbuild(env, "dlq", "list")
    assert "  push    late refs/heads/feature/late" in listing.out
    assert "  reason  access_denied: cannot start a build of project late: " in listing.out
    assert "ResourceNotFoundException" in listing.out

    await create_project(aws, "late")
    result = await branchbuild(env, "dlq", "redrive", "--all", "--yes")

    assert result.code == 0, result
    assert result.out == (
        "moved 1 message(s) from the work dead-letter queue back to their source queue; "
        "0 failed, 0 not found\n"
    )
    assert result.err == ""  # no progress bar without a terminal

    async def built() -> bool:
        return await running.metric("branchbuild_jobs_total", outcome="built") == 1

    await wait_for(built, within=60, what="the redriven job to build")
    assert await aws.count(aws.work_dlq_url) == 0


async def test_redrive_resends_with_a_new_dedup_id_and_without_our_attributes(
    aws: AwsResources, tmp_path: Path
) -> None:
    first = await dead_letter(aws, work_body("a", "one"), group="g1")
    second = await dead_letter(aws, work_body("a", "two"), group="g1")
    third = await dead_letter(aws, work_body("b", "one"), group="g2")
    event = json.dumps(codecommit_event(RefChange("c", "refs/heads/x", None, COMMIT)))
    intake = await dead_letter(aws, event, group="codecommit", intake=True)
    env = admin_env(aws, tmp_path)

    refused = await branchbuild(env, "dlq", "redrive", "--all")
    assert refused.code == 2
    assert refused.err == (
        "branchbuild dlq redrive: error: refusing to move messages without confirmation: "
        "pass --yes\n"
    )
    one = await branchbuild(env, "dlq", "redrive", "--message-id", third, "nope", "--yes")
    assert one.code == 1  # "nope" is not there
    assert "moved 1 message(s)" in one.out and "0 failed, 1 not found" in one.out
    assert f"branchbuild dlq redrive: nope: not found in {aws.work_dlq_url}\n" == one.err
    rest = await branchbuild(env, "dlq", "redrive", "--all", "--yes")
    assert rest.code == 0 and "moved 2 message(s)" in rest.out
    back = await branchbuild(env, "dlq", "redrive", "--queue", "intake", "--all", "--yes")
    assert back.code == 0 and "moved 1 message(s) from the intake dead-letter queue" in back.out

    assert await aws.count(aws.work_dlq_url) == 0 and await aws.count(aws.intake_dlq_url) == 0
    moved = await receive_all(aws, aws.work_url)
    assert sorted(m["Body"] for m in moved) == sorted(
        [work_body("a", "one"), work_body("a", "two"), work_body("b", "one")]
    )
    g1 = [m["Body"] for m in moved if m["Attributes"]["MessageGroupId"] == "g1"]
    assert g1 == [work_body("a", "one"), work_body("a", "two")]  # order kept within a group
    for m in moved:
        assert m["MessageAttributes"] == {"trace": {"StringValue": "kept", "DataType": "String"}}
        assert re.fullmatch(r"[0-9a-f]{32}", m["Attributes"]["MessageDeduplicationId"])
        assert m["MessageId"] not in {first, second, third}
    [replayed] = await receive_all(aws, aws.intake_url)
    assert replayed["Body"] == event and replayed["Attributes"]["MessageGroupId"] == "codecommit"
    assert intake != replayed["MessageId"]


async def test_redrive_keeps_what_it_cannot_move_and_exits_1(
    aws: AwsResources, tmp_path: Path
) -> None:
    gone = aws.work_url.replace(".fifo", "-gone.fifo")
    stuck = await dead_letter(aws, work_body("a", "x"), group="g", source=gone)
    after = await dead_letter(aws, work_body("a", "y"), group="g")
    fine = await dead_letter(aws, work_body("b", "x"), group="h")
    env = admin_env(aws, tmp_path)

    result = await branchbuild(env, "dlq", "redrive", "--all", "--yes")

    assert result.code == 1
    assert "moved 1 message(s)" in result.out and "2 failed" in result.out
    assert f"branchbuild dlq redrive: {stuck}: cannot send a message back to {gone}" in result.err
    assert (
        f"branchbuild dlq redrive: {after}: not moved: an earlier message of its group could "
        "not be moved\n"
    ) in result.err
    assert fine not in result.err
    # Both failures are back in the DLQ, visible at once, in their order.
    assert await visible(aws, aws.work_dlq_url) == 2
    assert [m["Body"] for m in await receive_all(aws, aws.work_url)] == [work_body("b", "x")]


async def test_redrive_asks_on_a_terminal(aws: AwsResources, tmp_path: Path) -> None:
    await dead_letter(aws, work_body("a", "x"), group="g")
    env = admin_env(aws, tmp_path)
    for answer, code, moved in ((b"n\n", 1, 0), (b"y\n", 0, 1)):
        controller, terminal = os.openpty()
        try:
            os.write(controller, answer)
            result = await branchbuild(env, "dlq", "redrive", "--all", stdin=terminal)
        finally:
            os.close(terminal)
            os.close(controller)
        assert result.code == code, result
        assert result.out.startswith(
            f"move about 1 message(s) from {aws.work_dlq_url} back to their source queue? [y/N] "
        )
        assert await aws.count(aws.work_url) == moved


# -- replay and test events -------------------------------------------------------------------


async def test_replay_puts_the_event_on_the_intake_queue_as_eventbridge_does(
    aws: AwsResources, tmp_path: Path
) -> None:
    event = codecommit_event(RefChange("shop", "refs/heads/feature/x", None, COMMIT))
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event, indent=2))
    env = admin_env(aws, tmp_path)

    result = await branchbuild(env, "replay", str(path))

    assert result.code == 0, result
    assert re.fullmatch(
        rf"sent referenceCreated shop refs/heads/feature/x 3f1c2a9b8d7e \(event {event['id']}\) "
        r"to the intake queue as message [0-9a-f-]{36}\n",
        result.out,
    )
    [message] = await receive_all(aws, aws.intake_url)
    assert json.loads(message["Body"]) == event
    assert message["Attributes"]["MessageGroupId"] == "codecommit"
    assert re.fullmatch(r"[0-9a-f]{32}", message["Attributes"]["MessageDeduplicationId"])
    # The same file again is a new message (EventBridge would send a new event, too).
    again = await branchbuild(env, "replay", str(path), "--group", "replays")
    assert again.code == 0
    [second] = await receive_all(aws, aws.intake_url)
    assert second["Attributes"]["MessageGroupId"] == "replays"


async def test_replay_refuses_a_malformed_event(aws: AwsResources, tmp_path: Path) -> None:
    event = codecommit_event(RefChange("shop", "refs/heads/feature/x", None, COMMIT))
    event["detail"]["referenceName"] = "feature/../x"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(event))

    result = await branchbuild(admin_env(aws, tmp_path), "replay", str(path))

    assert result.code == 1
    assert result.err == (
        f"branchbuild replay: refused {path}: invalid ref name 'feature/../x': contains '..' or "
        "'//', or starts or ends with '/' or ends with '.'\n"
    )
    assert await aws.count(aws.intake_url) == 0


async def test_send_test_event_builds_a_codecommit_event(aws: AwsResources, tmp_path: Path) -> None:
    env = admin_env(aws, tmp_path, BRANCHBUILD_ALLOWED_ACCOUNTS="111122223333")
    args = ("--repository", "shop", "--commit", COMMIT)

    branch = await branchbuild(env, "send-test-event", *args, "--branch", "feature/x")
    tag = await branchbuild(
        env, "send-test-event", *args, "--branch", "v1.0", "--tag", "--region", "us-east-2",
        "--account", "444455556666",
    )  # fmt: skip

    assert branch.code == 0 and tag.code == 0, (branch, tag)
    assert "sent referenceCreated shop refs/heads/feature/x 3f1c2a9b8d7e" in branch.out
    pushes = []
    for message in await receive_all(aws, aws.intake_url):
        assert message["Attributes"]["MessageGroupId"] == "codecommit"
        pushed = parse_event(message["Body"])
        assert isinstance(pushed, Push)
        pushes.append((pushed.ref, pushed.commit, pushed.account, pushed.region))
    assert sorted(pushes) == [
        ("refs/heads/feature/x", COMMIT, "111122223333", "eu-west-1"),
        ("refs/tags/v1.0", COMMIT, "444455556666", "us-east-2"),
    ]


# -- builds --codebuild -----------------------------------------------------------------------


async def test_builds_lists_recent_codebuild_builds(aws: AwsResources, tmp_path: Path) -> None:
    await create_project(aws, "shop")
    await create_project(aws, "other")
    started = [
        (await aws.codebuild.start_build(projectName=name))["build"]["id"]
        for name in ("shop", "shop", "other")
    ]
    env = admin_env(aws, tmp_path)

    result = await branchbuild(
        env, "builds", "--codebuild", "--project", "shop", "--project", "other", "--json"
    )

    assert result.code == 0, result
    runs = [json.loads(line) for line in result.out.splitlines()]
    assert sorted(r["id"] for r in runs) == sorted(started)
    assert all(r["status"] == "SUCCEEDED" and r["logs"].startswith("https://") for r in runs)
    limited = await branchbuild(env, "builds", "--project", "shop", "--limit", "1")
    lines = limited.out.splitlines()
    assert lines[0].split() == [
        "STARTED", "PROJECT", "BUILD", "STATUS", "BRANCH", "COMMIT", "DURATION", "LOGS"
    ]  # fmt: skip
    assert len(lines) == 2 and " shop " in lines[1]
    await create_project(aws, "quiet")
    none = await branchbuild(env, "builds", "--project", "quiet")
    assert none.code == 0 and none.out == "no builds\n"
    unknown = await branchbuild(env, "builds", "--project", "nope")
    assert unknown.code == 1
    assert unknown.err.startswith("branchbuild builds: cannot list the builds of project nope: ")
    assert "ResourceNotFoundException" in unknown.err and unknown.err.count("\n") == 1


async def test_a_stopped_build_shows_the_commit_that_superseded_it(aws: AwsResources) -> None:
    newer = "b" * 40
    archive = f"shop/feature/x/{COMMIT}.zip"
    runs = [
        to_run(
            {
                "id": build_id,
                "projectName": "shop",
                "buildStatus": "STOPPED",
                "environment": {
                    "type": "LINUX_CONTAINER",
                    "image": "aws/codebuild/standard:7.0",
                    "computeType": "BUILD_GENERAL1_SMALL",
                    "environmentVariables": [
                        {"name": "BRANCHBUILD_ARCHIVE", "value": archive, "type": "PLAINTEXT"}
                    ],
                },
            }
        )
        for build_id in ("shop:1", "shop:2")
    ]
    ledger = {
        "build_id": "shop:1",
        "commit": COMMIT,
        "ref": "refs/heads/feature/x",
        "project": "shop",
        "status": "STOPPED",
        "superseded_by": newer,
    }
    await aws.s3.put_object(
        Bucket=aws.bucket, Key=archive + ".build.json", Body=json.dumps(ledger).encode()
    )
    shown = await with_outcomes(runs, aws.s3, aws.bucket)
    assert [r.superseded_by for r in shown] == [newer, None]  # shop:2 is not the ledger's
    assert f"STOPPED (superseded by {newer[:12]})" in render(shown)


def test_a_codebuild_build_shows_its_commit_and_branch() -> None:
    start = datetime(2026, 11, 26, 16, 20, 11, tzinfo=UTC)
    run = to_run(
        {
            "id": "shop:1234",
            "projectName": "shop",
            "buildStatus": "FAILED",
            "startTime": start,
            "endTime": start + timedelta(seconds=95),
            "environment": {
                "type": "LINUX_CONTAINER",
                "image": "aws/codebuild/standard:7.0",
                "computeType": "BUILD_GENERAL1_SMALL",
                "environmentVariables": [
                    {"name": "COMMIT_ID", "value": COMMIT, "type": "PLAINTEXT"},
                    {"name": "BRANCH_NAME", "value": "feature/x", "type": "PLAINTEXT"},
                ],
            },
            "logs": {"deepLink": "https://console.aws.amazon.com/cloudwatch/home#logEvent"},
        }
    )
    assert (run.commit, run.branch, run.tag, run.duration) == (COMMIT, "feature/x", None, 95.0)
    assert run.started_at == "2026-11-26T16:20:11+00:00"
