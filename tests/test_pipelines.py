"""The pipeline configuration file: the shipped example, rule resolution, errors with their
file, line and field, and reloading (a bad new version is refused, the last good one kept)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from service.decide import Skip, decide
from service.errors import ConfigurationError
from service.events import Push, parse_event, parse_work
from service.intake import work_message
from service.metrics import Metrics
from service.outcome import Outcome
from service.pipelines import (
    DEFAULT_SKIP_MARKERS,
    OnDelete,
    Pipelines,
    SourceMode,
    Watcher,
    parse_config,
)
from service.settings import Settings, load_settings
from tests.helpers import ROOT, event_for

EXAMPLE = ROOT / "deploy" / "examples" / "pipelines.yaml"


def settings(**overrides: Any) -> Settings:
    return load_settings(queue_url="q", work_queue_url="w", bucket="bucket", **overrides)


def push(repository: str, branch: str) -> Push:
    commit = "a" * 40
    parsed = parse_event(json.dumps(event_for(repository, f"refs/heads/{branch}", commit)))
    assert isinstance(parsed, Push)
    return parsed


def test_the_shipped_example_loads_and_resolves() -> None:
    config = parse_config(EXAMPLE.read_bytes(), str(EXAMPLE), settings())
    mono = config.rule_for("platform-monorepo")
    assert mono.project_template == "bb-monorepo-payments"
    assert mono.include_branches == ("feature/*", "bugfix/*")
    assert mono.exclude_branches == ("feature/experimental-*",)
    assert mono.include_paths == ("services/payments/*", "libs/money/*")
    assert mono.skip_markers[-1] == "[wip]"
    assert dict(mono.environment) == {"SERVICE": "payments", "DEPLOY_STAGE": "preview"}
    assert mono.keep_running_branches == ("release/*",)
    assert mono.key_template == "platform-monorepo/payments/{branch}/{commit}.zip"
    assert mono.on_delete is OnDelete.DELETE
    web = config.rule_for("web-shop")
    assert web.source is SourceMode.CODECOMMIT and web.build_tags and web.skip_markers == ()
    assert config.rule_for("mobile-app") is web
    # The catch-all rule: environment settings for everything it leaves out.
    other = config.rule_for("anything")
    assert other.protected_branches == ("test", "develop", "staging")
    assert other.skip_markers == DEFAULT_SKIP_MARKERS and other.source is SourceMode.ARCHIVE
    assert config.reconcile_repositories == ("platform-monorepo", "web-shop")
    assert (config.reconcile_account, config.reconcile_region) == ("111122223333", "eu-west-1")


def test_reconciliation_needs_the_repositories_account() -> None:
    text = "version: 1\nrules: []\nreconcile:\n  repositories: [shop]\n"
    with pytest.raises(ConfigurationError, match=r"p.yaml:3: reconcile.account: required"):
        parse_config(text, "p.yaml", settings())
    config = parse_config(text, "p.yaml", settings(allowed_accounts=("444455556666",)))
    assert config.reconcile_account == "444455556666"


def test_reconciliation_the_allow_lists_would_refuse_is_refused() -> None:
    """Every push reconciliation found for a repository, region or account the allow-lists
    refuse was skipped in silence: the file is refused instead, naming the line."""
    text = (
        "version: 1\nrules: []\nreconcile:\n  account: '444455556666'\n"
        "  region: eu-west-1\n  repositories: [shop, other]\n"
    )
    allowed = {"allowed_accounts": ("444455556666",)}
    with pytest.raises(
        ConfigurationError,
        match=r"p.yaml:6: reconcile.repositories\[1\]: 'other' is not allowed by "
        "BRANCHBUILD_ALLOWED_REPOSITORIES",
    ):
        parse_config(text, "p.yaml", settings(**allowed, allowed_repositories=("shop*",)))
    with pytest.raises(
        ConfigurationError, match=r"p.yaml:5: reconcile.region: 'eu-west-1' is not allowed"
    ):
        parse_config(text, "p.yaml", settings(**allowed, allowed_regions=("us-*",)))
    with pytest.raises(ConfigurationError, match=r"p.yaml:4: reconcile.account: '444455556666'"):
        parse_config(text, "p.yaml", settings(allowed_accounts=("111122223333",)))
    config = parse_config(
        text,
        "p.yaml",
        settings(**allowed, allowed_repositories=("shop", "oth*"), allowed_regions=("eu-*",)),
    )
    assert config.reconcile_repositories == ("shop", "other")


def test_first_match_wins_and_the_environment_is_the_default() -> None:
    text = """
version: 1
rules:
  - repository: "shop-*"
    branches: {protected: [main]}
  - repository: [shop-api, other]
    branches: {protected: []}
"""
    config = parse_config(text, "p.yaml", settings(protected_branches=("develop",)))
    assert config.rule_for("shop-api").protected_branches == ("main",)
    assert config.rule_for("other").protected_branches == ()
    assert config.rule_for("unmatched").protected_branches == ("develop",)


def test_decide_uses_the_rule() -> None:
    text = """
version: 1
rules:
  - repository: mono
    branches: {include: ["feature/*"], exclude: ["feature/wip-*"], protected: []}
"""
    pipelines = Pipelines(parse_config(text, "p.yaml", settings()))
    s = settings()
    rule = pipelines.rule_for("mono")
    assert isinstance(decide(push("mono", "feature/a"), s, rule), Push)
    for branch in ("feature/wip-1", "bugfix/b"):
        result = decide(push("mono", branch), s, rule)
        assert isinstance(result, Skip) and result.outcome is Outcome.EXCLUDED, branch
    # "develop" is protected by the environment, but not under this rule.
    assert isinstance(decide(push("mono", "feature/develop"), s, rule), Push)
    assert isinstance(decide(push("other", "develop"), s, pipelines.rule_for("other")), Skip)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "version: 1\nrules:\n  - repository: a\n    sorce: codecommit\n",
            "p.yaml:4: rules[0].sorce: Extra inputs",
        ),
        (
            "version: 1\nrules:\n  - repository: a\n  - repository: b\n    source: svn\n",
            "p.yaml:5: rules[1].source: Input should be 'archive' or 'codecommit'",
        ),
        (
            "version: 1\nrules:\n  - repository: a\n    key: '{branch}.zip'\n",
            "p.yaml:4: rules[0].key: must contain {commit}",
        ),
        (
            "version: 1\nrules:\n  - repository: a\n    project: '{team}'\n",
            "p.yaml:4: rules[0].project: unknown field(s) ['team']",
        ),
        (
            "version: 1\nrules:\n  - repository: a\n    environment: {BRANCH_NAME: x}\n",
            "p.yaml:4: rules[0].environment: BRANCH_NAME is set by branchbuild",
        ),
        (
            "version: 1\nrules:\n  - repository: a\n    paths:\n      include: [a, '']\n",
            "p.yaml:5: rules[0].paths.include[1]: String should have at least 1 character",
        ),
        ("version: 1\nrules:\n  - project: x\n", "p.yaml:3: rules[0].repository: Field required"),
        ("version: 2\n", "p.yaml:1: version: Input should be 1"),
        ("version: 1\nrules: [\n", "p.yaml:3: not valid YAML"),
        ("- just a list\n", "p.yaml:1: the file must be a mapping"),
    ],
)
def test_errors_name_the_file_line_and_field(text: str, expected: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_config(text, "p.yaml", settings())
    assert str(caught.value).startswith(expected), str(caught.value)


async def test_reload_takes_a_good_version_and_refuses_a_bad_one(tmp_path: Path) -> None:
    path = tmp_path / "pipelines.yaml"
    path.write_text("version: 1\nrules:\n  - repository: shop\n    project: one\n")
    s = settings(config=str(path))
    pipelines = Pipelines.from_settings(s)
    metrics = Metrics()
    watcher = Watcher(s, pipelines, metrics, None)
    await watcher.load()
    assert pipelines.rule_for("shop").project_template == "one"
    assert await watcher.check() is False  # unchanged: not even re-read

    path.write_text("version: 1\nrules:\n  - repository: shop\n    project: two\n")
    os.utime(path, ns=(1, 2_000_000_000))  # a distinct mtime even on a coarse clock
    assert await watcher.check() is True
    assert pipelines.rule_for("shop").project_template == "two"

    path.write_text("version: 1\nrules:\n  - repository: shop\n    project: '{nope}'\n")
    os.utime(path, ns=(1, 3_000_000_000))
    assert await watcher.check() is False
    assert pipelines.rule_for("shop").project_template == "two"  # the last good one
    assert await watcher.check() is False  # refused once, not at every check
    assert metrics.config_reloads.labels(result="loaded")._value.get() == 1
    assert metrics.config_reloads.labels(result="refused")._value.get() == 1


async def test_a_missing_file_refuses_to_start(tmp_path: Path) -> None:
    s = settings(config=str(tmp_path / "absent.yaml"))
    with pytest.raises(ConfigurationError, match="absent.yaml: cannot read"):
        await Watcher(s, Pipelines.from_settings(s), Metrics(), None).load()


def test_an_s3_location_needs_a_key() -> None:
    with pytest.raises(ConfigurationError, match="BRANCHBUILD_CONFIG"):
        settings(config="s3://bucket-only")


def test_the_manual_shows_the_shipped_example() -> None:
    assert EXAMPLE.read_text() in (ROOT / "docs" / "configuration.md").read_text()


def test_a_deletion_is_queued_for_clean_up_only_under_on_delete() -> None:
    text = "version: 1\nrules:\n  - repository: tidy\n    on_delete: delete\n"
    pipelines = Pipelines(parse_config(text, "p.yaml", settings()))
    s = settings()
    for repository, queued in (("tidy", True), ("other", False)):
        raw = event_for(repository, "refs/heads/feature/x", None, old="b" * 40)
        deletion = parse_event(json.dumps(raw))
        assert isinstance(deletion, Push)
        result = decide(deletion, s, pipelines.rule_for(repository))
        assert (result is deletion) is queued, repository
        if queued:
            # Through the work queue and back: no new commit, the deleted one kept.
            message = work_message(deletion)
            assert parse_work(message.body) == deletion
            assert message.dedup != work_message(replace(deletion, old_commit="c" * 40)).dedup
