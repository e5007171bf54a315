"""Parse the EventBridge envelope of ``CodeCommit Repository State Change`` into a typed push.

Everything that reaches git, S3 or CodeBuild passes through here first, so the checks are
strict: a repository name CodeCommit would accept, a ref name git would accept, a commit id of
40 hex characters. Anything else is a :class:`MalformedEvent`, which is permanent.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from .errors import MalformedEvent

DETAIL_TYPE = "CodeCommit Repository State Change"
SOURCE = "aws.codecommit"
MAX_BODY_BYTES = 256 * 1024
MAX_REF_BYTES = 255

_COMMIT = re.compile(r"[0-9a-f]{40}")
_REPOSITORY = re.compile(r"[A-Za-z0-9._-]{1,100}")
_ACCOUNT = re.compile(r"[0-9]{12}")
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")
# Characters git refuses anywhere in a ref (git-check-ref-format rule 4 and 5), plus backslash.
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


class RefType(StrEnum):
    BRANCH = "branch"
    TAG = "tag"


class Action(StrEnum):
    CREATED = "referenceCreated"
    UPDATED = "referenceUpdated"
    DELETED = "referenceDeleted"


_PREFIX = {RefType.BRANCH: "refs/heads/", RefType.TAG: "refs/tags/"}


@dataclass(frozen=True)
class Push:
    """One ref change in one repository: the unit of work of branchbuild."""

    event_id: str
    account: str
    region: str
    repository: str
    ref_type: RefType
    name: str
    action: Action
    commit: str | None
    old_commit: str | None = None
    time: str | None = None
    # "event": from a CodeCommit event; "reconcile": a missed push found by service.reconcile.
    origin: str = "event"
    pusher: str | None = None  # the event's callerUserArn (notifications, service.notify)

    @property
    def ref(self) -> str:
        return _PREFIX[self.ref_type] + self.name

    def to_json(self) -> str:
        return json.dumps({"version": 1, **asdict(self)}, separators=(",", ":"))


@dataclass(frozen=True)
class OtherEvent:
    """A well-formed CodeCommit event that is not a ref change (e.g. an unreferenced merge)."""

    event_id: str
    event: str


def parse_event(body: str | bytes) -> Push | OtherEvent:
    """Parse an EventBridge envelope as delivered in an SQS message body.

    Raises:
        MalformedEvent: the body is not JSON, not the expected shape, or carries a value that
            git, S3 or CodeBuild must never see.
    """
    envelope = _load(body)
    if envelope.get("detail-type") != DETAIL_TYPE or envelope.get("source") != SOURCE:
        raise MalformedEvent(
            f"not a CodeCommit event: source={_short(envelope.get('source'))} "
            f"detail-type={_short(envelope.get('detail-type'))}"
        )
    detail = envelope.get("detail")
    if not isinstance(detail, dict):
        raise MalformedEvent("detail is missing or not an object")
    event_id = _text(envelope, "id", limit=128)
    event = _text(detail, "event", limit=64)
    if event not in {a.value for a in Action}:
        return OtherEvent(event_id=event_id, event=event)

    action = Action(event)
    ref_type_raw = _text(detail, "referenceType", limit=16)
    try:
        ref_type = RefType(ref_type_raw)
    except ValueError:
        raise MalformedEvent(f"unknown referenceType {ref_type_raw!r}") from None
    name = _text(detail, "referenceName", limit=4096)
    check_ref_name(name)
    full = detail.get("referenceFullName")
    if full is not None and full != _PREFIX[ref_type] + name:
        raise MalformedEvent("referenceFullName does not match referenceType and referenceName")

    commit = _commit(detail, "commitId", required=action is not Action.DELETED)
    old_commit = _commit(detail, "oldCommitId", required=action is Action.DELETED)
    time = envelope.get("time")
    return Push(
        event_id=event_id,
        account=_match(envelope, "account", _ACCOUNT),
        region=_match(envelope, "region", _REGION),
        repository=check_repository(_text(detail, "repositoryName", limit=100)),
        ref_type=ref_type,
        name=name,
        action=action,
        commit=commit,
        old_commit=old_commit,
        time=time if isinstance(time, str) and len(time) <= 64 else None,
        pusher=_pusher(detail.get("callerUserArn")),
    )


def parse_work(body: str | bytes) -> Push:
    """Parse a work-queue message written by :meth:`Push.to_json`, re-checking every field.

    Raises:
        MalformedEvent: the body was not written by branchbuild or was tampered with.
    """
    data = _load(body)
    if data.get("version") != 1:
        raise MalformedEvent(f"unknown work message version {_short(data.get('version'))}")
    try:
        action = Action(str(data.get("action")))
        deleted = action is Action.DELETED  # a clean-up (service.cleanup): no new commit
        push = Push(
            event_id=_text(data, "event_id", limit=128),
            account=_match(data, "account", _ACCOUNT),
            region=_match(data, "region", _REGION),
            repository=check_repository(_text(data, "repository", limit=100)),
            ref_type=RefType(str(data.get("ref_type"))),
            name=check_ref_name(_text(data, "name", limit=4096)),
            action=action,
            commit=_commit(data, "commit", required=not deleted),
            old_commit=_commit(data, "old_commit", required=deleted),
            time=data.get("time") if isinstance(data.get("time"), str) else None,
            origin="reconcile" if data.get("origin") == "reconcile" else "event",
            pusher=_pusher(data.get("pusher")),
        )
    except ValueError as exc:
        raise MalformedEvent(f"bad work message: {exc}") from None
    return push


def _pusher(value: Any) -> str | None:
    """An IAM ARN as CodeCommit names the pusher, or None (only ever shown, never acted on)."""
    ok = isinstance(value, str) and value.startswith("arn:") and len(value) <= 2048
    return value if ok and value.isprintable() else None


def check_repository(name: str) -> str:
    """Return ``name`` if CodeCommit could have named a repository so.

    Raises:
        MalformedEvent: otherwise (it would become a path and part of a URL).
    """
    if not _REPOSITORY.fullmatch(name) or name in {".", ".."} or name.endswith(".git"):
        raise MalformedEvent(f"invalid repository name {_short(name)}")
    return name


def check_ref_name(name: str) -> str:
    """Return ``name`` if git would accept ``refs/heads/<name>`` (git-check-ref-format), and
    it is safe as an S3 key part and a git argument.

    Raises:
        MalformedEvent: otherwise.
    """
    reason = _ref_problem(name)
    if reason:
        raise MalformedEvent(f"invalid ref name {_short(name)}: {reason}")
    return name


def _ref_problem(name: str) -> str | None:
    if not name:
        return "empty"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_REF_BYTES:
        return f"longer than {MAX_REF_BYTES} bytes"
    if _REF_FORBIDDEN.search(name):
        return "contains a control character, space or one of ~ ^ : ? * [ \\"
    if name.startswith("-"):
        return "starts with '-'"
    if name == "HEAD":
        return "is 'HEAD', which git refuses as a branch name"
    if name == "@" or "@{" in name:
        return "contains '@{' or is '@'"
    if ".." in name or "//" in name or name.startswith("/") or name.endswith(("/", ".")):
        return "contains '..' or '//', or starts or ends with '/' or ends with '.'"
    for part in name.split("/"):
        if part.startswith(".") or part.endswith(".lock"):
            return "a component starts with '.' or ends with '.lock'"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8"
    return None


def _load(body: str | bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY_BYTES:
        raise MalformedEvent(f"body larger than {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedEvent(f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedEvent(f"body is JSON {type(data).__name__}, not an object")
    return data


def _text(data: dict[str, Any], key: str, *, limit: int) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise MalformedEvent(f"{key} is missing or not a non-empty string")
    if len(value) > limit:
        raise MalformedEvent(f"{key} is longer than {limit} characters")
    return value


def _match(data: dict[str, Any], key: str, pattern: re.Pattern[str]) -> str:
    value = _text(data, key, limit=64)
    if not pattern.fullmatch(value):
        raise MalformedEvent(f"invalid {key} {_short(value)}")
    return value


def _commit(data: dict[str, Any], key: str, *, required: bool) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not _COMMIT.fullmatch(value):
        raise MalformedEvent(f"{key} is not a 40-character hex commit id: {_short(value)}")
    return value


def _short(value: object, limit: int = 80) -> str:
    """A log-safe rendering of a hostile value: repr (escapes control chars), truncated."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def event_time(push: Push) -> datetime | None:
    """The event's own timestamp, for end-to-end latency; None when absent or unreadable."""
    if push.time is None:
        return None
    try:
        return datetime.fromisoformat(push.time.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass(frozen=True)
class RefChange:
    """One branch or tag that a push created (old None), moved, or deleted (new None)."""

    repository: str
    ref: str
    old: str | None
    new: str | None


def codecommit_event(
    change: RefChange,
    *,
    account: str = "123456789012",
    region: str = "eu-west-1",
    event_id: str | None = None,
    time: datetime | None = None,
) -> dict[str, Any]:
    """Return the EventBridge event that CodeCommit emits for ``change``: the inverse of
    :func:`parse_event` (the local git host, ``send-test-event`` and the tests build theirs
    with it).

    The repositoryId is derived from (account, region, name), so it is stable across runs.
    Raises ValueError if the ref is not a branch or a tag, or if old and new are both None.
    """
    if change.ref.startswith("refs/heads/"):
        ref_type, ref_name = "branch", change.ref.removeprefix("refs/heads/")
    elif change.ref.startswith("refs/tags/"):
        ref_type, ref_name = "tag", change.ref.removeprefix("refs/tags/")
    else:
        raise ValueError(f"CodeCommit emits no event for {change.ref!r}")
    if change.old is None and change.new is None:
        raise ValueError("a ref change needs an old or a new commit")
    kind = "Created" if change.old is None else "Deleted" if change.new is None else "Updated"
    repo_id = uuid.uuid5(uuid.NAMESPACE_URL, f"codecommit:{region}:{account}:{change.repository}")
    detail: dict[str, Any] = {
        "callerUserArn": f"arn:aws:iam::{account}:user/localdev",
        "repositoryId": str(repo_id),
        "repositoryName": change.repository,
        "event": f"reference{kind}",
        "referenceType": ref_type,
        "referenceName": ref_name,
        "referenceFullName": change.ref,
    }
    if change.new is not None:
        detail["commitId"] = change.new
    if change.old is not None:
        detail["oldCommitId"] = change.old
    when = (time or datetime.now(UTC)).astimezone(UTC)
    return {
        "version": "0",
        "detail-type": "CodeCommit Repository State Change",
        "source": "aws.codecommit",
        "account": account,
        "region": region,
        "resources": [f"arn:aws:codecommit:{region}:{account}:{change.repository}"],
        "id": event_id or str(uuid.uuid4()),
        "time": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "detail": detail,
    }
