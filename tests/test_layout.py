"""The layout: the suite runs from a bare clone (no code names anything outside the
repository: CI runs the whole suite in a clean clone), and production code needs nothing of
localdev."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARENTS = re.compile(r"\.parents\[(\d+)\]")


def tracked_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    return [ROOT / name for name in out.split("\0") if name]


def test_no_code_reaches_outside_the_repository() -> None:
    escapes = []
    for path in tracked_files():
        if path.suffix not in {".py", ".sh"} and path.name != "Makefile":
            continue
        if path == Path(__file__).resolve():
            continue
        text = path.read_text()
        root = len(path.relative_to(ROOT).parts) - 1  # parents[root] is the repository
        for match in PARENTS.finditer(text):
            if int(match.group(1)) > root:
                escapes.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
        if "../shared" in text or '"shared" / "events"' in text:
            escapes.append(f"{path.relative_to(ROOT)}: names ../shared")
    assert escapes == []


_IMPORT_ALL = """
import importlib, pkgutil, sys

def load(package):
    for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if module.name != "service.__main__":
            imported = importlib.import_module(module.name)
            if module.ispkg:
                load(imported)

load(importlib.import_module("service"))
print(" ".join(sorted(m for m in sys.modules if m.startswith(("localdev", "asyncssh")))))
"""


def test_production_code_imports_nothing_from_localdev() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
