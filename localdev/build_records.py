"""The local backend's build records: ``<builds dir>/<folder>/build.json`` and the log beside it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import anyio

RECORD = "build.json"


@dataclass(frozen=True)
class PhaseResult:
    """One phase of a build as ``python -m localdev builds`` shows it (CodeBuild's phase names)."""

    name: str
    status: str  # IN_PROGRESS, SUCCEEDED, FAILED, SKIPPED, TIMED_OUT, STOPPED
    started_at: str | None = None
    duration: float | None = None
    message: str | None = None


@dataclass(frozen=True)
class BuildRecord:
    """One local build, as stored in ``<builds dir>/<folder>/build.json``."""

    id: str
    project: str
    repository: str
    ref: str
    branch: str
    commit: str
    source: str
    status: str  # IN_PROGRESS, SUCCEEDED, FAILED, TIMED_OUT, STOPPED
    started_at: str
    log: str
    ended_at: str | None = None
    duration: float | None = None
    phase: str | None = None
    message: str | None = None
    number: int | None = None
    phases: tuple[PhaseResult, ...] = ()
    exported: Mapping[str, str] = field(default_factory=dict)
    artifacts: Mapping[str, list[str]] = field(default_factory=dict)
    reports: Mapping[str, list[str]] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BuildRecord:
        """Raises TypeError or ValueError when ``data`` is no build record."""
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["phases"] = tuple(PhaseResult(**p) for p in data.get("phases") or ())
        data["warnings"] = tuple(data.get("warnings") or ())
        return cls(**data)


async def save_record(folder: Path, record: BuildRecord) -> None:
    temporary = folder / (RECORD + ".tmp")
    async with await anyio.open_file(temporary, "w") as out:
        await out.write(json.dumps(asdict(record), indent=2))
    await anyio.Path(temporary).replace(folder / RECORD)


async def append_log(path: Path, text: str) -> None:
    async with await anyio.open_file(path, "a") as out:
        await out.write(text)


def list_builds(root: Path, limit: int = 20) -> list[BuildRecord]:
    """The most recent local builds, newest first (for ``python -m localdev builds``)."""
    records = []
    for path in root.glob(f"*/{RECORD}"):
        try:
            records.append(BuildRecord.from_json(json.loads(path.read_text())))
        except (ValueError, TypeError, OSError):
            continue
    records.sort(key=lambda r: r.started_at, reverse=True)
    return records[:limit]


def find_build(root: Path, wanted: str) -> BuildRecord | None:
    """A build by its id, the id without the project, or a unique prefix of either."""
    matches = [
        r
        for r in list_builds(root, limit=10**6)
        if r.id == wanted or r.id.split(":", 1)[-1].startswith(wanted) or r.id.startswith(wanted)
    ]
    exact = [r for r in matches if r.id == wanted]
    return (exact or matches)[0] if len(exact or matches) == 1 else None
