"""The ledger: what branchbuild started for each archive, as ``<archive>.build.json`` beside it.

The one owner of that document: its key (from a rule's key template), its typed content
(:class:`Entry`) and every write, each a compare-and-swap (:mod:`service.records`), so a job,
a build state event and the superseding of a build never clobber each other, across
instances and redeliveries. Everything else reads and changes the ledger through
:class:`Ledger`.

* A job reads the entry before any work (a redelivery finds its build) and records the build
  it started (:meth:`Ledger.started`).
* Build state events move it forward (``status``, times, logs: :mod:`service.build_state`); a
  newer commit marks it ``superseded_by`` (:mod:`service.supersede`).

Keys: :func:`archive_key` names a push's archive; :func:`branch_keys` matches every archive
(and ledger entry) of one branch and nothing else: :func:`service.settings.check_key_template`
refuses the templates under which two branches could share a key.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .events import Push
from .records import Records

log = logging.getLogger("branchbuild.ledger")

LEDGER_SUFFIX = ".build.json"
_COMMIT = "[0-9a-f]{40}"

__all__ = [
    "LEDGER_SUFFIX",
    "BranchKeys",
    "Entry",
    "Ledger",
    "archive_key",
    "branch_keys",
    "entry_key",
    "KeySpace",
    "may_share_keys",
]


def archive_key(template: str, push: Push, commit: str | None = None) -> str:
    """The S3 key of a push's archive; names were validated, so no '..' or leading '/'."""
    return template.format(
        repository=push.repository, branch=push.name, ref=push.ref, commit=commit or push.commit
    )


def entry_key(archive: str) -> str:
    """The ledger entry's key for the archive ``archive``."""
    return archive + LEDGER_SUFFIX


@dataclass(frozen=True)
class BranchKeys:
    """Every key of one branch: ``prefix`` to list under, ``pattern`` its archives (any
    commit). An empty prefix (a template starting with ``{commit}``) is never listed."""

    prefix: str
    pattern: re.Pattern[str]

    def is_archive(self, key: str) -> bool:
        return self.pattern.fullmatch(key) is not None

    def owns(self, key: str) -> bool:
        """Whether ``key`` is one of the branch's archives or their ledger entries."""
        return self.is_archive(key.removesuffix(LEDGER_SUFFIX)) or self.is_archive(key)


def branch_keys(template: str, push: Push) -> BranchKeys:
    """The keys of every archive of the push's branch (any commit)."""
    marker = "\0commit\0"
    parts = archive_key(template, push, commit=marker).split(marker)
    return BranchKeys(parts[0], re.compile(_COMMIT.join(re.escape(part) for part in parts)))


@dataclass(frozen=True)
class KeySpace:
    """The keys of one rule: its ``template``, the ``repository`` it names exactly (None for
    globs), and ``serves(name)``: whether a push of repository ``name`` takes this rule."""

    template: str
    repository: str | None
    serves: Callable[[str], bool]

    def head(self) -> list[str]:
        """The template's path segments before its first ``{branch}``/``{ref}`` one, with
        the one repository it names written in."""
        template = self.template
        if self.repository is not None:
            template = template.replace("{repository}", self.repository)
        segments = template.split("/")
        cut = next(i for i, s in enumerate(segments) if s in ("{branch}", "{ref}"))
        return segments[:cut]


def may_share_keys(a: KeySpace, b: KeySpace) -> bool:
    """Whether a key of rule ``a`` can be a key of another rule ``b`` (for another
    repository, then: every repository takes one rule).

    One template gives every (repository, ref, commit) its own key
    (:func:`service.settings.check_key_template`), but two rules' templates can meet: the
    environment's ``{repository}/{branch}/...`` for a repository named ``monorepo`` and a rule's
    ``monorepo/{branch}/...`` for another repository write the same keys for two branches of
    the same name, and deleting one took the other's archives and ledger entries. Branch
    names may hold ``/``, so only the segments before each template's branch are compared:
    they must differ somewhere (another literal, or a repository name the other rule does not
    serve), or name the repository the same way. Conservative: True when unsure.
    """
    if a.template == b.template and "{repository}" in a.template:
        return False  # one template: one key per (repository, ref, commit)
    for x, y in zip(a.head(), b.head(), strict=False):
        meet = _may_meet(x, y, b.serves) if _fields(y) else _may_meet(y, x, a.serves)
        if not meet:
            return False
    return True


def _fields(segment: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(segment) if f is not None]


def _may_meet(x: str, y: str, serves: Callable[[str], bool]) -> bool:
    """Whether segment ``x`` (of one rule) and segment ``y`` (of the rule that ``serves``)
    may be the same text for two repositories."""
    if not _fields(y):  # two literals
        return x == y
    if not _fields(x):  # a literal and a pattern: is it the pattern's, for whom?
        regex, named = "", False
        for text, field, _, _ in string.Formatter().parse(y):
            regex += re.escape(text)
            if field == "commit":
                regex += _COMMIT
            elif field == "repository":
                regex += "(?P=repository)" if named else r"(?P<repository>[A-Za-z0-9._-]+)"
                named = True
        match = re.fullmatch(regex, x)
        return match is not None and (not named or serves(match.group("repository")))
    if x == y and "repository" in _fields(x):
        return False  # it pins the repository, and one repository takes one rule
    # Two patterns: they may meet unless their literal ends differ.
    head_x, head_y = x.split("{", 1)[0], y.split("{", 1)[0]
    tail_x, tail_y = x.rsplit("}", 1)[-1], y.rsplit("}", 1)[-1]
    return (head_x.startswith(head_y) or head_y.startswith(head_x)) and (
        tail_x.endswith(tail_y) or tail_y.endswith(tail_x)
    )


@dataclass(frozen=True)
class Entry:
    """One ledger entry. Written by the job after StartBuild (the first four fields); moved
    forward by build state events (``status`` ``IN_PROGRESS`` then a final one, times and
    logs link, ISO 8601 UTC) and by a newer commit (``superseded_by``)."""

    commit: str
    ref: str
    build_id: str
    project: str
    status: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    logs: str | None = None
    superseded_by: str | None = None
    # The push's repository and time (ISO 8601 UTC: the event's, else the start's), which
    # order a branch's badges (service.badges); None in entries written before them.
    repository: str | None = None
    pushed_at: str | None = None
    # CodeBuild auto-retry (service.retries): the build's autoRetryLimit, and which attempt
    # the entry now follows (``attempt`` N > 0 is retry N, build ``attempt_build_id``).
    retries: str | None = None
    attempt: str | None = None
    attempt_build_id: str | None = None

    @property
    def current_build(self) -> str:
        """The build id of the attempt the entry follows (the started build, or its retry)."""
        return self.attempt_build_id or self.build_id

    @property
    def attempt_number(self) -> int:
        return int(self.attempt) if self.attempt and self.attempt.isdigit() else 0

    @property
    def retry_limit(self) -> int:
        return int(self.retries) if self.retries and self.retries.isdigit() else 0

    def to_document(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_document(cls, data: dict[str, Any]) -> Entry | None:
        """The entry in ``data``, or None when it is not one (a required field missing)."""
        known = {f.name for f in fields(cls)}
        values = {k: str(v) for k, v in data.items() if k in known and v is not None}
        if not {"commit", "ref", "build_id", "project"} <= values.keys():
            return None
        return cls(**values)


Change = Callable[[Entry | None], Entry | None]


class Ledger:
    """The ledger entries in the artifact bucket; every write is a compare-and-swap."""

    def __init__(self, records: Records) -> None:
        self.records = records

    async def read(self, archive: str) -> Entry | None:
        """The entry of ``archive``, or None when there is none (or it is unreadable, which
        :meth:`service.records.Records.read` logs and counts).

        Raises:
            StorageError: S3 failed (transient).
        """
        found = await self.records.read(entry_key(archive))
        return None if found is None else self._parse(archive, found.data)

    async def update(self, archive: str, change: Change) -> Entry | None:
        """Apply ``change`` (the current entry or None → the new one, or None to leave it)
        until the compare-and-swap wins; returns what was written (None: nothing).

        Raises:
            Conflict: lost the race ten times in a row (transient).
            StorageError: S3 failed (transient).
        """

        def on_document(data: dict[str, Any] | None) -> dict[str, Any] | None:
            new = change(None if data is None else self._parse(archive, data))
            return None if new is None else new.to_document()

        written = await self.records.update(entry_key(archive), on_document)
        return None if written is None else Entry.from_document(written)

    async def started(self, archive: str, entry: Entry) -> None:
        """Record the build just started for ``archive`` (replacing an older build's entry;
        the same build's entry, already moved forward by its events, is kept as it is).

        Raises:
            StorageError: S3 failed (transient).
        """

        def record(current: Entry | None) -> Entry | None:
            if current is not None and current.build_id == entry.build_id:
                return None
            return replace(entry, status=None, started_at=None, ended_at=None, logs=None)

        await self.update(archive, record)

    @staticmethod
    def _parse(archive: str, data: dict[str, Any]) -> Entry | None:
        entry = Entry.from_document(data)
        if entry is None and data:
            log.warning("ignoring a ledger entry without its fields at %s", entry_key(archive))
        return entry
