"""The local stack's components: the SSH git host, the CodeCommit stand-in, branchbuild's
environment, and EventBridge between them."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
import anyio.abc

from service.events import RefChange, codecommit_event

from .codecommit import CodeCommitStandIn
from .codecommit import git_resolver as resolver
from .githost import GitHost

if TYPE_CHECKING:
    pass

from .options import ACCOUNT, Keys, Options, aws_env, local_session

log = logging.getLogger("branchbuild.localdev")


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
        repositories=host.repository_path,
        account=ACCOUNT,
        region=options.region,
        port=options.codecommit_port,
    )
    async with standin:
        followers.append(standin.pushed)
        yield standin


# -- branchbuild ------------------------------------------------------------------------------


# Issue 25: the pull requests of the repositories named *-merge are built as merged too.
MERGE_REPOSITORY = "demo-merge"
PIPELINES = """version: 1
rules:
  - repository: "*-merge"
    branches: {protected: [main]}
    pull_requests: {merge_build: true, merge_strategy: THREE_WAY_MERGE}
"""


def service_env(
    options: Options, keys: Keys, outputs: dict[str, str], codecommit: str
) -> dict[str, str]:
    pipelines = options.state / "pipelines.yaml"
    pipelines.write_text(PIPELINES)
    return {
        "BRANCHBUILD_CONFIG": str(pipelines),
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
        # Status badges (docs/badges-and-retries.md): LocalStack serves the bucket's objects
        # to anyone, as deploy/badges.yaml's distribution does in AWS.
        "BRANCHBUILD_BADGES": "true",
        "BRANCHBUILD_BADGES_URL": f"{options.endpoint}/{outputs['BucketName']}/badges~",
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
