"""The local build backend (development only) and `branchbuild builds`, against moto's S3."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import anyio
import pytest

from service.builds import BuildRequest
from service.errors import PermanentError
from service.events import Action, Push, RefType
from service.local_builds import BuildRecord, LocalBuilds, list_builds, read_buildspec, unpack
from tests.helpers import AwsResources

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
    aws: AwsResources, tmp_path: Path, files: dict[str, str], *, build_timeout: float = 60
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

    [record] = list_builds(tmp_path / "builds")
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
    assert record.status == "FAILED" and record.phase == "build"
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
        [sys.executable, "-m", "service", "builds"],
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
        [sys.executable, "-m", "service", "builds", "--json", "--limit", "1"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert [json.loads(line)["id"] for line in as_json.stdout.splitlines()] == ["shop:1"]
    empty = subprocess.run(
        [sys.executable, "-m", "service", "builds"],
        capture_output=True,
        text=True,
        check=True,
        env={"BRANCHBUILD_LOCAL_BUILDS_DIR": str(tmp_path / "none"), "PATH": "/usr/bin:/bin"},
    )
    assert empty.stdout.startswith("no builds in")
