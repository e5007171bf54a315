"""``python -m localdev``: the development commands (the local build backend's builds, buildspec
checks). The service with the local backend is ``python -m localdev.service``; the whole local
stack is ``python -m localdev.run`` (``make run``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from service.cli import positive
from service.errors import ConfigurationError
from service.settings import load_local_settings


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m localdev", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    builds = commands.add_parser(
        "builds", help="the local backend's recent builds (BRANCHBUILD_LOCAL_BUILDS_DIR)"
    )
    builds.add_argument("--limit", type=positive, default=20, help="how many (default 20)")
    builds.add_argument("--json", action="store_true", help="one JSON object per line")
    builds.add_argument(
        "--follow", metavar="ID", help="stream a build's log until it ends (exit 0 if it passed)"
    )
    buildspec = commands.add_parser("buildspec", help="buildspec tools for the local backend")
    buildspec_commands = buildspec.add_subparsers(
        dest="buildspec_command", required=True, metavar="COMMAND"
    )
    check = buildspec_commands.add_parser(
        "check",
        help="validate a buildspec without running it; print its plan or its problems",
        description="validate a buildspec without running it; print its plan or its problems",
        epilog="exit codes: 0 it would run locally, 1 it has errors, 2 it cannot be read",
    )
    check.add_argument("file", metavar="FILE", type=Path)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    from localdev import commands

    args = parser().parse_args(argv)
    if args.command == "buildspec":
        return commands.check_file(args.file)
    try:
        root = load_local_settings().builds_dir
    except ConfigurationError as exc:
        sys.stderr.write(f"localdev: configuration error: {exc}\n")
        return 2
    if args.follow:
        return commands.follow(root, args.follow)
    return commands.builds(root, args.limit, args.json)


if __name__ == "__main__":
    sys.exit(main())
