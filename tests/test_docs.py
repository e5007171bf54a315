"""The manual (README.md and docs/) documents every setting and metric, and its links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from service.metrics import Metrics
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~)")


def manual() -> str:
    return "\n".join(page.read_text() for page in PAGES)


def _outside_fences(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in _outside_fences(page.read_text()):
        heading = re.match(r"^#{1,6} (.+)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            found.add(slug.replace(" ", "-"))
    return found


def links(page: Path) -> list[str]:
    return [m for line in _outside_fences(page.read_text()) for m in _LINK.findall(line)]


def test_the_readme_stays_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto: are not ours to check
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    assert broken == []


def test_the_link_check_sees_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [no anchor](#nowhere)\n")
    assert links(page) == ["#title", "missing.md", "#nowhere"]
    assert anchors(page) == {"title"}


def test_every_page_is_linked_from_the_readme() -> None:
    readme = links(ROOT / "README.md")
    unlinked = [
        p.name for p in PAGES[1:] if not any(t.startswith(f"docs/{p.name}") for t in readme)
    ]
    assert unlinked == []


def test_every_setting_is_documented() -> None:
    text = manual()
    missing = [
        name for name in Settings.model_fields if f"`BRANCHBUILD_{name.upper()}`" not in text
    ]
    assert missing == []


def test_ci_runs_make_test() -> None:
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_metric_is_documented() -> None:
    text = manual()
    exposed = generate_latest(Metrics().registry).decode()
    for family, kind in re.findall(r"^# TYPE (\w+) (\w+)", exposed, re.M):
        name = family if kind != "counter" or family.endswith("_total") else f"{family}_total"
        assert f"`{name}`" in text, name
