"""The event parser: the samples, every malformed shape, and hostile names."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from service.build_state import parse_build_state
from service.errors import MalformedEvent
from service.events import (
    Action,
    Model,
    OtherEvent,
    Push,
    RefType,
    _WorkMessage,
    detail_type,
    event_time,
    parse_event,
    parse_work,
    validated,
)
from service.pullrequests import parse_pull_request
from tests.test_build_state import build_state_event

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


def test_the_work_message_model_has_every_field_of_a_push() -> None:
    """parse_work builds the Push from its model: a field of Push the model lacked would be
    lost on the work queue (its default taken), silently."""
    assert set(_WorkMessage.model_fields) == {field.name for field in dataclasses.fields(Push)}


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


# -- the envelope layer: the three kinds of event and the work message ----------------------

PARSERS: dict[str, Callable[[str], object]] = {
    "push": parse_event,
    "work": parse_work,
    "build_state": parse_build_state,
    "pull_request": parse_pull_request,
}
BUILD_ID = "shop:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
COMMIT = "9f2c61d0a4b7e83c5d19f0e2a6b4c8d7e1f3a5b9"


def build_state(**envelope: Any) -> dict[str, Any]:
    at = datetime(2026, 3, 2, 16, 20, tzinfo=UTC)
    event = build_state_event(BUILD_ID, "SUCCEEDED", archive="shop/x.zip", at=at)
    return event | {"id": "5e2b8c1a-0f3d-4e6a-9b7c-1d2e3f4a5b6c"} | envelope


def pull_request(**detail: Any) -> dict[str, Any]:
    """A ``CodeCommit Pull Request State Change`` as CodeCommit sends it (the AWS sample)."""
    fields = {
        "author": "arn:aws:iam::111122223333:user/dev-anna",
        "callerUserArn": "arn:aws:iam::111122223333:user/dev-anna",
        "event": "pullRequestCreated",
        "isMerged": "False",
        "pullRequestId": "42",
        "pullRequestStatus": "OPEN",
        "repositoryNames": ["payments-api"],
        "sourceCommit": COMMIT,
        "sourceReference": "refs/heads/feature/x",
        "destinationReference": "refs/heads/main",
        "title": "Refunds",
    }
    return {
        "version": "0",
        "id": "8c1f4f0e-33e9-4a5a-9c41-2b0f77e1d7a2",
        "detail-type": "CodeCommit Pull Request State Change",
        "source": "aws.codecommit",
        "account": "111122223333",
        "time": "2026-11-20T09:20:00Z",
        "region": "eu-west-1",
        "resources": ["arn:aws:codecommit:eu-west-1:111122223333:payments-api"],
        "detail": fields | detail,
    }


def valid_body(kind: str) -> dict[str, Any]:
    push = parse_event(json.dumps(sample("branch-created.json")))
    assert isinstance(push, Push)
    bodies: dict[str, dict[str, Any]] = {
        "push": sample("branch-created.json"),
        "work": json.loads(push.to_json()),
        "build_state": build_state(),
        "pull_request": pull_request(),
    }
    return bodies[kind]


@pytest.mark.parametrize("kind", PARSERS)
@pytest.mark.parametrize("opener", ["[", '{"a":'])
@pytest.mark.parametrize("inside", [False, True])
def test_json_nested_too_deeply_is_a_malformed_event(kind: str, opener: str, inside: bool) -> None:
    """json raises RecursionError on deep nesting: it must be a malformed event with its
    reason, never a crash retried as unexpected."""
    depth = 40_000  # far beyond the interpreter's recursion limit, within the body limit
    nested = opener * depth + "1" + ("]" if opener == "[" else "}") * depth
    body = nested
    if inside:  # in a field no model reads
        body = json.dumps(valid_body(kind) | {"extra": 0}).replace("0}", nested + "}")
    with pytest.raises(MalformedEvent, match="nested deeper than the parser allows"):
        PARSERS[kind](body)
    assert detail_type(body) is None


@pytest.mark.parametrize("kind", PARSERS)
def test_every_body_is_bounded(kind: str) -> None:
    body = json.dumps(valid_body(kind) | {"pad": "x" * 256 * 1024})
    with pytest.raises(MalformedEvent, match="larger than 262144 bytes"):
        PARSERS[kind](body)


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (build_state(id="x" * 2049), "id: String should have at most 2048 characters"),
        (pull_request(pullRequestId="1" * 129), "pullRequestId: .* at most 128 characters"),
        (pull_request(pullRequestStatus=""), "pullRequestStatus: .* at least 1 character"),
        (pull_request(sourceReference="refs/" + "x" * 4096), "sourceReference: .* at most 4096"),
    ],
)
def test_text_fields_are_bounded(event: dict[str, Any], reason: str) -> None:
    parse = parse_build_state if event["source"] == "aws.codebuild" else parse_pull_request
    with pytest.raises(MalformedEvent, match=reason):
        parse(json.dumps(event))


# Times without an offset, or with an offset in whole minutes (as ISO 8601 writes them).
ZONES = st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m)))


def times(
    low: datetime = datetime.min, high: datetime = datetime.max
) -> st.SearchStrategy[datetime]:
    naive, aware = st.datetimes(low, high), st.datetimes(low, high, timezones=ZONES)
    return (naive | aware).map(lambda t: t.replace(microsecond=0))


TIMES, NEAR = times(), times(datetime(2000, 1, 1), datetime(2100, 1, 1))


def as_utc(when: datetime) -> datetime:
    """A time without an offset is UTC (raises OverflowError out of range)."""
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)


def push_at(when: datetime | str) -> Push:
    event = sample("branch-updated.json")
    event["time"] = when if isinstance(when, str) else when.isoformat()
    push = parse_event(json.dumps(event))
    assert isinstance(push, Push)
    return push


@settings(max_examples=300, deadline=None)
@given(TIMES)
@example(datetime(2026, 11, 20, 9, 14, 3))
@example(datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))))
def test_a_push_time_is_utc_and_a_time_without_offset_is_utc(when: datetime) -> None:
    push = push_at(when)
    try:
        expected = as_utc(when)
    except OverflowError:  # no such time in UTC: no time, never a crash later
        assert push.time is None and event_time(push) is None
        return
    pushed = event_time(push)
    assert pushed == expected and pushed is not None and pushed.utcoffset() == timedelta(0)
    assert push.time is not None and push.time.endswith("Z")
    assert parse_work(push.to_json()) == push


@settings(max_examples=300, deadline=None)
@given(NEAR, NEAR)
@example(
    datetime(2026, 11, 20, 10, 14, 3, tzinfo=timezone(timedelta(hours=1))),
    datetime(2026, 11, 20, 9, 20, 0, tzinfo=UTC),
)
def test_push_times_compare_as_text_in_time_order(a: datetime, b: datetime) -> None:
    """The supersede and scheduler documents compare push times as text."""
    first, second = push_at(a).time, push_at(b).time
    assert first is not None and second is not None
    assert (first < second) == (as_utc(a) < as_utc(b))
    assert (first == second) == (as_utc(a) == as_utc(b))


def test_an_unreadable_push_time_is_no_time() -> None:
    for value in ["yesterday", "2026-13-01T00:00:00Z", "9" * 100]:
        assert push_at(value).time is None


@settings(max_examples=200, deadline=None)
@given(TIMES)
@example(datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))))
def test_a_build_state_time_is_utc_and_a_time_without_offset_is_utc(when: datetime) -> None:
    body = json.dumps(build_state(time=when.isoformat()))
    try:
        expected = as_utc(when)
    except OverflowError:  # the ledger writes times in UTC: out of range there is malformed
        with pytest.raises(MalformedEvent, match="time is not an ISO 8601 time"):
            parse_build_state(body)
        return
    state = parse_build_state(body)
    assert state.time == expected and state.time.utcoffset() == timedelta(0)


KEYS = st.text(min_size=1, max_size=12).map(lambda k: "x-" + k)
EXTRA = st.dictionaries(KEYS, st.none() | st.integers() | st.text(max_size=8), max_size=3)


@settings(max_examples=100, deadline=None)
@given(EXTRA, EXTRA, EXTRA)
def test_fields_aws_adds_are_ignored(envelope: Any, detail: Any, inner: Any) -> None:
    build = build_state() | envelope
    build["detail"] = build["detail"] | detail
    information = build["detail"]["additional-information"]
    information["environment"] |= inner
    information["logs"] |= inner
    assert parse_build_state(json.dumps(build)) == parse_build_state(json.dumps(build_state()))
    change = pull_request(**detail) | envelope
    assert parse_pull_request(json.dumps(change)) == parse_pull_request(json.dumps(pull_request()))


FIELDS = {
    "push": ["id", "account", "region", "detail.event", "detail.referenceType",
             "detail.referenceName", "detail.commitId", "detail.repositoryName"],
    "build_state": ["id", "time", "detail.build-status", "detail.build-id",
                    "detail.project-name"],
    "pull_request": ["account", "detail.event", "detail.pullRequestId",
                     "detail.sourceReference", "detail.sourceCommit",
                     "detail.pullRequestStatus", "detail.repositoryNames"],
}  # fmt: skip
NOT_TEXT = st.none() | st.booleans() | st.integers() | st.lists(st.integers(), max_size=2)


@settings(max_examples=300, deadline=None)
@given(st.data())
@pytest.mark.parametrize("kind", FIELDS)
def test_a_wrong_or_missing_field_is_named_in_the_reason(kind: str, data: st.DataObject) -> None:
    event = valid_body(kind)
    path = data.draw(st.sampled_from(FIELDS[kind])).split(".")
    parent = event["detail"] if len(path) == 2 else event
    if data.draw(st.booleans()):
        parent[path[-1]] = data.draw(NOT_TEXT)
    else:
        del parent[path[-1]]
    with pytest.raises(MalformedEvent) as raised:
        PARSERS[kind](json.dumps(event))
    assert path[-1] in str(raised.value) or "commit id" in str(raised.value)


def test_a_pull_request_event_not_handled_is_not_checked_further() -> None:
    closed = pull_request(event="pullRequestStatusChanged", sourceCommit=None, pullRequestId=5)
    assert parse_pull_request(json.dumps(closed)) is None
    change = parse_pull_request(json.dumps(pull_request()))
    assert change is not None and change.account == "111122223333"
    assert change.detail.repositoryNames == ["payments-api"]
    assert change.detail.sourceCommit == COMMIT


def test_a_value_nested_deeper_than_repr_goes_is_a_malformed_event() -> None:
    """json parses a little deeper than repr (of an enum's error, of a reason) can show from
    further down the stack: a malformed event all the same, never a RecursionError."""

    class Kind(Model):
        kind: RefType

    deep: list[Any] = []
    for _ in range(10 * sys.getrecursionlimit()):
        deep = [deep]
    with pytest.raises(MalformedEvent, match="nested deeper than the parser allows"):
        validated(Kind, {"kind": deep})
