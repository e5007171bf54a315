"""The event parser: the samples, every malformed shape, and hostile names."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from service.errors import MalformedEvent
from service.events import Action, OtherEvent, Push, RefType, parse_event, parse_work

EVENTS = Path(__file__).parent / "events"
CORPUS = Path(__file__).parent / "corpus"


def sample(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EVENTS / name).read_text())
    return data


def with_detail(name: str = "branch-created.json", **changes: Any) -> str:
    event = sample(name)
    for key, value in changes.items():
        if value is None:
            event["detail"].pop(key, None)
        else:
            event["detail"][key] = value
    return json.dumps(event)


def test_branch_created_sample() -> None:
    push = parse_event(json.dumps(sample("branch-created.json")))
    assert push == Push(
        event_id="0d6f1c7a-3b41-4e0e-8a4e-6f2a9b6f8a01",
        account="111122223333",
        region="eu-west-1",
        repository="payments-api",
        ref_type=RefType.BRANCH,
        name="feature/PAY-1432-refunds",
        action=Action.CREATED,
        commit="9f2c61d0a4b7e83c5d19f0e2a6b4c8d7e1f3a5b9",
        old_commit=None,
        time="2026-11-20T09:14:03Z",
        pusher="arn:aws:iam::111122223333:user/dev-anna",  # callerUserArn (notifications)
    )
    assert push.ref == "refs/heads/feature/PAY-1432-refunds"


def test_deleted_branch_has_no_commit() -> None:
    push = parse_event(json.dumps(sample("branch-deleted.json")))
    assert isinstance(push, Push)
    assert push.action is Action.DELETED and push.commit is None
    assert push.old_commit == "3a8b0c4e2f61d97a5b13c8e0f4d2a6b9c7e1f0d3"


def test_tag_and_other_events() -> None:
    tag = parse_event(json.dumps(sample("tag-created.json")))
    assert isinstance(tag, Push) and tag.ref_type is RefType.TAG and tag.ref == "refs/tags/v2.14.0"
    other = parse_event(json.dumps(sample("merge-commit-unreferenced.json")))
    assert other == OtherEvent(
        event_id="a8c3e1f5-2d7b-4e9a-8f1c-6b0d4a2e9c06", event="unreferencedMergeCommitCreated"
    )


def test_unknown_fields_are_ignored() -> None:
    event = sample("branch-updated.json")
    event["detail"]["displayName"] = "Anna"
    event["detail"]["emailAddress"] = "anna@example.com"
    event["extra"] = {"nested": [1, 2]}
    assert isinstance(parse_event(json.dumps(event)), Push)


def test_work_message_round_trip() -> None:
    push = parse_event(json.dumps(sample("branch-updated.json")))
    assert isinstance(push, Push)
    assert parse_work(push.to_json()) == push


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "not an object"),
        (b"\xff\xfe", "not JSON"),
        ("x" * (256 * 1024 + 1), "larger than"),
        (
            json.dumps({**sample("branch-created.json"), "source": "aws.s3"}),
            "not a CodeCommit event",
        ),
        (json.dumps({**sample("branch-created.json"), "detail": "x"}), "detail"),
        (with_detail(commitId="9f2c61d0"), "40-character"),
        (with_detail(commitId="G" * 40), "40-character"),
        (with_detail(commitId=None), "40-character"),
        (with_detail(commitId=12345), "40-character"),
        (with_detail(referenceName=None), "referenceName"),
        (with_detail(referenceName=["a"]), "referenceName"),
        (with_detail(referenceType="note"), "referenceType"),
        (with_detail(referenceFullName="refs/heads/other"), "does not match"),
        (with_detail(repositoryName="../../etc"), "repository"),
        (with_detail(repositoryName="-uhelp"), None),
        (with_detail("branch-deleted.json", oldCommitId=None), "oldCommitId"),
        (json.dumps({**sample("branch-created.json"), "account": "evil"}), "account"),
    ],
)
def test_malformed_bodies_are_permanent(body: str | bytes, reason: str | None) -> None:
    try:
        parse_event(body)
    except MalformedEvent as exc:
        if reason:
            assert reason in str(exc)
    else:
        # A leading dash is a valid CodeCommit name; it must still never reach git as an option.
        assert reason is None


# Names git accepts although they look like shell: nothing here uses a shell, so they are
# built under their exact names (the end-to-end tests check nothing runs).
SHELLY_BUT_VALID = ["$(touch${IFS}pwned)", "`id`", "a;rm${IFS}-rf", "a|b&c>d<e", "'quoted\""]

# Names git refuses: never accepted.
HOSTILE_REFS = [
    "$(touch /tmp/pwned)",
    "--upload-pack=touch /tmp/pwned",
    "-f",
    "a..b",
    "../../etc/passwd",
    "a\nb",
    "a\x00b",
    "a\x7fb",
    "a b",
    "a~1",
    "a^",
    "a:b",
    "a?",
    "a*",
    "a[b",
    "a\\b",
    "a//b",
    "/a",
    "a/",
    "a.",
    "a/.b",
    "a.lock",
    "@",
    "a@{1}",
    "x" * 1000,
]


@pytest.mark.parametrize("name", HOSTILE_REFS)
def test_hostile_ref_names_are_refused(name: str) -> None:
    body = with_detail(referenceName=name, referenceFullName="refs/heads/" + name)
    with pytest.raises(MalformedEvent, match="invalid ref name"):
        parse_event(body)


@pytest.mark.parametrize("name", SHELLY_BUT_VALID)
def test_shell_metacharacters_stay_data(name: str) -> None:
    assert git_accepts(name)
    push = parse_event(with_detail(referenceName=name, referenceFullName="refs/heads/" + name))
    assert isinstance(push, Push) and push.name == name


@pytest.mark.parametrize(
    "name", ["feature/ünïcödé-ブランチ", "fix/JIRA-1_2.3", "a-b", "release/2026.11"]
)
def test_reasonable_names_are_accepted(name: str) -> None:
    push = parse_event(with_detail(referenceName=name, referenceFullName="refs/heads/" + name))
    assert isinstance(push, Push) and push.name == name


def git_accepts(name: str) -> bool:
    result = subprocess.run(
        ["git", "check-ref-format", "--branch", name], capture_output=True, check=False
    )
    return result.returncode == 0


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=40))
@example("HEAD")
def test_never_accepts_what_git_refuses(name: str) -> None:
    """Whatever the parser accepts, git accepts too (the parser may be stricter)."""
    body = with_detail(referenceName=name, referenceFullName="refs/heads/" + name)
    try:
        push = parse_event(body)
    except MalformedEvent:
        return
    assert isinstance(push, Push)
    assert git_accepts(name), name
    assert not name.startswith("-")


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_arbitrary_json_never_crashes(value: object) -> None:
    try:
        parse_event(json.dumps(value))
    except MalformedEvent:
        pass


def test_fixed_corpus() -> None:
    """tests/corpus/*.json: each file is one body; the expected error is in its name's stem."""
    files = sorted(CORPUS.glob("*.json"))
    assert files, "the corpus is empty"
    for path in files:
        with pytest.raises(MalformedEvent):
            parse_event(path.read_bytes())
