"""``python -m localdev builds``, ``builds --follow ID`` and ``buildspec check FILE``."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from .build_records import BuildRecord, find_build, list_builds
from .buildspec import FileSet, Plan, check

FOLLOW_POLL = 0.2  # seconds between looks at a running build's log


def _duration(seconds: float | None) -> str:
    return f"{seconds:.1f}s" if seconds is not None else "-"


def render_builds(records: Sequence[BuildRecord]) -> str:
    """The builds, newest first, each followed by its phases (status and duration)."""
    from service.admin.common import table as make_table

    rows = [("STARTED", "REPOSITORY", "BRANCH", "COMMIT", "STATUS", "DURATION", "LOG")]
    for r in records:
        rows.append(
            (
                r.started_at[:19],
                r.repository,
                r.branch,
                r.commit[:12],
                r.status,
                _duration(r.duration),
                r.log,
            )
        )
        for p in r.phases:
            note = f"  {p.message}" if p.message else ""
            rows.append(("", f"  {p.name}", "", "", p.status, _duration(p.duration), note.strip()))
    return make_table(rows)


def builds(root: Path, limit: int, as_json: bool) -> int:
    records = list_builds(root, limit)
    if as_json:
        sys.stdout.write("".join(json.dumps(asdict(r)) + "\n" for r in records))
        return 0
    if not records:
        sys.stdout.write(f"no builds in {root}\n")
        return 0
    sys.stdout.write(render_builds(records))
    return 0


def follow(root: Path, wanted: str, *, within: float | None = None) -> int:
    """Stream a build's log until the build ends; exit 0 if it SUCCEEDED, 1 otherwise."""
    record = find_build(root, wanted)
    if record is None:
        sys.stderr.write(f"localdev builds: no single build matches {wanted!r} in {root}\n")
        return 2
    folder = Path(record.log).parent
    position = 0
    deadline = time.monotonic() + within if within else None
    while True:
        current = _read(folder) or record
        position = _copy_new(Path(record.log), position)
        if current.status != "IN_PROGRESS":
            position = _copy_new(Path(record.log), position)
            sys.stdout.flush()
            return 0 if current.status == "SUCCEEDED" else 1
        if deadline is not None and time.monotonic() > deadline:
            return 1
        time.sleep(FOLLOW_POLL)


def _read(folder: Path) -> BuildRecord | None:
    try:
        return BuildRecord.from_json(json.loads((folder / "build.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _copy_new(log: Path, position: int) -> int:
    try:
        with log.open("rb") as f:
            f.seek(position)
            data = f.read()
    except FileNotFoundError:
        return position
    if data:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return position + len(data)


def check_file(path: Path) -> int:
    """``buildspec check``: the plan, or every problem with its line. 0 runs, 1 errors."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        sys.stderr.write(f"localdev buildspec check: cannot read {path}: {exc}\n")
        return 2
    plan, problems = check(text)
    for problem in problems:
        sys.stdout.write(f"{path}: {problem}\n")
    if plan is None:
        errors = sum(p.severity == "error" for p in problems)
        sys.stdout.write(f"{path}: {errors} error(s): it would not run\n")
        return 1
    sys.stdout.write(describe(plan))
    return 0


def describe(plan: Plan) -> str:
    """The plan in words: shell, variables and their sources, phases, outputs."""
    lines = [f"version {plan.version}, shell {plan.shell}"]
    lines.append(
        "one shell state for the whole build (working directory and variables carry over)"
        if plan.one_shell
        else "each command in its own shell (version 0.1)"
    )
    if plan.run_as:
        lines.append(f"run-as {plan.run_as}")
    if plan.variables:
        lines.append("variables:")
        for v in plan.variables:
            where = {
                "variables": f"= {v.value!r}",
                "parameter-store": f"from SSM parameter {v.value}",
                "secrets-manager": f"from Secrets Manager {v.value} (masked in the log)",
            }[v.source]
            lines.append(f"  {v.name} {where}  (line {v.line})")
    lines.append(
        "  plus COMMIT_ID, BRANCH_NAME or TAG_NAME, REPOSITORY_NAME (set by branchbuild) "
        "and the CODEBUILD_* variables"
    )
    if plan.exported:
        lines.append("exported variables: " + ", ".join(plan.exported))
    lines += _phases(plan)
    for artifact in plan.artifacts:
        lines.append(_outputs("artifacts " + (artifact.id or "(primary)"), artifact))
    for report in plan.reports:
        lines.append(_outputs(f"report {report.id}", report))
    if plan.cache.paths:
        lines.append("cache (kept between builds of the project): " + ", ".join(plan.cache.paths))
    if plan.batch:
        lines.append(f"batch {plan.batch}: ignored (single builds), the phases run once")
    return "\n".join(lines) + "\n"


def _phases(plan: Plan) -> list[str]:
    lines = ["phases:"]
    for phase in plan.phases:
        extras = []
        if phase.on_failure:
            extras.append(f"on-failure {phase.on_failure}")
        if phase.run_as:
            extras.append(f"run-as {phase.run_as}")
        lines.append(f"  {phase.name}" + (f" ({', '.join(extras)})" if extras else ""))
        for command in phase.commands:
            lines.append(f"    {command.line:>4}  {_one_line(command.text)}")
        if phase.finally_:
            lines.append("    finally:")
            for command in phase.finally_:
                lines.append(f"    {command.line:>4}  {_one_line(command.text)}")
    return lines


def _outputs(title: str, files: FileSet) -> str:
    details = [", ".join(files.files)]
    if files.base_directory:
        details.append(f"base-directory {files.base_directory}")
    if files.discard_paths:
        details.append("discard-paths")
    if files.exclude_paths:
        details.append("excluding " + ", ".join(files.exclude_paths))
    if files.name:
        details.append(f"name {files.name}")
    if files.file_format:
        details.append(files.file_format)
    return f"{title}: " + "; ".join(details)


def _one_line(text: str) -> str:
    text = text.rstrip("\n")
    return text.replace("\n", "\n          ") if "\n" in text else text
