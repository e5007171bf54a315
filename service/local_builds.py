"""The ``local`` build backend, for development only: it RUNS REPOSITORY CODE ON THIS MACHINE.

LocalStack community does not emulate CodeBuild. This backend stands in for it: it downloads
the uploaded archive, unpacks it in a fresh temporary directory and runs the repository's
``buildspec.yml`` phases (install, pre_build, build, post_build) with ``env.variables`` and
the same variables CodeBuild would get, as subprocesses with a timeout. Every build keeps its
log and a ``build.json`` record under ``BRANCHBUILD_LOCAL_BUILDS_DIR``; ``branchbuild builds``
lists them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
import zipfile
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiofiles
import anyio
import anyio.abc
import yaml

from .builds import BuildRequest, StartedBuild
from .errors import PermanentError

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = logging.getLogger("branchbuild.local_builds")

PHASES = ("install", "pre_build", "build", "post_build")
RECORD = "build.json"


@dataclass(frozen=True)
class BuildRecord:
    """One local build, as stored in ``<builds dir>/<id>/build.json``."""

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


class LocalBuilds:
    """Runs builds in the background of ``task_group``; ``start`` returns at once (StartBuild)."""

    def __init__(
        self, s3: S3Client, *, root: Path, timeout: float, task_group: anyio.abc.TaskGroup
    ) -> None:
        self.s3 = s3
        self.root = root
        self.timeout = timeout
        self.task_group = task_group
        root.mkdir(parents=True, exist_ok=True)

    async def start(self, request: BuildRequest) -> StartedBuild:
        now = datetime.now(UTC)
        build_id = f"{request.project}:{uuid.uuid4()}"
        folder = self.root / f"{now:%Y%m%dT%H%M%S}-{build_id.split(':')[1][:8]}"
        await anyio.Path(folder).mkdir(parents=True)
        record = BuildRecord(
            id=build_id,
            project=request.project,
            repository=request.push.repository,
            ref=request.push.ref,
            branch=request.push.name,
            commit=request.commit,
            source=f"s3://{request.bucket}/{request.key}",
            status="IN_PROGRESS",
            started_at=now.isoformat(),
            log=str(folder / "build.log"),
        )
        await _save(folder, record)
        self.task_group.start_soon(self._run, request, folder, record, name=f"build {build_id}")
        return StartedBuild(build_id=build_id, project=request.project)

    async def _run(self, request: BuildRequest, folder: Path, record: BuildRecord) -> None:
        started = time.monotonic()
        workdir = Path(await anyio.to_thread.run_sync(tempfile.mkdtemp, None, "branchbuild-build-"))
        status, phase, message = "FAILED", None, None
        try:
            with anyio.fail_after(self.timeout):
                source = workdir / "src"
                await self._download(request, workdir / "source.zip")
                await anyio.to_thread.run_sync(unpack, workdir / "source.zip", source)
                spec = await anyio.to_thread.run_sync(read_buildspec, source)
                status, phase, message = await self._phases(request, record, spec, source)
        except TimeoutError:
            status, message = (
                "TIMED_OUT",
                f"exceeded BRANCHBUILD_LOCAL_BUILD_TIMEOUT={self.timeout:g} s",
            )
        except PermanentError as exc:
            status, message = "FAILED", str(exc)
        except anyio.get_cancelled_exc_class():
            status, message = "STOPPED", "the service stopped"
            raise
        except Exception as exc:  # keep the record honest whatever happened
            log.exception("local build %s failed to run", record.id)
            status, message = "FAILED", f"{type(exc).__name__}: {exc}"
        finally:
            with anyio.CancelScope(shield=True):
                done = replace(
                    record,
                    status=status,
                    phase=phase,
                    message=message,
                    ended_at=datetime.now(UTC).isoformat(),
                    duration=round(time.monotonic() - started, 3),
                )
                await _save(folder, done)
                await _append(
                    Path(record.log),
                    f"[branchbuild] {status}" + (f": {message}" if message else "") + "\n",
                )
                await anyio.to_thread.run_sync(shutil.rmtree, workdir, True)
                log.info("local build %s %s", record.id, status, extra={"build_id": record.id})

    async def _download(self, request: BuildRequest, target: Path) -> None:
        reply = await self.s3.get_object(Bucket=request.bucket, Key=request.key)
        async with aiofiles.open(target, "wb") as out:
            async for chunk in reply["Body"].iter_chunks(1024 * 1024):
                await out.write(chunk)

    async def _phases(
        self, request: BuildRequest, record: BuildRecord, spec: dict[str, Any], source: Path
    ) -> tuple[str, str | None, str | None]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(source.parent),
            "LANG": "C.UTF-8",
            "CODEBUILD_BUILD_ID": record.id,
            "CODEBUILD_SRC_DIR": str(source),
            "CODEBUILD_RESOLVED_SOURCE_VERSION": request.commit,
            "CODEBUILD_SOURCE_VERSION": record.source,
            "CODEBUILD_BUILD_SUCCEEDING": "1",
        }
        env |= {k: str(v) for k, v in (spec.get("env") or {}).get("variables", {}).items()}
        env |= request.environment  # like CodeBuild: the overrides win over the buildspec
        phases = spec.get("phases") or {}
        failed: str | None = None
        for phase in PHASES:
            if failed and phase != "post_build":
                continue  # CodeBuild skips to post_build after a failure
            commands = (phases.get(phase) or {}).get("commands") or []
            for command in commands:
                await _append(Path(record.log), f"[branchbuild] {phase}: {command}\n")
                code = await self._command(str(command), source, env, Path(record.log))
                if code != 0:
                    failed = failed or phase
                    env["CODEBUILD_BUILD_SUCCEEDING"] = "0"
                    await _append(
                        Path(record.log), f"[branchbuild] {phase} failed: exit status {code}\n"
                    )
                    break
        if failed:
            return "FAILED", failed, f"phase {failed} failed"
        return "SUCCEEDED", "post_build", None

    async def _command(self, command: str, cwd: Path, env: dict[str, str], log_path: Path) -> int:
        # A buildspec command is shell by definition (as in CodeBuild); this is repository
        # code running on purpose, which is why this backend is for development only.
        output = await anyio.to_thread.run_sync(lambda: log_path.open("ab"))
        try:
            result = await anyio.run_process(
                ["bash", "-e", "-o", "pipefail", "-c", command],
                cwd=cwd,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                check=False,
            )
        finally:
            output.close()
        return result.returncode


def unpack(archive: Path, target: Path) -> None:
    """Unpack a zip keeping symlinks as symlinks; refuse anything that would land outside.

    Raises:
        PermanentError: the archive has a path escaping ``target``.
    """
    target.mkdir(parents=True)
    root = target.resolve()
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            path = root / info.filename
            parent = path.parent.resolve()
            if parent != root and root not in parent.parents or ".." in Path(info.filename).parts:
                raise PermanentError(f"archive entry {info.filename!r} escapes the build directory")
            mode = info.external_attr >> 16
            if info.is_dir():
                path.mkdir(parents=True, exist_ok=True)
            elif stat.S_ISLNK(mode):
                path.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(z.read(info).decode(), path)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, path.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
                path.chmod((mode & 0o777) or 0o644)


def read_buildspec(source: Path) -> dict[str, Any]:
    """Read ``buildspec.yml`` (or ``.yaml``) at the top of the source.

    Raises:
        PermanentError: missing or not a buildspec.
    """
    for name in ("buildspec.yml", "buildspec.yaml"):
        path = source / name
        if path.is_file() and not path.is_symlink():
            try:
                spec = yaml.safe_load(path.read_text())
            except yaml.YAMLError as exc:
                raise PermanentError(f"{name} is not valid YAML: {exc}") from None
            if not isinstance(spec, dict) or not isinstance(spec.get("phases"), dict):
                raise PermanentError(f"{name} has no phases")
            return spec
    raise PermanentError("the repository has no buildspec.yml")


async def _save(folder: Path, record: BuildRecord) -> None:
    temporary = folder / (RECORD + ".tmp")
    async with aiofiles.open(temporary, "w") as out:
        await out.write(json.dumps(asdict(record), indent=2))
    await anyio.Path(temporary).replace(folder / RECORD)


async def _append(path: Path, text: str) -> None:
    async with aiofiles.open(path, "a") as out:
        await out.write(text)


def list_builds(root: Path, limit: int = 20) -> list[BuildRecord]:
    """The most recent local builds, newest first (for ``branchbuild builds``)."""
    records = []
    for path in root.glob(f"*/{RECORD}"):
        try:
            records.append(BuildRecord(**json.loads(path.read_text())))
        except (ValueError, TypeError):
            continue
    records.sort(key=lambda r: r.started_at, reverse=True)
    return records[:limit]
