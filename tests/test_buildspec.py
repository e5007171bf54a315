"""The buildspec reader: a corpus of real-world shapes, precise refusals, random YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from localdev.buildspec import Plan, check, parse_secret_ref
from localdev.commands import describe

CORPUS = Path(__file__).parent / "buildspecs"
GOOD = sorted((CORPUS / "good").glob("*.yml"))
BAD = sorted((CORPUS / "bad").glob("*.yml"))


def test_the_corpus_is_there() -> None:
    assert len(GOOD) >= 15 and len(BAD) >= 20


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_good_buildspecs_become_plans(path: Path) -> None:
    plan, problems = check(path.read_text())
    assert plan is not None, [str(p) for p in problems]
    assert plan.phases and all(p.severity == "warning" for p in problems)
    assert describe(plan).startswith(f"version {plan.version}")


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_buildspecs_are_refused_with_a_clear_message(path: Path) -> None:
    text = path.read_text()
    plan, problems = check(text)
    assert plan is None
    errors = [p for p in problems if p.severity == "error"]
    assert errors and all(p.message for p in errors)
    first = text.splitlines()[0] if text else ""
    if first.startswith("# expect: "):
        expected = first.removeprefix("# expect: ")
        assert any(expected in p.message for p in errors), [str(p) for p in problems]
        # Every problem in a file with content points at its line.
        assert all(p.line for p in errors if "empty" not in p.message)


def plan_of(text: str) -> Plan:
    plan, problems = check(text)
    assert plan is not None, [str(p) for p in problems]
    return plan


def test_commands_keep_their_text() -> None:
    plan = plan_of((CORPUS / "good" / "multiphase-finally.yml").read_text())
    install, pre_build, build, post_build = plan.phases
    assert [c.text for c in install.commands] == ["false", "yes", "1.10", "on", "null_command"]
    assert install.on_failure == "ABORT" and pre_build.on_failure == "CONTINUE"
    assert pre_build.run_as == "nobody" and plan.run_as == "root"
    assert build.commands[0].text == 'set -e\nfor i in 1 2 3; do\n  echo "$i"\ndone\n'
    assert build.commands[1].text == "echo folded across lines\n"
    assert [c.text for c in build.finally_] == ["echo cleanup"]
    assert build.commands[0].line == 32  # the "- |" line
    variables = {v.name: (v.value, v.source) for v in plan.variables}
    assert variables["FLAG"] == ("yes", "variables")
    assert variables["VERSION"] == ("1.10", "variables")
    assert variables["EMPTY"] == ("", "variables")
    assert variables["DB_PASS"] == ("prod/db:password", "secrets-manager")
    assert post_build.commands[0].text == 'echo "succeeding=$CODEBUILD_BUILD_SUCCEEDING"'


def test_secret_references() -> None:
    assert parse_secret_ref("prod/db") == parse_secret_ref("prod/db:::")
    ref = parse_secret_ref("prod/db:password:AWSCURRENT")
    assert (ref.secret_id, ref.json_key, ref.version_stage, ref.version_id) == (
        "prod/db",
        "password",
        "AWSCURRENT",
        "",
    )
    arn = "arn:aws:secretsmanager:eu-west-1:111122223333:secret:app-Ab12Cd"
    ref = parse_secret_ref(f"{arn}:token::0123-4567")
    assert (ref.secret_id, ref.json_key, ref.version_stage, ref.version_id) == (
        arn,
        "token",
        "",
        "0123-4567",
    )
    assert parse_secret_ref("mysecret::AWSCURRENT").version_stage == "AWSCURRENT"


def test_unknown_keys_are_warnings_with_lines_and_hints() -> None:
    plan, problems = check(
        "version: 0.2\nphase:\n  build: {}\nphases:\n  biuld:\n    commands: [a]\n"
        "  build:\n    comands: [a]\n    commands: [b]\nartifact:\n  files: [x]\n"
    )
    assert plan is not None
    text = [str(p) for p in problems]
    assert (
        "line 2: warning: the buildspec: unknown key 'phase', ignored (did you mean 'phases'?)"
        in text
    )
    assert any(t.startswith("line 5: warning:") and "'build'" in t for t in text)
    assert any(t.startswith("line 8: warning:") and "'commands'" in t for t in text)
    assert any(t.startswith("line 10: warning:") and "'artifacts'" in t for t in text)


def test_codebuild_only_features_are_warned_about() -> None:
    plan = plan_of((CORPUS / "good" / "proxy-and-extras.yml").read_text())
    messages = " ".join(p.message for p in plan.problems)
    for feature in ("proxy", "s3-prefix", "enable-symlinks", "fallback-keys"):
        assert feature in messages
    assert plan.phases[0].commands[0].text == "echo single-string-command"
    assert plan.artifacts[0].exclude_paths == ("**/*.map",)
    assert plan.cache.action == "restore" and plan.cache.key == "npm-cache"
    batch = plan_of((CORPUS / "good" / "matrix-batch.yml").read_text())
    assert batch.batch == "build-matrix"
    assert any("StartBuild" in p.message for p in batch.problems)


def test_anchors_and_merge_keys() -> None:
    plan = plan_of((CORPUS / "good" / "anchors-and-merge.yml").read_text())
    assert [c.text for p in plan.phases for c in p.commands] == [
        "echo common",
        "echo one",
        "echo two",
    ]


yaml_scalars = st.one_of(
    st.text(max_size=12),
    st.integers(),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.sampled_from(["0.2", "0.1", "yes", "ABORT", "CONTINUE", "bash", "**/*"]),
)
keys = st.sampled_from(
    [
        "version",
        "phases",
        "build",
        "install",
        "commands",
        "finally",
        "env",
        "variables",
        "artifacts",
        "files",
        "reports",
        "cache",
        "paths",
        "batch",
        "on-failure",
        "run-as",
        "secrets-manager",
        "parameter-store",
        "exported-variables",
        "shell",
        "secondary-artifacts",
    ]
) | st.text(max_size=8)
documents = st.recursive(
    yaml_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(documents)
def test_random_yaml_never_raises(document: object) -> None:
    plan, problems = check(yaml.safe_dump(document))
    assert plan is not None or any(p.severity == "error" for p in problems)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_random_text_never_raises(text: str) -> None:
    plan, problems = check(text)
    assert plan is not None or any(p.severity == "error" for p in problems)


def test_each_problem_is_reported_once() -> None:
    _, problems = check(
        "version: 0.2\nphases:\n  build:\n    commands: [a]\n"
        "artifacts:\n  files: [a]\n  nmae: x\n  files: [b]\n"
    )
    assert [str(p) for p in problems] == [
        "line 7: warning: artifacts: unknown key 'nmae', ignored (did you mean 'name'?)",
        "line 8: error: artifacts: duplicate key 'files' (first on line 6)",
    ]
