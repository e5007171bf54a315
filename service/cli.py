"""The ``branchbuild`` command: ``run`` the service, ``healthcheck`` it, and admin commands.

Exit codes: 0 ok, 1 a check or an operation failed, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, NoReturn

import anyio

from .errors import BranchbuildError, ConfigurationError, MalformedEvent
from .settings import load_settings

if TYPE_CHECKING:
    from .admin.common import AwsClients
    from .app import App
    from .settings import Settings

EXIT_CODES = "exit codes: 0 ok, 1 a check or an operation failed, 2 bad configuration or usage"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (subcommand parsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Usage(Exception):
    """Raised by an admin command for a bad argument found after parsing (exit 2)."""


def _parser() -> _Parser:
    parser = _Parser(
        prog="branchbuild",
        description="Build every push to every branch with CodeBuild.",
        epilog=EXIT_CODES,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> _Parser:
        sub: _Parser = commands.add_parser(
            name, help=summary, description=summary, epilog=EXIT_CODES
        )
        return sub

    command("run", "run the service (consume the queues until SIGTERM)")
    health = command("healthcheck", "exit 0 if the local service is alive")
    health.add_argument(
        "--port", type=int, default=None, help="default: BRANCHBUILD_HTTP_PORT or 8080"
    )
    health.add_argument("--timeout", type=float, default=3.0)

    check = command("check", "preflight: queues, dead-letter queues, bucket, projects, git host")
    check.add_argument(
        "--repository",
        action="append",
        default=[],
        metavar="R",
        help="check the CodeBuild project and git access of this repository (repeatable)",
    )
    check.add_argument(
        "--branch", default="main", help="branch to render {branch} in the project template"
    )
    check.add_argument("--region", help="the repositories' region (default: AWS_REGION)")
    check.add_argument("--json", action="store_true", help="one JSON object")

    status = command(
        "status", "backlog of the queues and their DLQs, and pushes waiting for CodeBuild"
    )
    status.add_argument("--json", action="store_true", help="one JSON object")

    dlq = command("dlq", "inspect and redrive the dead-letter queues")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="COMMAND")
    listing_help = "the messages of a DLQ and why each failed (they stay in the DLQ)"
    listing = dlq_commands.add_parser(
        "list", help=listing_help, description=listing_help, epilog=EXIT_CODES
    )
    redrive_help = "move DLQ messages back to their source queue, then delete them from the DLQ"
    redrive = dlq_commands.add_parser(
        "redrive", help=redrive_help, description=redrive_help, epilog=EXIT_CODES
    )
    for sub in (listing, redrive):
        sub.add_argument(
            "--queue", choices=("work", "intake"), default="work", help="whose DLQ (default work)"
        )
    listing.add_argument("--limit", type=positive, default=50, help="at most N (default 50)")
    listing.add_argument("--json", action="store_true", help="one JSON object per message")
    which = redrive.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every message of the DLQ")
    which.add_argument(
        "--message-id", nargs="+", metavar="ID", help="only these messages (ids from dlq list)"
    )
    redrive.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    replay = command("replay", "put an EventBridge event file on the intake queue")
    replay.add_argument(
        "event", metavar="EVENT.json", help="a CodeCommit event as EventBridge sends it"
    )
    replay.add_argument("--queue", choices=("intake",), default="intake")
    replay.add_argument("--group", default="codecommit", help="MessageGroupId (default codecommit)")

    test = command(
        "send-test-event", "put a CodeCommit push event for a commit on the intake queue"
    )
    test.add_argument("--repository", required=True, metavar="R")
    test.add_argument("--branch", required=True, metavar="B", help="the branch (tag with --tag)")
    test.add_argument("--commit", required=True, metavar="C", help="40 hex characters")
    test.add_argument(
        "--account", help="default: the first BRANCHBUILD_ALLOWED_ACCOUNTS, else 123456789012"
    )
    test.add_argument("--region", help="default: AWS_REGION")
    test.add_argument("--tag", action="store_true", help="a tag push instead of a branch push")

    builds = command("builds", "the recent CodeBuild builds of one or more projects")
    builds.add_argument("--limit", type=positive, default=20, help="how many (default 20)")
    builds.add_argument("--json", action="store_true", help="one JSON object per line")
    builds.add_argument(
        "--codebuild", action="store_true", help="accepted for compatibility: always CodeBuild"
    )
    builds.add_argument(
        "--project", action="append", default=[], metavar="P", help="CodeBuild project (repeatable)"
    )
    builds.add_argument(
        "--bucket",
        metavar="B",
        help="the artifact bucket: stopped builds then show the newer commit that superseded them",
    )
    return parser


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1, with a one-line error otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    command: str = args.command
    if command == "run":
        return _run()
    if command == "healthcheck":
        return _healthcheck(args.port, args.timeout)
    if command == "builds":
        if not args.project:
            sys.stderr.write(
                "branchbuild builds: error: needs at least one --project P (the local build "
                "backend's builds: python -m localdev builds) (see branchbuild builds --help)\n"
            )
            return 2
        return _admin("builds", partial(_codebuild_builds, args))
    if command == "dlq":
        command = f"dlq {args.dlq_command}"
        work = _dlq_list if args.dlq_command == "list" else _dlq_redrive
        return _with_settings(command, partial(work, args))
    handlers = {
        "check": _check,
        "status": _status,
        "replay": _replay,
        "send-test-event": _send_test_event,
    }
    return _with_settings(command, partial(handlers[command], args))


# -- the service ------------------------------------------------------------------------------


def _run() -> int:
    from .app import App

    return serve(App)


def serve(make_app: Callable[[Settings], App]) -> int:
    """Run the service that ``make_app`` makes from the environment's settings until it stops.

    Returns the exit code: 2 for a configuration error, 1 when it cannot start.
    """
    from .logs import configure
    from .storage import return_freed_buffers_to_the_os

    try:
        settings = load_settings()
        configure(settings.log_level, settings.log_format)
        return_freed_buffers_to_the_os()
        anyio.run(make_app(settings).run)
    except ConfigurationError as exc:
        sys.stderr.write(f"branchbuild: configuration error: {exc}\n")
        return 2
    except BranchbuildError as exc:
        sys.stderr.write(f"branchbuild: cannot start: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _healthcheck(port: int | None, timeout: float) -> int:
    import os

    port = port or int(os.environ.get("BRANCHBUILD_HTTP_PORT", "8080"))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as reply:
            return 0 if reply.status == 200 else 1
    except OSError as exc:
        sys.stderr.write(f"branchbuild: unhealthy: {exc}\n")
        return 1


# -- admin commands ---------------------------------------------------------------------------

Work = Callable[["AwsClients"], Awaitable[int]]


def _with_settings(command: str, work: Callable[[Settings, AwsClients], Awaitable[int]]) -> int:
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        sys.stderr.write(f"branchbuild: configuration error: {exc}\n")
        return 2
    return _admin(command, partial(work, settings))


def _admin(command: str, work: Work) -> int:
    """Run an admin command's coroutine with its AWS clients; map failures to exit codes."""
    from botocore.exceptions import BotoCoreError

    from .admin.common import aws_clients

    # The commands report problems themselves; library warnings would only repeat them.
    logging.getLogger("branchbuild").addHandler(logging.NullHandler())

    async def body() -> int:
        async with aws_clients() as clients:
            return await work(clients)

    try:
        return anyio.run(body)
    except ConfigurationError as exc:
        sys.stderr.write(f"branchbuild: configuration error: {exc}\n")
        return 2
    except _Usage as exc:
        sys.stderr.write(f"branchbuild {command}: error: {exc}\n")
        return 2
    except BotoCoreError as exc:  # e.g. no region configured: before any call is made
        sys.stderr.write(f"branchbuild {command}: error: {exc}\n")
        return 2
    except BranchbuildError as exc:
        sys.stderr.write(f"branchbuild {command}: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130


def _region(given: str | None, what: str) -> str:
    from .admin.common import default_region

    region = given or default_region()
    if not region:
        raise _Usage(f"give --region or set AWS_REGION {what}")
    return region


def _valid(check: Callable[[str], str], value: str) -> str:
    try:
        return check(value)
    except MalformedEvent as exc:
        raise _Usage(str(exc)) from None


async def _check(args: argparse.Namespace, settings: Settings, clients: AwsClients) -> int:
    from .admin import check as admin_check
    from .events import check_repository

    repositories = tuple(_valid(check_repository, r) for r in args.repository)
    region = _region(args.region, "to probe the git host") if repositories else args.region
    target = admin_check.Target(repositories, args.branch, region)
    results = await admin_check.run_checks(settings, clients, target)
    render = admin_check.to_json if args.json else admin_check.render
    sys.stdout.write(render(results))
    return admin_check.exit_code(results)


async def _status(args: argparse.Namespace, settings: Settings, clients: AwsClients) -> int:
    import json
    from dataclasses import asdict

    from .admin.status import capacity_status, queue_status, render_capacity, render_status

    rows = await queue_status(settings, clients)
    waiting, running = await capacity_status(settings, clients)
    if args.json:
        document = {
            "queues": [asdict(r) for r in rows],
            "waiting": [asdict(w) for w in waiting],
            "running": running,
        }
        sys.stdout.write(json.dumps(document) + "\n")
    else:
        sys.stdout.write(render_status(rows) + render_capacity(waiting, running))
    return 0


async def _dlq_list(args: argparse.Namespace, settings: Settings, clients: AwsClients) -> int:
    from .admin import dlq

    sqs = await clients.sqs()
    queue = await dlq.resolve(settings, sqs, args.queue)
    listing = await dlq.list_dead_letters(sqs, queue, limit=args.limit)
    render = dlq.to_json_lines(listing) if args.json else dlq.render_listing(queue, listing)
    sys.stdout.write(render)
    return 0


async def _dlq_redrive(args: argparse.Namespace, settings: Settings, clients: AwsClients) -> int:
    from tqdm import tqdm

    from .admin import dlq

    if not args.yes and not sys.stdin.isatty():
        raise _Usage("refusing to move messages without confirmation: pass --yes")
    sqs = await clients.sqs()
    queue = await dlq.resolve(settings, sqs, args.queue)
    ids = frozenset(args.message_id) if args.message_id else None
    total = len(ids) if ids is not None else await dlq.approximate_count(sqs, queue.url)
    if total == 0:
        sys.stdout.write(f"the {queue.name} dead-letter queue is empty: nothing to move\n")
        return 0
    if not args.yes:
        what = f"{total} message(s)" if ids is not None else f"about {total} message(s)"
        prompt = f"move {what} from {queue.url} back to their source queue? [y/N] "
        answer = await anyio.to_thread.run_sync(input, prompt)
        if answer.strip().lower() not in {"y", "yes"}:
            sys.stdout.write("nothing moved\n")
            return 1
    with tqdm(
        total=total, unit="msg", desc="redrive", file=sys.stderr, disable=not sys.stderr.isatty()
    ) as bar:
        result = await dlq.redrive(sqs, queue, ids=ids, on_moved=lambda: bar.update())
    sys.stdout.write(
        f"moved {result.moved} message(s) from the {queue.name} dead-letter queue back to "
        f"their source queue; {len(result.failed)} failed, {len(result.not_found)} not found\n"
    )
    for message_id, why in result.failed:
        sys.stderr.write(f"branchbuild dlq redrive: {message_id}: {why}\n")
    for message_id in result.not_found:
        sys.stderr.write(f"branchbuild dlq redrive: {message_id}: not found in {queue.url}\n")
    return 1 if result.failed or result.not_found else 0


async def _replay(args: argparse.Namespace, settings: Settings, clients: AwsClients) -> int:
    from .admin.events import describe_event, event_body, put_event

    try:
        text = await anyio.Path(args.event).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise _Usage(f"cannot read {args.event}: {exc}") from None
    try:
        body, parsed = event_body(text)
    except MalformedEvent as exc:
        sys.stderr.write(f"branchbuild replay: refused {args.event}: {exc}\n")
        return 1
    message_id = await put_event(await clients.sqs(), settings.queue_url, body, group=args.group)
    sys.stdout.write(f"sent {describe_event(parsed)} to the intake queue as message {message_id}\n")
    return 0


async def _send_test_event(
    args: argparse.Namespace, settings: Settings, clients: AwsClients
) -> int:
    import json

    from .admin.events import build_test_event, describe_event, event_body, put_event

    if not re.fullmatch(r"[0-9a-f]{40}", args.commit):
        raise _Usage(f"--commit must be 40 lower-case hex characters, got {args.commit!r}")
    account = args.account or next(
        (a for a in settings.allowed_accounts if re.fullmatch(r"[0-9]{12}", a)), "123456789012"
    )
    region = _region(args.region, "for the event")
    try:
        event = build_test_event(
            args.repository, args.branch, args.commit, tag=args.tag, account=account, region=region
        )
    except MalformedEvent as exc:
        raise _Usage(str(exc)) from None
    body, parsed = event_body(json.dumps(event))
    message_id = await put_event(await clients.sqs(), settings.queue_url, body, group="codecommit")
    sys.stdout.write(f"sent {describe_event(parsed)} to the intake queue as message {message_id}\n")
    return 0


async def _codebuild_builds(args: argparse.Namespace, clients: AwsClients) -> int:
    from .admin import build_history as admin_builds

    runs = await admin_builds.recent_builds(
        await clients.codebuild(), args.project, limit=args.limit
    )
    if args.bucket:
        runs = await admin_builds.with_outcomes(runs, await clients.s3(), args.bucket)
    render = admin_builds.to_json_lines if args.json else admin_builds.render
    sys.stdout.write(render(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
