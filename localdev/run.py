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
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from service.events import RefChange

if TYPE_CHECKING:
    pass

from .components import (
    MERGE_REPOSITORY,
    git_host,
    make_keys,
    pull_requests,
    service_env,
    wait_ready,
)
from .demo import demo
from .deploy import deploy
from .notifications import create_inbox
from .options import ROOT, Keys, Options
from .processes import child, localstack

log = logging.getLogger("branchbuild.localdev")


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

The pull requests of the repositories named *-merge (e.g. {MERGE_REPOSITORY}) are also built
as merged (pipeline rule `pull_requests: {{merge_build: true}}`, docs/merge-builds.md): each
gets a merge build, rebuilt when either branch moves, and its own comment.
"""


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
        env |= await create_inbox(options)  # issue 25: notifications on an SNS topic
        proc = await stack.enter_async_context(child(command, env, options, "branchbuild"))
        await wait_ready(options.http_port, proc, options)
        if options.demo:
            badges = env["BRANCHBUILD_BADGES_URL"]
            return 0 if await demo(options, keys, standin.endpoint, badges) else 1
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
        "--repository",
        action="append",
        default=[],
        help=f"repositories to serve (default demo and {MERGE_REPOSITORY})",
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
        repositories=tuple(args.repository) or ("demo", MERGE_REPOSITORY),
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
