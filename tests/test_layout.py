"""The layout: the suite runs from a bare clone (nothing it needs lives outside the
repository), and production code needs nothing of localdev."""

from __future__ import annotations

import os
import re
import shutil
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


def test_the_event_tests_pass_in_a_clone_with_nothing_beside_it(tmp_path: Path) -> None:
    # A user's clone: the tracked files alone, in a folder with no siblings.
    clone = tmp_path / "alone" / "branchbuild"
    for path in tracked_files():
        target = clone / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            shutil.copy2(path, target)
    assert sorted(p.name for p in clone.parent.iterdir()) == ["branchbuild"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_events.py",
            "tests/test_decide.py",
        ],
        cwd=clone,
        env={k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed in [\d.]+s.*", summary), summary  # nothing skipped


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
