"""A local SSH git host that serves bare repositories at CodeCommit's path layout.

Repository ``<name>`` is the bare repository ``<root>/v1/repos/<name>.git``, reached as
``ssh://git@HOST:PORT/v1/repos/<name>`` (any user name, public keys only). Only upload-pack and
receive-pack are served, by real ``git`` processes started without a shell. After a push,
``on_change`` is awaited for each branch or tag it created, moved or deleted *before* the exit
status is sent, so the callbacks have run when ``git push`` returns.
Run ``python -m localdev.githost --help`` to serve until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import signal
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import asyncssh
from anyio.abc import ByteReceiveStream, Process

from service.events import RefChange, codecommit_event

__all__ = ["GitHost", "RefChange", "codecommit_event", "main"]

logger = logging.getLogger("branchbuild.githost")

_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
_REPO_PATH = re.compile(r"/v1/repos/([A-Za-z0-9._-]{1,100})")
_GIT_PROTOCOL = re.compile(r"[A-Za-z0-9.:=_-]{1,100}")
_SERVICES = {"git-upload-pack": "upload-pack", "git-receive-pack": "receive-pack"}
_CHUNK = 65536


def _check_name(name: str) -> str:
    if _NAME.fullmatch(name) is None or name in {".", ".."}:
        raise ValueError(f"invalid repository name: {name!r}")
    return name


def _parse_command(command: str) -> tuple[str, str]:
    """Return (git service, repository name); raises ValueError for anything else."""
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise ValueError("malformed command") from exc
    if len(words) == 3 and words[0] == "git":
        words = [f"git-{words[1]}", words[2]]
    if len(words) != 2 or words[0] not in _SERVICES:
        raise ValueError("only git-upload-pack and git-receive-pack are served")
    match = _REPO_PATH.fullmatch(words[1])
    if match is None:
        raise ValueError(f"invalid repository path {words[1]!r}, expected /v1/repos/<name>")
    return _SERVICES[words[0]], _check_name(match[1])


def _load_or_create_host_key(path: Path, algorithm: str) -> asyncssh.SSHKey:
    try:
        key = asyncssh.read_private_key(path)
    except FileNotFoundError:
        pass
    else:
        if key.algorithm.decode() != algorithm:
            raise ValueError(f"host key {path} is {key.algorithm.decode()}, not {algorithm}")
        return key
    key = asyncssh.generate_private_key(algorithm, comment="branchbuild-githost")
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL: never overwrite a key another process has just written.
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
        file.write(key.export_private_key())
    logger.info("generated host key %s (%s)", path, key.get_fingerprint())
    return key


class _Connection(asyncssh.SSHServer):
    def __init__(self, host: GitHost) -> None:
        self._host = host
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._host._connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._host._connections.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        allowed = not self._host.refuse_all_keys and key.public_data in self._host._allowed_keys
        if not allowed:
            logger.warning("refused key %s for user %s", key.get_fingerprint(), username)
        return allowed


class GitHost:
    """SSH git server for local development and tests; see the module docstring."""

    def __init__(
        self,
        root: Path,
        *,
        host_key: Path,
        authorized_keys: Sequence[Path],
        host: str = "127.0.0.1",
        port: int = 0,
        on_change: Callable[[RefChange], Awaitable[None]] | None = None,
        ssh_rsa_only: bool = False,
    ) -> None:
        """``ssh_rsa_only``: behave like CodeCommit's SSH endpoints, which offer only an
        ``ssh-rsa`` host key and accept only ``ssh-rsa`` (SHA-1) signatures from user keys."""
        self.root = root.resolve()
        self.ssh_rsa_only = ssh_rsa_only
        self.host = host
        self.upload_pack_delay: float = 0.0
        # Speak only protocol v0 (ignore the client's GIT_PROTOCOL): like a host without
        # uploadpack.allowReachableSHA1InWant, it then serves only advertised commits by id.
        self.protocol_v0 = False
        self.refuse_all_keys = False
        self.drop_after_bytes: int | None = None
        self.upload_pack_count = 0
        # Tests: hold every upload-pack until the gate is set; upload_pack_waiting counts the
        # sessions held there right now (a deterministic way to see concurrent fetches).
        self.upload_pack_gate: anyio.Event | None = None
        self.upload_pack_waiting = 0
        # Per repository, likewise (checked after the global gate).
        self.repository_gates: dict[str, anyio.Event] = {}
        self._port = port
        self._authorized_key_files = list(authorized_keys)
        self._on_change = on_change
        self._host_key = _load_or_create_host_key(
            host_key, "ssh-rsa" if ssh_rsa_only else "ssh-ed25519"
        )
        self._allowed_keys: frozenset[bytes] = frozenset()
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._connections: set[asyncssh.SSHServerConnection] = set()
        self._sessions: set[asyncio.Task[Any]] = set()
        self._push_locks: dict[str, anyio.Lock] = {}

    @property
    def port(self) -> int:
        """The listening port; raises RuntimeError if port 0 was asked for and not started."""
        if self._port == 0:
            raise RuntimeError("GitHost is not started")
        return self._port

    async def start(self) -> None:
        """Listen for connections; raises OSError if the address is unavailable."""
        if self._acceptor is not None:
            raise RuntimeError("GitHost is already started")
        self._allowed_keys = await anyio.to_thread.run_sync(self._read_authorized_keys)
        [host_key] = asyncssh.load_keypairs([self._host_key])
        algorithms: dict[str, list[str]] = {}
        if self.ssh_rsa_only:
            # Offer the RSA key as ssh-rsa only (not rsa-sha2-*), and accept only ssh-rsa
            # signatures, as CodeCommit's endpoints are reported to do.
            host_key.host_key_algorithms = [b"ssh-rsa"]
            algorithms = {"signature_algs": ["ssh-rsa"]}
        self._acceptor = await asyncssh.listen(
            self.host,
            self._port,
            server_factory=lambda: _Connection(self),
            server_host_keys=[host_key],
            process_factory=self._session,
            encoding=None,
            config=None,
            gss_host=None,
            password_auth=False,
            kbdint_auth=False,
            host_based_auth=False,
            allow_pty=False,
            agent_forwarding=False,
            **algorithms,
        )
        self._port = self._acceptor.get_port()
        logger.info(
            "git host listening on %s:%d, repositories in %s",
            self.host,
            self._port,
            self.root / "v1" / "repos",
        )

    async def aclose(self) -> None:
        """Stop listening, close every connection and kill every git process."""
        acceptor, self._acceptor = self._acceptor, None
        if acceptor is None:
            return
        with anyio.CancelScope(shield=True):
            acceptor.close()
            connections, sessions = list(self._connections), list(self._sessions)
            for conn in connections:
                conn.close()
            for task in sessions:
                task.cancel()  # each session kills its git process as it unwinds
            await acceptor.wait_closed()
            if sessions:
                await asyncio.wait(sessions)
            for conn in connections:
                await conn.wait_closed()
        logger.info("git host on port %d stopped", self._port)

    async def __aenter__(self) -> GitHost:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def known_hosts_line(self) -> str:
        """The known_hosts line that pins this host's key, e.g. "[127.0.0.1]:2222 ssh-ed25519 …"."""
        algorithm, data = self._host_key.export_public_key("openssh").decode().split()[:2]
        host = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        return f"{host} {algorithm} {data}"

    def write_known_hosts(self, path: Path) -> None:
        path.write_text(self.known_hosts_line() + "\n")

    def repository_path(self, name: str) -> Path:
        """Where repository ``name`` lives; raises ValueError for an invalid name."""
        return self.root / "v1" / "repos" / f"{_check_name(name)}.git"

    def create_repository(self, name: str) -> Path:
        """Create bare repository ``name`` (HEAD -> main) unless it exists; return its path.

        Runs `git init` synchronously: this is a set-up helper, not for use inside sessions.
        Raises ValueError for an invalid name and CalledProcessError if git fails.
        """
        path = self.repository_path(name)
        if not (path / "HEAD").is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                ["git", "init", "--bare", "--quiet", "--initial-branch=main", str(path)],
                env=self._git_env(None),
                check=True,
                capture_output=True,
            )
        return path

    def _read_authorized_keys(self) -> frozenset[bytes]:
        keys = (asyncssh.read_public_key_list(path) for path in self._authorized_key_files)
        return frozenset(key.public_data for key_list in keys for key in key_list)

    def _git_env(self, protocol: str | None) -> dict[str, str]:
        # The host's own git configuration must not change what the repositories do.
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "HOME": str(self.root),
            "LC_ALL": "C",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
        }
        if protocol is not None and _GIT_PROTOCOL.fullmatch(protocol):
            env["GIT_PROTOCOL"] = protocol
        return env

    async def _session(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        status = 128
        try:
            status = await self._serve(process)
        except Exception as exc:  # one broken session must not affect the others
            logger.warning("git session failed: %r", exc)
        finally:
            self._sessions.discard(task)
            with contextlib.suppress(Exception):
                process.exit(status)

    async def _serve(self, process: asyncssh.SSHServerProcess[bytes]) -> int:
        command = process.command
        try:
            if command is None:
                raise ValueError("no shell here: only git-upload-pack/git-receive-pack")
            service, name = _parse_command(command)
        except ValueError as exc:
            logger.warning("refused request %r: %s", command, exc)
            process.stderr.write(f"fatal: {exc}\n".encode())
            return 128
        git_dir = self.repository_path(name)
        if not await anyio.Path(git_dir / "HEAD").is_file():
            logger.warning("refused %s: repository %s does not exist", service, name)
            process.stderr.write(f"fatal: repository '{name}' does not exist\n".encode())
            return 128
        env = self._git_env(None if self.protocol_v0 else process.env.get("GIT_PROTOCOL"))
        if service == "upload-pack":
            self.upload_pack_count += 1
            if self.upload_pack_delay > 0:
                await anyio.sleep(self.upload_pack_delay)
            for gate in (self.upload_pack_gate, self.repository_gates.get(name)):
                if gate is not None:
                    self.upload_pack_waiting += 1
                    try:
                        await gate.wait()
                    finally:
                        self.upload_pack_waiting -= 1
            return await self._run_git(process, service, git_dir, env, self.drop_after_bytes)
        # One push per repository at a time, so that the before/after snapshots belong to it.
        async with self._push_locks.setdefault(name, anyio.Lock()):
            before = await self._refs(git_dir)
            status = await self._run_git(process, service, git_dir, env, None)
            after = await self._refs(git_dir)
        for ref in sorted(before.keys() | after.keys()):
            if before.get(ref) == after.get(ref):
                continue
            change = RefChange(name, ref, before.get(ref), after.get(ref))
            logger.info("%s %s: %s -> %s", name, ref, change.old, change.new)
            try:
                if self._on_change is not None:
                    await self._on_change(change)
            except Exception:
                logger.exception("on_change failed for %s", change)
        return status

    async def _run_git(
        self,
        process: asyncssh.SSHServerProcess[bytes],
        service: str,
        git_dir: Path,
        env: dict[str, str],
        drop_after: int | None,
    ) -> int:
        logger.info("running git %s %s", service, git_dir)
        proc = await anyio.open_process(["git", service, str(git_dir)], env=env)
        try:
            assert proc.stdout is not None and proc.stderr is not None
            sent = [0]  # bytes of git's output sent to the client (logged: the bench reads it)
            async with anyio.create_task_group() as session:
                session.start_soon(self._pump_stdin, process, proc)
                async with anyio.create_task_group() as output:
                    output.start_soon(
                        self._pump_out, proc.stdout, process.stdout, proc, drop_after, sent
                    )
                    output.start_soon(self._pump_out, proc.stderr, process.stderr, proc, None, None)
                status = await proc.wait()
                session.cancel_scope.cancel()  # the client may keep its side open
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.aclose()
        logger.info("git %s %s exited with %d, %d bytes sent", service, git_dir, status, sent[0])
        return status if status >= 0 else 128  # killed by a signal

    @staticmethod
    async def _pump_stdin(process: asyncssh.SSHServerProcess[bytes], proc: Process) -> None:
        assert proc.stdin is not None
        try:
            while chunk := await process.stdin.read(_CHUNK):
                await proc.stdin.send(chunk)
            await proc.stdin.aclose()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # git stopped reading; its exit status tells the client why

    @staticmethod
    async def _pump_out(
        source: ByteReceiveStream,
        sink: asyncssh.SSHWriter[bytes],
        proc: Process,
        limit: int | None,
        total: list[int] | None,
    ) -> None:
        sent = 0
        async for chunk in source:
            if limit is not None and sent + len(chunk) > limit:
                sink.write(chunk[: limit - sent])
                await sink.drain()
                logger.warning("drop_after_bytes: aborting the channel after %d bytes", limit)
                sink.channel.abort()
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                return
            sink.write(chunk)
            await sink.drain()
            sent += len(chunk)
            if total is not None:
                total[0] += len(chunk)

    async def _refs(self, git_dir: Path) -> dict[str, str]:
        """Branches and tags of ``git_dir``, annotated tags peeled to their commit."""
        result = await anyio.run_process(
            [
                "git",
                "--git-dir",
                str(git_dir),
                "for-each-ref",
                "--format=%(refname) %(objectname) %(*objectname)",
                "refs/heads",
                "refs/tags",
            ],
            env=self._git_env(None),
        )
        refs: dict[str, str] = {}
        for line in result.stdout.decode().splitlines():
            ref, obj, peeled = line.split(" ")
            refs[ref] = peeled or obj
        return refs


async def _serve_until_signalled(args: argparse.Namespace) -> None:
    async def log_event(change: RefChange) -> None:
        logger.info("event %s", json.dumps(codecommit_event(change)))

    host = GitHost(
        args.root,
        host_key=args.host_key,
        authorized_keys=args.authorized_key,
        host=args.host,
        port=args.port,
        on_change=log_event,
        ssh_rsa_only=args.ssh_rsa_only,
    )
    host.protocol_v0 = args.protocol_v0
    for name in args.repository:
        host.create_repository(name)
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with host:
            if args.known_hosts is not None:
                host.write_known_hosts(args.known_hosts)
            logger.info(
                "clone with: git clone ssh://git@%s:%d/v1/repos/<name>", host.host, host.port
            )
            async for signum in signals:
                logger.info("received %s, stopping", signal.Signals(signum).name)
                break


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the repositories under --root until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m localdev.githost",
        description="Local SSH git host with CodeCommit paths.",
    )
    parser.add_argument("--root", type=Path, required=True, help="holds v1/repos/<name>.git")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--host-key", type=Path, required=True, help="created if missing")
    parser.add_argument(
        "--authorized-key",
        type=Path,
        action="append",
        required=True,
        help="OpenSSH public key file allowed to log in (repeatable)",
    )
    parser.add_argument("--known-hosts", type=Path, help="write the pinned host key line here")
    parser.add_argument(
        "--ssh-rsa-only",
        action="store_true",
        help="offer only an ssh-rsa host key and accept only ssh-rsa signatures, as CodeCommit",
    )
    parser.add_argument(
        "--repository",
        action="append",
        default=[],
        help="create this repository if missing (repeatable)",
    )
    parser.add_argument(
        "--protocol-v0",
        action="store_true",
        help="serve protocol v0 only: commits that no branch or tag points at can't be "
        "fetched by id (like a host without uploadpack.allowReachableSHA1InWant)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    anyio.run(_serve_until_signalled, args)


if __name__ == "__main__":
    main()
