"""Section ``archive-extras``: what the rule fields ``git_metadata`` and ``submodules`` cost.

For each size's repository on the SSH git host, the service's own :class:`service.git.Git`
(in this process) archives the pushed commit on a warm cache: plainly, with ``git_metadata``
(a shallow ``.git`` in the zip), and, through a superproject whose only content is that
repository as a submodule (``../<repository>``), with ``submodules``: once on a cold cache (the
submodule's fetch included) and then warm. Bytes are the zip's; seconds are wall time of the
archive stream read to its end (the median of the repeats).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from service.events import Action, Push, RefType
from service.git import NO_EXTRAS, Extras, Git
from service.settings import load_settings

from .core import Bench, Size
from .repos import git

SUBMODULE_PATH = "vendor/lib"


def measure_archive_extras(bench: Bench, size: Size, repeats: int) -> dict[str, Any]:
    """Bytes and seconds of a plain archive, with git_metadata, and with submodules."""
    superproject = _superproject(bench, size)
    return anyio.run(_measure, bench, size, superproject, max(1, repeats))


def _superproject(bench: Bench, size: Size) -> str:
    """A repository ``super-<name>`` on the git host holding ``size``'s head as a submodule."""
    name = f"super-{size.spec.name}"
    served = bench.host.root / "v1" / "repos" / f"{name}.git"
    with tempfile.TemporaryDirectory(dir=bench.work) as scratch:
        work = Path(scratch)
        git("init", "--quiet", "--initial-branch=main", str(work))
        (work / ".gitmodules").write_text(
            f'[submodule "lib"]\n\tpath = {SUBMODULE_PATH}\n\turl = ../{size.spec.name}\n'
        )
        (work / "README").write_text("a superproject\n")
        git("add", ".gitmodules", "README", cwd=work)
        git(
            "update-index", "--add", "--cacheinfo", f"160000,{size.head},{SUBMODULE_PATH}", cwd=work
        )
        git("commit", "--quiet", "-m", "superproject", cwd=work)
        if not served.exists():
            git("init", "--bare", "--quiet", "--initial-branch=main", str(served))
        git("push", "--quiet", "--force", str(served), "HEAD:refs/heads/main", cwd=work)
        return git("rev-parse", "HEAD", cwd=work)


def _push(repository: str, commit: str) -> Push:
    return Push(
        event_id=f"bench-{repository}",
        account="123456789012",
        region="eu-west-1",
        repository=repository,
        ref_type=RefType.BRANCH,
        name="main",
        action=Action.UPDATED,
        commit=commit,
    )


async def _measure(bench: Bench, size: Size, superproject: str, repeats: int) -> dict[str, Any]:
    host = bench.host

    def service_git(cache: str) -> Git:
        return Git(
            load_settings(
                queue_url="unused",
                work_queue_url="unused",
                bucket="unused",
                git_url_template=host.url_template,
                ssh_key_file=host.key,
                known_hosts_file=host.known_hosts,
                cache_dir=bench.work / f"extras-{cache}-{size.name}",
            )
        )

    async def archive(service: Git, push: Push, extras: Extras) -> tuple[int, float]:
        started = time.perf_counter()
        fetched = await service.fetch(push)
        total = 0
        async with service.archive(fetched, extras) as stream:
            async for chunk in stream:
                total += len(chunk)
        return total, time.perf_counter() - started

    async def median(service: Git, push: Push, extras: Extras) -> tuple[int, float]:
        runs = [await archive(service, push, extras) for _ in range(repeats)]
        return runs[0][0], statistics.median(seconds for _, seconds in runs)

    service = service_git("plain")
    pushed = _push(size.spec.name, size.head)
    await service.fetch(pushed)  # warm
    plain_bytes, plain_s = await median(service, pushed, NO_EXTRAS)
    bench.log(f"{size.name}: archive-extras git_metadata ({repeats} repeats)")
    metadata = Extras(git_metadata_ref="refs/heads/main")
    metadata_bytes, metadata_s = await median(service, pushed, metadata)

    bench.log(f"{size.name}: archive-extras submodules")
    cold = service_git("submodules")
    outer = _push(f"super-{size.spec.name}", superproject)
    await cold.fetch(outer)  # the superproject itself is cached: the submodule is not
    with_submodules = Extras(submodules=True)
    sub_bytes, sub_cold_s = await archive(cold, outer, with_submodules)
    _, sub_warm_s = await median(cold, outer, with_submodules)
    outer_bytes, outer_s = await median(cold, outer, NO_EXTRAS)
    return {
        "size": size.name,
        "repository": size.spec.name,
        "files": size.files,
        "tree_bytes": size.bytes,
        "repeats": repeats,
        "plain_bytes": plain_bytes,
        "plain_seconds": round(plain_s, 3),
        "git_metadata_bytes": metadata_bytes,
        "git_metadata_seconds": round(metadata_s, 3),
        "superproject_plain_bytes": outer_bytes,
        "superproject_plain_seconds": round(outer_s, 3),
        "submodules_bytes": sub_bytes,
        "submodules_cold_seconds": round(sub_cold_s, 3),
        "submodules_warm_seconds": round(sub_warm_s, 3),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    """The section's table (docs/build-contents.md quotes it)."""
    if not rows:
        return ""
    lines = [
        "## Archive extras: git_metadata and submodules",
        "",
        "| repository | plain archive | with `git_metadata` | superproject + `submodules`, "
        "cold (fetch included) | warm |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        extra = r["git_metadata_bytes"] - r["plain_bytes"]
        lines.append(
            f"| {r['size']} ({r['files']} files, {_mb(r['tree_bytes'])}) "
            f"| {_mb(r['plain_bytes'])}, {r['plain_seconds']:.2f} s "
            f"| {_mb(r['git_metadata_bytes'])} (+{_mb(extra)}, "
            f"+{100 * extra / max(1, r['plain_bytes']):.0f} %), {r['git_metadata_seconds']:.2f} s "
            f"| {_mb(r['submodules_bytes'])}, {r['submodules_cold_seconds']:.2f} s "
            f"| {r['submodules_warm_seconds']:.2f} s |"
        )
    return "\n".join(lines) + "\n"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"
