"""Test helpers: emulator resources, a real git working copy, the service as a real process."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
import zipfile
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import anyio
import anyio.abc
from prometheus_client.parser import text_string_to_metric_families

from localdev.githost import GitHost
from service.events import Action, Push, RefChange, RefType, codecommit_event

if TYPE_CHECKING:
    from types_aiobotocore_codebuild import CodeBuildClient
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.literals import QueueAttributeNameType

T = TypeVar("T")
StartService = Callable[..., Awaitable["ServiceProcess"]]
ROOT = Path(__file__).resolve().parent.parent


async def wait_for(
    probe: Callable[[], Awaitable[T | None]], *, within: float = 30, what: str = "condition"
) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``within`` seconds."""
    with anyio.move_on_after(within):
        while True:
            result = await probe()
            if result:
                return result
            await anyio.sleep(0.05)
    raise TimeoutError(f"timed out after {within} s waiting for {what}")


@dataclass
class AwsResources:
    endpoint: str
    sqs: SQSClient
    s3: S3Client
    codebuild: CodeBuildClient
    intake_url: str
    intake_dlq_url: str
    work_url: str
    work_dlq_url: str
    bucket: str
    project: str

    async def send_event(self, event: dict[str, Any] | str) -> None:
        """What the EventBridge rule does: the whole event, one static message group."""
        body = event if isinstance(event, str) else json.dumps(event)
        await self.sqs.send_message(
            QueueUrl=self.intake_url,
            MessageBody=body,
            MessageGroupId="codecommit",
            MessageDeduplicationId=uuid.uuid4().hex,
        )

    async def count(self, url: str) -> int:
        reply = await self.sqs.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )
        a = reply["Attributes"]
        return int(a["ApproximateNumberOfMessages"]) + int(
            a["ApproximateNumberOfMessagesNotVisible"]
        )

    async def dlq_bodies(self, url: str) -> list[str]:
        return [body for body, _ in await self.dlq_messages(url)]

    async def dlq_messages(self, url: str) -> list[tuple[str, dict[str, str]]]:
        """Bodies and string attributes of the messages in a dead-letter queue."""
        reply = await self.sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0, MessageAttributeNames=["All"]
        )
        return [
            (
                m["Body"],
                {k: v.get("StringValue", "") for k, v in m.get("MessageAttributes", {}).items()},
            )
            for m in reply.get("Messages", [])
        ]

    async def keys(self) -> list[str]:
        """Every key of the bucket (every page: a shared bucket can hold more than 1,000)."""
        found: list[str] = []
        async for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            found += [o["Key"] for o in page.get("Contents", [])]
        return sorted(found)

    async def object(self, key: str) -> bytes:
        reply = await self.s3.get_object(Bucket=self.bucket, Key=key)
        return await reply["Body"].read()

    async def open_uploads(self) -> int:
        reply = await self.s3.list_multipart_uploads(Bucket=self.bucket)
        return len(reply.get("Uploads", []))

    async def start_builds(self) -> list[dict[str, Any]]:
        """Every StartBuild request moto received, as sent on the wire."""
        return await self.recorded("StartBuild")

    async def recorded(self, action: str) -> list[dict[str, Any]]:
        """Every request of a JSON-protocol ``action`` (e.g. StopBuild) moto received."""
        async with aiohttp.ClientSession() as session:
            url = self.endpoint + "/moto-api/recorder/download-recording"
            async with session.get(url) as reply:
                lines = (await reply.text()).splitlines()
        entries: list[dict[str, Any]] = []
        decoder = json.JSONDecoder()
        for number, line in enumerate(lines):
            # moto writes each record and its newline in two calls from its request threads,
            # so two records can share a line: read every object on it.
            position = 0
            while position < len(line.rstrip()):
                try:
                    entry, position = decoder.raw_decode(line, position)
                except ValueError:
                    if number == len(lines) - 1:  # moto is still writing this one
                        break
                    raise
                entries.append(entry)
        requests = []
        for entry in entries:
            if entry.get("headers", {}).get("X-Amz-Target", "").endswith("." + action):
                body = entry["body"]
                if entry.get("body_encoded"):
                    body = base64.b64decode(body).decode()
                requests.append(json.loads(body))
        return requests


async def create_resources(
    endpoint: str, sqs: SQSClient, s3: S3Client, codebuild: CodeBuildClient
) -> AwsResources:
    suffix = uuid.uuid4().hex[:8]

    async def fifo(name: str, dlq_arn: str | None = None) -> tuple[str, str]:
        attributes: dict[QueueAttributeNameType, str] = {
            "FifoQueue": "true",
            "ContentBasedDeduplication": "true",
        }
        if dlq_arn:
            attributes["RedrivePolicy"] = json.dumps(
                {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 2}
            )
        url = (await sqs.create_queue(QueueName=f"{name}-{suffix}.fifo", Attributes=attributes))[
            "QueueUrl"
        ]
        arn = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"]))[
            "Attributes"
        ]["QueueArn"]
        return url, arn

    intake_dlq, intake_dlq_arn = await fifo("intake-dlq")
    intake, _ = await fifo("intake", intake_dlq_arn)
    work_dlq, work_dlq_arn = await fifo("work-dlq")
    work, _ = await fifo("work", work_dlq_arn)
    bucket = f"artifacts-{suffix}"
    await s3.create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
    )
    return AwsResources(
        endpoint=endpoint,
        sqs=sqs,
        s3=s3,
        codebuild=codebuild,
        intake_url=intake,
        intake_dlq_url=intake_dlq,
        work_url=work,
        work_dlq_url=work_dlq,
        bucket=bucket,
        project="",
    )


async def create_project(aws: AwsResources, name: str) -> None:
    await aws.codebuild.create_project(
        name=name,
        source={"type": "S3", "location": f"{aws.bucket}/placeholder.zip"},
        artifacts={"type": "NO_ARTIFACTS"},
        environment={
            "type": "LINUX_CONTAINER",
            "image": "aws/codebuild/standard:7.0",
            "computeType": "BUILD_GENERAL1_SMALL",
        },
        serviceRole="arn:aws:iam::123456789012:role/codebuild",
    )


def zip_listing(data: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return sorted(archive.namelist())


# -- git --------------------------------------------------------------------------------------


@dataclass
class GitWorld:
    """A real SSH git host plus a client key and known_hosts, for pushing and for the service."""

    host: GitHost
    key: Path
    known_hosts: Path
    home: Path
    changes: list[RefChange] = field(default_factory=list)
    legacy_rsa: bool = False  # the host offers and accepts only ssh-rsa, as CodeCommit does

    @property
    def url_template(self) -> str:
        return f"ssh://git@127.0.0.1:{self.host.port}/v1/repos/{{repository}}"

    def env(self) -> dict[str, str]:
        ssh = (
            f"ssh -i {self.key} -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes "
            f"-o UserKnownHostsFile={self.known_hosts} -o BatchMode=yes"
        )
        if self.legacy_rsa:
            ssh += " -o HostKeyAlgorithms=+ssh-rsa -o PubkeyAcceptedAlgorithms=+ssh-rsa"
        return {
            "PATH": os.environ["PATH"],
            "HOME": str(self.home),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_SSH_COMMAND": ssh,
            "GIT_AUTHOR_NAME": "Test",
            "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "Test",
            "GIT_COMMITTER_EMAIL": "test@example.com",
        }


class WorkCopy:
    """A working repository that pushes to the git host over SSH with the real git CLI."""

    def __init__(self, world: GitWorld, path: Path, repository: str) -> None:
        self.world = world
        self.path = path
        self.repository = repository

    @classmethod
    async def create(cls, world: GitWorld, tmp: Path, repository: str) -> WorkCopy:
        world.host.create_repository(repository)
        path = tmp / f"work-{repository}"
        path.mkdir()
        copy = cls(world, path, repository)
        await copy.git("init", "--quiet", "--initial-branch=main")
        port = world.host.port
        await copy.git(
            "remote", "add", "origin", f"ssh://git@127.0.0.1:{port}/v1/repos/{repository}"
        )
        return copy

    async def git(self, *args: str) -> str:
        result = await anyio.run_process(
            ["git", *args], cwd=self.path, env=self.world.env(), check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr.decode()}")
        return result.stdout.decode().strip()

    async def commit(self, files: dict[str, str | bytes], message: str = "change") -> str:
        for name, content in files.items():
            target = self.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        await self.git("add", "--all")
        await self.git("commit", "--quiet", "--allow-empty", "-m", message)
        return await self.git("rev-parse", "HEAD")

    async def checkout(self, branch: str, *, new: bool = True) -> None:
        await self.git("checkout", "--quiet", *(["-b"] if new else []), branch)

    async def push(self, *refspecs: str) -> None:
        await self.git("push", "--quiet", "origin", *refspecs)

    async def archive_listing(self, commit: str) -> list[str]:
        data = await anyio.run_process(
            ["git", "archive", "--format=zip", commit], cwd=self.path, env=self.world.env()
        )
        return zip_listing(data.stdout)


def event_for(repository: str, ref: str, new: str | None, old: str | None = None) -> dict[str, Any]:
    return codecommit_event(RefChange(repository=repository, ref=ref, old=old, new=new))


def push_for(repository: str, branch: str, commit: str | None = None, **fields: Any) -> Push:
    """A push that moved ``branch`` to ``commit`` (made up from the names when not given), as
    the intake stage forwards it; ``fields`` replace any other of its fields. The one place
    the tests build a ``Push``."""
    push = Push(
        event_id=f"e-{repository}-{branch}",
        account="123456789012",
        region="eu-west-1",
        repository=repository,
        ref_type=RefType.BRANCH,
        name=branch,
        action=Action.UPDATED,
        commit=commit or hashlib.sha1(f"{repository} {branch}".encode()).hexdigest(),  # noqa: S324
    )
    return replace(push, **fields)


# -- the service as a real process ------------------------------------------------------------


# The run's directory of AWS-call logs (tests/test_iam.py's proof): made by the controller (or
# the only pytest process) in conftest's pytest_configure, inherited by pytest-xdist's workers
# through the environment, so the calls of every worker are proven in one place.
CALLS_DIR = "TESTS_AWS_CALLS_DIR"


def calls_directory() -> Path:
    """Where every process of the run lists the logs whose aws_call records the IAM proof
    evaluates (one file each, naming a log), and writes what it selected."""
    return Path(os.environ[CALLS_DIR])


def record_calls_of(directory: Path, log: Path) -> None:
    (directory / f"{uuid.uuid4().hex}.log-path").write_text(str(log))


def recorded_logs(directory: Path) -> list[Path]:
    return [Path(f.read_text()) for f in sorted(directory.glob("*.log-path"))]


def service_env(
    git_world: GitWorld, cache: Path, *, intake_url: str, work_url: str, bucket: str, **more: str
) -> dict[str, str]:
    """The environment of ``python -m service run`` on the test's queues, bucket and git host
    (the one place it is written), with ``more`` on top."""
    return (
        dict(os.environ)
        | {
            "BRANCHBUILD_QUEUE_URL": intake_url,
            "BRANCHBUILD_WORK_QUEUE_URL": work_url,
            "BRANCHBUILD_BUCKET": bucket,
            "BRANCHBUILD_GIT_URL_TEMPLATE": git_world.url_template,
            "BRANCHBUILD_SSH_KEY_FILE": str(git_world.key),
            "BRANCHBUILD_KNOWN_HOSTS_FILE": str(git_world.known_hosts),
            "BRANCHBUILD_CACHE_DIR": str(cache),
            "BRANCHBUILD_HTTP_HOST": "127.0.0.1",
            "BRANCHBUILD_HTTP_PORT": "0",
            "BRANCHBUILD_LOG_FORMAT": "json",
        }
        | more
    )


class ServiceProcess:
    """``python -m service run`` as a child process, with real signals."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        # Port 0: the service binds a free port itself and logs it (no race between a probe
        # that closes a port and the server that takes it).
        self.env = env | {"BRANCHBUILD_HTTP_PORT": "0"}
        self.log = log
        self.process: anyio.abc.Process | None = None
        self.port = 0

    async def start(self) -> None:
        out = self.log.open("ab")
        self.process = await anyio.open_process(
            [sys.executable, "-m", "service", "run"],
            env=self.env,
            stdout=out,
            stderr=out,
            cwd=ROOT,
        )
        out.close()
        self.port = await wait_for(self._bound_port, within=30, what="the HTTP server")
        await wait_for(self.ready, within=30, what="readiness")

    async def _bound_port(self) -> int | None:
        if self.process is not None and self.process.returncode is not None:
            raise RuntimeError(f"service exited {self.process.returncode}:\n{self.logs()}")
        found = re.search(r"/metrics on [^ ]+:(\d+)", self.logs())
        return int(found.group(1)) if found else None

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{self.port}{path}") as reply:
                return reply.status, await reply.text()

    async def ready(self) -> bool:
        if self.process is not None and self.process.returncode is not None:
            raise RuntimeError(f"service exited {self.process.returncode}:\n{self.log.read_text()}")
        try:
            status, _ = await self.get("/readyz")
        except aiohttp.ClientError:
            return False
        return status == 200

    async def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``."""
        _, text = await self.get("/metrics")
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    async def metric_reaches(self, value: float, name: str, **labels: str) -> None:
        """Wait until a metric has ``value``: a message is counted once it is settled, which
        is after a test can see it settled in SQS."""

        async def reached() -> bool:
            return await self.metric(name, **labels) == value

        await wait_for(reached, what=f"{name}{labels} == {value}")

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait(self, within: float = 30) -> int:
        assert self.process is not None
        with anyio.fail_after(within):
            return await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await self.wait(within=30)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


# -- emulator processes -----------------------------------------------------------------------


@contextmanager
def server_process(
    command: list[str],
    *,
    env: dict[str, str],
    health: str,
    log: Path,
    within: float,
    cwd: Path,
    announces: re.Pattern[str] | None = None,
) -> Iterator[str]:
    """A server subprocess (an emulator), up once ``health`` answers; terminated on exit.

    With ``announces``, the server was told to bind port 0 and logs the port it got (the
    pattern's one group); ``health`` is formatted with ``port=`` it. Yields ``health``.
    Session fixtures are synchronous, so this polls with blocking sleeps before any event loop
    runs.
    """
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + within
    try:
        while True:
            try:
                if announces is not None and "{port}" in health:
                    found = announces.search(log.read_text(errors="replace"))
                    if found is None:
                        raise OSError("the port is not announced yet")
                    health = health.format(port=found.group(1))
                urllib.request.urlopen(health, timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{command[2]} did not start: {log.read_text()}") from None
                time.sleep(0.1)
        yield health
    finally:
        process.terminate()
        process.wait(timeout=30)
