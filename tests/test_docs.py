"""The README (and docs/) document every setting, and the Makefile/CI entry points it
promises."""

from __future__ import annotations

from pathlib import Path

from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def manual() -> str:
    """README.md and every docs/*.md (topics the README links to)."""
    docs = sorted((ROOT / "docs").glob("*.md"))
    return "\n".join(path.read_text() for path in [ROOT / "README.md", *docs])


def test_every_setting_is_documented() -> None:
    readme = manual()
    missing = [
        name for name in Settings.model_fields if f"`BRANCHBUILD_{name.upper()}`" not in readme
    ]
    assert missing == []


def test_ci_runs_make_test() -> None:
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_metric_is_documented() -> None:
    import re

    from prometheus_client import generate_latest

    from service.metrics import Metrics

    readme = manual()
    exposed = generate_latest(Metrics().registry).decode()
    for family, kind in re.findall(r"^# TYPE (\w+) (\w+)", exposed, re.M):
        name = family if kind != "counter" or family.endswith("_total") else f"{family}_total"
        assert f"`{name}`" in readme, name
