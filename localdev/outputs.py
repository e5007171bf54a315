"""What a local build leaves behind: artifact and report files, and the per-project cache.

Blocking file work, run in a worker thread by the builder. Nothing here follows a path out of
the build's source (or, for the cache, its home): a symlink pointing outside is skipped.
"""

from __future__ import annotations

import glob
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from .buildspec import FileSet

GLOB = frozenset("*?[")


def _inside(path: Path, root: Path) -> bool:
    resolved = path.resolve()
    return resolved == root or root in resolved.parents


def _matches(base: Path, patterns: tuple[str, ...]) -> set[str]:
    """Files under ``base`` matching any pattern (``**`` included); a directory means its files."""
    found: set[str] = set()
    for pattern in patterns:
        for match in glob.glob(pattern, root_dir=base, recursive=True, include_hidden=True):
            path = base / match
            if path.is_dir():
                found |= {str(p.relative_to(base)) for p in path.rglob("*") if p.is_file()}
            elif path.is_file():
                found.add(os.path.normpath(match))
    return found


def collect(files: FileSet, source: Path, target: Path) -> list[str]:
    """Copy the set's files into ``target``; the copied names, relative to ``target``."""
    root = source.resolve()
    base = source / files.base_directory
    if not base.is_dir() or not _inside(base, root):
        return []
    chosen = _matches(base, files.files) - _matches(base, files.exclude_paths)
    copied: list[str] = []
    for name in sorted(chosen):
        path = base / name
        if not _inside(path, root):
            continue  # a symlink out of the source
        relative = Path(name).name if files.discard_paths else name
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)
        copied.append(str(relative))
    return sorted(set(copied))


@dataclass(frozen=True)
class CacheResult:
    saved: tuple[str, ...]
    problems: tuple[str, ...]


def _where(path: str, source: Path, home: Path) -> tuple[str, Path] | str:
    """("src" | "home", the path's fixed prefix) for a cache path; a reason if not cacheable.

    CodeBuild's home is /root; ``~``, ``$HOME`` and ``/root`` mean the build's own home here.
    """
    text = path.strip()
    for prefix in ("$CODEBUILD_SRC_DIR/", "${CODEBUILD_SRC_DIR}/"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    area = "src"
    for prefix in ("~/", "$HOME/", "${HOME}/", "/root/"):
        if text.startswith(prefix):
            area, text = "home", text[len(prefix) :]
            break
    if text.startswith("/"):
        return f"{path}: outside the source and home, not cached locally"
    parts: list[str] = []
    for part in Path(text).parts:
        if GLOB & set(part):
            break
        parts.append(part)
    if ".." in parts:
        return f"{path}: goes out of the source, not cached"
    return area, Path(*parts) if parts else Path(".")


def save_cache(cache: Path, paths: tuple[str, ...], source: Path, home: Path) -> CacheResult:
    """Replace the cache with the current content of ``paths`` (their fixed prefixes)."""
    fresh = cache.with_name(f"{cache.name}.new-{uuid.uuid4().hex[:8]}")
    saved, problems = [], []
    for path in paths:
        where = _where(path, source, home)
        if isinstance(where, str):
            problems.append(where)
            continue
        area, relative = where
        base = source if area == "src" else home
        origin = base / relative
        if not origin.exists() or not _inside(origin, base.resolve()):
            continue
        destination = fresh / area / relative
        if origin.is_dir():
            shutil.copytree(origin, destination, symlinks=True, dirs_exist_ok=True)
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, destination, follow_symlinks=False)
        saved.append(path)
    fresh.mkdir(parents=True, exist_ok=True)
    old = cache.with_name(f"{cache.name}.old-{uuid.uuid4().hex[:8]}")
    if cache.exists():
        cache.rename(old)
    fresh.rename(cache)
    shutil.rmtree(old, ignore_errors=True)
    return CacheResult(tuple(saved), tuple(problems))


def restore_cache(cache: Path, paths: tuple[str, ...], source: Path, home: Path) -> list[str]:
    """Put the cached files back where they were; the areas restored."""
    restored = []
    for area, base in (("src", source), ("home", home)):
        if (cache / area).is_dir():
            shutil.copytree(cache / area, base, symlinks=True, dirs_exist_ok=True)
            restored.append(f"{len(list((cache / area).rglob('*')))} entries in {area}")
    return restored
