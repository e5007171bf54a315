"""The git cache over a real SSH server: exact commits, incremental fetches, archives, failures."""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path
from typing import Any

import anyio
import pytest

from service.errors import (
    ArchiveTooLarge,
    CommitNotFound,
    GitAccessDenied,
    GitError,
    HostKeyMismatch,
)
from service.git import Fetched, Git
from service.settings import Settings, load_settings
from tests.helpers import GitWorld, WorkCopy, push_for, wait_for, zip_listing


def make_settings(world: GitWorld, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "queue_url": "q",
        "work_queue_url": "w",
        "bucket": "bucket",
        "git_url_template": world.url_template,
        "ssh_key_file": world.key,
        "known_hosts_file": world.known_hosts,
        "cache_dir": tmp_path / "cache",
    }
    return load_settings(**(values | overrides))


async def archive_bytes(git: Git, fetched: Fetched) -> bytes:
    data = bytearray()
    async with git.archive(fetched) as stream:
        async for chunk in stream:
            data += chunk
    return bytes(data)


async def test_commit_far_behind_the_tip_is_fetched_exactly(
    git_world: GitWorld, tmp_path: Path
) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "app")
    old = await repo.commit({"version.txt": "0\n", "src/a.py": "print(0)\n"})
    for i in range(1, 16):
        await repo.commit({"version.txt": f"{i}\n", f"src/file{i}.py": "x\n"})
    await repo.push("main")
    git = Git(make_settings(git_world, tmp_path))
    fetched = await git.fetch(push_for("app", "main", old))
    assert not fetched.cache_hit
    data = await archive_bytes(git, fetched)
    assert zip_listing(data) == await repo.archive_listing(old)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.read("version.txt") == b"0\n"


async def test_second_fetch_is_a_cache_hit_and_new_commits_are_incremental(
    git_world: GitWorld, tmp_path: Path
) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "inc")
    first = await repo.commit({"big.bin": os.urandom(200_000).hex()})
    await repo.push("main")
    git = Git(make_settings(git_world, tmp_path))
    await git.fetch(push_for("inc", "main", first))
    served = git_world.host.upload_pack_count
    again = await git.fetch(push_for("inc", "main", first))
    assert again.cache_hit and git_world.host.upload_pack_count == served
    second = await repo.commit({"small.txt": "new\n"})
    await repo.push("main")
    fetched = await git.fetch(push_for("inc", "main", second))
    assert not fetched.cache_hit
    # The old objects were not sent again: the cache holds each of the two commits' three
    # objects (commit, tree, blob) once; a second copy of big.bin's blob would make it 7.
    count = await anyio.run_process(["git", f"--git-dir={fetched.git_dir}", "count-objects", "-v"])
    figures = dict(line.split(": ") for line in count.stdout.decode().splitlines())
    assert int(figures["count"]) + int(figures["in-pack"]) == 6
    assert zip_listing(await archive_bytes(git, fetched)) == ["big.bin", "small.txt"]


async def test_the_cache_stays_packed_and_never_rewrites_the_big_first_pack(
    git_world: GitWorld, tmp_path: Path
) -> None:
    """One pack per fetch, no loose objects; git's own gc merges the small packs once there
    are more than 50 and leaves the first clone's big pack alone."""
    repo = await WorkCopy.create(git_world, tmp_path, "packs")
    base = await repo.commit({"big.bin": os.urandom(17 * 1024 * 1024)})
    await repo.push("main")
    git = Git(make_settings(git_world, tmp_path))
    fetched = await git.fetch(push_for("packs", "main", base))
    pack_dir = anyio.Path(fetched.git_dir / "objects" / "pack")
    [big] = [p.name async for p in pack_dir.glob("*.pack")]
    for n in range(52):
        commit = await repo.commit({"n.txt": f"{n}\n"})
        await repo.push("main")
        await git.fetch(push_for("packs", "main", commit))
    packs = [p.name async for p in pack_dir.glob("*.pack")]
    assert big in packs and len(packs) < 10, packs
    loose = [p async for p in anyio.Path(fetched.git_dir / "objects").glob("[0-9a-f][0-9a-f]/*")]
    assert loose == []
    latest = await git.fetch(push_for("packs", "main", commit))
    assert latest.cache_hit
    assert zip_listing(await archive_bytes(git, latest)) == ["big.bin", "n.txt"]


def _child_pid(command_word: bytes) -> int | None:
    """This process's child whose command line contains ``command_word``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat_file:
                ppid = int(stat_file.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if ppid == os.getpid() and command_word in cmdline.read().split(b"\0"):
                    return int(pid)
        except (OSError, ValueError):  # not a process, or gone
            continue
    return None


def _anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            lines = [line for line in status if line.startswith("RssAnon")]
    except (FileNotFoundError, ProcessLookupError):  # it has just exited
        return 0
    return int(lines[0].split()[1]) if lines else 0  # none: it is exiting


async def test_archiving_a_big_file_streams_it_through_git(
    git_world: GitWorld, tmp_path: Path
) -> None:
    """git would hold a blob under core.bigFileThreshold whole in memory, once per
    concurrent job; the cache streams every blob over 16 MiB."""
    repo = await WorkCopy.create(git_world, tmp_path, "bigblob")
    data = os.urandom(24 * 1024 * 1024)
    commit = await repo.commit({"big.bin": data})
    await repo.push("main")
    git = Git(make_settings(git_world, tmp_path))
    fetched = await git.fetch(push_for("bigblob", "main", commit))
    peak = size = 0
    async with git.archive(fetched) as stream:
        archiver = _child_pid(b"archive")
        assert archiver is not None
        async for chunk in stream:
            size += len(chunk)
            peak = max(peak, _anon_kib(archiver))
    assert size > len(data)
    assert 0 < peak < 12 * 1024, f"git archive used {peak} KiB of anonymous memory"


async def test_parallel_fetches_of_one_repository_are_serialised(
    git_world: GitWorld, tmp_path: Path
) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "par")
    commit = await repo.commit({"f.txt": "1"})
    await repo.push("main")
    git = Git(make_settings(git_world, tmp_path))
    results: list[Fetched] = []

    async def one() -> None:
        results.append(await git.fetch(push_for("par", "main", commit)))

    served = git_world.host.upload_pack_count
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(one)
    assert len(results) == 3
    # One fetch went to the server; the others waited for it and found the commit cached.
    assert sum(not r.cache_hit for r in results) == 1
    assert git_world.host.upload_pack_count == served + 1


async def _fetch_while_first_is_held(
    git_world: GitWorld, git: Git, repository: str, pushes: list[tuple[str, str]]
) -> dict[str, Fetched | Exception]:
    """Fetch ``pushes[0]`` and hold it at the server; start the rest (they queue behind it
    for the repository's lock), then let everything go."""
    results: dict[str, Fetched | Exception] = {}

    async def one(branch: str, commit: str) -> None:
        try:
            results[branch] = await git.fetch(push_for(repository, branch, commit))
        except Exception as exc:  # noqa: BLE001 (collected for the assertions)
            results[branch] = exc

    gate = git_world.host.repository_gates[repository] = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(one, *pushes[0])

        async def held() -> bool:
            return git_world.host.upload_pack_waiting == 1

        await wait_for(held, within=10, what="the first fetch at the server")
        for branch, commit in pushes[1:]:
            tg.start_soon(one, branch, commit)
        await anyio.wait_all_tasks_blocked()
        gate.set()
    return results


async def _branches_off_a_cached_main(
    git_world: GitWorld, tmp_path: Path, repository: str, numbers: list[int]
) -> tuple[Git, dict[str, str]]:
    """Branches b<n> off main, each adding f<n>.txt; a Git whose cache already has main."""
    repo = await WorkCopy.create(git_world, tmp_path, repository)
    await repo.commit({"base.txt": "0\n"})
    await repo.push("main")
    commits = {}
    for n in numbers:
        await repo.git("checkout", "--quiet", "-b", f"b{n}", "main")
        commits[f"b{n}"] = await repo.commit({f"f{n}.txt": f"{n}\n"})
        await repo.push(f"b{n}")
    git = Git(make_settings(git_world, tmp_path))
    await git.fetch(push_for(repository, "main", await repo.git("rev-parse", "main")))
    return git, commits


async def test_waiting_fetches_of_one_repository_share_one_request(
    git_world: GitWorld, tmp_path: Path
) -> None:
    git, commits = await _branches_off_a_cached_main(git_world, tmp_path, "batch", [1, 2, 3, 4])
    served = git_world.host.upload_pack_count

    results = await _fetch_while_first_is_held(git_world, git, "batch", list(commits.items()))

    # b1's fetch was under way; b2, b3 and b4 waited for the lock and then got one fetch.
    assert git_world.host.upload_pack_count == served + 2
    fetched = {b: r for b, r in results.items() if isinstance(r, Fetched)}
    assert sorted(fetched) == ["b1", "b2", "b3", "b4"], results
    assert sum(not f.cache_hit for f in fetched.values()) == 2
    for branch, commit in commits.items():
        assert fetched[branch].commit == commit
        listing = zip_listing(await archive_bytes(git, fetched[branch]))
        assert listing == ["base.txt", f"f{branch[1:]}.txt"]
        # The shared fetch is shallow too: each commit without its parent.
        assert await cache_git(fetched[branch], "rev-list", "--count", commit) == "1"


async def test_waiting_fetches_share_one_request_on_a_host_refusing_commits_by_id(
    git_world: GitWorld, tmp_path: Path
) -> None:
    git, commits = await _branches_off_a_cached_main(git_world, tmp_path, "batchv0", [1, 2, 3])
    git_world.host.protocol_v0 = True  # each pushed commit is its branch's tip: advertised
    served = git_world.host.upload_pack_count

    results = await _fetch_while_first_is_held(git_world, git, "batchv0", list(commits.items()))

    assert git_world.host.upload_pack_count == served + 2
    for branch, commit in commits.items():
        fetched = results[branch]
        assert isinstance(fetched, Fetched) and fetched.commit == commit, results
        assert zip_listing(await archive_bytes(git, fetched)) == ["base.txt", f"f{branch[1:]}.txt"]


async def test_a_bad_commit_among_waiting_fetches_fails_only_its_own_push(
    git_world: GitWorld, tmp_path: Path
) -> None:
    git, commits = await _branches_off_a_cached_main(git_world, tmp_path, "batchbad", [1, 2, 4])
    commits["b3"] = "0123456789abcdef0123456789abcdef01234567"  # on no branch of the server
    pushes = [(b, commits[b]) for b in ("b1", "b2", "b3", "b4")]

    results = await _fetch_while_first_is_held(git_world, git, "batchbad", pushes)

    assert isinstance(results["b3"], CommitNotFound), results
    for branch in ("b1", "b2", "b4"):
        result = results[branch]
        assert isinstance(result, Fetched) and result.commit == commits[branch], results
        assert f"f{branch[1:]}.txt" in zip_listing(await archive_bytes(git, result))


async def test_symlinks_are_stored_as_links_never_followed(
    git_world: GitWorld, tmp_path: Path
) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "links")
    (repo.path / "passwd").symlink_to("/etc/passwd")
    (repo.path / "up").symlink_to("../../outside")
    commit = await repo.commit({"README": "hi\n", "odd\nname.txt": "newline\n"})
    await repo.push("main")
    git = Git(make_settings(git_world, tmp_path))
    data = await archive_bytes(git, await git.fetch(push_for("links", "main", commit)))
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = z.getinfo("passwd")
        assert stat.S_ISLNK(info.external_attr >> 16)
        assert z.read("passwd") == b"/etc/passwd"  # the link target, not the file's content
        assert z.read("up") == b"../../outside"
        assert not any(name.startswith(".git/") for name in z.namelist())
        assert "odd\nname.txt" in z.namelist()


async def test_size_limits_are_permanent(git_world: GitWorld, tmp_path: Path) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "sizes")
    commit = await repo.commit({"big.bin": b"x" * 50_000, "small.txt": "y"})
    await repo.push("main")
    git = Git(make_settings(git_world, tmp_path, max_file_bytes=10_000))
    fetched = await git.fetch(push_for("sizes", "main", commit))
    with pytest.raises(ArchiveTooLarge, match="big.bin"):
        await git.check_sizes(fetched)
    git = Git(make_settings(git_world, tmp_path, max_archive_bytes=40_000))
    with pytest.raises(ArchiveTooLarge, match="BRANCHBUILD_MAX_ARCHIVE_BYTES"):
        await git.check_sizes(fetched)


async def test_unknown_commit_is_permanent(git_world: GitWorld, tmp_path: Path) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "gone")
    await repo.commit({"a": "1"})
    await repo.push("main")
    git = Git(make_settings(git_world, tmp_path))
    with pytest.raises(CommitNotFound):
        await git.fetch(push_for("gone", "main", "0123456789abcdef0123456789abcdef01234567"))


async def test_force_pushed_away_commit_is_permanent(git_world: GitWorld, tmp_path: Path) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "force")
    base = await repo.commit({"a": "1"})
    await repo.push("main")
    lost = await repo.commit({"a": "2"})
    await repo.push("main")
    await repo.git("reset", "--hard", base)
    await repo.push("--force", "main")
    # The server prunes what no ref reaches (CodeCommit does so eventually).
    server = git_world.host.repository_path("force")
    await anyio.run_process(
        ["git", f"--git-dir={server}", "reflog", "expire", "--expire=now", "--all"]
    )
    await anyio.run_process(["git", f"--git-dir={server}", "gc", "--prune=now", "--quiet"])
    git = Git(make_settings(git_world, tmp_path))
    with pytest.raises(CommitNotFound):
        await git.fetch(push_for("force", "main", lost))


async def test_missing_repository_is_permanent(git_world: GitWorld, tmp_path: Path) -> None:
    git = Git(make_settings(git_world, tmp_path))
    with pytest.raises(GitAccessDenied):
        await git.fetch(push_for("no-such-repo", "main", "a" * 40))


async def test_host_key_mismatch_is_permanent(git_world: GitWorld, tmp_path: Path) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "hk")
    commit = await repo.commit({"a": "1"})
    await repo.push("main")
    other = tmp_path / "other_host_key"
    await anyio.run_process(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)])
    pub = other.with_suffix(".pub").read_text().split()
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[127.0.0.1]:{git_world.host.port} {pub[0]} {pub[1]}\n")
    git = Git(make_settings(git_world, tmp_path, known_hosts_file=wrong))
    with pytest.raises(HostKeyMismatch):
        await git.fetch(push_for("hk", "main", commit))
    # An empty known_hosts (unknown host) is refused too: never trust on first use.
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    git = Git(make_settings(git_world, tmp_path, known_hosts_file=empty))
    with pytest.raises(HostKeyMismatch):
        await git.fetch(push_for("hk", "main", commit))


async def test_refused_key_is_permanent(git_world: GitWorld, tmp_path: Path) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "refuse")
    commit = await repo.commit({"a": "1"})
    await repo.push("main")
    git_world.host.refuse_all_keys = True
    git = Git(make_settings(git_world, tmp_path))
    with pytest.raises(GitAccessDenied):
        await git.fetch(push_for("refuse", "main", commit))


async def test_dropped_connection_is_transient(git_world: GitWorld, tmp_path: Path) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "drop")
    commit = await repo.commit({"big.bin": os.urandom(300_000)})
    await repo.push("main")
    git_world.host.drop_after_bytes = 2000
    git = Git(make_settings(git_world, tmp_path))
    with pytest.raises(GitError) as info:
        await git.fetch(push_for("drop", "main", commit))
    assert not isinstance(info.value, GitAccessDenied | HostKeyMismatch | CommitNotFound)
    git_world.host.drop_after_bytes = None
    assert (await git.fetch(push_for("drop", "main", commit))).commit == commit


async def test_git_never_sees_aws_credentials(
    git_world: GitWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "super-secret-value")
    git = Git(make_settings(git_world, tmp_path))
    assert not any("AWS" in name for name in git._env)
    assert "super-secret-value" not in repr(git._env)


async def test_the_ssh_wrapper_takes_any_cache_path_literally(
    git_world: GitWorld, tmp_path: Path
) -> None:
    """The wrapper is /bin/sh: a cache directory full of shell syntax must still just work."""
    repo = await WorkCopy.create(git_world, tmp_path, "odd-path")
    commit = await repo.commit({"a": "1"})
    await repo.push("main")
    cache = tmp_path / "cache $(touch pwned) `id` 'q' ;&|*"
    git = Git(make_settings(git_world, tmp_path, cache_dir=cache))
    fetched = await git.fetch(push_for("odd-path", "main", commit))
    assert zip_listing(await archive_bytes(git, fetched)) == ["a"]
    assert not [p async for p in anyio.Path(tmp_path).rglob("pwned")]
    assert not await anyio.Path("pwned").exists()


async def test_known_hosts_and_key_given_as_text(git_world: GitWorld, tmp_path: Path) -> None:
    """The ECS way: key and host keys come as environment values (from Secrets Manager)."""
    repo = await WorkCopy.create(git_world, tmp_path, "secret")
    commit = await repo.commit({"a": "1"})
    await repo.push("main")
    settings = make_settings(
        git_world,
        tmp_path,
        known_hosts_file=None,
        known_hosts=git_world.known_hosts.read_text(),
        ssh_key_file=None,
        ssh_private_key=git_world.key.read_text(),
    )
    git = Git(settings)
    assert (await git.fetch(push_for("secret", "main", commit))).commit == commit
    written = settings.cache_dir / "ssh" / "id"
    assert written.stat().st_mode & 0o777 == 0o600


async def test_probe_lists_branches_and_classifies_failures(
    git_world: GitWorld, tmp_path: Path
) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "probe")
    await repo.commit({"a": "1"})
    await repo.push("main", "main:feature/x")
    git = Git(make_settings(git_world, tmp_path))
    assert await git.probe("probe", "eu-west-1") == 2
    with pytest.raises(GitAccessDenied):
        await git.probe("missing", "eu-west-1")
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyMismatch):
        await Git(make_settings(git_world, tmp_path, known_hosts_file=empty)).probe(
            "probe", "eu-west-1"
        )


async def test_a_failing_consumer_keeps_its_own_error_after_git_exited(
    git_world: GitWorld, tmp_path: Path
) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "consumer")
    commit = await repo.commit({"a.txt": "small"})
    await repo.push("main")
    git = Git(make_settings(git_world, tmp_path))
    fetched = await git.fetch(push_for("consumer", "main", commit))

    class UploadFailed(Exception):
        pass

    with pytest.raises(UploadFailed):
        async with git.archive(fetched) as stream:
            async for _ in stream:  # read everything: git archive exits
                pass
            raise UploadFailed


async def test_odd_repositories_archive_like_git_archive(
    git_world: GitWorld, tmp_path: Path
) -> None:
    """A submodule (gitlink), a Git LFS pointer, a file name with a newline: stored as git
    has them, nothing fetched or expanded."""
    repo = await WorkCopy.create(git_world, tmp_path, "odd")
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{'a' * 64}\nsize 104857600\n"
    await repo.commit(
        {".gitattributes": "*.bin filter=lfs diff=lfs merge=lfs -text\n", "model.bin": pointer}
    )
    (repo.path / "odd\nname").write_text("x")
    await repo.git("add", "--all")
    await repo.git("update-index", "--add", "--cacheinfo", f"160000,{'b' * 40},vendor/lib")
    await repo.git("commit", "--quiet", "-m", "submodule")
    commit = await repo.git("rev-parse", "HEAD")
    await repo.push("main")
    git = Git(make_settings(git_world, tmp_path))
    fetched = await git.fetch(push_for("odd", "main", commit))
    assert await git.check_sizes(fetched) > 0
    data = await archive_bytes(git, fetched)
    assert zip_listing(data) == await repo.archive_listing(commit)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.read("model.bin").decode() == pointer  # the pointer, not 100 MB
        assert "vendor/lib/" in z.namelist()  # the submodule: an empty directory
        assert not any(n.startswith("vendor/lib/") and n != "vendor/lib/" for n in z.namelist())


async def test_empty_repository_and_empty_tree(git_world: GitWorld, tmp_path: Path) -> None:
    empty = await WorkCopy.create(git_world, tmp_path, "empty")  # no commit pushed at all
    git = Git(make_settings(git_world, tmp_path))
    with pytest.raises(CommitNotFound):
        await git.fetch(push_for("empty", "main", "c" * 40))
    commit = await empty.commit({})  # a commit with an empty tree
    await empty.push("main")
    fetched = await git.fetch(push_for("empty", "main", commit))
    data = await archive_bytes(git, fetched)
    assert zip_listing(data) == []


# -- the shallow cache ---------------------------------------------------------------------------


def zip_files(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {name: z.read(name) for name in z.namelist()}


async def assert_builds_exactly(git: Git, fetched: Fetched, repo: WorkCopy, commit: str) -> None:
    """The cache's archive of ``commit`` holds exactly the files, and bytes, git has."""
    assert fetched.commit == commit
    expected = await anyio.run_process(
        ["git", "archive", "--format=zip", commit], cwd=repo.path, env=repo.world.env()
    )
    assert zip_files(await archive_bytes(git, fetched)) == zip_files(expected.stdout)


async def cache_git(fetched: Fetched, *args: str) -> str:
    result = await anyio.run_process(["git", f"--git-dir={fetched.git_dir}", *args])
    return result.stdout.decode().strip()


async def commits_in(fetched: Fetched) -> set[str]:
    """Every commit object in the cache, referenced or not."""
    listing = await cache_git(
        fetched, "cat-file", "--batch-all-objects", "--batch-check=%(objecttype) %(objectname)"
    )
    return {line.split()[1] for line in listing.splitlines() if line.startswith("commit ")}


async def test_a_shallow_cache_builds_exactly_the_pushed_tree(
    git_world: GitWorld, tmp_path: Path
) -> None:
    """Depth-1 fetches: the tip, a commit far behind it, a force push back to an older commit,
    and a branch whose history was rewritten each build exactly their own tree."""
    repo = await WorkCopy.create(git_world, tmp_path, "shallow")
    history = [
        await repo.commit({"v.txt": f"{n}\n", f"src/{n}.py": f"x = {n}\n"}) for n in range(12)
    ]
    await repo.push("main")
    git = Git(make_settings(git_world, tmp_path))

    tip = await git.fetch(push_for("shallow", "main", history[-1]))
    await assert_builds_exactly(git, tip, repo, history[-1])
    assert await cache_git(tip, "rev-parse", "--is-shallow-repository") == "true"
    assert await commits_in(tip) == {history[-1]}  # one commit, no history

    behind = await git.fetch(push_for("shallow", "main", history[3]))  # not the tip
    await assert_builds_exactly(git, behind, repo, history[3])
    assert await cache_git(tip, "rev-list", "--count", history[3]) == "1"

    await repo.git("reset", "--quiet", "--hard", history[7])  # force push to an older commit
    await repo.push("--force", "main")
    older = await git.fetch(push_for("shallow", "main", history[7]))
    assert not older.cache_hit
    await assert_builds_exactly(git, older, repo, history[7])

    await repo.checkout("feature")  # a branch whose history is then rewritten
    first = [await repo.commit({"feature.txt": f"{n}\n"}) for n in range(3)]
    await repo.push("feature")
    await git.fetch(push_for("shallow", "feature", first[-1]))
    await repo.git("reset", "--quiet", "--hard", history[2])
    rewritten = await repo.commit({"feature.txt": "rewritten\n", "v.txt": "new\n"})
    await repo.push("--force", "feature")
    fetched = await git.fetch(push_for("shallow", "feature", rewritten))
    await assert_builds_exactly(git, fetched, repo, rewritten)
    assert await git.check_sizes(fetched) == sum(
        len(v) for v in zip_files(await archive_bytes(git, fetched)).values()
    )
    assert await cache_git(fetched, "rev-list", "--count", rewritten) == "1"


async def test_a_warm_shallow_fetch_sends_only_the_new_objects(
    git_world: GitWorld, tmp_path: Path
) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "thin")
    await repo.commit({"big.bin": os.urandom(300_000).hex()})
    await repo.push("main")
    git = Git(make_settings(git_world, tmp_path))
    first = await git.fetch(push_for("thin", "main", await repo.git("rev-parse", "HEAD")))
    pack_dir = first.git_dir / "objects" / "pack"
    for n in range(3):  # each push is fetched at depth 1 into the shallow cache
        before = {p.name for p in pack_dir.glob("*.pack")}
        await repo.git("checkout", "--quiet", "-B", f"b{n}", "main")
        commit = await repo.commit({f"new{n}.txt": f"{n}\n"})
        await repo.push(f"b{n}")
        fetched = await git.fetch(push_for("thin", f"b{n}", commit))
        [new] = [p for p in pack_dir.glob("*.pack") if p.name not in before]
        # The 600 kB blob is not sent again: the cached commits were sent as haves.
        assert new.stat().st_size < 2_000, new.stat().st_size
        assert zip_listing(await archive_bytes(git, fetched)) == ["big.bin", f"new{n}.txt"]


async def test_a_host_refusing_commits_by_id_gets_the_branch_deepened_to_the_commit(
    git_world: GitWorld, tmp_path: Path
) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "v0")
    history = [await repo.commit({"v.txt": f"{n}\n"}) for n in range(20)]
    await repo.push("main")
    await repo.checkout("other")
    others = [await repo.commit({"o.txt": f"{n}\n"}) for n in range(5)]
    await repo.push("other")
    git_world.host.protocol_v0 = True
    git = Git(make_settings(git_world, tmp_path))

    served = git_world.host.upload_pack_count
    tip = await git.fetch(push_for("v0", "main", history[-1]))  # advertised: by id, at depth 1
    assert git_world.host.upload_pack_count == served + 1
    await assert_builds_exactly(git, tip, repo, history[-1])

    behind = await git.fetch(push_for("v0", "main", history[-6]))  # 5 behind: not advertised
    await assert_builds_exactly(git, behind, repo, history[-6])
    # Deepened 1, 2, 4 from the tip: 8 commits of main, none of the other branch's.
    have = await commits_in(behind)
    assert history[-6] in have and len(have) == 8, len(have)
    assert not have & set(others)

    with pytest.raises(CommitNotFound):  # on no branch: main's whole history, then a clear no
        await git.fetch(push_for("v0", "main", "0123456789abcdef0123456789abcdef01234567"))
    with pytest.raises(CommitNotFound):  # the branch is gone
        await git.fetch(push_for("v0", "gone", "0123456789abcdef0123456789abcdef01234567"))


async def test_changed_paths_needs_both_trees_not_the_history_between(
    git_world: GitWorld, tmp_path: Path
) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "diff")
    base = await repo.commit({"a.txt": "a\n", "b.txt": "b\n", "dir/c.txt": "c\n"})
    for n in range(10):
        await repo.commit({"b.txt": f"b{n}\n", f"dir/new{n}.txt": "n\n"})
    await repo.git("rm", "--quiet", "a.txt")
    tip = await repo.commit({"dir/new0.txt": "gone soon\n"})
    await repo.push("main")
    git = Git(make_settings(git_world, tmp_path))
    push = push_for("diff", "main", tip)
    changed = await git.changed_paths(push, base)
    expected = await repo.git("diff", "--name-only", base, tip)
    assert sorted(changed) == sorted(expected.split("\n")) and "a.txt" in changed
    fetched = await git.fetch(push)
    assert fetched.cache_hit
    assert await commits_in(fetched) == {base, tip}
