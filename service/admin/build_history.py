"""``branchbuild builds --codebuild``: the recent CodeBuild builds of one or more projects."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING

from ..aws import translated
from ..ledger import Ledger
from ..records import Records
from .common import table

if TYPE_CHECKING:
    from types_aiobotocore_codebuild import CodeBuildClient
    from types_aiobotocore_codebuild.type_defs import BuildTypeDef
    from types_aiobotocore_s3 import S3Client

BATCH_GET = 100  # BatchGetBuilds' limit


@dataclass(frozen=True)
class CodeBuildRun:
    """One CodeBuild build, as much as the list needs of it."""

    id: str
    project: str
    status: str
    commit: str | None
    branch: str | None
    tag: str | None
    started_at: str | None
    ended_at: str | None
    duration: float | None
    logs: str | None
    archive: str | None = None  # BRANCHBUILD_ARCHIVE: names the build's ledger entry
    superseded_by: str | None = None  # from the ledger (issue 13), see with_outcomes


async def recent_builds(
    codebuild: CodeBuildClient, projects: Sequence[str], *, limit: int
) -> list[CodeBuildRun]:
    """The newest ``limit`` builds of the projects together, newest first.

    Raises:
        AccessDenied: a project does not exist or may not be read.
        TransientError: CodeBuild could not be reached.
    """
    ids: list[str] = []
    for project in projects:
        ids += await _build_ids(codebuild, project, limit)
    found: list[BuildTypeDef] = []
    for start in range(0, len(ids), BATCH_GET):
        with translated("read builds"):
            reply = await codebuild.batch_get_builds(ids=ids[start : start + BATCH_GET])
        found += reply.get("builds", [])
    runs = [to_run(build) for build in found]
    runs.sort(key=lambda r: r.started_at or "", reverse=True)
    return runs[:limit]


async def _build_ids(codebuild: CodeBuildClient, project: str, limit: int) -> list[str]:
    ids: list[str] = []
    pages = codebuild.get_paginator("list_builds_for_project").paginate(
        projectName=project, sortOrder="DESCENDING"
    )
    with translated(f"list the builds of project {project}"):
        async for page in pages:
            ids += page.get("ids", [])
            if len(ids) >= limit:
                break
    return ids[:limit]


def to_run(build: BuildTypeDef) -> CodeBuildRun:
    """The fields the list shows; the commit and branch come from the build's variables."""
    variables = {
        v.get("name", ""): v.get("value", "")
        for v in build.get("environment", {}).get("environmentVariables", [])
    }
    start, end = build.get("startTime"), build.get("endTime")
    return CodeBuildRun(
        id=build.get("id", "?"),
        project=build.get("projectName", "?"),
        status=build.get("buildStatus", "?"),
        commit=variables.get("COMMIT_ID"),
        branch=variables.get("BRANCH_NAME"),
        tag=variables.get("TAG_NAME"),
        started_at=_iso(start),
        ended_at=_iso(end),
        duration=(end - start).total_seconds() if start and end else None,
        logs=build.get("logs", {}).get("deepLink"),
        archive=variables.get("BRANCHBUILD_ARCHIVE"),
    )


async def with_outcomes(
    runs: Sequence[CodeBuildRun], s3: S3Client, bucket: str
) -> list[CodeBuildRun]:
    """The runs, with what branchbuild's ledger adds: which newer commit superseded a build.

    Raises:
        AccessDenied: the bucket may not be read.
        TransientError: S3 could not be reached.
    """
    ledger = Ledger(Records(s3, bucket))
    found: list[CodeBuildRun] = []
    for run in runs:
        entry = await ledger.read(run.archive) if run.archive else None
        if entry is not None and entry.build_id == run.id and entry.superseded_by:
            run = replace(run, superseded_by=entry.superseded_by)
        found.append(run)
    return found


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def render(runs: Sequence[CodeBuildRun]) -> str:
    if not runs:
        return "no builds\n"
    header = ("STARTED", "PROJECT", "BUILD", "STATUS", "BRANCH", "COMMIT", "DURATION", "LOGS")
    rows = [header]
    for r in runs:
        rows.append(
            (
                (r.started_at or "-")[:19],
                r.project,
                r.id.removeprefix(f"{r.project}:"),
                f"{r.status} (superseded by {r.superseded_by[:12]})"
                if r.superseded_by
                else r.status,
                r.branch or (f"tag {r.tag}" if r.tag else "-"),
                (r.commit or "-")[:12],
                f"{r.duration:.0f}s" if r.duration is not None else "-",
                r.logs or "-",
            )
        )
    return table(rows)


def _status(run: CodeBuildRun) -> str:
    if run.superseded_by:
        return f"{run.status} (superseded by {run.superseded_by[:12]})"
    return run.status


def to_json_lines(runs: Sequence[CodeBuildRun]) -> str:
    return "".join(json.dumps(asdict(r)) + "\n" for r in runs)
