"""The local build backend (development only) and `python -m localdev builds`, against moto's S3."""

from __future__ import annotations

import io
import json
import os
import pwd
import subprocess
import sys
import zipfile
from dataclasses import asdict, replace
from pathlib import Path

import aioboto3
import anyio
import pytest

from localdev.build_records import BuildRecord, list_builds
from localdev.builder import LocalBuilds
from localdev.workspace import read_buildspec, unpack
from service.builds import BuildRequest
from service.errors import PermanentError
from service.events import Action, Push, RefType
from tests.helpers import AwsResources, wait_for

COMMIT = "c" * 40


def make_zip(files: dict[str, str], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, target in (links or {}).items():  # links first: files may go "through" them
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            z.writestr(info, target)
        for name, content in files.items():
            z.writestr(name, content)
    return buffer.getvalue()


async def run_build(
    aws: AwsResources,
    tmp_path: Path,
    files: dict[str, str],
    *,
    build_timeout: float = 60,
    newest: bool = False,
) -> BuildRecord:
    key = f"shop/feature/x/{COMMIT}.zip"
    await aws.s3.put_object(Bucket=aws.bucket, Key=key, Body=make_zip(files))
    push = Push(
        "e",
        "123456789012",
        "eu-west-1",
        "shop",
        RefType.BRANCH,
        "feature/x",
        Action.UPDATED,
        COMMIT,
    )
    request = BuildRequest(push=push, project="shop", bucket=aws.bucket, key=key)
    async with anyio.create_task_group() as tg:
        backend = LocalBuilds(
            aws.s3, root=tmp_path / "builds", timeout=build_timeout, task_group=tg
        )
        started = await backend.start(request)
        assert started.project == "shop"

    records = list_builds(tmp_path / "builds")
    record = records[0] if newest else records[-1]
    if not newest:
        assert len(records) == 1
    assert record.id == started.build_id
    return record


async def test_phases_run_with_codebuild_variables(aws: AwsResources, tmp_path: Path) -> None:
    spec = """version: 0.2
env:
  variables:
    GREETING: hello
    COMMIT_ID: overridden-by-branchbuild
phases:
  install:
    commands: [echo install]
  build:
    commands:
      - echo "$GREETING $REPOSITORY_NAME $BRANCH_NAME $COMMIT_ID"
      - test "$CODEBUILD_SRC_DIR" = "$PWD"
      - cat app.txt
"""
    record = await run_build(aws, tmp_path, {"buildspec.yml": spec, "app.txt": "the app\n"})
    assert record.status == "SUCCEEDED" and record.duration is not None
    log = await anyio.Path(record.log).read_text()
    assert f"hello shop feature/x {COMMIT}" in log
    assert "the app" in log and log.rstrip().endswith("SUCCEEDED")


async def test_failed_build_still_runs_post_build(aws: AwsResources, tmp_path: Path) -> None:
    spec = """version: 0.2
phases:
  pre_build:
    commands: [echo pre]
  build:
    commands: [exit 7, echo never]
  post_build:
    commands: ['echo "post succeeding=$CODEBUILD_BUILD_SUCCEEDING"']
"""
    record = await run_build(aws, tmp_path, {"buildspec.yml": spec})
    assert record.status == "FAILED" and record.phase == "BUILD"
    log = await anyio.Path(record.log).read_text()
    assert "exit status 7" in log and "never" not in log.split("exit 7")[1].split("failed")[0]
    assert "post succeeding=0" in log


async def test_timeout_and_missing_buildspec(aws: AwsResources, tmp_path: Path) -> None:
    slow = "version: 0.2\nphases:\n  build:\n    commands: [sleep 30]\n"
    record = await run_build(aws, tmp_path / "a", {"buildspec.yml": slow}, build_timeout=1)
    assert record.status == "TIMED_OUT"
    record = await run_build(aws, tmp_path / "b", {"README": "no buildspec"})
    assert record.status == "FAILED" and record.message == "the repository has no buildspec.yml"


def test_unpack_keeps_links_and_refuses_escapes(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(make_zip({"dir/f.txt": "x"}, links={"link": "/etc/passwd"}))
    unpack(archive, tmp_path / "out")
    assert (tmp_path / "out" / "link").is_symlink()
    assert (tmp_path / "out" / "dir" / "f.txt").read_text() == "x"
    for hostile in ("../escape.txt", "/abs.txt"):
        archive.write_bytes(make_zip({hostile: "x"}))
        with pytest.raises(PermanentError, match="escapes"):
            unpack(archive, tmp_path / f"out-{len(hostile)}")
    # A symlink to a directory outside, then a file "through" it.
    archive.write_bytes(make_zip({"out/evil.txt": "x"}, links={"out": "/tmp"}))
    with pytest.raises(PermanentError, match="escapes"):
        unpack(archive, tmp_path / "out-link")


def test_buildspec_errors(tmp_path: Path) -> None:
    (tmp_path / "buildspec.yml").write_text("version: 0.2\n")
    with pytest.raises(PermanentError, match="no phases"):
        read_buildspec(tmp_path)
    (tmp_path / "buildspec.yml").write_text("phases: [unclosed\n")
    with pytest.raises(PermanentError, match="not valid YAML"):
        read_buildspec(tmp_path)


def test_builds_command_lists_recent_builds(tmp_path: Path) -> None:
    for n, status in enumerate(("SUCCEEDED", "FAILED")):
        folder = tmp_path / f"b{n}"
        folder.mkdir()
        record = BuildRecord(
            id=f"shop:{n}",
            project="shop",
            repository="shop",
            ref="refs/heads/f",
            branch=f"feature/{n}",
            commit=str(n) * 40,
            source="s3://b/k",
            status=status,
            started_at=f"2026-11-26T10:0{n}:00+00:00",
            log=str(folder / "build.log"),
            duration=1.5 + n,
        )
        (folder / "build.json").write_text(json.dumps(record.__dict__))
    env = {"BRANCHBUILD_LOCAL_BUILDS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "localdev", "builds"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "STARTED",
        "REPOSITORY",
        "BRANCH",
        "COMMIT",
        "STATUS",
        "DURATION",
        "LOG",
    ]
    assert "feature/1" in lines[1] and "FAILED" in lines[1] and "2.5s" in lines[1]  # newest first
    assert (
        "feature/0" in lines[2]
        and "SUCCEEDED" in lines[2]
        and str(tmp_path / "b0" / "build.log") in lines[2]
    )
    as_json = subprocess.run(
        [sys.executable, "-m", "localdev", "builds", "--json", "--limit", "1"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert [json.loads(line)["id"] for line in as_json.stdout.splitlines()] == ["shop:1"]
    empty = subprocess.run(
        [sys.executable, "-m", "localdev", "builds"],
        capture_output=True,
        text=True,
        check=True,
        env={"BRANCHBUILD_LOCAL_BUILDS_DIR": str(tmp_path / "none"), "PATH": "/usr/bin:/bin"},
    )
    assert empty.stdout.startswith("no builds in")


def phases(record: BuildRecord) -> dict[str, str]:
    return {p.name: p.status for p in record.phases}


async def test_commands_are_the_text_of_the_file(aws: AwsResources, tmp_path: Path) -> None:
    """YAML 1.1 would read these as False, True and 1.1; CodeBuild runs what is written."""
    spec = """version: 0.2
phases:
  build:
    commands:
      - true
      - echo 1.10 yes
      - echo on
      - |
        echo first
        echo second
      - >-
        echo folded
        line
"""
    record = await run_build(aws, tmp_path, {"buildspec.yml": spec})
    assert record.status == "SUCCEEDED", await anyio.Path(record.log).read_text()
    log = await anyio.Path(record.log).read_text()
    assert "\n1.10 yes\n" in log and "\non\n" in log
    assert "\nfirst\nsecond\n" in log and "\nfolded line\n" in log


async def test_finally_runs_and_a_failed_install_ends_the_build(
    aws: AwsResources, tmp_path: Path
) -> None:
    spec = """version: 0.2
phases:
  install:
    commands: [echo installing, exit 4, echo not-reached]
    finally: [echo install-finally]
  build:
    commands: [echo building]
  post_build:
    commands: [echo post]
artifacts:
  files: [buildspec.yml]
"""
    record = await run_build(aws, tmp_path, {"buildspec.yml": spec})
    log = await anyio.Path(record.log).read_text()
    assert record.status == "FAILED" and record.phase == "INSTALL"
    assert "install-finally" in log and "not-reached\n" not in log.replace(": echo not", "")
    assert "building\n" not in log and "post\n" not in log  # CodeBuild goes to FINALIZING
    assert phases(record) == {
        "DOWNLOAD_SOURCE": "SUCCEEDED",
        "INSTALL": "FAILED",
        "BUILD": "SKIPPED",
        "POST_BUILD": "SKIPPED",
    }
    assert record.artifacts == {}


async def test_on_failure_continue_and_abort(aws: AwsResources, tmp_path: Path) -> None:
    go_on = """version: 0.2
phases:
  pre_build:
    on-failure: CONTINUE
    commands: [exit 1]
  build:
    commands: ['echo "build ran succeeding=$CODEBUILD_BUILD_SUCCEEDING"']
"""
    record = await run_build(aws, tmp_path / "a", {"buildspec.yml": go_on})
    assert record.status == "FAILED" and phases(record)["BUILD"] == "SUCCEEDED"
    assert "build ran succeeding=0" in await anyio.Path(record.log).read_text()
    stop = """version: 0.2
phases:
  build:
    on-failure: ABORT
    commands: [exit 1]
    finally: [echo build-finally]
  post_build:
    commands: [echo post-ran]
"""
    record = await run_build(aws, tmp_path / "b", {"buildspec.yml": stop})
    log = await anyio.Path(record.log).read_text()
    assert record.status == "FAILED" and phases(record)["POST_BUILD"] == "SKIPPED"
    assert "build-finally\n" in log and "post-ran\n" not in log


async def test_one_shell_state_per_build_in_02_not_in_01(aws: AwsResources, tmp_path: Path) -> None:
    spec = """version: {version}
env:
  shell: bash
phases:
  install:
    commands:
      - mkdir -p sub && cd sub
      - export EXPORTED=e; PLAIN=p
  build:
    commands:
      - 'echo "where=$(basename $PWD) exported=${{EXPORTED:-none}} plain=${{PLAIN:-none}}"'
"""
    record = await run_build(aws, tmp_path / "a", {"buildspec.yml": spec.format(version="0.2")})
    assert "where=sub exported=e plain=p" in await anyio.Path(record.log).read_text()
    record = await run_build(aws, tmp_path / "b", {"buildspec.yml": spec.format(version="0.1")})
    assert "where=src exported=none plain=none" in await anyio.Path(record.log).read_text()


async def test_parameters_and_secrets_are_resolved_masked_and_exported(
    aws: AwsResources, tmp_path: Path
) -> None:
    session = aioboto3.Session()
    async with (
        session.client("ssm", endpoint_url=aws.endpoint) as ssm,
        session.client("secretsmanager", endpoint_url=aws.endpoint) as secrets,
    ):
        await ssm.put_parameter(Name="/shop/db-host", Value="db.internal", Type="String")
        await ssm.put_parameter(Name="/shop/password", Value="pa55-word", Type="SecureString")
        created = await secrets.create_secret(
            Name="shop/api", SecretString=json.dumps({"token": "t0ken-value", "user": "bob"})
        )
        await secrets.create_secret(Name="shop/key", SecretString="-----BEGIN-----\nk3y-b0dy\n")
    spec = f"""version: 0.2
env:
  variables:
    PLAIN: visible
  parameter-store:
    DB_HOST: /shop/db-host
    DB_PASSWORD: /shop/password
  secrets-manager:
    API_TOKEN: shop/api:token
    API_USER: {created["ARN"]}:user:AWSCURRENT
    API_ALL: shop/api
    KEY: shop/key
  exported-variables:
    - RESULT
    - DB_HOST
phases:
  build:
    commands:
      - echo "password is $DB_PASSWORD and token is $API_TOKEN"
      - test "$API_USER" = bob && test "$DB_HOST" = db.internal && test "$PLAIN" = visible
      - echo "$API_ALL" | grep -q '"user"'
      - echo "$KEY"; printf 'no newline k3y-b0dy'
      - printf '%s' "$KEY" | sed -n 2p
      - RESULT="built-$CODEBUILD_BUILD_NUMBER"
      - export RESULT
      - 'echo "id=$CODEBUILD_BUILD_ID arn=$CODEBUILD_BUILD_ARN start=$CODEBUILD_START_TIME"'
      - test "$CODEBUILD_RESOLVED_SOURCE_VERSION" = {COMMIT} && test -n "$CODEBUILD_INITIATOR"
"""
    record = await run_build(aws, tmp_path, {"buildspec.yml": spec})
    log = await anyio.Path(record.log).read_text()
    assert record.status == "SUCCEEDED", log
    assert "password is *** and token is ***" in log
    assert "pa55-word" not in log and "t0ken-value" not in log
    assert "k3y-b0dy" not in log and "BEGIN" not in log and "\nno newline ***\n" in log
    assert f"id={record.id} arn=arn:aws:codebuild:eu-west-1:123456789012:build/{record.id}" in log
    assert record.exported == {"RESULT": "built-1", "DB_HOST": "db.internal"}


async def test_a_missing_parameter_fails_the_build_clearly(
    aws: AwsResources, tmp_path: Path
) -> None:
    spec = (
        "version: 0.2\nenv:\n  parameter-store:\n    X: /no/such\n"
        "phases:\n  build:\n    commands: [echo hi]\n"
    )
    record = await run_build(aws, tmp_path, {"buildspec.yml": spec})
    assert record.status == "FAILED" and record.phase == "DOWNLOAD_SOURCE"
    assert record.message is not None and "env.parameter-store.X (line 4)" in record.message


async def test_artifacts_reports_and_cache(aws: AwsResources, tmp_path: Path) -> None:
    spec = """version: 0.2
phases:
  build:
    commands:
      - 'if [ -f deps/fetched ]; then echo "cache hit $(cat deps/fetched)"; else echo miss; fi'
      - mkdir -p deps dist/js dist/css reports && echo "$CODEBUILD_BUILD_NUMBER" > deps/fetched
      - echo app > dist/js/app.js && echo css > dist/css/site.css && echo x > dist/notes.tmp
      - echo '<testsuite/>' > reports/junit.xml
      - SCRIPTS=js
  post_build:
    commands: [exit 1]
artifacts:
  files: ['**/*']
  base-directory: dist
  exclude-paths: ['*.tmp']
  name: site-$BRANCH_NAME
  secondary-artifacts:
    flat:
      files: [dist/**/*]
      discard-paths: yes
    named:
      files: ['${SCRIPTS}/*.js']
      base-directory: $CODEBUILD_SRC_DIR/dist
reports:
  unit:
    files: ['*.xml']
    base-directory: reports
    file-format: JUNITXML
cache:
  paths: ['deps/**/*']
"""
    first = await run_build(aws, tmp_path, {"buildspec.yml": spec})
    # POST_BUILD failed: the build failed, artifacts are still uploaded (CodeBuild's rule).
    assert first.status == "FAILED" and phases(first)["UPLOAD_ARTIFACTS"] == "SUCCEEDED"
    folder = Path(first.log).parent
    assert "\nmiss\n" in await anyio.Path(first.log).read_text()
    assert first.artifacts == {
        "primary": ["css/site.css", "js/app.js"],
        "flat": ["app.js", "notes.tmp", "site.css"],
        "named": ["js/app.js"],
    }
    assert (folder / "artifacts" / "site-feature_x" / "js" / "app.js").read_text() == "app\n"
    assert (folder / "artifacts" / "flat" / "site.css").exists()
    assert first.reports == {"unit": ["junit.xml"]}
    assert (folder / "reports" / "unit" / "junit.xml").exists()
    second = await run_build(aws, tmp_path, {"buildspec.yml": spec}, newest=True)
    assert "cache hit 1" in await anyio.Path(second.log).read_text()
    assert second.number == 2


async def test_builds_follow_streams_the_log_and_check_validates(tmp_path: Path) -> None:
    folder = tmp_path / "b1"
    folder.mkdir()
    record = BuildRecord(
        id="shop:1234abcd-0000",
        project="shop",
        repository="shop",
        ref="refs/heads/f",
        branch="f",
        commit="c" * 40,
        source="s3://b/k",
        status="IN_PROGRESS",
        started_at="2026-11-26T10:00:00+00:00",
        log=str(folder / "build.log"),
    )
    (folder / "build.json").write_text(json.dumps(asdict(record)))
    (folder / "build.log").write_text("line one\n")
    env = {"BRANCHBUILD_LOCAL_BUILDS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "localdev", "builds", "--follow", "1234abcd"]
    proc = await anyio.open_process(command, env=env)
    assert proc.stdout is not None
    seen = b""
    with anyio.fail_after(30):
        async for chunk in proc.stdout:
            seen += chunk
            if b"line one" in seen:
                break
        with (folder / "build.log").open("a") as log:
            log.write("line two\n")
        done = replace(record, status="FAILED")
        (folder / "build.json").write_text(json.dumps(asdict(done)))
        async for chunk in proc.stdout:
            seen += chunk
        assert await proc.wait() == 1  # the build failed
    assert seen == b"line one\nline two\n"


def test_buildspec_check_command(tmp_path: Path) -> None:
    good = tmp_path / "good.yml"
    good.write_text(
        "version: 0.2\nphases:\n  install:\n    runtime-versions:\n      python: 3.12\n"
        "  build:\n    commands:\n      - false\n    finaly: [echo x]\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "localdev", "buildspec", "check", str(good)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "line 4: warning: runtime-versions runs only on CodeBuild" in result.stdout
    assert "line 9: warning: phases.build: unknown key 'finaly'" in result.stdout
    assert "did you mean 'finally'?" in result.stdout
    assert "       8  false" in result.stdout
    bad = tmp_path / "bad.yml"
    bad.write_text("version: 0.2\nphases:\n  build:\n    commands: {a: b}\n    on-failure: STOP\n")
    result = subprocess.run(
        [sys.executable, "-m", "localdev", "buildspec", "check", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "line 4: error: phases.build.commands must be a list" in result.stdout
    assert "line 5: error: phases.build.on-failure must be one of ABORT, CONTINUE" in result.stdout


async def test_run_as_drops_to_the_user_when_root(aws: AwsResources, tmp_path: Path) -> None:
    """As root, a phase's run-as runs it as that user; otherwise it is a warning."""
    spec = """version: 0.2
phases:
  install:
    run-as: nobody
    commands:
      - id -un > who
  build:
    commands:
      - 'echo "install as $(cat who), build as $(id -un)"'
"""
    record = await run_build(aws, tmp_path, {"buildspec.yml": spec})
    log = await anyio.Path(record.log).read_text()
    assert record.status == "SUCCEEDED", log
    me = pwd.getpwuid(os.geteuid()).pw_name
    if os.geteuid() == 0:
        assert f"install as nobody, build as {me}" in log
        assert record.warnings == ()
    else:
        assert f"install as {me}, build as {me}" in log
        assert record.warnings == ("run-as nobody: ignored, branchbuild does not run as root",)


def test_production_code_imports_nothing_from_localdev() -> None:
    """The local backend is imported only when BRANCHBUILD_BUILD_BACKEND=local."""
    probe = (
        "import sys, service.app, service.cli, service.worker\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('localdev'))\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_builds_follow_an_unknown_build(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "localdev", "builds", "--follow", "nope"],
        capture_output=True,
        text=True,
        env={"BRANCHBUILD_LOCAL_BUILDS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == f"localdev builds: no single build matches 'nope' in {tmp_path}\n"


async def test_stop_kills_the_process_group_and_the_states_reach_eventbridge(
    aws: AwsResources, tmp_path: Path
) -> None:
    """StopBuild's stand-in: the build's processes (a background child too) are killed, the
    build is STOPPED, and its IN_PROGRESS and STOPPED events go to the default bus, shaped
    as service.build_state parses CodeBuild's (routed by a rule like the BuildStateRule)."""
    from service.build_state import BuildState, parse_build_state

    pids = tmp_path / "pids"
    spec = (
        "version: 0.2\nphases:\n  build:\n    commands:\n"
        f"      - (sleep 300 & echo $! > {pids}.child; wait)  & echo $! > {pids}; wait\n"
    )
    key = f"shop/feature/x/{COMMIT}.zip"
    await aws.s3.put_object(Bucket=aws.bucket, Key=key, Body=make_zip({"buildspec.yml": spec}))
    push = Push("e", "123456789012", "eu-west-1", "shop", RefType.BRANCH, "feature/x",
                Action.UPDATED, COMMIT)  # fmt: skip
    request = BuildRequest(push=push, project="shop", bucket=aws.bucket, key=key)
    session = aioboto3.Session()
    async with session.client("events", endpoint_url=aws.endpoint) as events:
        queue = (await aws.sqs.create_queue(QueueName=f"states-{os.getpid()}"))["QueueUrl"]
        arn = (await aws.sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"]))[
            "Attributes"
        ]["QueueArn"]
        pattern = {
            "source": ["aws.codebuild"],
            "detail-type": ["CodeBuild Build State Change"],
        }
        await events.put_rule(Name="states", EventPattern=json.dumps(pattern))
        await events.put_targets(Rule="states", Targets=[{"Id": "q", "Arn": arn}])
        async with anyio.create_task_group() as tg:
            backend = LocalBuilds(
                aws.s3, root=tmp_path / "builds", timeout=60, task_group=tg, events=events
            )
            started = await backend.start(request)
            child_file = anyio.Path(f"{pids}.child")

            async def running() -> str | None:
                text = await child_file.read_text() if await child_file.exists() else ""
                return text.strip() or None

            child = int(await wait_for(running, within=60, what="the build's child"))
            assert await backend.stop(started.build_id)
            assert not await backend.stop(started.build_id)  # ended: nothing left to stop
        states: list[BuildState] = []
        with anyio.fail_after(60):
            while len(states) < 2:
                reply = await aws.sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=1)
                states += [parse_build_state(m["Body"]) for m in reply.get("Messages", [])]
    [record] = list_builds(tmp_path / "builds")
    assert record.status == "STOPPED" and record.message == "stopped (StopBuild)"
    stat = anyio.Path(f"/proc/{child}/stat")  # killed: gone, or a zombie until reaped
    text = await stat.read_text() if await stat.exists() else ""
    assert not text or text.split(") ")[1][0] == "Z", text
    assert sorted(s.status for s in states) == ["IN_PROGRESS", "STOPPED"]
    assert {s.build_id for s in states} == {started.build_id}
    assert {s.archive for s in states} == {key}  # BRANCHBUILD_ARCHIVE: the correlation
    assert all(s.started_at is not None for s in states)
