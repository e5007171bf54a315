"""Parse the events that enter branchbuild into typed models: the EventBridge envelope shared by
all of them, and the ``CodeCommit Repository State Change`` push (the build state and pull
request events have their models in :mod:`service.build_state` and :mod:`service.pullrequests`).

Everything that reaches git, S3 or CodeBuild passes through here first, so the checks are
strict: a repository name CodeCommit would accept, a ref name git would accept, a commit id of
40 hex characters. Anything else is a :class:`MalformedEvent`, which is permanent. AWS adds
fields to its events over time: unknown fields are ignored.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import ErrorDetails

from .errors import MalformedEvent

DETAIL_TYPE = "CodeCommit Repository State Change"
SOURCE = "aws.codecommit"
MAX_BODY_BYTES = 256 * 1024
MAX_REF_BYTES = 255

_COMMIT = re.compile(r"[0-9a-f]{40}")
_REPOSITORY = re.compile(r"[A-Za-z0-9._-]{1,100}")
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


# -- the envelope layer: one way to read an event -------------------------------------------


class Model(BaseModel):
    """A typed event or a part of one; fields it does not name are ignored. Its validators raise
    MalformedEvent, which pydantic lets through (it is no ValueError) with its own message."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class Envelope(Model):
    """The EventBridge envelope around every event on the intake queue; a subclass per kind
    types the rest (its detail). As a base, it reads what routes an event: its detail-type."""

    #: (source, detail-type) a subclass accepts, and who sends it (for the error message)
    KIND: ClassVar[tuple[str, str] | None] = None
    SENDER: ClassVar[str] = "EventBridge"

    detail_type: str = Field(alias="detail-type")

    @model_validator(mode="before")
    @classmethod
    def _of_kind(cls, data: object) -> object:
        if cls.KIND is None or not isinstance(data, dict):
            return data
        source, kind = data.get("source"), data.get("detail-type")
        if (source, kind) != cls.KIND:
            raise MalformedEvent(
                f"not a {cls.SENDER} event: source={_short(source)} detail-type={_short(kind)}"
            )
        return {"detail": None} | data  # a missing detail is reported as not an object


M = TypeVar("M", bound=BaseModel)


def load(body: str | bytes) -> Any:
    """The JSON value of a message body.

    Raises:
        MalformedEvent: larger than ``MAX_BODY_BYTES``, not JSON, or nested too deeply for the
            parser (a RecursionError, never a crash).
    """
    if len(body) > MAX_BODY_BYTES:
        raise MalformedEvent(f"body larger than {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedEvent(f"body is not JSON: {exc}") from None
    except RecursionError:
        raise MalformedEvent("body is not JSON: nested deeper than the parser allows") from None


def validated(model: type[M], data: object) -> M:
    """``data`` as ``model``.

    Raises:
        MalformedEvent: naming the first field (in the model's order) that is wrong, or a value
            nested too deeply to show.
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise MalformedEvent(_reason(exc.errors()[0])) from None
    except RecursionError:  # showing a value json parsed, from further down the stack
        raise MalformedEvent("body is not JSON: nested deeper than the parser allows") from None


def _reason(error: ErrorDetails) -> str:
    """Pydantic's complaint, naming the field (by its JSON name) and the value it refused."""
    names = [part for part in error["loc"] if isinstance(part, str)]
    key, kind = (names[-1] if names else "body"), error["type"]
    if kind == "model_type":
        if not names:
            return f"body is JSON {type(error['input']).__name__}, not an object"
        return f"{key} is missing or not an object"
    if kind in {"missing", "string_type"}:  # the required fields are text
        return f"{key} is missing or not a string"
    return f"{key}: {error['msg']}, not {_short(error['input'])}"


def text(limit: int) -> Any:
    """``Annotated[str, text(limit)]``: a non-empty string of at most ``limit`` characters."""
    return Field(min_length=1, max_length=limit)


def _commit(value: object, info: ValidationInfo) -> object:
    if value is None or (isinstance(value, str) and _COMMIT.fullmatch(value)):
        return value
    raise MalformedEvent(f"{info.field_name} is not a 40-character hex commit id: {_short(value)}")


def _require(name: str, commit: str | None, required: bool) -> None:
    if required and commit is None:
        raise MalformedEvent(f"{name} is not a 40-character hex commit id: None")


def parse_time(value: object) -> datetime | None:
    """``value`` as an ISO 8601 time in UTC (a time without an offset is UTC); None if it is
    not one (or is out of range once in UTC)."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        parsed = datetime.fromisoformat(value)
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def iso(value: datetime) -> str:
    """``value`` in UTC, to the second, as EventBridge writes times: ``2026-03-02T16:12:29Z``."""
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _event_time(value: object) -> str | None:
    parsed = parse_time(value)
    return None if parsed is None else iso(parsed)


Commit = Annotated[str, BeforeValidator(_commit)]
MaybeCommit = Annotated[str | None, BeforeValidator(_commit)]
Account = Annotated[str, Field(pattern=r"^[0-9]{12}$")]
Region = Annotated[str, Field(pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]{1,2}$")]
#: An event's time, as UTC ``...Z`` to the second so that times compare as text; None when
#: absent or unreadable (a time is only ever informative for a push).
EventTime = Annotated[str | None, BeforeValidator(_event_time)]


def detail_type(body: str | bytes) -> str | None:
    """The ``detail-type`` of an EventBridge envelope (what routes it), or None if the body is
    not one."""
    try:
        return validated(Envelope, load(body)).detail_type
    except MalformedEvent:
        return None


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


def _short(value: object, limit: int = 80) -> str:
    """A log-safe rendering of a hostile value: repr (escapes control chars), truncated."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


# A pull request's merge build (service.mergebuilds) is queued as the branch
# ``pr/<id>/.merge``: git refuses a ref component that starts with '.', so no pushed branch can
# share its archive keys, its ledger entries, its superseding or its work-queue lane.
MERGE_NAME = re.compile(r"pr/([0-9]{1,20})/\.merge")


def merge_branch(pull_request_id: str) -> str:
    """The name a pull request's merge builds are queued and stored under.

    Raises:
        MalformedEvent: the id is not a CodeCommit pull request id (digits).
    """
    name = f"pr/{pull_request_id}/.merge"
    if not MERGE_NAME.fullmatch(name):
        raise MalformedEvent(f"invalid pull request id {_short(pull_request_id)}")
    return name


def merged_pull_request(push: Push) -> str | None:
    """The pull request whose merge build ``push`` is, if it is one."""
    match = MERGE_NAME.fullmatch(push.name) if push.ref_type is RefType.BRANCH else None
    return match[1] if match else None


def _work_name(name: str) -> str:
    """A work message's ref name: a pushed one, or a merge build's (never from an event)."""
    return name if MERGE_NAME.fullmatch(name) else check_ref_name(name)


Repository = Annotated[str, AfterValidator(check_repository)]
#: Who pushed (an IAM ARN), or None: only ever shown (notifications), so never refused.
Pusher = Annotated[str | None, BeforeValidator(_pusher)]
RefName = Annotated[str, AfterValidator(check_ref_name)]
WorkName = Annotated[str, AfterValidator(_work_name)]


class Named(Model):
    """The detail of any CodeCommit event: the event's name decides what else it must hold."""

    event: Annotated[str, text(64)]


class _RefDetail(Named):
    event: Action
    referenceType: RefType
    referenceName: RefName
    referenceFullName: str | None = None
    commitId: MaybeCommit = None
    oldCommitId: MaybeCommit = None
    repositoryName: Repository
    callerUserArn: Pusher = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        full = self.referenceFullName
        if full is not None and full != _PREFIX[self.referenceType] + self.referenceName:
            raise MalformedEvent("referenceFullName does not match referenceType and referenceName")
        _require("commitId", self.commitId, self.event is not Action.DELETED)
        _require("oldCommitId", self.oldCommitId, self.event is Action.DELETED)
        return self


class _RepositoryEvent(Envelope):
    """Any ``CodeCommit Repository State Change``."""

    KIND = (SOURCE, DETAIL_TYPE)
    SENDER = "CodeCommit"

    id: Annotated[str, text(128)]
    detail: Named


class _RefChangeEvent(_RepositoryEvent):
    """A branch or tag created, moved or deleted: a push."""

    detail: _RefDetail
    account: Account
    region: Region
    time: EventTime = None


_ACTIONS = frozenset(action.value for action in Action)


def parse_event(body: str | bytes) -> Push | OtherEvent:
    """Parse an EventBridge envelope as delivered in an SQS message body.

    Raises:
        MalformedEvent: the body is not JSON, not the expected shape, or carries a value that
            git, S3 or CodeBuild must never see.
    """
    data = load(body)
    event = validated(_RepositoryEvent, data)
    if event.detail.event not in _ACTIONS:
        return OtherEvent(event_id=event.id, event=event.detail.event)
    change = validated(_RefChangeEvent, data)
    detail = change.detail
    return Push(
        event_id=change.id,
        account=change.account,
        region=change.region,
        repository=detail.repositoryName,
        ref_type=detail.referenceType,
        name=detail.referenceName,
        action=detail.event,
        commit=detail.commitId,
        old_commit=detail.oldCommitId,
        time=change.time,
        pusher=detail.callerUserArn,
    )


class _WorkMessage(Model):
    """A work-queue message as :meth:`Push.to_json` writes it: a :class:`Push`'s fields."""

    event_id: Annotated[str, text(128)]
    account: Account
    region: Region
    repository: Repository
    ref_type: RefType
    name: WorkName
    action: Action
    commit: MaybeCommit = None
    old_commit: MaybeCommit = None
    time: EventTime = None
    # "reconcile" only when it says so: the origin decides nothing else.
    origin: Annotated[
        str, BeforeValidator(lambda v: "reconcile" if v == "reconcile" else "event")
    ] = "event"
    pusher: Pusher = None

    @model_validator(mode="before")
    @classmethod
    def _version(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("version") != 1:
            raise MalformedEvent(f"unknown work message version {_short(data.get('version'))}")
        return data

    @model_validator(mode="after")
    def _commits(self) -> Self:
        deleted = self.action is Action.DELETED  # a clean-up (service.cleanup): no new commit
        _require("commit", self.commit, not deleted)
        _require("old_commit", self.old_commit, deleted)
        return self


def parse_work(body: str | bytes) -> Push:
    """Parse a work-queue message written by :meth:`Push.to_json`, re-checking every field.

    Raises:
        MalformedEvent: the body was not written by branchbuild or was tampered with.
    """
    return Push(**validated(_WorkMessage, load(body)).model_dump())


def event_time(push: Push) -> datetime | None:
    """The event's own timestamp, for end-to-end latency; None when absent or unreadable."""
    return parse_time(push.time)


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
