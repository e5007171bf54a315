"""The git cache's disk budget: LRU eviction, nothing in use evicted, a really full disk."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anyio

from service.git import Git
from tests.helpers import ROOT, GitWorld, WorkCopy, push_for
from tests.test_git import make_settings


async def repo_with(world: GitWorld, tmp: Path, name: str, size: int) -> str:
    repo = await WorkCopy.create(world, tmp, name)
    commit = await repo.commit({"data.bin": os.urandom(size)})
    await repo.push("main")
    return commit


async def test_least_recently_used_repositories_are_evicted(
    git_world: GitWorld, tmp_path: Path
) -> None:
    commits = {
        name: await repo_with(git_world, tmp_path, name, 400_000) for name in ("a", "b", "c")
    }
    git = Git(make_settings(git_world, tmp_path, cache_max_bytes=1_000_000))
    for name in ("a", "b"):
        async with git.fetched(push_for(name, "main", commits[name])):
            pass
    async with git.fetched(push_for("a", "main", commits["a"])) as again:  # a is now newest
        assert again.cache_hit
    async with git.fetched(push_for("c", "main", commits["c"])):
        pass
    kept = sorted(p.name.split("-")[0] for p in git.repos.iterdir())
    assert kept == ["a", "c"]  # b was the least recently used
    assert git.cache.size <= 1_000_000


async def test_a_repository_in_use_is_never_evicted(git_world: GitWorld, tmp_path: Path) -> None:
    commits = {name: await repo_with(git_world, tmp_path, name, 400_000) for name in ("x", "y")}
    git = Git(make_settings(git_world, tmp_path, cache_max_bytes=1))
    async with git.fetched(push_for("x", "main", commits["x"])) as x:
        async with git.fetched(push_for("y", "main", commits["y"])):
            assert x.git_dir.exists()  # over budget, but in use
        # y was released, x still in use: enforcing evicts y only.
        await git.cache.enforce()
        assert x.git_dir.exists()
        assert [p.name.split("-")[0] for p in git.repos.iterdir()] == ["x"]
    await git.cache.enforce()
    assert list(git.repos.iterdir()) == []


FULL_DISK_SCRIPT = """
import json, subprocess, sys
import anyio
from pathlib import Path
from service.errors import DiskFull
from service.git import Git
from service.settings import load_settings
from tests.helpers import push_for

args = json.loads(sys.argv[1])
cache = Path(args["cache"])
cache.mkdir(parents=True, exist_ok=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(cache)], check=True)

async def main():
    settings = load_settings(queue_url="q", work_queue_url="w", bucket="bucket",
        git_url_template=args["url"], ssh_key_file=args["key"], known_hosts_file=args["known"],
        cache_dir=cache, cache_max_bytes=0)
    git = Git(settings)
    result = {}
    async with git.fetched(push_for("small", "main", args["small"])):
        pass
    try:
        async with git.fetched(push_for("big", "main", args["big"])):
            pass
        result["first"] = "fetched"
    except DiskFull as exc:
        result["first"] = "disk_full"
        result["reason"] = str(exc)
    result["after_eviction"] = sorted(p.name.split("-")[0] for p in git.repos.iterdir())
    async with git.fetched(push_for("big", "main", args["big"])) as fetched:
        result["retry"] = fetched.commit
    print(json.dumps(result))

anyio.run(main)
"""


async def test_a_full_disk_is_a_clear_transient_error_and_recovers(
    git_world: GitWorld, tmp_path: Path
) -> None:
    """A real full disk: the cache on a 3 MB tmpfs in a private mount namespace."""
    small = await repo_with(git_world, tmp_path, "small", 1_300_000)
    big = await repo_with(git_world, tmp_path, "big", 2_000_000)
    args = {
        "cache": str(tmp_path / "tiny"),
        "url": git_world.url_template,
        "key": str(git_world.key),
        "known": str(git_world.known_hosts),
        "small": small,
        "big": big,
    }
    command = [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        sys.executable,
        "-c",
        FULL_DISK_SCRIPT,
        json.dumps(args),
    ]
    with anyio.fail_after(120):
        result = await anyio.run_process(command, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr.decode()
    outcome = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert outcome["first"] == "disk_full", outcome
    assert "disk is full" in outcome["reason"]
    # The idle 'small' was evicted to make room; 'big' (in use while failing) was kept.
    assert outcome["after_eviction"] == ["big"]
    assert outcome["retry"] == big  # and the retry succeeds
