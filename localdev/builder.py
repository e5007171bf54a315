"""The ``local`` build backend, for development only: it RUNS REPOSITORY CODE ON THIS MACHINE.

LocalStack community does not emulate CodeBuild. This backend stands in for it: it downloads
the uploaded archive, unpacks it in a fresh temporary directory, reads ``buildspec.yml`` into a
plan (``buildspec.py``) and runs it as CodeBuild would: phases in order with their ``finally``
blocks, ``on-failure``, CodeBuild's phase transitions, one shell state for the whole build
(0.2), ``env`` variables with ``parameter-store`` and ``secrets-manager`` read from the AWS
endpoint the service uses (LocalStack under ``make run``), then artifacts, reports and the
cache. Every build keeps its log and a ``build.json`` record under
``BRANCHBUILD_LOCAL_BUILDS_DIR``; ``python -m localdev builds`` lists them.

Like CodeBuild, it reports each build's state as a ``CodeBuild Build State Change`` event on
the default EventBridge bus (``IN_PROGRESS`` when it starts, the final state when it ends),
where the pipeline's ``BuildStateRule`` routes it to the intake queue (service.build_state), and
it can stop a running build (:meth:`LocalBuilds.stop`, StopBuild's stand-in).
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any

import aioboto3
import anyio
import anyio.abc
from botocore.exceptions import BotoCoreError, ClientError

from service.aws import region
from service.builds import BuildRequest, StartedBuild
from service.errors import PermanentError

from .build_records import (
    BuildRecord,
    PhaseResult,
    append_log,
    save_record,
)
from .buildspec import PHASES, FileSet, Phase, Plan
from .outputs import collect, restore_cache, save_cache
from .secrets import read_secret
from .state_events import state_event
from .workspace import chown_tree, read_buildspec, safe_name, unpack

if TYPE_CHECKING:
    from types_aiobotocore_events import EventBridgeClient
    from types_aiobotocore_s3 import S3Client

log = logging.getLogger("branchbuild.local_builds")

MASK = "***"
LONGEST_LINE = 64 * 1024  # bytes of output kept waiting for a newline before being written


class LocalBuilds:
    """Runs builds in the background of ``task_group``; ``start`` returns at once (StartBuild).

    ``events``: an EventBridge client; when given, each build's state changes are put on the
    default bus as CodeBuild puts them (:func:`state_event`)."""

    def __init__(
        self,
        s3: S3Client,
        *,
        root: Path,
        timeout: float,
        task_group: anyio.abc.TaskGroup,
        events: EventBridgeClient | None = None,
    ) -> None:
        self.s3 = s3
        self.root = root
        self.timeout = timeout
        self.task_group = task_group
        self.events = events
        self.numbers = anyio.Lock()
        self.running: dict[str, _Build] = {}  # the builds of this process, by id
        root.mkdir(parents=True, exist_ok=True)

    async def stop(self, build_id: str) -> bool:
        """StopBuild: kill the running build's processes (their whole process group) and
        wait until it is recorded ``STOPPED`` (its state event put). False when this process
        runs no such build (it ended, or it never ran here)."""
        build = self.running.get(build_id)
        if build is None:
            return False
        build.stop_requested = True
        build.scope.cancel()
        await build.done.wait()
        return True

    async def publish(self, request: BuildRequest, record: BuildRecord) -> None:
        """Put the build's state event; a failure is logged, never fails the build."""
        if self.events is None:
            return
        event = state_event(request, record)
        try:
            reply = await self.events.put_events(
                Entries=[
                    {
                        "Time": datetime.now(UTC),
                        "Source": event["source"],
                        "DetailType": event["detail-type"],
                        "Resources": event["resources"],
                        "Detail": json.dumps(event["detail"]),
                    }
                ]
            )
        except (ClientError, BotoCoreError) as exc:
            log.warning("could not put the %s event of %s: %s", record.status, record.id, exc)
            return
        if reply.get("FailedEntryCount"):
            log.warning("EventBridge refused the event of %s: %s", record.id, reply["Entries"])

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
            number=await self._next_number(request.project),
        )
        await save_record(folder, record)
        await anyio.Path(record.log).touch()
        build = _Build(self, request, folder, record)
        self.running[build_id] = build
        self.task_group.start_soon(build.run, name=f"build {build_id}")
        return StartedBuild(build_id=build_id, project=request.project)

    async def _next_number(self, project: str) -> int:
        """CODEBUILD_BUILD_NUMBER: 1, 2, 3... per project, kept in the builds folder."""
        async with self.numbers:
            path = anyio.Path(self.root / ".numbers" / project)
            await path.parent.mkdir(parents=True, exist_ok=True)
            number = int(await path.read_text() or 0) + 1 if await path.exists() else 1
            await path.write_text(str(number))
            return number


class _Build:
    """One build's run: the state the phases share (variables, shell state, the log)."""

    def __init__(
        self, backend: LocalBuilds, request: BuildRequest, folder: Path, record: BuildRecord
    ) -> None:
        self.backend = backend
        self.request = request
        self.folder = folder
        self.record = record
        self.secrets: list[str] = []
        self.env: dict[str, str] = {}
        self.failed: str | None = None
        self.warnings: list[str] = []
        self.owner = (os.geteuid(), os.getegid())
        self.scope = anyio.CancelScope()  # cancelled by LocalBuilds.stop
        self.stop_requested = False
        self.done = anyio.Event()

    # -- the record and the log --

    async def _update(self, **changes: Any) -> None:
        self.record = replace(self.record, **changes)
        await save_record(self.folder, self.record)

    async def _phase(self, name: str, status: str, **extra: Any) -> None:
        phases = [p for p in self.record.phases if p.name != name]
        old = next((p for p in self.record.phases if p.name == name), None)
        now = datetime.now(UTC)
        if status == "IN_PROGRESS":
            result = PhaseResult(name, status, started_at=now.isoformat())
            self._phase_started = time.monotonic()
        elif old is not None and old.started_at:
            result = replace(
                old,
                status=status,
                duration=round(time.monotonic() - self._phase_started, 3),
                **extra,
            )
        else:
            result = PhaseResult(name, status, **extra)
        await self._update(
            phases=(*phases, result)
            if old is None
            else tuple(result if p.name == name else p for p in self.record.phases)
        )

    async def say(self, text: str) -> None:
        await append_log(Path(self.record.log), self.mask(f"[branchbuild] {text}\n"))

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text

    # -- the build --

    async def run(self) -> None:
        try:
            with self.scope:
                await self._run()
        finally:
            self.backend.running.pop(self.record.id, None)
            self.done.set()

    async def _run(self) -> None:
        started = time.monotonic()
        self.workdir = Path(
            await anyio.to_thread.run_sync(tempfile.mkdtemp, None, "branchbuild-build-")
        )
        status, message = "FAILED", None
        current = "DOWNLOAD_SOURCE"
        try:
            await self.backend.publish(self.request, self.record)
            with anyio.fail_after(self.backend.timeout):
                await self._phase(current, "IN_PROGRESS")
                plan = await self._prepare()
                await self._phase(current, "SUCCEEDED")
                reached_upload = True
                for phase in PHASES:
                    current = phase.upper()
                    reached_upload = await self._run_phase(plan, phase)
                    if not reached_upload:
                        break
                if reached_upload:
                    current = "UPLOAD_ARTIFACTS"
                    await self._phase(current, "IN_PROGRESS")
                    await self._outputs(plan)
                    await self._phase(current, "FAILED" if self.failed == current else "SUCCEEDED")
                status = "FAILED" if self.failed else "SUCCEEDED"
                message = f"phase {self.failed} failed" if self.failed else None
        except TimeoutError:
            status = "TIMED_OUT"
            message = f"exceeded BRANCHBUILD_LOCAL_BUILD_TIMEOUT={self.backend.timeout:g} s"
            await self._phase(current, "TIMED_OUT")
        except PermanentError as exc:
            status, message = "FAILED", str(exc)
            self.failed = self.failed or current
            await self._phase(current, "FAILED", message=str(exc))
        except anyio.get_cancelled_exc_class():
            status, message = "STOPPED", "the service stopped"
            if self.stop_requested:
                message = "stopped (StopBuild)"
            with anyio.CancelScope(shield=True):
                await self._phase(current, "STOPPED")
            raise
        except Exception as exc:  # keep the record honest whatever happened
            log.exception("local build %s failed to run", self.record.id)
            status, message = "FAILED", f"{type(exc).__name__}: {exc}"
        finally:
            with anyio.CancelScope(shield=True):
                await self._update(
                    status=status,
                    phase=self.failed or (current if status != "SUCCEEDED" else "UPLOAD_ARTIFACTS"),
                    message=self.mask(message) if message else None,
                    ended_at=datetime.now(UTC).isoformat(),
                    duration=round(time.monotonic() - started, 3),
                    warnings=tuple(self.warnings),
                )
                await self.say(f"{status}" + (f": {message}" if message else ""))
                await anyio.to_thread.run_sync(shutil.rmtree, self.workdir, True)
                await self.backend.publish(self.request, self.record)
                log.info(
                    "local build %s %s", self.record.id, status, extra={"build_id": self.record.id}
                )

    async def _prepare(self) -> Plan:
        """Download and unpack the source, read the buildspec, resolve the variables.

        Raises:
            BuildspecError: no buildspec, or one with errors.
            PermanentError: a parameter or secret cannot be read, a hostile archive.
        """
        request = self.request
        self.source = self.workdir / "src"
        self.home = self.workdir / "home"
        self.state = self.workdir / "shell"
        await self._download(self.workdir / "source.zip")
        await anyio.to_thread.run_sync(unpack, self.workdir / "source.zip", self.source)
        plan = await anyio.to_thread.run_sync(read_buildspec, self.source)
        for problem in plan.problems:
            self.warnings.append(str(problem))
            await self.say(f"buildspec.yml {problem}")
        for path in (self.home, self.state):
            await anyio.Path(path).mkdir()
        await anyio.Path(self.state / "cwd").write_text(str(self.source))
        record = self.record
        start_ms = int(datetime.fromisoformat(record.started_at).timestamp() * 1000)
        build_region = request.push.region
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            # The service's AWS endpoint and credentials, as CodeBuild gives a build its role.
            **{k: v for k, v in os.environ.items() if k.startswith("AWS_")},
            "AWS_REGION": build_region,
            "AWS_DEFAULT_REGION": build_region,
            "CODEBUILD_BUILD_ID": record.id,
            "CODEBUILD_BUILD_ARN": (
                f"arn:aws:codebuild:{build_region}:{request.push.account}:build/{record.id}"
            ),
            "CODEBUILD_BUILD_NUMBER": str(record.number or 1),
            "CODEBUILD_BUILD_SUCCEEDING": "1",
            "CODEBUILD_BUILD_IMAGE": "branchbuild-local",
            "CODEBUILD_INITIATOR": "branchbuild",
            "CODEBUILD_LOG_PATH": record.id.split(":", 1)[1],
            "CODEBUILD_SRC_DIR": str(self.source),
            "CODEBUILD_SOURCE_REPO_URL": record.source,
            "CODEBUILD_RESOLVED_SOURCE_VERSION": request.commit,
            "CODEBUILD_SOURCE_VERSION": record.source,
            "CODEBUILD_START_TIME": str(start_ms),
        }
        self.env |= await self._variables(plan)
        self.env |= request.environment  # like CodeBuild: the overrides win over the buildspec
        self.users = await self._run_as(plan)
        if plan.cache.paths and plan.cache.action != "save":
            restored = await anyio.to_thread.run_sync(
                restore_cache, self._cache_dir(plan), plan.cache.paths, self.source, self.home
            )
            await self.say(f"cache: restored {', '.join(restored) or 'nothing (empty)'}")
        return plan

    async def _download(self, target: Path) -> None:
        reply = await self.backend.s3.get_object(Bucket=self.request.bucket, Key=self.request.key)
        async with await anyio.open_file(target, "wb") as out:
            async for chunk in reply["Body"].iter_chunks(1024 * 1024):
                await out.write(chunk)

    async def _variables(self, plan: Plan) -> dict[str, str]:
        """``env.variables``, then the parameters and secrets, read from the AWS endpoint."""
        values: dict[str, str] = {}
        wanted = [v for v in plan.variables if v.source != "variables"]
        session = aioboto3.Session()
        for variable in plan.variables:
            if variable.source == "variables":
                values[variable.name] = variable.value
        if not wanted:
            return values
        async with (
            session.client("ssm", region_name=region()) as ssm,
            session.client("secretsmanager", region_name=region()) as secrets,
        ):
            for variable in wanted:
                where = f"env.{variable.source}.{variable.name} (line {variable.line})"
                try:
                    if variable.source == "parameter-store":
                        reply = await ssm.get_parameter(Name=variable.value, WithDecryption=True)
                        value = reply["Parameter"].get("Value", "")
                    else:
                        value = await read_secret(secrets, variable.value)
                except (ClientError, BotoCoreError) as exc:
                    raise PermanentError(
                        f"{where}: cannot read {variable.value!r}: {exc}"
                    ) from None
                values[variable.name] = value
                # The log is masked line by line: a multi-line secret is masked line by line.
                self.secrets += [line for line in {value, *value.splitlines()} if line.strip()]
        self.secrets.sort(key=len, reverse=True)  # mask the longest first
        return values

    async def _run_as(self, plan: Plan) -> dict[str, pwd.struct_passwd | None]:
        """The users ``run-as`` names that this process can become (root only)."""
        users: dict[str, pwd.struct_passwd | None] = {}
        names = {plan.run_as} | {p.run_as for p in plan.phases}
        for name in sorted(n for n in names if n):
            try:
                user = pwd.getpwnam(name)
            except KeyError:
                user = None
                why = f"there is no user {name!r} on this machine"
            else:
                why = "branchbuild does not run as root"
            if user is not None and os.geteuid() == 0:
                users[name] = user
                continue
            users[name] = None
            self.warnings.append(f"run-as {name}: ignored, {why}")
            await self.say(f"run-as {name}: ignored, {why}; commands run as this user")
        if any(users.values()):
            await anyio.Path(self.workdir).chmod(0o755)  # mkdtemp's 0700 would lock them out
        return users

    async def _own(self, user: pwd.struct_passwd | None) -> None:
        """Hand the source, home and shell state to the user the next commands run as, so
        that they can write their build as they would on CodeBuild (root only)."""
        uid, gid = (user.pw_uid, user.pw_gid) if user else (os.geteuid(), os.getegid())
        if (uid, gid) == self.owner:
            return
        for path in (self.source, self.home, self.state):
            await anyio.to_thread.run_sync(chown_tree, path, uid, gid)
        self.owner = (uid, gid)

    async def _run_phase(self, plan: Plan, name: str) -> bool:
        """Run one phase if CodeBuild would; False when the build goes straight to FINALIZING.

        CodeBuild's transitions: a failed INSTALL or PRE_BUILD ends the build, a failed BUILD
        goes on to POST_BUILD, a failed POST_BUILD to UPLOAD_ARTIFACTS; ``on-failure: ABORT``
        ends the build and ``CONTINUE`` goes on to the next phase.
        """
        phase = next((p for p in plan.phases if p.name == name), None)
        label = name.upper()
        if phase is None:
            return True
        await self._phase(label, "IN_PROGRESS")
        user = self._user(plan, phase)
        await self._own(user)
        ok = True
        for command in phase.commands:
            if not await self._command(plan, name, command.text, user):
                ok = False
                break
        if phase.finally_:
            await self.say(f"{name}: finally")
        for command in phase.finally_:
            ok = await self._command(plan, name, command.text, user) and ok
        await self._phase(label, "SUCCEEDED" if ok else "FAILED")
        if ok:
            return True
        self.failed = self.failed or label
        self.env["CODEBUILD_BUILD_SUCCEEDING"] = "0"
        await self._set_shell_variable("CODEBUILD_BUILD_SUCCEEDING", "0")
        if phase.on_failure == "CONTINUE":
            return True
        if phase.on_failure == "ABORT" or name in ("install", "pre_build"):
            await self.say(f"{name} failed: the build ends here (as on CodeBuild)")
            for later in PHASES[PHASES.index(name) + 1 :]:
                if any(p.name == later for p in plan.phases):
                    await self._phase(later.upper(), "SKIPPED")
            return False
        return True  # after BUILD, POST_BUILD; after POST_BUILD, UPLOAD_ARTIFACTS

    def _user(self, plan: Plan, phase: Phase) -> pwd.struct_passwd | None:
        name = phase.run_as or plan.run_as
        return self.users.get(name) if name else None

    async def _command(
        self, plan: Plan, phase: str, command: str, user: pwd.struct_passwd | None
    ) -> bool:
        await self.say(f"{phase}: {command}")
        script = self.state / "command"
        await anyio.Path(script).write_text(command + "\n")
        wrapper = _wrapper(plan.shell, self.state, one_shell=plan.one_shell)
        shell = "bash" if plan.shell == "bash" else "/bin/sh"
        code = await self._process([shell, "-c", wrapper], user)
        if code != 0:
            await self.say(f"{phase}: command failed: exit status {code}")
        return code == 0

    async def _process(self, argv: list[str], user: pwd.struct_passwd | None) -> int:
        # A buildspec command is shell by definition (as in CodeBuild); this is repository
        # code running on purpose, which is why this backend is for development only.
        env = dict(self.env)
        extra: dict[str, Any] = {}
        if user is not None:
            extra = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
            env |= {"USER": user.pw_name, "LOGNAME": user.pw_name}
        process = await anyio.open_process(
            argv,
            cwd=self.source,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a timeout kills its children too
            **extra,
        )
        try:
            assert process.stdout is not None
            pending = b""
            async with await anyio.open_file(self.record.log, "ab") as out:
                async for chunk in process.stdout:
                    pending += chunk
                    cut = pending.rfind(b"\n") + 1  # whole lines, so that masking sees them
                    if not cut and len(pending) > LONGEST_LINE:
                        cut = len(pending)
                    if cut:
                        await out.write(self._mask_bytes(pending[:cut]))
                        await out.flush()
                        pending = pending[cut:]
                if pending:
                    await out.write(self._mask_bytes(pending + b"\n"))
            return await process.wait()
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    try:
                        os.killpg(process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    await process.wait()

    def _mask_bytes(self, data: bytes) -> bytes:
        if not self.secrets:
            return data
        return self.mask(data.decode("utf-8", "replace")).encode()

    async def _set_shell_variable(self, name: str, value: str) -> None:
        """Change a variable in the saved shell state too (CODEBUILD_BUILD_SUCCEEDING)."""
        saved = anyio.Path(self.state / "env")
        if await saved.exists():
            text = await saved.read_text()
            await saved.write_text(text + f"export {name}={shlex.quote(value)}\n")

    async def _outputs(self, plan: Plan) -> None:
        """Exported variables, artifacts, reports and the cache, into the build's folder."""
        self.env["CODEBUILD_BUILD_SUCCEEDING"] = "0" if self.failed else "1"
        sets = plan.artifacts + plan.reports
        referenced = {n for s in sets for text in _texts(s) for n in VARIABLE.findall(text)}
        values = await self._final_values(plan, (*plan.exported, *sorted(referenced)))
        if plan.exported:
            exported = {n: values.get(n, "") for n in plan.exported}
            await self._update(exported=exported)
            await self.say("exported variables: " + ", ".join(exported))
        # Paths may name variables, as on CodeBuild: their values at the end of the build.
        plan = replace(
            plan,
            artifacts=tuple(_expand(s, self.env | values, self.source) for s in plan.artifacts),
            reports=tuple(_expand(s, self.env | values, self.source) for s in plan.reports),
        )
        await self._own(None)
        artifacts: dict[str, list[str]] = {}
        for artifact in plan.artifacts:
            target = self.folder / "artifacts" / _folder_name(artifact)
            files = await anyio.to_thread.run_sync(collect, artifact, self.source, target)
            key = artifact.id or "primary"
            artifacts[key] = files
            if not files:
                self.failed = self.failed or "UPLOAD_ARTIFACTS"
                await self.say(f"artifacts {key}: no file matches {list(artifact.files)}")
            else:
                await self.say(f"artifacts {key}: {len(files)} file(s) in {target}")
        reports: dict[str, list[str]] = {}
        for group in plan.reports:
            target = self.folder / "reports" / safe_name(group.id or "report")
            reports[group.id or "report"] = await anyio.to_thread.run_sync(
                collect, group, self.source, target
            )
            found = reports[group.id or "report"]
            missing = f"no file matches {list(group.files)} (a warning on CodeBuild)"
            await self.say(f"report {group.id}: " + (f"{len(found)} file(s)" if found else missing))
        await self._update(artifacts=artifacts, reports=reports)
        if plan.cache.paths and plan.cache.action != "restore":
            saved = await anyio.to_thread.run_sync(
                save_cache, self._cache_dir(plan), plan.cache.paths, self.source, self.home
            )
            await self.say(f"cache: saved {', '.join(saved.saved) or 'nothing'}")
            for problem in saved.problems:
                self.warnings.append(problem)
                await self.say(f"cache: {problem}")

    async def _final_values(self, plan: Plan, names: Sequence[str]) -> dict[str, str]:
        """The values of ``names`` in the build's shell at the end of the build."""
        if not names:
            return {}
        out = self.state / "exported"
        printf = " ".join(shlex.quote(f"{n}=") + f'"${{{n}-}}"' for n in names)
        command = f"printf '%s\\0' {printf} > {shlex.quote(str(out))}"
        await self._own(None)
        await anyio.Path(self.state / "command").write_text(command + "\n")
        wrapper = _wrapper(plan.shell, self.state, one_shell=plan.one_shell, save=False)
        shell = "bash" if plan.shell == "bash" else "/bin/sh"
        await self._process([shell, "-c", wrapper], None)
        values: dict[str, str] = {}
        if await anyio.Path(out).exists():
            for item in (await anyio.Path(out).read_bytes()).split(b"\0"):
                name, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep:
                    values[name] = value
        return values

    def _cache_dir(self, plan: Plan) -> Path:
        return (
            self.backend.root
            / ".cache"
            / safe_name(self.record.project)
            / safe_name(plan.cache.key or "default")
        )


def _wrapper(shell: str, state: Path, *, one_shell: bool, save: bool = True) -> str:
    """The script around one command: restore the build's shell state, run the command,
    save the state on the way out (``exit`` included): the working directory and every
    variable, exported or not. 0.1 starts afresh every command."""
    s = shlex.quote(str(state))
    lines = []
    if one_shell:
        lines += [f"[ -f {s}/env ] && . {s}/env", f'cd "$(cat {s}/cwd)" || exit 1']
        if save and shell == "bash":
            skip = (
                "BASH*|EUID|PPID|UID|GROUPS|FUNCNAME|RANDOM|SRANDOM|SECONDS|LINENO|"
                "EPOCHREALTIME|EPOCHSECONDS|HISTCMD|PIPESTATUS|DIRSTACK|SHELLOPTS|"
                "COMP_WORDBREAKS|OPTIND|OPTERR|SHLVL|_|__bb_*"
            )
            dump = (
                f"for __bb_n in $(compgen -v); do case $__bb_n in {skip}) continue;; esac; "
                'declare -p "$__bb_n"; done'
            )
        elif save:
            dump = "set; export -p"  # every variable, then which are exported
        if save:
            lines += [
                "__bb_save() { __bb_rc=$?; "
                f"{{ {dump}; }} > {s}/env.tmp 2>/dev/null && mv {s}/env.tmp {s}/env; "
                f'pwd > {s}/cwd; exit "$__bb_rc"; }}',
                "trap __bb_save EXIT",
            ]
    lines.append(f". {s}/command")
    return "\n".join(lines) + "\n"


VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


def _texts(files: FileSet) -> tuple[str, ...]:
    return (*files.files, *files.exclude_paths, files.base_directory, files.name)


def _expand(files: FileSet, env: Mapping[str, str], source: Path) -> FileSet:
    def expand(text: str) -> str:
        expanded = Template(text).safe_substitute(env)
        inside = expanded.removeprefix(f"{source}/")  # $CODEBUILD_SRC_DIR/dist
        return "." if expanded == str(source) else inside

    return replace(
        files,
        files=tuple(expand(f) for f in files.files),
        exclude_paths=tuple(expand(f) for f in files.exclude_paths),
        base_directory=expand(files.base_directory),
        name=expand(files.name),
    )


def _folder_name(artifact: FileSet) -> str:
    if artifact.id:
        return safe_name(artifact.id)
    return safe_name(artifact.name) if artifact.name else "primary"


__all__ = ["LocalBuilds"]
