"""Fetch the exact pushed commit over SSH into a per-repository bare cache, and archive it.

* git runs as async subprocesses with an argument list and a clean environment: no shell, no
  AWS credentials, no user or system git config. Names from events reach git only after
  :mod:`service.events` validated them, and only inside a URL or a hashed ref.
* SSH is OpenSSH with a generated config: our key only, strict host key checking against the
  pinned known_hosts, batch mode. git starts it through a two-line exec wrapper (``GIT_SSH``)
  whose only variable part is ``"$@"``, git's own argument list passed on verbatim: nothing
  from an event is ever parsed by a shell.
* Each repository has one shallow bare repository on disk. A push needs one tree, never
  history: every fetch is ``git fetch --depth 1`` of the pushed commit by id, so a fresh
  instance fetches one tree however long the history, and a warm one only the objects the
  commits it already has lack (the shallow fetch sends the cached commits as haves). A host
  that refuses commits by id (protocol v0 without ``uploadpack.allowReachableSHA1InWant``)
  gets a depth-1 fetch of the pushed branch, deepened in doubling steps until the commit is
  there: only as deep as the pushed commit, never every branch's history.
* Fetches of one repository are serialised by a lock; different repositories fetch in
  parallel. Jobs that wait for the same repository's lock are served together: the holder
  fetches every commit wanted at that moment in one ``git fetch``, one SSH connection, one pack.
* The archive is what a checkout leaves (docs/build-contents.md): the tree's ``export-ignore``
  and ``export-subst`` are overridden, no filter driver is ever configured, line endings are
  converted as a default Linux checkout converts them. Opt-in extras (:class:`Extras`):
  submodules (:mod:`service.submodules`) and a shallow ``.git``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shlex
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import ByteReceiveStream

from . import submodules
from .cache import RepoCache
from .errors import (
    ArchiveTooLarge,
    CommitNotFound,
    ConfigurationError,
    DiskFull,
    GitAccessDenied,
    GitError,
    HostKeyMismatch,
    SubmoduleError,
    unwrap_group,
)
from .events import Push, check_repository
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("branchbuild.git")

_HOST_KEY = ("host key verification failed", "remote host identification has changed")
_ACCESS = (
    "permission denied",
    "does not appear to be a git repository",
    "repository not found",
    "does not exist",
    "not authorized",
)
_NOT_OUR_REF = (
    "not our ref",
    "couldn't find remote ref",
    "unadvertised object",
    "no such remote ref",
    "remote error: upload-pack: not our ref",
)


@dataclass(frozen=True)
class Fetched:
    """A commit present in the local cache."""

    git_dir: Path
    commit: str
    cache_hit: bool
    url: str = ""  # where it was fetched from: submodules' relative URLs resolve against it


@dataclass(frozen=True)
class Extras:
    """What a rule adds to the checkout of the pushed commit (docs/build-contents.md)."""

    # The pushed ref (refs/heads/<b> or refs/tags/<t>): add a shallow .git with it checked out.
    git_metadata_ref: str | None = None
    submodules: bool = False


NO_EXTRAS = Extras()


@dataclass(frozen=True)
class Remote:
    """A repository to fetch from: its URL, its cache, the branch to deepen if the host
    refuses commits by id, and its name for messages."""

    url: str
    git_dir: Path
    branch: str
    name: str


class Git:
    """The git cache and the SSH transport; one per service."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.root = settings.cache_dir
        self.repos = self.root / "repos"
        # Per repository in use: its lock, the commits jobs are waiting for (commit -> the ref
        # to keep it under), and how many fetches use them: removed with the last one, so the
        # maps hold only the repositories being fetched, however many were ever pushed.
        self._locks: dict[Path, anyio.Lock] = {}
        self._wanted: dict[Path, dict[str, str]] = {}
        self._users: dict[Path, int] = {}
        self._env = self._prepare()

        def report(size: int, evicted: int) -> None:
            if metrics is not None:
                metrics.cache_bytes.set(size)
                metrics.cache_evictions.inc(evicted)

        self.cache = RepoCache(self.repos, max_bytes=settings.cache_max_bytes, on_change=report)

    # -- set-up -----------------------------------------------------------------------------

    def _prepare(self) -> dict[str, str]:
        """Write the SSH config and wrapper; fail with the variable's name if something is off."""
        s = self.settings
        self.repos.mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.root),
            "LC_ALL": "C",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_ASKPASS": "/bin/false",
            "SSH_ASKPASS": "/bin/false",
        }
        if not s.git_url_template.startswith("ssh://"):
            return env
        ssh = shutil.which("ssh")
        if ssh is None:
            raise ConfigurationError("the OpenSSH client 'ssh' is not installed")
        private = self.root / "ssh"
        private.mkdir(mode=0o700, exist_ok=True)
        key = s.ssh_key_file
        if s.ssh_private_key is not None:
            key = private / "id"
            key.touch(mode=0o600, exist_ok=True)
            material = s.ssh_private_key.get_secret_value().strip() + "\n"
            key.write_text(material)
        if key is None or not key.is_file():
            raise ConfigurationError(
                "BRANCHBUILD_SSH_KEY_FILE (or BRANCHBUILD_SSH_PRIVATE_KEY) must name a readable "
                f"private key for {s.git_url_template.split('@')[-1]}"
            )
        known = s.known_hosts_file
        if s.known_hosts is not None:
            known = private / "known_hosts"
            known.write_text(s.known_hosts.strip() + "\n")
        if known is None or not known.is_file():
            raise ConfigurationError(
                "BRANCHBUILD_KNOWN_HOSTS_FILE must name a known_hosts file with the git host's "
                "key (or BRANCHBUILD_KNOWN_HOSTS hold its lines)"
            )
        config = private / "config"
        legacy = ""
        if s.ssh_legacy_rsa_hosts:
            # Appended (+) to OpenSSH's defaults, for these hosts only: rsa-sha2 and ed25519
            # stay preferred wherever the host offers them. Pinning is unchanged.
            # PubkeyAcceptedKeyTypes, not its 8.5 rename PubkeyAcceptedAlgorithms: every
            # OpenSSH since 7.0 reads the old name (later ones as an alias); older ones stop
            # at the new name with "Bad configuration option".
            legacy = (
                f"Host {' '.join(s.ssh_legacy_rsa_hosts)}\n"
                "  HostKeyAlgorithms +ssh-rsa\n"
                "  PubkeyAcceptedKeyTypes +ssh-rsa\n\n"
            )
        config.write_text(
            legacy + "Host *\n"
            f"  IdentityFile {_ssh_quote(key)}\n"
            "  IdentitiesOnly yes\n"
            "  IdentityAgent none\n"
            f"  UserKnownHostsFile {_ssh_quote(known)}\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n"
            "  CheckHostIP no\n"
            "  BatchMode yes\n"
            "  PasswordAuthentication no\n"
            "  KbdInteractiveAuthentication no\n"
            f"  ConnectTimeout {s.ssh_connect_timeout}\n"
            "  ServerAliveInterval 15\n"
            "  ServerAliveCountMax 3\n"
            "  LogLevel INFO\n"  # ERROR hides why a key exchange failed
        )
        wrapper = private / "git-ssh"
        # POSIX sh only to exec ssh (a Python wrapper cost 14 ms of CPU per fetch); the paths
        # are quoted and git's arguments pass through "$@" untouched.
        wrapper.write_text(
            f'#!/bin/sh\nexec {shlex.quote(ssh)} -F {shlex.quote(str(config))} "$@"\n'
        )
        wrapper.chmod(0o700)
        env.update(GIT_SSH=str(wrapper), GIT_SSH_VARIANT="ssh")
        return env

    def url(self, push: Push) -> str:
        return self.url_for(push.repository, push.region)

    def url_for(self, repository: str, region: str) -> str:
        return self.settings.git_url_template.format(
            repository=repository, region=region, ssh_key_id=self.settings.ssh_key_id
        )

    async def probe(self, repository: str, region: str) -> int:
        """Connect to the git host with the configured key and known_hosts, and count the
        repository's branches (for ``branchbuild check``).

        Raises:
            HostKeyMismatch, GitAccessDenied: permanent.
            GitError: the host cannot be reached.
        """
        url = self.url_for(check_repository(repository), region)
        listing = await self._git(None, "ls-remote", "--heads", "--end-of-options", url)
        return len(listing.splitlines())

    def git_dir(self, push: Push) -> Path:
        return self.cache_dir_for(push.repository, self.url(push))

    def cache_dir_for(self, name: str, url: str) -> Path:
        """The bare cache of the repository at ``url`` (``name``: a readable prefix)."""
        digest = hashlib.sha256(url.encode()).hexdigest()[:12]
        return self.repos / f"{name}-{digest}.git"

    def _remote(self, push: Push) -> Remote:
        return Remote(self.url(push), self.git_dir(push), push.ref, push.repository)

    # -- fetch ------------------------------------------------------------------------------

    @asynccontextmanager
    async def fetched(self, push: Push) -> AsyncIterator[Fetched]:
        """Fetch ``push.commit`` and keep its repository in use (never evicted) until exit.

        Raises: as :meth:`fetch`.
        """
        assert push.commit is not None
        async with self.fetched_from(self._remote(push), push.commit, push.ref) as fetched:
            yield fetched

    @asynccontextmanager
    async def fetched_from(
        self, remote: Remote, commit: str, ref_name: str
    ) -> AsyncIterator[Fetched]:
        """Fetch ``commit`` of ``remote`` (kept under a ref named for ``ref_name``) and keep
        its cache in use until exit.

        Raises: as :meth:`fetch`.
        """
        async with self.cache.use(remote.git_dir):
            try:
                fetched = await self._fetch_commit(remote, commit, _cache_ref(ref_name))
            except DiskFull:
                await self.cache.enforce(target=0)  # evict every idle repository
                raise
            if not fetched.cache_hit:
                await self.cache.enforce(changed=remote.git_dir)
            yield fetched

    async def fetch(self, push: Push) -> Fetched:
        """Make ``push.commit`` present in the cache, fetching only what is missing.

        ``cache_hit`` is true when no fetch was needed: the commit was there already, or an
        earlier job's fetch brought it along with its own.

        Raises:
            HostKeyMismatch, GitAccessDenied, CommitNotFound: permanent.
            GitError: transient (network, SSH drop, timeout).
        """
        assert push.commit is not None
        return await self._fetch_commit(self._remote(push), push.commit, _cache_ref(push.ref))

    async def changed_paths(self, push: Push, base: str) -> list[str]:
        """The paths that differ between commit ``base`` and ``push.commit``. Both commits are
        fetched at depth 1 (two trees, never the history between them).

        Raises: as :meth:`fetch` (for either commit).
        """
        assert push.commit is not None
        remote = self._remote(push)
        async with self.cache.use(remote.git_dir):
            fetched = await self._fetch_commit(remote, push.commit, _cache_ref(push.ref))
            # The base is kept under a ref of its own: the branch's ref stays at its tip.
            await self._fetch_commit(remote, base, _cache_ref(push.ref + "\0base"))
            listing = await self._git(
                fetched.git_dir,
                "diff-tree",
                "-r",
                "-z",
                "--name-only",
                "--no-renames",
                base,
                fetched.commit,
            )
        return [p.decode("utf-8", "surrogateescape") for p in listing.split(b"\0") if p]

    async def _fetch_commit(self, remote: Remote, commit: str, ref: str) -> Fetched:
        """Make ``commit`` present and keep it under ``ref``: the next fetch sends it as a
        have, so it transfers only new objects (the ref name is a hash, never the branch)."""
        git_dir = remote.git_dir
        self._users[git_dir] = self._users.get(git_dir, 0) + 1
        lock = self._locks.setdefault(git_dir, anyio.Lock())
        wanted = self._wanted.setdefault(git_dir, {})
        wanted.setdefault(commit, ref)
        try:
            async with lock:
                if not git_dir.exists():
                    await self._git(None, "init", "--bare", "--quiet", str(git_dir))
                await anyio.to_thread.run_sync(_pin_attributes, git_dir)
                if await self._has_commit(git_dir, commit):
                    return Fetched(git_dir, commit, cache_hit=True, url=remote.url)
                try:
                    await self._fetch_wanted(remote, commit, ref, wanted)
                except DiskFull:
                    await anyio.to_thread.run_sync(_remove_partial_packs, git_dir)
                    raise
                return Fetched(git_dir, commit, cache_hit=False, url=remote.url)
        finally:
            if wanted.get(commit) == ref:
                del wanted[commit]
            self._users[git_dir] -= 1
            if not self._users[git_dir]:
                del self._users[git_dir], self._locks[git_dir], self._wanted[git_dir]

    async def _fetch_wanted(
        self, remote: Remote, commit: str, ref: str, wanted: dict[str, str]
    ) -> None:
        """Fetch ``commit`` and, in the same request, every other commit jobs are waiting for."""
        git_dir, url = remote.git_dir, remote.url
        batch = {ref: commit}
        for other, other_ref in wanted.items():
            batch.setdefault(other_ref, other)  # one commit per ref: a refspec can't share one
        if len(batch) > 1:
            try:
                await self._git(
                    git_dir,
                    *_FETCH,
                    "--depth=1",
                    "--end-of-options",
                    url,
                    *(f"+{c}:{r}" for r, c in batch.items()),
                )
                return
            except _NotOurRef as exc:
                # One commit the server won't serve fails the whole request: fetch ours on
                # its own; the others do the same when they get the lock. (Any other failure
                # would fail ours alone as well, so it is raised as it is.)
                log.info(
                    "a fetch of %s commits failed (%s); fetching %s alone", len(batch), exc, commit
                )
        try:
            await self._git(
                git_dir, *_FETCH, "--depth=1", "--end-of-options", url, f"+{commit}:{ref}"
            )
        except _NotOurRef:
            log.info(
                "fetch by commit id refused; deepening %s of %s to it", remote.branch, remote.name
            )
            await self._deepen_to(git_dir, url, remote.branch, commit, ref)

    async def _deepen_to(self, git_dir: Path, url: str, branch: str, commit: str, ref: str) -> None:
        """Fetch ``branch`` at depth 1, then deepen it (1, 2, 4, ... more commits) until
        ``commit`` is present; raise CommitNotFound once its whole history is here without it.

        The pushed commit is nearly always the branch's tip, so one request is the rule. The
        deepened history is kept under ``ref`` only until ``commit`` is found.
        """
        refspec = f"+{branch}:{ref}"
        try:
            await self._git(git_dir, *_FETCH, "--depth=1", "--end-of-options", url, refspec)
        except _NotOurRef:
            raise CommitNotFound(f"{branch} is no longer on the server") from None
        step, seen = 1, -1
        while not await self._has_commit(git_dir, commit):
            count = int(await self._git(git_dir, "rev-list", "--count", ref))
            if count == seen:  # deepening brought nothing: the whole history is here
                raise CommitNotFound(
                    f"commit {commit} is not on {branch} any more (force-pushed away?)"
                )
            seen = count
            await self._git(git_dir, *_FETCH, f"--deepen={step}", "--end-of-options", url, refspec)
            step *= 2
        await self._git(git_dir, "update-ref", ref, commit)

    async def _has_commit(self, git_dir: Path, commit: str) -> bool:
        """Whether ``commit`` is in the cache (run under the repository's lock, so within
        ``BRANCHBUILD_GIT_TIMEOUT`` like every git command).

        Raises:
            GitError: git timed out.
        """
        command = ["git", f"--git-dir={git_dir}", "cat-file", "-e", f"{commit}^{{commit}}"]
        try:
            with anyio.fail_after(self.settings.git_timeout):
                result = await anyio.run_process(command, env=self._env, check=False)
        except TimeoutError:
            raise GitError(
                f"git cat-file timed out after {self.settings.git_timeout:g} s"
            ) from None
        return result.returncode == 0

    # -- archive ----------------------------------------------------------------------------

    async def check_sizes(
        self, fetched: Fetched, treeish: str | None = None, env: dict[str, str] | None = None
    ) -> int:
        """Return the total size of the commit's files (or of ``treeish``, the commit with
        its submodules, read with ``env``).

        Raises:
            ArchiveTooLarge: a file or the sum exceeds the configured limits.
        """
        listing = await self._git(
            fetched.git_dir, "ls-tree", "-r", "-l", "-z", treeish or fetched.commit, env=env
        )
        total = 0
        for entry in listing.split(b"\0"):
            if not entry:
                continue
            meta, _, path = entry.partition(b"\t")
            size = meta.split()[-1]
            if size == b"-":  # a submodule (gitlink): archived as an empty directory
                continue
            total += int(size)
            if int(size) > self.settings.max_file_bytes:
                raise ArchiveTooLarge(
                    f"file {path.decode(errors='replace')!r} is {int(size)} bytes, over "
                    f"BRANCHBUILD_MAX_FILE_BYTES={self.settings.max_file_bytes}"
                )
        if total > self.settings.max_archive_bytes:
            raise ArchiveTooLarge(
                f"the commit's files total {total} bytes, over "
                f"BRANCHBUILD_MAX_ARCHIVE_BYTES={self.settings.max_archive_bytes}"
            )
        return total

    @asynccontextmanager
    async def archive(
        self, fetched: Fetched, extras: Extras = NO_EXTRAS
    ) -> AsyncIterator[ByteReceiveStream]:
        """Stream a zip of what a checkout of the commit leaves: symlinks stored as links,
        line endings converted as a Linux checkout does, export-ignore and export-subst never
        applied; with ``extras``, submodules checked out and a shallow ``.git``.

        Raises:
            SubmoduleError: a submodule cannot be included (permanent).
            ArchiveTooLarge: with its submodules, the tree exceeds the size limits.
            GitError: git archive failed.
        """
        async with AsyncExitStack() as stack:
            treeish, env, cwd, attributes = fetched.commit, self._env, None, []
            scratch = self.root  # a private directory only when an extra needs one
            if extras != NO_EXTRAS:
                scratch = await self._scratch(stack)
            if extras.submodules:
                composed = await self._with_submodules(stack, fetched, scratch)
                if composed is not None:
                    treeish, env, cwd = composed
                    await self.check_sizes(fetched, treeish, env)
                    attributes = ["--work-tree=.", "--worktree-attributes"]
            added: list[str] = []
            if extras.git_metadata_ref is not None:
                added = await self._git_metadata(fetched, extras.git_metadata_ref, scratch)
            args = [
                "git",
                f"--git-dir={fetched.git_dir}",
                *attributes[:1],
                *_CACHE,
                *_CHECKOUT,
                "archive",
                *attributes[1:],
                "--format=zip",
                f"-{self.settings.zip_level}",
                *added,
                "--prefix=",
                treeish,
            ]
            async with self._stream(args, env, cwd) as stream:
                yield stream

    @asynccontextmanager
    async def _stream(
        self, args: list[str], env: dict[str, str], cwd: Path | None
    ) -> AsyncIterator[ByteReceiveStream]:
        stderr = bytearray()
        async with await anyio.open_process(args, env=env, stdin=None, cwd=cwd) as process:
            assert process.stdout is not None and process.stderr is not None
            with unwrap_group():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_drain, process.stderr, stderr)
                    try:
                        yield process.stdout
                    except BaseException:
                        # The consumer failed (e.g. the upload): stop git, keep the real error.
                        with anyio.CancelScope(shield=True):
                            if process.returncode is None:
                                with contextlib.suppress(ProcessLookupError):
                                    process.kill()
                            await process.wait()
                        raise
                    returncode = await process.wait()
        if returncode != 0:
            raise GitError(f"git archive failed: {_tail(stderr)}")

    async def _scratch(self, stack: AsyncExitStack) -> Path:
        """A private directory for one archive, removed (shielded) when ``stack`` exits."""
        parent = self.root / "scratch"
        parent.mkdir(exist_ok=True)
        path = Path(await anyio.to_thread.run_sync(lambda: tempfile.mkdtemp(dir=parent)))

        async def remove() -> None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(path, ignore_errors=True))

        stack.push_async_callback(remove)
        return path

    async def _git_metadata(self, fetched: Fetched, ref: str, scratch: Path) -> list[str]:
        """Build a shallow ``.git`` with ``ref`` at the commit checked out (its index written,
        so the unzipped tree is clean) and return git archive's arguments that add it."""
        meta = scratch / "dot-git"
        await self._git(None, "init", "--bare", "--quiet", "--template=", str(meta))
        local = ref if ref.startswith(("refs/heads/", "refs/tags/")) else "refs/branchbuild/head"
        await self._git(
            meta,
            *_CACHE,
            "-c",
            "protocol.version=2",
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            "--depth=1",
            "--end-of-options",
            str(fetched.git_dir),
            f"+{fetched.commit}:{local}",
        )
        if local.startswith("refs/heads/"):
            await self._git(meta, "symbolic-ref", "HEAD", local)
        else:  # a tag: CodeBuild's clone of a tag is a detached HEAD too
            await self._git(meta, "update-ref", "--no-deref", "HEAD", fetched.commit)
        await self._git(meta, "read-tree", fetched.commit)
        await self._git(meta, "config", "core.bare", "false")

        def listing() -> list[str]:
            args: list[str] = []
            for path in sorted(p for p in meta.rglob("*") if p.is_file()):
                folder = path.parent.relative_to(meta).as_posix()
                prefix = ".git/" if folder == "." else f".git/{folder}/"
                args += [f"--prefix={prefix}", f"--add-file={path}"]
            return args

        return await anyio.to_thread.run_sync(listing)

    async def _with_submodules(
        self, stack: AsyncExitStack, fetched: Fetched, scratch: Path
    ) -> tuple[str, dict[str, str], Path] | None:
        """The commit's tree with every submodule's tree in place of its gitlink (recursively,
        to BRANCHBUILD_SUBMODULE_DEPTH), the environment that reads it (new trees go to
        ``scratch``; the caches' objects are alternates, never changed), and the directory
        holding the attributes to archive it with; None when the commit has no gitlink.

        In a checkout, a superproject's attributes never reach its submodules' files: each
        submodule's root gets an attributes file that unsets them before its own lines.

        Raises:
            SubmoduleError: a submodule has no URL, a URL not allowed, or is not fetchable.
            GitError: a submodule's fetch failed in a way that may pass.
        """
        objects, empty = scratch / "objects", scratch / "empty"
        objects.mkdir()
        empty.mkdir()
        alternates: list[str] = [str(fetched.git_dir / "objects")]
        env = dict(self._env, GIT_OBJECT_DIRECTORY=str(objects))
        boundaries: list[str] = []

        def with_alternates() -> dict[str, str]:
            return env | {"GIT_ALTERNATE_OBJECT_DIRECTORIES": os.pathsep.join(alternates)}

        async def compose(
            git_dir: Path, commit: str, url: str, depth: int, where: str
        ) -> str | None:
            listing = await self._git(git_dir, "ls-tree", "-r", "-z", commit, env=with_alternates())
            if not listing:  # an empty tree: the gitlink stays, an empty directory as checked out
                return None
            links = submodules.gitlinks(listing)
            if not links:
                return f"{commit}^{{tree}}"
            if depth >= self.settings.submodule_depth:
                raise SubmoduleError(
                    f"submodule {where}{links[0][0]}: nested deeper than "
                    f"BRANCHBUILD_SUBMODULE_DEPTH={self.settings.submodule_depth}"
                )
            status, config = await self.query(
                git_dir, "config", "-z", "--list", f"--blob={commit}:.gitmodules"
            )
            declared = submodules.parse_gitmodules(config if status == 0 else b"")
            # update-index wants a work tree: an empty one, never read or written.
            indexed = with_alternates() | {
                "GIT_INDEX_FILE": str(scratch / f"index-{len(boundaries)}"),
                "GIT_WORK_TREE": str(empty),
            }
            await self._git(git_dir, "read-tree", commit, env=indexed)
            for path, wanted in links:
                label = where + path
                name, raw, update = declared.get(path, (path, None, None))
                if raw is not None and not submodules.checked_out(update, label):
                    continue  # `update = none`: an empty directory, as in a checkout
                boundaries.append(label)
                sub = await self._fetch_submodule(stack, name, raw, wanted, url, label)
                alternates.append(str(sub.git_dir / "objects"))
                tree = await compose(sub.git_dir, wanted, sub.url, depth + 1, label + "/")
                if tree is None:
                    continue
                indexed["GIT_ALTERNATE_OBJECT_DIRECTORIES"] = os.pathsep.join(alternates)
                await self._git(git_dir, "update-index", "--force-remove", "--", path, env=indexed)
                await self._git(git_dir, "read-tree", f"--prefix={path}/", tree, env=indexed)
            return (await self._git(git_dir, "write-tree", env=indexed)).decode().strip()

        tree = await compose(fetched.git_dir, fetched.commit, fetched.url, 0, "")
        if tree is None or not boundaries:
            return None
        env = with_alternates()
        attributes = scratch / "attributes"
        found = await self._attribute_files(fetched.git_dir, tree, env)
        found = submodules.scoped_attributes(found, boundaries)

        def write() -> None:
            for path, content in found.items():
                target = attributes / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)

        attributes.mkdir()
        await anyio.to_thread.run_sync(write)
        return tree, env, attributes

    async def _attribute_files(
        self, git_dir: Path, tree: str, env: dict[str, str]
    ) -> dict[str, bytes]:
        """Every ``.gitattributes`` (a regular file: git ignores a link) of ``tree``: path ->
        its bytes."""
        listing = await self._git(git_dir, "ls-tree", "-r", "-z", tree, env=env)
        found: dict[str, bytes] = {}
        for entry in listing.split(b"\0"):
            meta, _, raw = entry.partition(b"\t")
            path = raw.decode("utf-8", "surrogateescape")
            fields = meta.split()
            if fields[:2] in ([b"100644", b"blob"], [b"100755", b"blob"]) and (
                path == ".gitattributes" or path.endswith("/.gitattributes")
            ):
                found[path] = await self._git(
                    git_dir, "cat-file", "blob", fields[2].decode(), env=env
                )
        return found

    async def _fetch_submodule(
        self,
        stack: AsyncExitStack,
        name: str,
        raw: str | None,
        commit: str,
        url: str,
        label: str,
    ) -> Fetched:
        """Fetch a gitlink's commit into its repository's own cache (in use until ``stack``
        exits), from the URL .gitmodules gives it resolved against ``url``.

        Raises:
            SubmoduleError: no URL, a URL not allowed, refused or gone at the server.
            GitError: the fetch failed in a way that may pass.
        """
        if raw is None:
            raise SubmoduleError(f"submodule {label}: no URL for it in .gitmodules")
        sub_url = submodules.with_user(
            submodules.resolve_url(url, raw, self.settings.submodule_hosts, label),
            self.settings.ssh_key_id,
        )
        remote = Remote(sub_url, self.cache_dir_for(_readable(name), sub_url), "HEAD", label)
        try:
            return await stack.enter_async_context(
                self.fetched_from(remote, commit, "submodule\0" + sub_url)
            )
        except (GitAccessDenied, CommitNotFound, HostKeyMismatch) as exc:
            raise SubmoduleError(
                f"submodule {label} ({sub_url}) at {commit} cannot be fetched: {exc}"
            ) from None
        except GitError as exc:  # transient (a network failure, a full disk): retried
            raise type(exc)(f"submodule {label} ({sub_url}): {exc}") from None

    # -- for service.changes (skip markers, path filters): read-only queries, one base commit --

    async def query(self, git_dir: Path, *args: str) -> tuple[int, bytes]:
        """Run a read-only git command on a cache directory: (exit status, stdout).

        Raises:
            GitError: git could not run or timed out.
        """
        command = ["git", f"--git-dir={git_dir}", *_CACHE, *args]
        try:
            with anyio.fail_after(self.settings.git_timeout):
                result = await anyio.run_process(command, env=self._env, check=False)
        except TimeoutError:
            raise GitError(f"git {args[0]} timed out") from None
        return result.returncode, result.stdout

    async def list_heads(self, repository: str, region: str) -> dict[str, str]:
        """The repository's branches on the server (``git ls-remote --heads``), for
        :mod:`service.reconcile`: ref name -> commit id.

        Raises:
            HostKeyMismatch, GitAccessDenied: permanent.
            GitError: the host cannot be reached.
        """
        url = self.url_for(check_repository(repository), region)
        listing = await self._git(None, "ls-remote", "--heads", "--end-of-options", url)
        heads: dict[str, str] = {}
        for line in listing.decode("utf-8", errors="replace").splitlines():
            commit, _, ref = line.partition("\t")
            if ref.startswith("refs/heads/") and len(commit) == 40:
                heads[ref] = commit
        return heads

    # -- running git ------------------------------------------------------------------------

    async def _git(
        self, git_dir: Path | None, *args: str, env: dict[str, str] | None = None
    ) -> bytes:
        command = ["git"] + ([f"--git-dir={git_dir}"] if git_dir else []) + list(args)
        name = next(a for a in args if not a.startswith("-") and "=" not in a)
        try:
            with anyio.fail_after(self.settings.git_timeout):
                result = await anyio.run_process(command, env=env or self._env, check=False)
        except TimeoutError:
            raise GitError(f"git {name} timed out after {self.settings.git_timeout:g} s") from None
        if result.returncode != 0:
            raise _classify(name, result.stderr)
        return result.stdout


# Settings for every git command on the cache (on the command line, so every cache directory
# gets them, however old). Blobs over 16 MiB are streamed, never held whole in memory (git
# archive held a 250 MB blob otherwise: 250 MB per concurrent job).
_CACHE = ("-c", "core.bigFileThreshold=16m")

# What a checkout on Linux with git's defaults converts (docs/build-contents.md): only the
# tree's own attributes (text, eol, ident, working-tree-encoding) decide, never a setting of
# this machine. No filter driver is configured anywhere git looks (no system or global config,
# the cache's own config is ours), so a `filter=` attribute never runs a command.
_CHECKOUT = (
    "-c",
    "core.autocrlf=false",
    "-c",
    "core.eol=lf",
    "-c",
    f"core.attributesFile={os.devnull}",
)

# The cache's info/attributes, the attribute file of highest precedence: git archive applies
# the tree's export-ignore and export-subst, a checkout never does.
_ARCHIVE_ATTRIBUTES = b"* -export-ignore -export-subst\n"

# Incoming objects stay packed, one pack per fetch: no loose-object pile-up. git's own
# housekeeping (`gc --auto`, run by the fetch) merges the small packs once there are 50
# (gc.autoPackLimit), never rewrites a pack over 16 MiB (such as the first clone's: rewriting
# it would cost seconds of CPU per merge), and runs inside the fetch, under the repository's
# lock: never detached in the background, where it could race an eviction. Every fetch is
# shallow, so a branch's earlier pushes become unreachable once its ref moves on: gc keeps
# them in one cruft pack (not as loose objects) until they expire (gc.pruneExpire, 2 weeks:
# a job may still be archiving one).
_FETCH = (
    *_CACHE,
    "-c",
    "protocol.version=2",
    "-c",
    "gc.cruftPacks=true",
    "-c",
    "transfer.unpackLimit=1",
    "-c",
    "gc.bigPackThreshold=16m",
    "-c",
    "gc.autoDetach=false",
    "-c",
    "maintenance.autoDetach=false",
    "fetch",
    "--quiet",
    "--no-tags",
    "--no-write-fetch-head",
    "--no-recurse-submodules",
)


def _cache_ref(name: str) -> str:
    return "refs/branchbuild/" + hashlib.sha256(name.encode()).hexdigest()[:32]


class _NotOurRef(GitError):
    """Raised internally when the server will not serve a commit by id."""


def _classify(command: str, stderr: bytes) -> Exception:
    text = _tail(stderr)
    lowered = text.lower()
    if "no space left on device" in lowered:
        return DiskFull(f"git {command}: the disk is full: {text}")
    if "no matching host key type found" in lowered:
        return HostKeyMismatch(
            f"the git host offers no host key type this client accepts ({text}); for a "
            "host that offers only ssh-rsa (CodeCommit), add it to BRANCHBUILD_SSH_LEGACY_RSA_HOSTS"
        )
    if any(marker in lowered for marker in _HOST_KEY):
        return HostKeyMismatch(f"the git host's key does not match known_hosts: {text}")
    if any(marker in lowered for marker in _NOT_OUR_REF):
        return _NotOurRef(f"git {command}: {text}")
    if any(marker in lowered for marker in _ACCESS):
        return GitAccessDenied(f"git host refused access: {text}")
    return GitError(f"git {command} failed: {text}")


def _tail(stderr: bytes | bytearray, limit: int = 500) -> str:
    text = bytes(stderr).decode("utf-8", errors="replace").strip().replace("\n", " | ")
    return text[-limit:] or "(no output)"


async def _drain(stream: ByteReceiveStream, into: bytearray, limit: int = 64 * 1024) -> None:
    async for chunk in stream:
        if len(into) < limit:
            into += chunk[: limit - len(into)]


def _pin_attributes(git_dir: Path) -> None:
    """Write the cache's info/attributes unless it holds ours already (atomically: archives
    of the repository may be reading it)."""
    path = git_dir / "info" / "attributes"
    with contextlib.suppress(FileNotFoundError):
        if path.read_bytes() == _ARCHIVE_ATTRIBUTES:
            return
    path.parent.mkdir(exist_ok=True)
    partial = path.with_name(f"attributes.{os.getpid()}.tmp")
    partial.write_bytes(_ARCHIVE_ATTRIBUTES)
    partial.replace(path)


def _readable(name: str) -> str:
    """A submodule's name as a cache directory prefix (the URL's digest keeps it unique)."""
    return (
        "".join(c if c.isalnum() or c in "._-" else "-" for c in name)[-60:].lstrip(".-") or "sub"
    )


def _remove_partial_packs(git_dir: Path) -> None:
    """Delete what a fetch that failed on a full disk left behind: git names its unfinished
    pack files ``tmp_*``, and no other fetch of this repository runs (we hold its lock)."""
    for leftover in (git_dir / "objects" / "pack").glob("tmp_*"):
        leftover.unlink(missing_ok=True)
    for leftover in (git_dir / "objects").glob("tmp_objdir-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _ssh_quote(path: Path) -> str:
    text = str(path)
    if any(c in text for c in '"\n'):
        raise ConfigurationError(f"path {text!r} cannot be used in an SSH config")
    return f'"{text}"'
