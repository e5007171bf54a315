"""What every variant shares: a moto server, the project's SSH git host, and a CodeBuild recorder.

* moto serves SQS, S3 and CodeBuild for A, B and F alike (its request recorder stays off: it
  would write every uploaded byte into its log).
* The git host is ``python -m localdev.githost`` as its own process, so its CPU is
  measured apart from everything else. The events it logs for each push are the EventBridge
  events (``codecommit_event``) that go on the intake queue.
* CodeBuild calls go through a tiny recording proxy in front of moto
  (``AWS_ENDPOINT_URL_CODEBUILD``) for all variants: moto's builds keep neither the overrides
  nor a usable timestamp, and the proxy notes when each StartBuild arrived and for which commit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped,unused-ignore]

ROOT = Path(__file__).resolve().parent.parent
REGION = "eu-west-1"
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(probe: Any, *, within: float, what: str, every: float = 0.05) -> Any:
    """Poll ``probe()`` until truthy; raise TimeoutError after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within:g} s waiting for {what}")
        time.sleep(every)


def aws_env(endpoint: str, codebuild_endpoint: str, home: Path) -> dict[str, str]:
    """A clean AWS environment pointing at the emulator: no ~/.aws, no stray variables."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BRANCHBUILD_"))}
    return base | {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": str(home / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_CODEBUILD": codebuild_endpoint,
    }


def terminate(process: subprocess.Popen[bytes], *, within: float = 30) -> None:
    """SIGTERM, then SIGKILL after ``within`` seconds; only this process."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=within)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# -- moto ---------------------------------------------------------------------------------------


@contextmanager
def moto_server(workdir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
    env["TMPDIR"] = str(workdir)  # moto spools S3 objects to temporary files
    log = (workdir / "moto.log").open("wb")
    process = subprocess.Popen(
        [PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"moto exited: {(workdir / 'moto.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
        except OSError:
            return False
        return True

    try:
        wait_until(up, within=30, what="moto")
        yield endpoint, process
    finally:
        terminate(process)
        log.close()


# -- CodeBuild recorder -------------------------------------------------------------------------


@dataclass(frozen=True)
class StartBuild:
    at: float  # time.time() when the request arrived
    project: str
    commit: str
    branch: str
    location: str
    body: dict[str, Any]


class BuildRecorder:
    """An HTTP proxy for CodeBuild that records each StartBuild and forwards it to moto."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.builds: list[StartBuild] = []
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                arrived = time.time()
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                target = self.headers.get("X-Amz-Target", "")
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in {"host", "content-length", "connection"}
                }
                request = urllib.request.Request(
                    recorder.upstream + self.path, data=body, headers=headers, method="POST"
                )
                try:
                    with urllib.request.urlopen(request, timeout=60) as reply:
                        status, payload, ctype = reply.status, reply.read(), reply.headers
                except urllib.error.HTTPError as exc:
                    status, payload, ctype = exc.code, exc.read(), exc.headers
                if target.endswith(".StartBuild") and status == 200:
                    recorder._record(arrived, json.loads(body))
                self.send_response(status)
                self.send_header("Content-Type", ctype.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _record(self, arrived: float, body: dict[str, Any]) -> None:
        variables = {v["name"]: v["value"] for v in body.get("environmentVariablesOverride", [])}
        location = body.get("sourceLocationOverride", "")
        # The key template is {repository}/{branch}/{commit}.zip, in A, B and F alike.
        branch = location.split("/", 2)[-1].rsplit("/", 1)[0] if location.count("/") >= 3 else ""
        build = StartBuild(
            at=arrived,
            project=body.get("projectName", ""),
            commit=variables.get("COMMIT_ID", ""),
            branch=branch,
            location=location,
            body=body,
        )
        with self._lock:
            self.builds.append(build)

    def since(self, start: int) -> list[StartBuild]:
        with self._lock:
            return list(self.builds[start:])

    def count(self) -> int:
        with self._lock:
            return len(self.builds)

    def __enter__(self) -> BuildRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- AWS resources ------------------------------------------------------------------------------


@dataclass
class Queues:
    intake: str
    intake_dlq: str
    work: str
    work_dlq: str


class Aws:
    """boto3 clients on the emulator, and the resources every variant needs."""

    def __init__(self, endpoint: str, codebuild_endpoint: str) -> None:
        session = boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
        )
        self.endpoint = endpoint
        self.sqs = session.client("sqs", endpoint_url=endpoint)
        self.s3 = session.client("s3", endpoint_url=endpoint)
        self.codebuild = session.client("codebuild", endpoint_url=codebuild_endpoint)

    def queues(self, label: str) -> Queues:
        """An intake and a work FIFO queue, each with a FIFO DLQ after 2 receives."""
        suffix = f"{label}-{uuid.uuid4().hex[:6]}"

        def fifo(name: str, dlq: str | None = None) -> str:
            attributes = {"FifoQueue": "true", "ContentBasedDeduplication": "true"}
            if dlq is not None:
                arn = self.sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])
                attributes["RedrivePolicy"] = json.dumps(
                    {"deadLetterTargetArn": arn["Attributes"]["QueueArn"], "maxReceiveCount": 2}
                )
            url: str = self.sqs.create_queue(
                QueueName=f"{name}-{suffix}"[:75] + ".fifo", Attributes=attributes
            )["QueueUrl"]
            return url

        intake_dlq = fifo("intake-dlq")
        work_dlq = fifo("work-dlq")
        return Queues(fifo("intake", intake_dlq), intake_dlq, fifo("work", work_dlq), work_dlq)

    def bucket(self, label: str) -> str:
        name = f"bench-{label}-{uuid.uuid4().hex[:6]}".lower()[:63]
        self.s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})
        return name

    def project(self, name: str, bucket: str) -> None:
        """A CodeBuild project (moto needs a source location to create one)."""
        try:
            self.codebuild.delete_project(name=name)
        except Exception:  # noqa: BLE001 (missing is fine)
            pass
        self.codebuild.create_project(
            name=name,
            source={"type": "S3", "location": f"{bucket}/placeholder.zip"},
            artifacts={"type": "NO_ARTIFACTS"},
            environment={
                "type": "LINUX_CONTAINER",
                "image": "aws/codebuild/standard:7.0",
                "computeType": "BUILD_GENERAL1_SMALL",
            },
            serviceRole="arn:aws:iam::123456789012:role/codebuild",
        )

    def send_events(self, queue: str, events: list[dict[str, Any]]) -> list[float]:
        """Put events on the intake queue as the EventBridge rule does (whole event as the
        body, MessageGroupId "codecommit"), ten per call; return each one's enqueue time."""
        times: list[float] = []
        for start in range(0, len(events), 10):
            batch = events[start : start + 10]
            now = time.time()
            reply = self.sqs.send_message_batch(
                QueueUrl=queue,
                Entries=[
                    {
                        "Id": str(n),
                        "MessageBody": json.dumps(event),
                        "MessageGroupId": "codecommit",
                        "MessageDeduplicationId": uuid.uuid4().hex,
                    }
                    for n, event in enumerate(batch)
                ],
            )
            if reply.get("Failed"):
                raise RuntimeError(f"send_message_batch failed: {reply['Failed']}")
            times += [now] * len(batch)
        return times

    def queue_depth(self, url: str) -> int:
        a = self.sqs.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(a["ApproximateNumberOfMessages"]) + int(
            a["ApproximateNumberOfMessagesNotVisible"]
        )

    def objects(self, bucket: str) -> dict[str, int]:
        """Key -> size of every object in ``bucket``."""
        found: dict[str, int] = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                found[item["Key"]] = int(item["Size"])
        return found

    def empty(self, bucket: str) -> None:
        """Delete every object (moto keeps them in memory and temporary files)."""
        keys = list(self.objects(bucket))
        for start in range(0, len(keys), 1000):
            self.s3.delete_objects(
                Bucket=bucket,
                Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]]},
            )


# -- git host -----------------------------------------------------------------------------------


@dataclass
class GitHostProcess:
    process: subprocess.Popen[bytes]
    port: int
    root: Path
    key: Path
    known_hosts: Path
    log: Path

    def url(self, repository: str) -> str:
        return f"ssh://git@127.0.0.1:{self.port}/v1/repos/{repository}"

    @property
    def url_template(self) -> str:
        return f"ssh://git@127.0.0.1:{self.port}/v1/repos/{{repository}}"

    @property
    def ssh_command(self) -> str:
        return (
            f"ssh -i {self.key} -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes "
            f"-o UserKnownHostsFile={self.known_hosts} -o BatchMode=yes -o LogLevel=ERROR"
        )

    def log_offset(self) -> int:
        return self.log.stat().st_size

    def uploads_since(self, offset: int) -> tuple[int, int]:
        """(upload-pack sessions, bytes they sent) that the host logged after ``offset``."""
        with self.log.open("rb") as file:
            file.seek(offset)
            text = file.read().decode(errors="replace")
        sessions = sent = 0
        for line in text.splitlines():
            if " git upload-pack " in line and " bytes sent" in line:
                sessions += 1
                sent += int(line.rsplit(" bytes sent", 1)[0].rsplit(" ", 1)[1])
        return sessions, sent

    def events_since(self, offset: int) -> list[dict[str, Any]]:
        """The CodeCommit events the host logged after ``offset``, in push order."""
        with self.log.open("rb") as file:
            file.seek(offset)
            text = file.read().decode(errors="replace")
        events = []
        for line in text.splitlines():
            _, marker, payload = line.partition(" branchbuild.githost event ")
            if marker:
                events.append(json.loads(payload))
        return events


@contextmanager
def git_host(workdir: Path) -> Iterator[GitHostProcess]:
    """The project's SSH git host as a subprocess on 127.0.0.1, with a client key."""
    keys = workdir / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    key = keys / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    known_hosts = keys / "known_hosts"
    known_hosts.unlink(missing_ok=True)
    port = free_port()
    log = workdir / "githost.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "localdev.githost",
                "--root",
                str(workdir / "githost"),
                "--port",
                str(port),
                "--host-key",
                str(keys / "host_key"),
                "--authorized-key",
                str(key.with_suffix(".pub")),
                "--known-hosts",
                str(known_hosts),
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BRANCHBUILD_"))},
        )
    host = GitHostProcess(process, port, workdir / "githost", key, known_hosts, log)

    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"git host exited: {log.read_text()[-2000:]}")
        return known_hosts.is_file() and "listening" in log.read_text()

    try:
        wait_until(up, within=30, what="git host")
        yield host
    finally:
        terminate(process)
