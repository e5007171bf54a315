"""The package layout shows the architecture: production code needs nothing of localdev."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT

_IMPORT_ALL = """
import importlib, pkgutil, sys

def load(package):
    for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if module.name not in ("service.localdev", "service.__main__"):
            imported = importlib.import_module(module.name)
            if module.ispkg:
                load(imported)

load(importlib.import_module("service"))
print(" ".join(sorted(m for m in sys.modules if m.startswith(("service.localdev", "asyncssh")))))
"""


def test_production_code_imports_nothing_from_localdev() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
