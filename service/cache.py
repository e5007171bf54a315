"""The on-disk git cache's budget: which repositories are in use, how big it is, what to evict.

Each repository's bare clone is kept so later pushes fetch only what is new. When the cache
grows past ``BRANCHBUILD_CACHE_MAX_BYTES`` the least recently used repositories that no job
is using are deleted; a full disk evicts every idle repository. A repository is "in use"
from the start of its fetch to the end of its archive's upload, so nothing is ever deleted
under a running git.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

log = logging.getLogger("branchbuild.cache")

_MARKER = "branchbuild-last-used"


class RepoCache:
    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int,
        on_change: Callable[[int, int], None] | None = None,
    ) -> None:
        """``on_change(total_bytes, evicted_count)`` is called after each size check."""
        self.root = root
        self.max_bytes = max_bytes
        self.on_change = on_change
        self._in_use: Counter[Path] = Counter()
        self._evicting: dict[Path, anyio.Event] = {}
        # Size and last use of each repository, from the last full scan plus what changed since.
        self._known: dict[Path, tuple[int, float]] | None = None
        self.size = 0

    @asynccontextmanager
    async def use(self, git_dir: Path) -> AsyncIterator[None]:
        """Mark ``git_dir`` in use (never evicted meanwhile) and recently used."""
        while git_dir in self._evicting:
            await self._evicting[git_dir].wait()
        self._in_use[git_dir] += 1
        try:
            if await anyio.Path(git_dir).exists():
                await anyio.Path(git_dir / _MARKER).touch()
                if self._known is not None and git_dir in self._known:
                    self._known[git_dir] = (self._known[git_dir][0], time.time())
            yield
        finally:
            self._in_use[git_dir] -= 1
            if not self._in_use[git_dir]:
                del self._in_use[git_dir]

    async def enforce(self, *, target: int | None = None, changed: Path | None = None) -> int:
        """Evict idle repositories, least recently used first, until the cache is within
        ``target`` bytes (default: the budget). Returns how many were evicted.

        ``changed``: only this repository changed since the last check, so only it is
        measured again; otherwise (and the first time) the whole cache is walked.
        """
        limit = (self.max_bytes or float("inf")) if target is None else target
        if changed is None or self._known is None:
            sizes = await anyio.to_thread.run_sync(_sizes, self.root)
        else:
            sizes = dict(self._known)
            fresh = await anyio.to_thread.run_sync(_sizes, self.root, changed)
            sizes.pop(changed, None)
            sizes.update(fresh)
        total = sum(size for size, _ in sizes.values())
        evicted = 0
        for git_dir in sorted(sizes, key=lambda d: sizes[d][1]):  # oldest use first
            if total <= limit:
                break
            if self._in_use[git_dir] or git_dir in self._evicting:
                continue
            done = self._evicting[git_dir] = anyio.Event()
            try:
                await anyio.to_thread.run_sync(shutil.rmtree, git_dir, True)
            finally:
                del self._evicting[git_dir]
                done.set()
            total -= sizes[git_dir][0]
            evicted += 1
            log.info("evicted %s from the git cache (%s bytes)", git_dir.name, sizes[git_dir][0])
            del sizes[git_dir]
        self._known = sizes
        self.size = total
        if self.on_change is not None:
            self.on_change(total, evicted)
        return evicted


def _sizes(root: Path, only: Path | None = None) -> dict[Path, tuple[int, float]]:
    """Size in bytes and last use time of each repository directory under ``root`` (or of
    ``only``, if it exists)."""
    found: dict[Path, tuple[int, float]] = {}
    if not root.exists():
        return found
    for entry in os.scandir(root):
        if not entry.is_dir(follow_symlinks=False):
            continue
        if only is not None and entry.name != only.name:
            continue
        path = Path(entry.path)
        marker = path / _MARKER
        used = marker.stat().st_mtime if marker.exists() else entry.stat().st_mtime
        found[path] = (_tree_size(path), used)
    return found


def _tree_size(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:  # a concurrent git gc or fetch moved it
                continue
    return total
