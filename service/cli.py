"""The ``branchbuild`` command: ``run`` the service, ``healthcheck`` it, and admin commands."""

from __future__ import annotations

import argparse
import sys
import urllib.request
from collections.abc import Sequence

import anyio

from .errors import BranchbuildError, ConfigurationError
from .settings import load_settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="branchbuild", description="Build every push to every branch with CodeBuild."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the service (consume the queues until SIGTERM)")
    check = commands.add_parser("healthcheck", help="exit 0 if the local service is alive")
    check.add_argument(
        "--port", type=int, default=None, help="default: BRANCHBUILD_HTTP_PORT or 8080"
    )
    check.add_argument("--timeout", type=float, default=3.0)
    builds = commands.add_parser(
        "builds", help="list recent builds of the local backend (BRANCHBUILD_LOCAL_BUILDS_DIR)"
    )
    builds.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    builds.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    if args.command == "healthcheck":
        return _healthcheck(args.port, args.timeout)
    if args.command == "builds":
        return _builds(args.limit, args.json)
    return _run()


def _run() -> int:
    from .app import App
    from .logs import configure

    try:
        settings = load_settings()
        configure(settings.log_level, settings.log_format)
        anyio.run(App(settings).run)
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


if __name__ == "__main__":
    raise SystemExit(main())


def _builds(limit: int, as_json: bool) -> int:
    import json
    from dataclasses import asdict

    from .local_builds import list_builds
    from .settings import load_local_settings

    try:
        root = load_local_settings().builds_dir
    except ConfigurationError as exc:
        sys.stderr.write(f"branchbuild: configuration error: {exc}\n")
        return 2
    records = list_builds(root, limit)
    if as_json:
        sys.stdout.write("".join(json.dumps(asdict(r)) + "\n" for r in records))
        return 0
    if not records:
        sys.stdout.write(f"no builds in {root}\n")
        return 0
    rows = [("STARTED", "REPOSITORY", "BRANCH", "COMMIT", "STATUS", "DURATION", "LOG")]
    for r in records:
        duration = f"{r.duration:.1f}s" if r.duration is not None else "-"
        rows.append(
            (r.started_at[:19], r.repository, r.branch, r.commit[:12], r.status, duration, r.log)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        sys.stdout.write("  ".join([*cells, row[-1]]) + "\n")
    return 0
