"""The LocalStack path: the project's own template deployed into a real LocalStack, real pushes
routed by the real EventBridge rule, and the local runner behind `make run` / `make demo`.

LocalStack is installed by `make test` (the Makefile's LOCALSTACK_STAMP); these tests never
skip: without it they fail and say how to install it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aioboto3
import anyio
import pytest

from service.local_builds import list_builds
from service.localdev.run import LOCALSTACK_PYTHON, Options, deploy, localstack_env
from tests.conftest import free_port
from tests.helpers import (
    ROOT,
    AwsResources,
    GitWorld,
    ServiceProcess,
    WorkCopy,
    create_project,
    server_process,
    service_env,
    wait_for,
)

pytestmark = pytest.mark.e2e

REGION = "eu-west-1"


@pytest.fixture(scope="session")
def localstack_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert LOCALSTACK_PYTHON.exists(), (
        "LocalStack is not installed: run `make test` or `make localstack`"
    )
    port = free_port()
    volume = tmp_path_factory.mktemp("localstack")
    env = localstack_env(volume, port)
    endpoint = f"http://127.0.0.1:{port}"
    command = [str(LOCALSTACK_PYTHON), "-m", "localstack.runtime.main"]
    log = volume / "localstack.log"
    health = endpoint + "/_localstack/health"
    with server_process(command, env=env, health=health, log=log, within=120, cwd=volume):
        yield endpoint


def options(endpoint: str, state: Path, prefix: str) -> Options:
    return Options(
        state=state,
        region=REGION,
        localstack_endpoint=endpoint,
        localstack_port=0,
        git_port=free_port(),
        http_port=free_port(),
        repositories=("shop",),
        demo=False,
        stack=f"{prefix}-stack",
        prefix=prefix,
    )


def runner(state: Path, *extra: str, http_port: int | None = None) -> list[str]:
    """The command behind `make run` (`make demo` with --demo), on free ports and its own
    stack, so tests never meet a developer's running `make run`."""
    unique = uuid.uuid4().hex[:6]
    return [
        sys.executable,
        "-m",
        "service.localdev.run",
        "--state",
        str(state),
        "--git-port",
        str(free_port()),
        "--http-port",
        str(http_port or free_port()),
        "--prefix",
        f"t{unique}",
        "--stack-name",
        f"t-{unique}",
        *extra,
    ]


async def run_demo(
    env: dict[str, str], state: Path, *extra: str
) -> subprocess.CompletedProcess[bytes]:
    with anyio.fail_after(240):
        return await anyio.run_process(
            runner(state, "--demo", *extra), env=env, check=False, cwd=ROOT
        )


def demo_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BRANCHBUILD_"))}
    return env | {"AWS_REGION": REGION} | extra


async def test_make_demo_against_a_running_localstack(
    localstack_endpoint: str, tmp_path: Path
) -> None:
    """LOCALSTACK_ENDPOINT: use it, start nothing. The demo's own checks must all pass."""
    state = tmp_path / "state"
    result = await run_demo(demo_env(LOCALSTACK_ENDPOINT=localstack_endpoint), state)
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    for line in ("feature/demo-pass", "feature/demo-fail", "develop", "delete"):
        assert any(line in row and row.rstrip().endswith("yes") for row in out.splitlines())
    assert not (state / "logs" / "localstack.log").exists()  # started nothing
    records = {r.branch: r for r in list_builds(state / "builds")}
    assert records["feature/demo-pass"].status == "SUCCEEDED"
    assert records["feature/demo-fail"].status == "FAILED"
    assert "develop" not in records
    log = await anyio.Path(records["feature/demo-pass"].log).read_text()
    assert f"building feature/demo-pass at {records['feature/demo-pass'].commit}" in log
    assert "exit 3" in await anyio.Path(records["feature/demo-fail"].log).read_text()
    # The archives really went through LocalStack's S3.
    assert "-local-artifacts/demo/feature/demo-pass/" in records["feature/demo-pass"].source


async def test_make_demo_starts_and_stops_its_own_localstack(tmp_path: Path) -> None:
    state = tmp_path / "state"
    port = free_port()
    result = await run_demo(demo_env(), state, "--localstack-port", str(port))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert (state / "logs" / "localstack.log").stat().st_size > 0
    for name in ("branchbuild.log", "githost.log", "run.log"):
        assert (state / "logs" / name).exists()
    # Everything it started is gone: nothing listens on LocalStack's port any more.
    with pytest.raises(OSError):
        await anyio.connect_tcp("127.0.0.1", port)


async def test_run_is_interrupted_cleanly(localstack_endpoint: str, tmp_path: Path) -> None:
    """`make run`: prints how to push, then Ctrl-C (SIGINT) stops every process it started."""
    state = tmp_path / "state"
    http_port = free_port()
    command = runner(state, http_port=http_port)
    out = state.parent / "run.out"
    state.mkdir()
    with out.open("wb") as sink:
        proc = await anyio.open_process(
            command,
            env=demo_env(LOCALSTACK_ENDPOINT=localstack_endpoint),
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    async def printed() -> bool:
        return "git push branchbuild HEAD:feature/my-change" in out.read_text()

    await wait_for(printed, within=120, what="the push instructions")
    text = out.read_text()
    assert (
        "export GIT_SSH_COMMAND=" in text
        and "git remote add branchbuild ssh://git@127.0.0.1:" in text
    )
    proc.send_signal(signal.SIGINT)
    with anyio.fail_after(60):
        assert await proc.wait() == 0
    with pytest.raises(OSError):
        await anyio.connect_tcp("127.0.0.1", http_port)


@pytest.fixture
async def deployed(localstack_endpoint: str, tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    yield await deploy(options(localstack_endpoint, tmp_path, prefix))


async def test_deployed_template_routes_a_push_to_a_build_request(
    localstack_endpoint: str,
    deployed: dict[str, str],
    aws: AwsResources,
    git_world: GitWorld,
    tmp_path: Path,
) -> None:
    """deploy/pipeline.yaml in LocalStack + CodeBuild at moto: put event → StartBuild."""
    await create_project(aws, "shop")
    repo = await WorkCopy.create(git_world, tmp_path, "shop")
    commit = await repo.commit({"README": "hi\n"})
    await repo.push("main:feature/routed")
    change = git_world.changes[-1]
    env = service_env(
        git_world,
        tmp_path / "cache",
        intake_url=deployed["IntakeQueueUrl"],
        work_url=deployed["WorkQueueUrl"],
        bucket=deployed["BucketName"],
        AWS_ENDPOINT_URL=localstack_endpoint,
        AWS_ENDPOINT_URL_CODEBUILD=aws.endpoint,
    )
    service = ServiceProcess(env, tmp_path / "service.log")
    await service.start()
    try:
        from service.events import codecommit_event

        event = codecommit_event(change, account="000000000000", region=REGION)
        session = aioboto3.Session()
        async with session.client(
            "events", endpoint_url=localstack_endpoint, region_name=REGION
        ) as events:
            reply = await events.put_events(
                Entries=[
                    {
                        "Source": "aws.codecommit",
                        "DetailType": "CodeCommit Repository State Change",
                        "Resources": event["resources"],
                        "Detail": json.dumps(event["detail"]),
                    }
                ]
            )
        assert reply["FailedEntryCount"] == 0

        async def started() -> list[dict[str, object]] | None:
            return await aws.start_builds() or None

        [request] = await wait_for(started, within=60, what="StartBuild at moto")
        key = f"shop/feature/routed/{commit}.zip"
        assert request["sourceLocationOverride"] == f"{deployed['BucketName']}/{key}"
        async with session.client("s3", endpoint_url=localstack_endpoint, region_name=REGION) as s3:
            head = await s3.head_object(Bucket=deployed["BucketName"], Key=key)
            assert head["ContentLength"] > 0
    finally:
        await service.stop()


async def test_redeploy_reuses_an_unchanged_stack_and_replaces_a_changed_one(
    localstack_endpoint: str, tmp_path: Path
) -> None:
    """LocalStack ignores rule updates: a changed repository list must still take effect."""
    first_options = options(localstack_endpoint, tmp_path, f"r{uuid.uuid4().hex[:8]}")
    first = await deploy(first_options)
    assert await deploy(first_options) == first  # idempotent
    wider = dataclasses.replace(first_options, repositories=("shop", "other"))
    outputs = await deploy(wider)
    session = aioboto3.Session()
    async with (
        session.client("events", endpoint_url=localstack_endpoint, region_name=REGION) as events,
        session.client("sqs", endpoint_url=localstack_endpoint, region_name=REGION) as sqs,
    ):
        await events.put_events(
            Entries=[
                {
                    "Source": "aws.codecommit",
                    "DetailType": "CodeCommit Repository State Change",
                    "Resources": [f"arn:aws:codecommit:{REGION}:000000000000:other"],
                    "Detail": json.dumps({"event": "referenceCreated", "repositoryName": "other"}),
                }
            ]
        )
        reply = await sqs.receive_message(
            QueueUrl=outputs["IntakeQueueUrl"], WaitTimeSeconds=10, MaxNumberOfMessages=1
        )
    [message] = reply["Messages"]
    assert json.loads(message["Body"])["detail"]["repositoryName"] == "other"
