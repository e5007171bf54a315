"""``make run`` / ``make demo``: the whole pipeline on one machine.

LocalStack (started here unless ``LOCALSTACK_ENDPOINT`` names a running one), the project's own
``deploy/pipeline.yaml`` deployed into it, an SSH git host whose pushes become CodeCommit events
on LocalStack's EventBridge, and branchbuild consuming with the ``local`` build backend.
Everything listens on 127.0.0.1; every component logs to ``<state>/logs/``; Ctrl-C stops all.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aioboto3
import aiohttp
import anyio
import anyio.abc
from prometheus_client.parser import text_string_to_metric_families

from ..events import RefChange, codecommit_event
from .githost import GitHost

if TYPE_CHECKING:
    from types_aiobotocore_cloudformation.type_defs import ParameterTypeDef

log = logging.getLogger("branchbuild.localdev")

ROOT = Path(__file__).resolve().parents[2]
ACCOUNT = "000000000000"


@dataclass(frozen=True)
class Options:
    state: Path
    region: str
    localstack_endpoint: str | None
    localstack_port: int
    git_port: int
    http_port: int
    repositories: tuple[str, ...]
    demo: bool
    stack: str = "branchbuild-local"
    prefix: str = "branchbuild"

    @property
    def endpoint(self) -> str:
        return self.localstack_endpoint or f"http://127.0.0.1:{self.localstack_port}"


@dataclass(frozen=True)
class Keys:
    client: Path
    known_hosts: Path
    host: Path

    def git_ssh_command(self) -> str:
        return (
            f"ssh -i {shlex.quote(str(self.client))} -o IdentitiesOnly=yes "
            "-o StrictHostKeyChecking=yes "
            f"-o UserKnownHostsFile={shlex.quote(str(self.known_hosts))}"
        )


def local_session(options: Options) -> aioboto3.Session:
    """LocalStack takes any credentials; these never reach AWS."""
    return aioboto3.Session(
        aws_access_key_id="test", aws_secret_access_key="test", region_name=options.region
    )


def aws_env(options: Options) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": options.endpoint,
        "AWS_REGION": options.region,
        "AWS_DEFAULT_REGION": options.region,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
    }


# -- LocalStack -------------------------------------------------------------------------------


async def healthy(endpoint: str) -> bool:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            async with http.get(f"{endpoint}/_localstack/health") as reply:
                return reply.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


LOCALSTACK_PYTHON = ROOT / ".localstack-venv" / "bin" / "python"


def localstack_env(volume: Path, port: int) -> dict[str, str]:
    """The LocalStack community runtime in host mode on 127.0.0.1 (see README.md)."""
    address = f"127.0.0.1:{port}"
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(volume),
        "GATEWAY_LISTEN": address,
        "LOCALSTACK_HOST": address,
        "SQS_ENDPOINT_STRATEGY": "path",
        "DNS_ADDRESS": "0",
        "DISABLE_EVENTS": "1",
        "SKIP_SSL_CERT_DOWNLOAD": "1",
        "LOCALSTACK_VOLUME_DIR": str(volume),
        "SERVICES": "sqs,s3,events,cloudformation,iam,sts,ssm,secretsmanager,cloudwatch",
    }


@asynccontextmanager
async def localstack(options: Options) -> AsyncIterator[None]:
    """Use the LocalStack at LOCALSTACK_ENDPOINT, one already on the port, or start one."""
    if options.localstack_endpoint or await healthy(options.endpoint):
        if not await healthy(options.endpoint):
            raise SystemExit(f"LOCALSTACK_ENDPOINT={options.endpoint} does not answer")
        log.info("using the LocalStack at %s", options.endpoint)
        yield
        return
    python = LOCALSTACK_PYTHON
    if not python.exists():
        raise SystemExit("LocalStack is not installed: run `make run` (it installs it)")
    volume = options.state / "localstack"
    volume.mkdir(parents=True, exist_ok=True)
    env = localstack_env(volume, options.localstack_port)
    async with _child(
        [str(python), "-m", "localstack.runtime.main"], env, options, "localstack"
    ) as proc:
        with anyio.fail_after(120):
            while not await healthy(options.endpoint):
                if proc.returncode is not None:
                    raise SystemExit(
                        f"LocalStack exited; see {options.state / 'logs/localstack.log'}"
                    )
                await anyio.sleep(0.3)
        log.info("LocalStack is up at %s", options.endpoint)
        yield


@asynccontextmanager
async def _child(
    command: list[str], env: dict[str, str], options: Options, name: str
) -> AsyncIterator[anyio.abc.Process]:
    """A child process logging to <state>/logs/<name>.log, stopped with SIGTERM then SIGKILL."""
    logs = options.state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / f"{name}.log").open("ab") as out:
        proc = await anyio.open_process(command, env=env, stdout=out, stderr=out, cwd=ROOT)
    try:
        yield proc
    finally:
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with anyio.move_on_after(30):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            log.info("%s stopped (exit %s)", name, proc.returncode)


# -- the stack --------------------------------------------------------------------------------


async def deploy(options: Options) -> dict[str, str]:
    """Create or update the pipeline stack from deploy/pipeline.yaml; return its outputs."""
    template = (ROOT / "deploy" / "pipeline.yaml").read_text()
    arns = ",".join(
        f"arn:aws:codecommit:{options.region}:{ACCOUNT}:{r}" for r in options.repositories
    )
    parameters: list[ParameterTypeDef] = [
        {"ParameterKey": "RepositoryArns", "ParameterValue": arns},
        {
            "ParameterKey": "ArtifactBucketName",
            "ParameterValue": f"{options.prefix}-local-artifacts",
        },
        {"ParameterKey": "Prefix", "ParameterValue": options.prefix},
    ]
    # LocalStack reports updates of the rule and the bucket as done without applying them,
    # so a changed template or parameter set means a fresh stack; the digest tells.
    digest = hashlib.sha256((template + json.dumps(parameters)).encode()).hexdigest()[:16]
    session = local_session(options)
    async with AsyncExitStack() as clients:
        cf = await clients.enter_async_context(
            session.client("cloudformation", endpoint_url=options.endpoint)
        )
        s3 = await clients.enter_async_context(session.client("s3", endpoint_url=options.endpoint))
        try:
            stacks = (await cf.describe_stacks(StackName=options.stack))["Stacks"]
        except cf.exceptions.ClientError:
            stacks = []
        if stacks:
            stack = stacks[0]
            tags = {t["Key"]: t["Value"] for t in stack.get("Tags", [])}
            if stack["StackStatus"] in _DONE and tags.get(_DIGEST_TAG) == digest:
                log.info("stack %s is up to date", options.stack)
                return _outputs(stack)
            log.info("replacing stack %s (template or parameters changed)", options.stack)
            bucket = _outputs(stack).get("BucketName")
            if bucket:
                await _empty_bucket(s3, bucket)
            await cf.delete_stack(StackName=options.stack)
            await _wait_stack(cf, options.stack, gone=True)
        log.info("deploying deploy/pipeline.yaml as stack %s", options.stack)
        await cf.create_stack(
            StackName=options.stack,
            TemplateBody=template,
            Parameters=parameters,
            Tags=[{"Key": _DIGEST_TAG, "Value": digest}],
        )
        return _outputs(await _wait_stack(cf, options.stack))


_DONE = {"CREATE_COMPLETE", "UPDATE_COMPLETE"}
_DIGEST_TAG = "branchbuild:deployed-digest"


def _outputs(stack: Any) -> dict[str, str]:
    return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}


async def _empty_bucket(s3: Any, bucket: str) -> None:
    try:
        paginator = s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                await s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    except s3.exceptions.NoSuchBucket:
        return


async def _wait_stack(cf: Any, name: str, *, gone: bool = False) -> dict[str, Any]:
    with anyio.fail_after(180):
        while True:
            try:
                stack: dict[str, Any] = (await cf.describe_stacks(StackName=name))["Stacks"][0]
            except cf.exceptions.ClientError:
                if gone:
                    return {}
                raise
            status = stack["StackStatus"]
            if not status.endswith("IN_PROGRESS"):
                if gone and status == "DELETE_COMPLETE":
                    return {}
                if not gone and status not in _DONE:
                    raise SystemExit(f"stack {name} is {status}: {stack.get('StackStatusReason')}")
                return stack
            await anyio.sleep(0.5)


# -- git host ---------------------------------------------------------------------------------


async def make_keys(state: Path) -> Keys:
    keys = state / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    client = keys / "id_ed25519"
    if not client.exists():
        await anyio.run_process(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "branchbuild-local",
                "-f",
                str(client),
            ]
        )
    return Keys(client=client, known_hosts=keys / "known_hosts", host=keys / "host_key")


@asynccontextmanager
async def git_host(options: Options, keys: Keys, stack: AsyncExitStack) -> AsyncIterator[GitHost]:
    """The SSH git host; each pushed ref change becomes an event on LocalStack's EventBridge."""
    session = local_session(options)
    events = await stack.enter_async_context(
        session.client("events", endpoint_url=options.endpoint)
    )

    async def publish(change: RefChange) -> None:
        event = codecommit_event(change, account=ACCOUNT, region=options.region)
        reply = await events.put_events(
            Entries=[
                {
                    "Source": event["source"],
                    "DetailType": event["detail-type"],
                    "Resources": event["resources"],
                    "Detail": json.dumps(event["detail"]),
                }
            ]
        )
        if reply.get("FailedEntryCount"):
            log.error("EventBridge refused the event for %s: %s", change.ref, reply["Entries"])
        else:
            log.info(
                "push event: %s %s %s", change.repository, event["detail"]["event"], change.ref
            )

    host = GitHost(
        options.state / "githost",
        host_key=keys.host,
        authorized_keys=[keys.client.with_suffix(".pub")],
        port=options.git_port,
        on_change=publish,
    )
    async with host:
        host.write_known_hosts(keys.known_hosts)
        for name in options.repositories:
            host.create_repository(name)
        yield host


# -- branchbuild ------------------------------------------------------------------------------


def service_env(options: Options, keys: Keys, outputs: dict[str, str]) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", str(options.state)),
        **aws_env(options),
        "BRANCHBUILD_QUEUE_URL": outputs["IntakeQueueUrl"],
        "BRANCHBUILD_WORK_QUEUE_URL": outputs["WorkQueueUrl"],
        "BRANCHBUILD_BUCKET": outputs["BucketName"],
        "BRANCHBUILD_GIT_URL_TEMPLATE": f"ssh://git@127.0.0.1:{options.git_port}/v1/repos/{{repository}}",
        "BRANCHBUILD_SSH_KEY_FILE": str(keys.client),
        "BRANCHBUILD_KNOWN_HOSTS_FILE": str(keys.known_hosts),
        "BRANCHBUILD_CACHE_DIR": str(options.state / "cache"),
        "BRANCHBUILD_LOCAL_BUILDS_DIR": str(options.state / "builds"),
        "BRANCHBUILD_BUILD_BACKEND": "local",
        "BRANCHBUILD_HTTP_HOST": "127.0.0.1",
        "BRANCHBUILD_HTTP_PORT": str(options.http_port),
        "BRANCHBUILD_LOG_FORMAT": "text",
    }


async def wait_ready(port: int, proc: anyio.abc.Process, options: Options) -> None:
    with anyio.fail_after(60):
        while True:
            if proc.returncode is not None:
                raise SystemExit(
                    f"branchbuild exited; see {options.state / 'logs/branchbuild.log'}"
                )
            try:
                async with aiohttp.ClientSession() as http:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as reply:
                        if reply.status == 200:
                            return
            except aiohttp.ClientError:
                pass
            await anyio.sleep(0.3)


def instructions(options: Options, keys: Keys) -> str:
    repo = options.repositories[0]
    env = f"BRANCHBUILD_LOCAL_BUILDS_DIR={options.state / 'builds'}"
    return f"""
branchbuild is running locally (Ctrl-C stops everything).

  LocalStack        {options.endpoint}
  git host (SSH)    ssh://git@127.0.0.1:{options.git_port}/v1/repos/{repo}
  branchbuild       http://127.0.0.1:{options.http_port}/metrics  (/healthz, /readyz)
  logs              {options.state / "logs"}/

Push your own commits from any git repository:

  export GIT_SSH_COMMAND="{keys.git_ssh_command()}"
  git remote add branchbuild ssh://git@127.0.0.1:{options.git_port}/v1/repos/{repo}
  git push branchbuild HEAD:feature/my-change

A buildspec.yml at the top of the repository is run by the local build backend
(this runs the repository's commands on this machine: development only). Check a buildspec
first, then see the builds (and --follow ID to stream a running one's log):

  {ROOT / ".venv/bin/branchbuild"} buildspec check buildspec.yml
  {env} {ROOT / ".venv/bin/branchbuild"} builds
"""


# -- demo -------------------------------------------------------------------------------------

PASSING = """version: 0.2
phases:
  build:
    commands:
      - echo building $BRANCH_NAME at $COMMIT_ID
      - test -f app.txt
"""
FAILING = """version: 0.2
phases:
  build:
    commands:
      - echo this build fails
      - exit 3
"""


async def demo(options: Options, keys: Keys) -> bool:
    """Push four things, wait for their outcomes, print a table; True if all are as expected."""
    from service.localdev.builder import list_builds

    work = options.state / "demo-work" / uuid.uuid4().hex[:8]
    work.mkdir(parents=True)
    repo = options.repositories[0]
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(work),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_SSH_COMMAND": keys.git_ssh_command(),
        "GIT_AUTHOR_NAME": "demo",
        "GIT_AUTHOR_EMAIL": "demo@example.com",
        "GIT_COMMITTER_NAME": "demo",
        "GIT_COMMITTER_EMAIL": "demo@example.com",
    }

    async def git(*args: str) -> str:
        result = await anyio.run_process(["git", *args], cwd=work, env=env)
        return result.stdout.decode().strip()

    stamp = str(time.time_ns())
    baseline = await _metrics(options.http_port)
    await git("init", "--quiet", "--initial-branch=feature/demo-pass")
    await git("remote", "add", "origin", f"ssh://git@127.0.0.1:{options.git_port}/v1/repos/{repo}")
    (work / "app.txt").write_text(stamp)
    (work / "buildspec.yml").write_text(PASSING)
    await git("add", "--all")
    await git("commit", "--quiet", "-m", "a passing build")
    passing = await git("rev-parse", "HEAD")
    await git("push", "--quiet", "--force", "origin", "HEAD:feature/demo-pass")
    (work / "buildspec.yml").write_text(FAILING)
    await git("commit", "--quiet", "-am", "a failing build")
    failing = await git("rev-parse", "HEAD")
    await git("push", "--quiet", "--force", "origin", "HEAD:feature/demo-fail")
    await git("push", "--quiet", "--force", "origin", "HEAD:develop")

    def status(commit: str) -> str | None:
        for record in list_builds(options.state / "builds", limit=1000):
            if record.commit == commit and record.status != "IN_PROGRESS":
                return record.status
        return None

    with anyio.move_on_after(120):
        while True:
            if status(passing) is not None and status(failing) is not None:
                break
            await anyio.sleep(0.5)
    await git("push", "--quiet", "origin", "--delete", "feature/demo-fail")
    with anyio.move_on_after(60):
        while True:
            now = await _metrics(options.http_port)
            if _delta(now, baseline, "deleted") >= 1 and _delta(now, baseline, "protected") >= 1:
                break
            await anyio.sleep(0.5)
    after = await _metrics(options.http_port)
    rows = [
        ("push feature/demo-pass", "build SUCCEEDED", f"build {status(passing) or 'none'}"),
        ("push feature/demo-fail", "build FAILED", f"build {status(failing) or 'none'}"),
        (
            "push develop (protected)",
            "skipped: protected",
            f"protected events: +{_delta(after, baseline, 'protected'):g}",
        ),
        (
            "delete feature/demo-fail",
            "skipped: deleted",
            f"deleted events: +{_delta(after, baseline, 'deleted'):g}",
        ),
    ]
    ok = [
        status(passing) == "SUCCEEDED",
        status(failing) == "FAILED",
        _delta(after, baseline, "protected") == 1,
        _delta(after, baseline, "deleted") == 1,
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'what':<{width}}  {'expected':<20}  {'got':<28}  ok"]
    for (what, expected, got), good in zip(rows, ok, strict=True):
        lines.append(f"{what:<{width}}  {expected:<20}  {got:<28}  {'yes' if good else 'NO'}")
    sys.stdout.write("\n" + "\n".join(lines) + "\n\n")
    return all(ok)


async def _metrics(port: int) -> dict[str, float]:
    """The service's ``branchbuild_events_total``, summed by outcome."""
    outcomes: dict[str, float] = {}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as reply:
            text = await reply.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "branchbuild_events_total":
                outcome = sample.labels["outcome"]
                outcomes[outcome] = outcomes.get(outcome, 0.0) + sample.value
    return outcomes


def _delta(after: dict[str, float], before: dict[str, float], outcome: str) -> float:
    return after.get(outcome, 0.0) - before.get(outcome, 0.0)


# -- main -------------------------------------------------------------------------------------


async def run(options: Options) -> int:
    options.state.mkdir(parents=True, exist_ok=True)
    keys = await make_keys(options.state)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(localstack(options))
        outputs = await deploy(options)
        host = await stack.enter_async_context(git_host(options, keys, stack))
        log.info("git host on 127.0.0.1:%s", host.port)
        command = [sys.executable, "-m", "service", "run"]
        proc = await stack.enter_async_context(
            _child(command, service_env(options, keys, outputs), options, "branchbuild")
        )
        await wait_ready(options.http_port, proc, options)
        if options.demo:
            return 0 if await demo(options, keys) else 1
        sys.stdout.write(instructions(options, keys))
        sys.stdout.flush()
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                sys.stdout.write("\nstopping...\n")
                break
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make run", description=__doc__)
    parser.add_argument("--demo", action="store_true", help="push a scripted demo, check it, stop")
    parser.add_argument(
        "--state", type=Path, default=ROOT / ".run", help="state folder (default .run/)"
    )
    parser.add_argument("--localstack-port", type=int, default=4566)
    parser.add_argument(
        "--git-port", type=int, default=int(os.environ.get("BRANCHBUILD_GIT_PORT", "2222"))
    )
    parser.add_argument(
        "--http-port", type=int, default=int(os.environ.get("BRANCHBUILD_HTTP_PORT", "8080"))
    )
    parser.add_argument(
        "--repository", action="append", default=[], help="repositories to serve (default demo)"
    )
    parser.add_argument("--stack-name", default="branchbuild-local", help="CloudFormation stack")
    parser.add_argument("--prefix", default="branchbuild", help="resource name prefix")
    args = parser.parse_args(argv)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "eu-west-1"
    options = Options(
        state=args.state.resolve(),
        region=region,
        localstack_endpoint=os.environ.get("LOCALSTACK_ENDPOINT") or None,
        localstack_port=args.localstack_port,
        git_port=args.git_port,
        http_port=args.http_port,
        repositories=tuple(args.repository) or ("demo",),
        demo=args.demo,
        stack=args.stack_name,
        prefix=args.prefix,
    )
    (options.state / "logs").mkdir(parents=True, exist_ok=True)
    detailed = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    runner = logging.FileHandler(options.state / "logs" / "run.log")
    runner.setFormatter(detailed)
    githost = logging.FileHandler(options.state / "logs" / "githost.log")
    githost.setFormatter(detailed)
    githost.addFilter(logging.Filter("branchbuild.githost"))
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    console.addFilter(logging.Filter("branchbuild.localdev"))
    logging.basicConfig(level=logging.INFO, handlers=[runner, githost, console])
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    logging.getLogger("botocore").setLevel(logging.WARNING)
    return anyio.run(run, options)


if __name__ == "__main__":
    raise SystemExit(main())
