"""What a build directory holds, read from an archive or from a real checkout, to compare them."""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path

import anyio

from service.git import NO_EXTRAS, Extras, Fetched, Git
from tests.helpers import GitWorld

# path -> ("file", executable, bytes) | ("link", target bytes) | ("dir",)
Entry = tuple[object, ...]
Tree = dict[str, Entry]


def tree_of_zip(data: bytes) -> Tree:
    tree: Tree = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            mode = info.external_attr >> 16
            if info.filename.endswith("/"):
                tree[info.filename.rstrip("/")] = ("dir",)
            elif stat.S_ISLNK(mode):
                tree[info.filename] = ("link", archive.read(info))
            else:
                tree[info.filename] = ("file", bool(mode & 0o100), archive.read(info))
    return tree


def tree_of_checkout(root: Path) -> Tree:
    """Every file, link and directory of a working tree, without the .git of the repository
    and of its submodules."""
    tree: Tree = {}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if not (d == ".git" and here == root)]
        for name in dirs + files:
            path = here / name
            relative = path.relative_to(root).as_posix()
            if name == ".git" and path.is_file():  # a submodule's gitfile
                continue
            if path.is_symlink():
                tree[relative] = ("link", os.readlink(path).encode("utf-8", "surrogateescape"))
            elif path.is_dir():
                tree[relative] = ("dir",)
            else:
                tree[relative] = ("file", bool(path.stat().st_mode & 0o100), path.read_bytes())
    return tree


def unpack(data: bytes, into: Path) -> None:
    """Unzip as CodeBuild does: modes kept, symlinks made links."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            target = into / info.filename
            mode = info.external_attr >> 16
            if info.filename.endswith("/"):
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if stat.S_ISLNK(mode):
                target.symlink_to(archive.read(info).decode("utf-8", "surrogateescape"))
            else:
                target.write_bytes(archive.read(info))
                target.chmod(0o755 if mode & 0o100 else 0o644)


async def archive_bytes(git: Git, fetched: Fetched, extras: Extras = NO_EXTRAS) -> bytes:
    data = bytearray()
    async with git.archive(fetched, extras) as stream:
        async for chunk in stream:
            data += chunk
    return bytes(data)


async def checkout(
    world: GitWorld,
    repository: str,
    commit: str,
    into: Path,
    *,
    submodules: bool = False,
    env: dict[str, str] | None = None,
) -> Path:
    """A real ``git clone`` + ``git checkout <commit>`` over SSH (and ``git submodule update
    --init --recursive``): what CodeBuild's own CodeCommit source leaves."""
    env = env or world.env()
    url = world.url_template.format(repository=repository)

    async def git(*args: str, cwd: Path | None = None) -> None:
        result = await anyio.run_process(["git", *args], cwd=cwd, env=env, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)}: {result.stderr.decode()}")

    await git("clone", "--quiet", "--no-checkout", url, str(into))
    await git("checkout", "--quiet", commit, cwd=into)
    if submodules:
        await git("submodule", "update", "--quiet", "--init", "--recursive", cwd=into)
    return into


def differences(archived: Tree, checked_out: Tree) -> list[str]:
    """What differs, one line per path (empty when the trees are equal)."""
    lines = []
    for path in sorted(archived.keys() | checked_out.keys()):
        a, c = archived.get(path), checked_out.get(path)
        if a != c:
            lines.append(f"{path!r}: archive {_short(a)} != checkout {_short(c)}")
    return lines


def _short(entry: Entry | None) -> str:
    return "absent" if entry is None else repr(entry)[:120]
