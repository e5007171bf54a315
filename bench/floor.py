"""F, the floor: the least work one push needs, with no queue and no service.

For each event: fetch the commit (warm: into an already-populated bare repository; cold:
``git clone --bare`` from scratch; cold-shallow: ``git init --bare`` and ``git fetch --depth 1``
of the commit, the cold floor of a history-heavy repository; cold-full: the same without
``--depth``, the commit's whole history, as the service fetched before it went shallow),
pipe ``git archive --format=zip`` into one S3 upload (boto3 ``upload_fileobj``: a single PUT,
or multipart for a large stream), and call StartBuild once. Each event is timed on its own;
the CPU of the timed part (this process and its git/ssh children) is reported too.

Usage: python -m bench.floor JOB.json RESULT.json  (the orchestrator writes JOB.json)
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped,unused-ignore]
from boto3.s3.transfer import TransferConfig  # type: ignore[import-untyped,unused-ignore]

_CONFIG = TransferConfig(multipart_threshold=8 * 1024 * 1024, multipart_chunksize=8 * 1024 * 1024)


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _git(env: dict[str, str], *args: str) -> None:
    result = subprocess.run(["git", *args], env=env, capture_output=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"git {args[:3]} failed: {result.stderr.decode()[-1000:]}")


class _Counter:
    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.stream.read(size)
        self.bytes += len(data)
        return data


def one(job: dict[str, Any], event: dict[str, Any], n: int, clients: Any) -> dict[str, Any]:
    s3, codebuild = clients
    env = job["git_env"]
    repository, commit, branch = event["repository"], event["commit"], event["branch"]
    started = time.time()
    cold = job["mode"].startswith("cold")
    if cold:
        bare = Path(job["scratch"]) / f"cold-{n}.git"
        shutil.rmtree(bare, ignore_errors=True)
    if job["mode"] == "cold":
        _git(env, "clone", "--bare", "--quiet", event["url"], str(bare))
    elif cold:  # cold-shallow: the commit at depth 1; cold-full: the commit and its history
        depth = ["--depth=1"] if job["mode"] == "cold-shallow" else []
        _git(env, "init", "--bare", "--quiet", str(bare))
        _git(
            env,
            f"--git-dir={bare}",
            "-c",
            "protocol.version=2",
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            *depth,
            event["url"],
            f"+{commit}:refs/floor/{n}",
        )
    else:
        bare = Path(job["bare"])
        _git(
            env,
            f"--git-dir={bare}",
            "-c",
            "protocol.version=2",
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            event["url"],
            f"+{commit}:refs/floor/{n}",
        )
    fetched = time.time()
    key = f"{repository}/{branch}/{commit}.zip"
    archive = subprocess.Popen(
        ["git", f"--git-dir={bare}", "archive", "--format=zip", f"-{job['zip_level']}", commit],
        env=env,
        stdout=subprocess.PIPE,
    )
    assert archive.stdout is not None
    counter = _Counter(archive.stdout)
    s3.upload_fileobj(counter, job["bucket"], key, Config=_CONFIG)
    if archive.wait() != 0:
        raise RuntimeError("git archive failed")
    uploaded = time.time()
    codebuild.start_build(
        projectName=repository,
        sourceTypeOverride="S3",
        sourceLocationOverride=f"{job['bucket']}/{key}",
        environmentVariablesOverride=[{"name": "COMMIT_ID", "value": commit, "type": "PLAINTEXT"}],
        artifactsOverride={"type": "NO_ARTIFACTS"},
    )
    done = time.time()
    if cold:
        shutil.rmtree(bare, ignore_errors=True)
    return {
        "commit": commit,
        "start": started,
        "end": done,
        "seconds": done - started,
        "fetch": fetched - started,
        "archive_upload": uploaded - fetched,
        "start_build": done - uploaded,
        "bytes": counter.bytes,
    }


def main(argv: list[str]) -> None:
    job = json.loads(Path(argv[0]).read_text())
    session = boto3.session.Session()
    local = threading.local()

    def clients() -> Any:
        if not hasattr(local, "clients"):
            local.clients = (
                session.client("s3"),
                session.client("codebuild"),
            )
        return local.clients

    if job["mode"] == "warm" and not Path(job["bare"]).exists():
        _git(job["git_env"], "clone", "--bare", "--quiet", job["warm_url"], job["bare"])
    # Create the clients (and their connection pools) before the clock starts, as a service would.
    with ThreadPoolExecutor(job["parallel"]) as pool:
        list(pool.map(lambda _: clients(), range(job["parallel"])))
        cpu_before, wall_before = _cpu(), time.time()
        results = list(
            pool.map(lambda item: one(job, item[1], item[0], clients()), enumerate(job["events"]))
        )
        cpu_after, wall_after = _cpu(), time.time()
    Path(argv[1]).write_text(
        json.dumps(
            {
                "events": results,
                "cpu_seconds": cpu_after - cpu_before,
                "wall_seconds": wall_after - wall_before,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
