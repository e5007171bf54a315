"""``make run`` / ``make demo``: the whole pipeline on one machine.

LocalStack (started here unless ``LOCALSTACK_ENDPOINT`` names a running one), the project's own
``deploy/pipeline.yaml`` deployed into it, an SSH git host whose pushes become CodeCommit events
on LocalStack's EventBridge, the CodeCommit pull request stand-in beside it (its pull requests
follow the pushes; their events go through EventBridge too), and branchbuild consuming with the
``local`` build backend, whose build state events take the same road back (build outcomes,
superseded builds stopped, results on pull requests).
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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aioboto3
import aiohttp
import anyio
import anyio.abc
from prometheus_client.parser import text_string_to_metric_families

from service.events import RefChange, codecommit_event

from .codecommit import CodeCommitStandIn, create_pull_request, describe, view_pull_request
from .codecommit import git_resolver as resolver
from .githost import GitHost

if TYPE_CHECKING:
    from types_aiobotocore_cloudformation.type_defs import ParameterTypeDef

log = logging.getLogger("branchbuild.localdev")

ROOT = Path(__file__).resolve().parents[1]
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
    codecommit_port: int = 0

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
    """The LocalStack community runtime in host mode on 127.0.0.1 (docs/local-development.md)."""
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


async def event_bus(
    options: Options, stack: AsyncExitStack
) -> Callable[[dict[str, Any]], Awaitable[bool]]:
    """Put an event on LocalStack's default bus, as AWS puts its own; False if refused."""
    session = local_session(options)
    events = await stack.enter_async_context(
        session.client("events", endpoint_url=options.endpoint)
    )

    async def put(event: dict[str, Any]) -> bool:
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
            log.error(
                "EventBridge refused the %s event: %s", event["detail-type"], reply["Entries"]
            )
            return False
        return True

    return put


@asynccontextmanager
async def git_host(
    options: Options,
    keys: Keys,
    stack: AsyncExitStack,
    followers: list[Callable[[RefChange], Awaitable[None]]] | None = None,
) -> AsyncIterator[GitHost]:
    """The SSH git host; each pushed ref change goes to ``followers`` (the pull request
    stand-in) and becomes an event on LocalStack's EventBridge."""
    put = await event_bus(options, stack)

    async def publish(change: RefChange) -> None:
        for follower in followers or ():
            await follower(change)
        event = codecommit_event(change, account=ACCOUNT, region=options.region)
        if await put(event):
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


@asynccontextmanager
async def pull_requests(
    options: Options,
    host: GitHost,
    stack: AsyncExitStack,
    followers: list[Callable[[RefChange], Awaitable[None]]],
) -> AsyncIterator[CodeCommitStandIn]:
    """The CodeCommit stand-in: its pull requests follow the git host's pushes, and their
    events (``pullRequestCreated``, ``pullRequestSourceBranchUpdated``) go to EventBridge,
    where the deployed PullRequestRule takes them to the intake queue."""
    put = await event_bus(options, stack)

    async def publish(event: dict[str, Any]) -> None:
        if await put(event):
            detail = event["detail"]
            log.info("pull request %s: %s", detail["pullRequestId"], detail["event"])

    standin = CodeCommitStandIn(
        resolve=resolver(host),
        on_event=publish,
        account=ACCOUNT,
        region=options.region,
        port=options.codecommit_port,
    )
    async with standin:
        followers.append(standin.pushed)
        yield standin


# -- branchbuild ------------------------------------------------------------------------------


def service_env(
    options: Options, keys: Keys, outputs: dict[str, str], codecommit: str
) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", str(options.state)),
        **aws_env(options),
        "AWS_ENDPOINT_URL_CODECOMMIT": codecommit,
        "BRANCHBUILD_PULL_REQUEST_FEEDBACK": "comment+approval",
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


def instructions(options: Options, keys: Keys, codecommit: str) -> str:
    repo = options.repositories[0]
    env = f"BRANCHBUILD_LOCAL_BUILDS_DIR={options.state / 'builds'}"
    pr = f"{ROOT / '.venv/bin/python'} -m localdev.codecommit --endpoint {codecommit}"
    return f"""
branchbuild is running locally (Ctrl-C stops everything).

  LocalStack        {options.endpoint}
  git host (SSH)    ssh://git@127.0.0.1:{options.git_port}/v1/repos/{repo}
  pull requests     {codecommit}  (CodeCommit stand-in, AWS_ENDPOINT_URL_CODECOMMIT)
  branchbuild       http://127.0.0.1:{options.http_port}/metrics  (/healthz, /readyz)
  logs              {options.state / "logs"}/

Push your own commits from any git repository:

  export GIT_SSH_COMMAND="{keys.git_ssh_command()}"
  git remote add branchbuild ssh://git@127.0.0.1:{options.git_port}/v1/repos/{repo}
  git push branchbuild HEAD:feature/my-change

A buildspec.yml at the top of the repository is run by the local build backend
(this runs the repository's commands on this machine: development only). Check a buildspec
first, then see the builds (and --follow ID to stream a running one's log):

  PYTHONPATH={ROOT} {ROOT / ".venv/bin/python"} -m localdev buildspec check buildspec.yml
  PYTHONPATH={ROOT} {env} {ROOT / ".venv/bin/python"} -m localdev builds

A newer push to a branch stops its older push's running build (superseded). Open a pull
request (push its destination branch too): branchbuild comments on it for each commit,
edits the comment as the build ends, and approves it when the build succeeds:

  git push branchbuild HEAD:main
  {pr} create-pr --repository {repo} --source feature/my-change --destination main
  {pr} show 1
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
# As long as seconds.txt says: the first push's build is still running when the second's starts.
SLOW = """version: 0.2
phases:
  build:
    commands:
      - echo building $BRANCH_NAME at $COMMIT_ID for $(cat seconds.txt) s
      - sleep $(cat seconds.txt)
"""


async def demo(options: Options, keys: Keys, codecommit: str) -> bool:
    """Push four things, then a pull request's branch twice, wait for their outcomes, print a
    table and what branchbuild left on the pull request; True if all are as expected."""
    from localdev.builder import list_builds

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
    pr_rows, pr_ok, pr_text = await _demo_pull_request(options, codecommit, git, passing, work)
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
        *pr_rows,
    ]
    ok = [
        status(passing) == "SUCCEEDED",
        status(failing) == "FAILED",
        _delta(after, baseline, "protected") == 1,
        _delta(after, baseline, "deleted") == 1,
        *pr_ok,
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'what':<{width}}  {'expected':<26}  {'got':<28}  ok"]
    for (what, expected, got), good in zip(rows, ok, strict=True):
        lines.append(f"{what:<{width}}  {expected:<26}  {got:<28}  {'yes' if good else 'NO'}")
    sys.stdout.write("\n" + "\n".join(lines) + "\n\n" + pr_text + "\n")
    return all(ok)


async def _demo_pull_request(
    options: Options,
    codecommit: str,
    git: Callable[..., Awaitable[str]],
    base: str,
    work: Path,
) -> tuple[list[tuple[str, str, str]], list[bool], str]:
    """A pull request from feature/demo-pr into develop, its branch pushed twice while the
    first build still runs: that build is stopped (superseded), the second succeeds, and
    branchbuild leaves one comment per commit and its approval."""
    from localdev.builder import list_builds

    def build(commit: str) -> Any:
        found = [r for r in list_builds(options.state / "builds", 1000) if r.commit == commit]
        return found[0] if found else None

    await git("checkout", "--quiet", "-b", "feature/demo-pr", base)
    (work / "buildspec.yml").write_text(SLOW)
    (work / "seconds.txt").write_text("120\n")
    await git("add", "--all")
    await git("commit", "--quiet", "-m", "a slow build")
    first = await git("rev-parse", "HEAD")
    await git("push", "--quiet", "--force", "origin", "HEAD:feature/demo-pr")
    number = await create_pull_request(
        codecommit,
        options.region,
        repository=options.repositories[0],
        source="feature/demo-pr",
        destination="develop",
        title="demo: a change built twice",
    )

    async def view() -> Any:
        return await view_pull_request(codecommit, options.region, number)

    # Push again once the first build runs its commands and its comment is on the PR.
    with anyio.move_on_after(120):
        while True:
            record = build(first)
            running = record is not None and any(
                p.name == "BUILD" and p.status == "IN_PROGRESS" for p in record.phases
            )
            if running and any(c[0] == first for c in (await view()).comments):
                break
            await anyio.sleep(0.5)
    (work / "seconds.txt").write_text("2\n")
    await git("commit", "--quiet", "-am", "a quick build")
    second = await git("rev-parse", "HEAD")
    await git("push", "--quiet", "origin", "HEAD:feature/demo-pr")

    def comment(pr: Any, commit: str) -> str:
        return next((c[2] for c in pr.comments if c[0] == commit), "")

    with anyio.move_on_after(120):
        while True:
            pr = await view()
            if (
                "superseded" in comment(pr, first)
                and "succeeded" in comment(pr, second)
                and pr.approvals
            ):
                break
            await anyio.sleep(0.5)
    pr = await view()
    one, two = build(first), build(second)
    approvals = ", ".join(state for _, state in pr.approvals) or "none"
    per_commit = {c[0] for c in pr.comments}
    rows = [
        (
            f"PR {number}: push 1",
            "build STOPPED, superseded",
            f"build {one.status if one else 'none'}"
            + (", superseded" if "superseded" in comment(pr, first) else ""),
        ),
        ("PR: push 2", "build SUCCEEDED", f"build {two.status if two else 'none'}"),
        ("PR: comments", "one per commit (2)", f"{len(pr.comments)} on {len(per_commit)} commits"),
        ("PR: approval", "APPROVE", approvals),
    ]
    ok = [
        one is not None and one.status == "STOPPED" and "superseded" in comment(pr, first),
        two is not None and two.status == "SUCCEEDED",
        len(pr.comments) == 2 and per_commit == {first, second},
        [state for _, state in pr.approvals] == ["APPROVE"],
    ]
    return rows, ok, "What branchbuild left on the pull request:\n\n" + describe(pr)


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
        followers: list[Callable[[RefChange], Awaitable[None]]] = []
        host = await stack.enter_async_context(git_host(options, keys, stack, followers))
        log.info("git host on 127.0.0.1:%s", host.port)
        standin = await stack.enter_async_context(pull_requests(options, host, stack, followers))
        log.info("CodeCommit pull request stand-in at %s", standin.endpoint)
        command = [sys.executable, "-m", "localdev.service"]
        env = service_env(options, keys, outputs, standin.endpoint)
        proc = await stack.enter_async_context(_child(command, env, options, "branchbuild"))
        await wait_ready(options.http_port, proc, options)
        if options.demo:
            return 0 if await demo(options, keys, standin.endpoint) else 1
        sys.stdout.write(instructions(options, keys, standin.endpoint))
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
    parser.add_argument(
        "--codecommit-port",
        type=int,
        default=0,
        help="the CodeCommit pull request stand-in's port (default: a free one)",
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
        codecommit_port=args.codecommit_port,
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
