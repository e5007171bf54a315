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
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import aioboto3
import anyio
import pytest

from localdev.build_records import BuildRecord, list_builds
from localdev.deploy import deploy
from localdev.options import Options
from localdev.processes import LOCALSTACK_PYTHON, localstack_env
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
        "localdev.run",
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
    with anyio.fail_after(420):
        return await anyio.run_process(
            runner(state, "--demo", *extra), env=env, check=False, cwd=ROOT
        )


def demo_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BRANCHBUILD_"))}
    return env | {"AWS_REGION": REGION} | extra


@pytest.mark.timeout(480)
async def test_make_demo_against_a_running_localstack(
    localstack_endpoint: str, tmp_path: Path
) -> None:
    """LOCALSTACK_ENDPOINT: use it, start nothing. The demo's own checks must all pass,
    the pull request's among them, and it prints what branchbuild left on the pull request."""
    state = tmp_path / "state"
    result = await run_demo(demo_env(LOCALSTACK_ENDPOINT=localstack_endpoint), state)
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    for line in (
        "feature/demo-pass",
        "feature/demo-fail",
        "develop",
        "delete",
        "PR 1: push 1",
        "PR: push 2",
        "PR: comments",
        "PR: approval",
        "PR 2: merge build",  # issue 25: demo-merge's pull request built as merged
        "PR: destination moves",
        "PR: merge comments",
    ):
        assert any(line in row and row.rstrip().endswith("yes") for row in out.splitlines())
    assert "build STOPPED, superseded" in out
    # Notifications (issue 25): a branch broken, then fixed, on an SNS topic's filtered inbox.
    notified = [row for row in out.splitlines() if row.startswith("notify feature/demo-notify")]
    assert [row.rstrip().endswith("yes") for row in notified] == [True, True], out
    assert "Subject: branchbuild: demo feature/demo-notify build failed" in out
    assert "Subject: branchbuild: demo feature/demo-notify build fixed" in out
    assert "**branchbuild**: ⏭️ Build superseded by" in out
    assert "**branchbuild**: ✅ Build succeeded" in out
    assert "approval of the current revision: APPROVE by arn:aws:iam::000000000000:user/test" in out
    assert "**branchbuild**: ✅ Merge build succeeded" in out
    assert "This is the **branch build**" in out
    pr_builds = [r for r in list_builds(state / "builds") if r.branch == "feature/demo-pr"]
    assert sorted(r.status for r in pr_builds) == ["STOPPED", "SUCCEEDED"]
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


@pytest.mark.timeout(300)
async def test_run_starts_its_own_localstack_and_an_interrupt_stops_everything(
    tmp_path: Path,
) -> None:
    """`make run` with no LOCALSTACK_ENDPOINT: it starts LocalStack itself, prints how to push,
    then Ctrl-C (SIGINT) stops every process it started, LocalStack among them."""
    state = tmp_path / "state"
    http_port, localstack_port = free_port(), free_port()
    command = runner(state, "--localstack-port", str(localstack_port), http_port=http_port)
    out = state.parent / "run.out"
    state.mkdir()
    with out.open("wb") as sink:
        proc = await anyio.open_process(
            command, env=demo_env(), stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT
        )

    async def printed() -> bool:
        return "git push branchbuild HEAD:feature/my-change" in out.read_text()

    await wait_for(printed, within=240, what="the push instructions")
    text = out.read_text()
    assert (
        "export GIT_SSH_COMMAND=" in text
        and "git remote add branchbuild ssh://git@127.0.0.1:" in text
    )
    assert (state / "logs" / "localstack.log").stat().st_size > 0
    async with await anyio.connect_tcp("127.0.0.1", localstack_port):
        pass  # it is up: this LocalStack is the one it started
    proc.send_signal(signal.SIGINT)
    with anyio.fail_after(90):
        assert await proc.wait() == 0
    for name in ("branchbuild.log", "githost.log", "run.log"):
        assert (state / "logs" / name).exists()
    # Everything it started is gone: nothing listens on its ports any more.
    for port in (http_port, localstack_port):
        with pytest.raises(OSError):
            await anyio.connect_tcp("127.0.0.1", port)


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


async def test_deployed_rules_route_build_states_and_pull_requests_to_their_own_groups(
    localstack_endpoint: str, deployed: dict[str, str]
) -> None:
    """The BuildStateRule (a pattern inside an array of objects) and the PullRequestRule."""
    from localdev.options import ACCOUNT
    from tests.test_build_state import build_state_event

    now = datetime.now(UTC)
    foreign = build_state_event("shop:" + "f" * 36, "FAILED", archive=None, at=now)
    ours = build_state_event("shop:" + "a" * 36, "SUCCEEDED", archive="shop/x/c.zip", at=now)
    pull_request = {
        "event": "pullRequestCreated",
        "pullRequestId": "1",
        "pullRequestStatus": "OPEN",
        "repositoryNames": ["shop"],
        "sourceReference": "refs/heads/feature/x",
        "sourceCommit": "c" * 40,
    }
    closed = pull_request | {"event": "pullRequestStatusChanged", "pullRequestId": "2"}
    repository = f"arn:aws:codecommit:{REGION}:{ACCOUNT}:shop"
    session = aioboto3.Session()
    async with (
        session.client("events", endpoint_url=localstack_endpoint, region_name=REGION) as events,
        session.client("sqs", endpoint_url=localstack_endpoint, region_name=REGION) as sqs,
    ):
        entries: list[Any] = [
            {
                "Source": "aws.codebuild",
                "DetailType": "CodeBuild Build State Change",
                "Resources": event["resources"],
                "Detail": json.dumps(event["detail"]),
            }
            for event in (foreign, ours)
        ] + [
            {
                "Source": "aws.codecommit",
                "DetailType": "CodeCommit Pull Request State Change",
                "Resources": [repository],
                "Detail": json.dumps(detail),
            }
            for detail in (closed, pull_request)
        ]
        reply = await events.put_events(Entries=entries)
        assert reply["FailedEntryCount"] == 0
        received: dict[str, list[dict[str, Any]]] = {}

        async def arrived() -> bool:
            found = await sqs.receive_message(
                QueueUrl=deployed["IntakeQueueUrl"],
                MaxNumberOfMessages=10,
                WaitTimeSeconds=1,
                MessageSystemAttributeNames=["MessageGroupId"],
            )
            for message in found.get("Messages", []):
                group = message["Attributes"]["MessageGroupId"]
                received.setdefault(group, []).append(json.loads(message["Body"]))
            return len(received) >= 2

        await wait_for(arrived, within=60, what="the two routed events")
    assert set(received) == {"codebuild", "pullrequest"}
    builds = [event["detail"]["build-id"] for event in received["codebuild"]]
    assert builds == [ours["detail"]["build-id"]]  # not the build without BRANCHBUILD_ARCHIVE
    assert [event["detail"]["pullRequestId"] for event in received["pullrequest"]] == ["1"]


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


E2E_BUILDSPEC = """version: 0.2
env:
  parameter-store:
    DB_HOST: /e2e/db-host
  secrets-manager:
    API_TOKEN: e2e/api:token
  exported-variables:
    - IMAGE_TAG
phases:
  install:
    on-failure: CONTINUE
    commands:
      - exit 5
  build:
    commands:
      - 'if [ -d deps ]; then echo "cache: hit $(cat deps/from)"; else echo "cache: miss"; fi'
      - mkdir -p deps out reports && echo "$BRANCH_NAME" > deps/from
      - echo "db=$DB_HOST token=$API_TOKEN"
      - IMAGE_TAG="img-$(echo $CODEBUILD_RESOLVED_SOURCE_VERSION | cut -c 1-7)"
      - echo app > out/app.txt && echo '<testsuite/>' > reports/unit.xml
      - false
    finally:
      - echo "finally ran"
artifacts:
  files: ['**/*']
  base-directory: out
reports:
  unit:
    files: [reports/unit.xml]
    discard-paths: yes
cache:
  paths: ['deps/**/*']
"""


async def test_make_run_builds_like_codebuild(localstack_endpoint: str, tmp_path: Path) -> None:
    """`make run`'s real path: push → EventBridge → intake → worker → local build, with
    variables from LocalStack's SSM and Secrets Manager, finally, on-failure, exported
    variables, artifacts, reports and the cache kept between two builds of the project."""
    session = aioboto3.Session(
        aws_access_key_id="test", aws_secret_access_key="test", region_name=REGION
    )
    async with (
        session.client("ssm", endpoint_url=localstack_endpoint) as ssm,
        session.client("secretsmanager", endpoint_url=localstack_endpoint) as secrets,
    ):
        await ssm.put_parameter(Name="/e2e/db-host", Value="db.e2e", Type="String", Overwrite=True)
        secret = json.dumps({"token": "s3cr3t-t0ken"})
        try:
            await secrets.create_secret(Name="e2e/api", SecretString=secret)
        except secrets.exceptions.ResourceExistsException:
            await secrets.put_secret_value(SecretId="e2e/api", SecretString=secret)
    state = tmp_path / "state"
    state.mkdir()
    git_port = free_port()
    command = runner(state, "--git-port", str(git_port))
    out = tmp_path / "run.out"
    with out.open("wb") as sink:
        proc = await anyio.open_process(
            command,
            env=demo_env(LOCALSTACK_ENDPOINT=localstack_endpoint),
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:

        async def printed() -> bool:
            return "git push branchbuild" in out.read_text()

        await wait_for(printed, within=120, what="the push instructions")
        work = tmp_path / "work"
        work.mkdir()
        keys = state / "keys"
        env = demo_env(
            HOME=str(tmp_path),
            GIT_CONFIG_NOSYSTEM="1",
            GIT_AUTHOR_NAME="t",
            GIT_AUTHOR_EMAIL="t@example.com",
            GIT_COMMITTER_NAME="t",
            GIT_COMMITTER_EMAIL="t@example.com",
            GIT_SSH_COMMAND=(
                f"ssh -i {keys / 'id_ed25519'} -o IdentitiesOnly=yes "
                f"-o UserKnownHostsFile={keys / 'known_hosts'} -o StrictHostKeyChecking=yes"
            ),
        )

        async def git(*args: str) -> str:
            result = await anyio.run_process(["git", *args], cwd=work, env=env)
            return result.stdout.decode().strip()

        await git("init", "--quiet", "--initial-branch=main")
        (work / "buildspec.yml").write_text(E2E_BUILDSPEC)
        await git("add", "--all")
        await git("commit", "--quiet", "-m", "buildspec")
        commit = await git("rev-parse", "HEAD")
        url = f"ssh://git@127.0.0.1:{git_port}/v1/repos/demo"

        async def build_of(branch: str) -> object:
            for record in list_builds(state / "builds"):
                if record.branch == branch and record.status != "IN_PROGRESS":
                    return record
            return None

        await git("push", "--quiet", url, "HEAD:feature/e2e-one")
        first = await wait_for(partial(build_of, "feature/e2e-one"), within=120, what="build 1")
        await git("push", "--quiet", url, "HEAD:feature/e2e-two")
        second = await wait_for(partial(build_of, "feature/e2e-two"), within=120, what="build 2")
    finally:
        proc.send_signal(signal.SIGINT)
        with anyio.fail_after(60):
            await proc.wait()
    assert isinstance(first, BuildRecord) and isinstance(second, BuildRecord)
    log = await anyio.Path(first.log).read_text()
    assert first.status == "FAILED" and first.phase == "INSTALL", log
    phases = {p.name: p.status for p in first.phases}
    assert phases["INSTALL"] == "FAILED" and phases["BUILD"] == "FAILED"  # CONTINUE went on
    assert phases["UPLOAD_ARTIFACTS"] == "SUCCEEDED"
    assert (
        "finally ran" in log
        and "db=*** token=***" in log
        and "s3cr3t" not in log
        and "db.e2e" not in log
    )
    assert first.exported == {"IMAGE_TAG": f"img-{commit[:7]}"}
    folder = Path(first.log).parent
    assert first.artifacts == {"primary": ["app.txt"]}
    assert (folder / "artifacts" / "primary" / "app.txt").read_text() == "app\n"
    assert first.reports == {"unit": ["unit.xml"]}
    assert (folder / "reports" / "unit" / "unit.xml").exists()
    assert "cache: miss" in log
    assert "cache: hit feature/e2e-one" in await anyio.Path(second.log).read_text()
    listing = await anyio.run_process(
        [sys.executable, "-m", "localdev", "builds"],
        env=demo_env(BRANCHBUILD_LOCAL_BUILDS_DIR=str(state / "builds")),
        cwd=ROOT,
    )
    text = listing.stdout.decode()
    assert "  INSTALL" in text and "  UPLOAD_ARTIFACTS" in text


SLOW_BUILDSPEC = """version: 0.2
phases:
  build:
    commands:
      - sleep $(cat seconds.txt)
"""


@pytest.mark.timeout(300)
async def test_make_run_stops_a_superseded_build_and_leaves_results_on_the_pull_request(
    localstack_endpoint: str, tmp_path: Path
) -> None:
    """`make run`'s real path, as `make demo` does it: a pull request opened on the
    CodeCommit stand-in with the banner's command, its branch pushed twice while the first
    build runs. The local build's state events go through LocalStack's EventBridge and the
    deployed BuildStateRule; the first build is stopped (StopBuild's stand-in) and reported
    superseded; one comment per commit; the pull request is approved."""
    state = tmp_path / "state"
    state.mkdir()
    git_port, codecommit_port = free_port(), free_port()
    command = runner(state, "--git-port", str(git_port), "--codecommit-port", str(codecommit_port))
    out = tmp_path / "run.out"
    with out.open("wb") as sink:
        proc = await anyio.open_process(
            command,
            env=demo_env(LOCALSTACK_ENDPOINT=localstack_endpoint),
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    endpoint = f"http://127.0.0.1:{codecommit_port}"
    try:

        async def printed() -> bool:
            return "create-pr" in out.read_text()

        await wait_for(printed, within=120, what="the banner")
        banner = out.read_text()
        assert f"pull requests     {endpoint}" in banner
        assert f"-m localdev.codecommit --endpoint {endpoint} create-pr" in banner
        work = tmp_path / "work"
        work.mkdir()
        keys = state / "keys"
        env = demo_env(
            HOME=str(tmp_path),
            GIT_CONFIG_NOSYSTEM="1",
            GIT_AUTHOR_NAME="t",
            GIT_AUTHOR_EMAIL="t@example.com",
            GIT_COMMITTER_NAME="t",
            GIT_COMMITTER_EMAIL="t@example.com",
            GIT_SSH_COMMAND=(
                f"ssh -i {keys / 'id_ed25519'} -o IdentitiesOnly=yes "
                f"-o UserKnownHostsFile={keys / 'known_hosts'} -o StrictHostKeyChecking=yes"
            ),
        )

        async def git(*args: str) -> str:
            result = await anyio.run_process(["git", *args], cwd=work, env=env)
            return result.stdout.decode().strip()

        async def pull_request(*args: str) -> str:
            helper = [sys.executable, "-m", "localdev.codecommit", "--endpoint", endpoint]
            result = await anyio.run_process([*helper, *args], env=env, cwd=ROOT)
            return result.stdout.decode()

        url = f"ssh://git@127.0.0.1:{git_port}/v1/repos/demo"
        await git("init", "--quiet", "--initial-branch=develop")
        (work / "README").write_text("base\n")
        await git("add", "--all")
        await git("commit", "--quiet", "-m", "base")
        await git("push", "--quiet", url, "HEAD:develop")  # protected: not built
        (work / "buildspec.yml").write_text(SLOW_BUILDSPEC)
        (work / "seconds.txt").write_text("600\n")
        await git("add", "--all")
        await git("commit", "--quiet", "-m", "slow")
        first = await git("rev-parse", "HEAD")
        await git("push", "--quiet", url, "HEAD:feature/pr")
        opened = await pull_request(
            "create-pr", "--repository", "demo", "--source", "feature/pr", "--destination",
            "develop", "--title", "t",
        )  # fmt: skip
        assert opened == "pull request 1 opened\n"

        async def running_with_its_comment() -> bool:
            record = next((r for r in list_builds(state / "builds") if r.commit == first), None)
            running = record is not None and any(
                p.name == "BUILD" and p.status == "IN_PROGRESS" for p in record.phases
            )
            return running and f"comment on {first[:12]}" in await pull_request("show", "1")

        await wait_for(running_with_its_comment, within=120, what="build 1 running, commented")
        (work / "seconds.txt").write_text("1\n")
        await git("commit", "--quiet", "-am", "quick")
        second = await git("rev-parse", "HEAD")
        await git("push", "--quiet", url, "HEAD:feature/pr")

        async def settled() -> str | None:
            shown = await pull_request("show", "1")
            done = "superseded" in shown and "succeeded" in shown and "APPROVE" in shown
            return shown if done else None

        shown = await wait_for(settled, within=120, what="the results on the pull request")
    finally:
        proc.send_signal(signal.SIGINT)
        with anyio.fail_after(60):
            await proc.wait()
    records = {r.commit: r for r in list_builds(state / "builds")}
    assert records[first].status == "STOPPED"
    assert records[first].message == "stopped (StopBuild)"
    assert records[second].status == "SUCCEEDED"
    # One comment per commit, each edited in place to its build's end.
    assert shown.count("  comment on ") == 2
    superseded, succeeded = shown.split(f"  comment on {second[:12]}")
    assert f"  comment on {first[:12]} by arn:aws:iam::000000000000:user/test:" in superseded
    assert f"Build superseded by `{second[:12]}`" in superseded
    assert "| Status | SUPERSEDED |" in superseded and f"| Commit | `{first}` |" in superseded
    assert "✅ Build succeeded" in succeeded and f"| Commit | `{second}` |" in succeeded
    assert (
        "approval of the current revision: APPROVE by arn:aws:iam::000000000000:user/test"
        in succeeded
    )
    log = (state / "logs" / "branchbuild.log").read_text()
    assert f"build {records[first].id} is STOPPED" in log  # the event came back through SQS
