"""A local build's working directory: the archive unpacked safely, the buildspec read."""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
from pathlib import Path

from service.errors import PermanentError

from .buildspec import BuildspecError, Plan, check


def safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name).strip(".")
    return cleaned or "_"


def chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for parent, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(parent, name), uid, gid, follow_symlinks=False)


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


def read_buildspec(source: Path) -> Plan:
    """Read ``buildspec.yml`` (or ``.yaml``) at the top of the source into a plan.

    Raises:
        BuildspecError: missing, or with errors (all of them in the message, with lines).
    """
    for name in ("buildspec.yml", "buildspec.yaml"):
        path = source / name
        if path.is_file() and not path.is_symlink():
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                raise BuildspecError(f"{name} is not UTF-8 text") from None
            plan, problems = check(text)
            if plan is None:
                errors = [str(p) for p in problems if p.severity == "error"]
                raise BuildspecError(f"{name}: " + "; ".join(errors))
            return plan
    raise BuildspecError("the repository has no buildspec.yml")
