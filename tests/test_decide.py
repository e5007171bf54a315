"""The decision step: protected and included branches, tags, deletions, allow-lists."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.decide import Skip, decide
from service.errors import RejectedEvent
from service.events import Push, parse_event
from service.outcome import Outcome
from service.settings import Settings, load_settings

EVENTS = Path(__file__).parent / "events"


def settings(**overrides: Any) -> Settings:
    return load_settings(queue_url="q", work_queue_url="w", bucket="bucket", **overrides)


def event(name: str, **detail: Any) -> Push:
    data = json.loads((EVENTS / name).read_text())
    data["detail"].update(detail)
    if "referenceName" in detail:
        prefix = "refs/tags/" if data["detail"]["referenceType"] == "tag" else "refs/heads/"
        data["detail"]["referenceFullName"] = prefix + detail["referenceName"]
    parsed = parse_event(json.dumps(data))
    assert isinstance(parsed, Push)
    return parsed


def test_feature_branch_is_built() -> None:
    push = event("branch-created.json")
    assert decide(push, settings()) is push


@pytest.mark.parametrize("branch", ["test", "develop", "staging"])
def test_default_protected_branches_are_skipped(branch: str) -> None:
    result = decide(event("branch-updated.json", referenceName=branch), settings())
    assert isinstance(result, Skip) and result.outcome is Outcome.PROTECTED


def test_protected_globs() -> None:
    s = settings(protected_branches=("release/*", "main"))
    assert isinstance(decide(event("branch-updated.json", referenceName="release/1.2"), s), Skip)
    assert isinstance(decide(event("branch-updated.json", referenceName="develop"), s), Push)


def test_include_list() -> None:
    s = settings(include_branches=("feature/*",))
    assert isinstance(decide(event("branch-updated.json", referenceName="feature/x"), s), Push)
    skipped = decide(event("branch-updated.json", referenceName="bugfix/x"), s)
    assert isinstance(skipped, Skip) and skipped.outcome is Outcome.EXCLUDED


def test_deleted_and_other_events_are_skipped() -> None:
    deleted = decide(event("branch-deleted.json"), settings())
    assert isinstance(deleted, Skip) and deleted.outcome is Outcome.DELETED
    other = parse_event((EVENTS / "merge-commit-unreferenced.json").read_text())
    ignored = decide(other, settings())
    assert isinstance(ignored, Skip) and ignored.outcome is Outcome.IGNORED


def test_tags_only_when_enabled() -> None:
    tag = event("tag-created.json")
    skipped = decide(tag, settings())
    assert isinstance(skipped, Skip) and skipped.outcome is Outcome.IGNORED
    assert decide(tag, settings(build_tags=True)) is tag


def test_allow_lists() -> None:
    push = event("branch-created.json")
    assert decide(push, settings(allowed_accounts=("111122223333",))) is push
    with pytest.raises(RejectedEvent, match="BRANCHBUILD_ALLOWED_ACCOUNTS"):
        decide(push, settings(allowed_accounts=("999999999999",)))
    with pytest.raises(RejectedEvent, match="BRANCHBUILD_ALLOWED_REGIONS"):
        decide(push, settings(allowed_regions=("us-east-1",)))
    with pytest.raises(RejectedEvent, match="BRANCHBUILD_ALLOWED_REPOSITORIES"):
        decide(push, settings(allowed_repositories=("other-*",)))
