"""Status badges (``BRANCHBUILD_BADGES``): an SVG per branch and per pull request in S3.

Each badge says how the newest build of its branch (or of its pull request's newest commit)
stands: ``passing``, ``failing``, ``running`` (also while CodeBuild retries a failed attempt)
or ``stopped``. It is written on every change of that build's ledger entry, at a stable key a
README or a wiki can embed (:func:`branch_key`, :func:`pull_request_key`):

* ``badges~/<repository>/branch/<escaped branch>.svg``
* ``badges~/<repository>/pull-request/<pull request id>.svg``

The prefix's ``~`` is deliberate: no CodeCommit repository name and no git branch name can
hold one, so no archive key template can ever put an archive (or a build's output) under the
prefix that the template's optional public route serves. Branch names are escaped the same way
(:func:`escape_name`): every byte outside ``A-Z a-z 0-9 . _ -`` becomes ``~XX`` (its UTF-8 byte
in upper-case hex), so ``feature/login`` is ``feature~2Flogin``: one path segment, nothing a
URL must encode, and no two branches share a key.

**Never older than the newest build.** The badge object is its own compare-and-swap record:
its metadata holds the push time, a digest of the build id and the status's rank, and every
write is conditional on the ETag read (``If-Match``; ``If-None-Match: *`` for the first), so
an older build's outcome that arrives late, a redelivered event or another instance never
replaces what a newer build wrote, and no reader ever sees an image older than the record.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

import anyio

from .aws import error_code, translated
from .errors import PermanentError, StorageError
from .ledger import Entry, Ledger
from .metrics import Metrics
from .records import MAX_ATTEMPTS, Conflict, Records
from .retries import RETRYING
from .settings import Settings

if TYPE_CHECKING:
    from .build_state import Change
    from .builds import StartedBuild
    from .events import Push

log = logging.getLogger("branchbuild.badges")

PREFIX = "badges~/"
CONTENT_TYPE = "image/svg+xml"
CACHE_CONTROL = "no-cache"
LABEL = "build"
_KEEP = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


class Status(StrEnum):
    PASSING = "passing"
    FAILING = "failing"
    RUNNING = "running"
    STOPPED = "stopped"


# Colours with white text at a contrast ratio of at least 4.5:1 (WCAG AA).
COLOURS = {
    Status.PASSING: "#2e7d32",
    Status.FAILING: "#c62828",
    Status.RUNNING: "#1565c0",
    Status.STOPPED: "#616161",
}
LABEL_COLOUR = "#444444"
_FINAL_STATUS = {
    "SUCCEEDED": Status.PASSING,
    "FAILED": Status.FAILING,
    "FAULT": Status.FAILING,
    "TIMED_OUT": Status.FAILING,
    "STOPPED": Status.STOPPED,
}


def status_of(entry: Entry) -> Status:
    """What a ledger entry's badge says (started, in progress and retrying are running)."""
    if entry.status is None or entry.status in {"IN_PROGRESS", RETRYING}:
        return Status.RUNNING
    return _FINAL_STATUS.get(entry.status, Status.FAILING)


def escape_name(name: str) -> str:
    """``name`` as one URL-safe path segment: bytes outside ``A-Za-z0-9._-`` as ``~XX``."""
    return "".join(chr(byte) if byte in _KEEP else f"~{byte:02X}" for byte in name.encode("utf-8"))


def branch_key(repository: str, branch: str) -> str:
    return f"{PREFIX}{escape_name(repository)}/branch/{escape_name(branch)}.svg"


def pull_request_key(repository: str, pull_request_id: str) -> str:
    return f"{PREFIX}{escape_name(repository)}/pull-request/{escape_name(pull_request_id)}.svg"


def url(settings: Settings, key: str) -> str | None:
    """Where ``key`` is served (``BRANCHBUILD_BADGES_URL`` + the key below the prefix)."""
    if not settings.badges_url:
        return None
    return settings.badges_url.rstrip("/") + "/" + key.removeprefix(PREFIX)


# -- the image --------------------------------------------------------------------------------

# Approximate advance widths (px) of Verdana/DejaVu Sans at 11 px: enough to size the boxes
# so that the text fits them in any of those fonts (the browser test measures it).
_NARROW = frozenset("iljtf.,:;!|'()[]I ")
_WIDE = frozenset("mwMW@%")


def _text_width(text: str) -> int:
    width = 0.0
    for char in text:
        if char in _NARROW:
            width += 4.0
        elif char in _WIDE:
            width += 10.5
        elif char.isupper() or char.isdigit():
            width += 7.8
        else:
            width += 7.0
    return round(width)


def svg(status: Status, title: str = "") -> str:
    """The badge: ``build | <status>``, shields style, self-contained (no fonts, no links).

    ``title`` (e.g. the branch) is the tooltip; it is escaped, like every text in the image.
    """
    label_width = _text_width(LABEL) + 12
    message = status.value
    message_width = _text_width(message) + 12
    width = label_width + message_width
    colour = COLOURS[status]
    tooltip = escape(f"{LABEL}: {message}" + (f" ({title})" if title else ""), {'"': "&quot;"})
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="20" role="img" '
        f'aria-label="{tooltip}">'
        f"<title>{tooltip}</title>"
        '<linearGradient id="s" x2="0" y2="100%"><stop offset="0" stop-color="#bbb" '
        'stop-opacity=".1"/><stop offset="1" stop-opacity=".1"/></linearGradient>'
        f'<clipPath id="r"><rect width="{width}" height="20" rx="3" fill="#fff"/></clipPath>'
        '<g clip-path="url(#r)">'
        f'<rect id="label-box" width="{label_width}" height="20" fill="{LABEL_COLOUR}"/>'
        f'<rect id="message-box" x="{label_width}" width="{message_width}" height="20" '
        f'fill="{colour}"/>'
        f'<rect width="{width}" height="20" fill="url(#s)"/></g>'
        '<g fill="#fff" text-anchor="middle" '
        'font-family="Verdana,Geneva,DejaVu Sans,sans-serif" font-size="11">'
        f'<text id="label" x="{label_width / 2:g}" y="14">{escape(LABEL)}</text>'
        f'<text id="message" x="{label_width + message_width / 2:g}" y="14">'
        f"{escape(message)}</text></g></svg>\n"
    )


# -- writing, in order ------------------------------------------------------------------------


@dataclass(frozen=True)
class Shown:
    """What a badge shows, as its metadata records it: compared to decide a write."""

    pushed_at: datetime
    build: str  # a digest of the build id (the object may be public: no ids in it)
    rank: int  # 0 running, 1 ended

    def to_metadata(self, status: Status) -> dict[str, str]:
        return {
            "pushed-at": self.pushed_at.isoformat(),
            "build": self.build,
            "rank": str(self.rank),
            "status": status.value,
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> Shown | None:
        try:
            return cls(
                pushed_at=_time(metadata["pushed-at"]),
                build=metadata["build"],
                rank=int(metadata["rank"]),
            )
        except (KeyError, ValueError):
            return None

    def replaces(self, shown: Shown | None) -> bool:
        """Whether this badge may replace ``shown``: a later push's build, or the same build
        further on (running → ended); never an older build, never back."""
        if shown is None:
            return True
        if self.build == shown.build:
            return self.rank > shown.rank
        return self.pushed_at > shown.pushed_at or (
            self.pushed_at == shown.pushed_at and self.rank > shown.rank
        )


def shown_for(entry: Entry) -> Shown:
    pushed = _time(entry.pushed_at) if entry.pushed_at else datetime.min.replace(tzinfo=UTC)
    digest = hashlib.sha256(entry.build_id.encode()).hexdigest()[:16]
    return Shown(
        pushed_at=pushed, build=digest, rank=0 if status_of(entry) is Status.RUNNING else 1
    )


def _time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class Badges:
    """Writes the badges; a job hook (:meth:`started`), an outcomes listener (:meth:`changed`)
    and the pull request feedback (:meth:`pull_request`) call it."""

    def __init__(self, records: Records, settings: Settings, metrics: Metrics) -> None:
        self.s3 = records.s3
        self.bucket = records.bucket
        self.ledger = Ledger(records)
        self.settings = settings
        self.metrics = metrics

    @property
    def enabled(self) -> bool:
        return self.settings.badges

    async def started(self, push: Push, build: StartedBuild, archive: str) -> None:
        """Job hook: the branch's badge says ``running`` (or what its build has reached).

        Raises:
            StorageError: S3 failed (transient: the job's hooks run again).
        """
        if self.enabled:
            await self.never_blocking(self.branch(archive), archive)

    async def changed(self, change: Change) -> None:
        """Outcomes listener: the build's ledger entry changed (or a redelivery re-checks).

        Raises:
            StorageError: S3 failed (transient: the event is retried).
        """
        if self.enabled and change.after is not None:
            await self.never_blocking(self.publish_branch(change.after), change.archive)

    async def never_blocking(self, write: Awaitable[object], archive: str) -> None:
        """A permission or a setting never fails a build's push or event for its badge: it is
        logged and counted (as the pull request feedback's are); transient errors propagate
        (the job's hooks, or the event, are retried)."""
        try:
            await write
        except PermanentError as exc:
            self.metrics.errors.labels(kind=exc.kind).inc()
            log.error("the badge of %s could not be written: %s", archive, exc)

    async def branch(self, archive: str) -> None:
        entry = await self.ledger.read(archive)
        if entry is not None:
            await self.publish_branch(entry)

    async def publish_branch(self, entry: Entry) -> bool:
        """Write the badge of the entry's branch unless a newer build's is there.

        Raises:
            StorageError: S3 failed (transient).
        """
        if entry.repository is None or not entry.ref.startswith("refs/heads/"):
            return False  # a tag, or an entry written before badges knew its repository
        branch = entry.ref.removeprefix("refs/heads/")
        return await self.write(branch_key(entry.repository, branch), entry, branch)

    async def pull_request(self, repository: str, pull_request_id: str, entry: Entry) -> bool:
        """Write the badge of a pull request whose newest commit ``entry`` built.

        Raises:
            StorageError: S3 failed (transient).
        """
        if not self.enabled:
            return False
        key = pull_request_key(repository, pull_request_id)
        return await self.write(key, entry, f"pull request {pull_request_id}")

    async def write(self, key: str, entry: Entry, title: str) -> bool:
        """Compare-and-swap the badge at ``key``; True when this call wrote it.

        Raises:
            Conflict: lost the race ten times in a row (transient).
            StorageError: S3 failed (transient).
        """
        ours = shown_for(entry)
        status = status_of(entry)
        body = svg(status, title).encode()
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                await anyio.sleep(random.uniform(0, min(1.0, 0.02 * 2**attempt)))  # noqa: S311
            etag, shown = await self._head(key)
            if not ours.replaces(shown):
                return False
            condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            try:
                with translated(
                    f"write the badge s3://{self.bucket}/{key}", transient=StorageError
                ):
                    await self.s3.put_object(
                        Bucket=self.bucket,
                        Key=key,
                        Body=body,
                        ContentType=CONTENT_TYPE,
                        CacheControl=CACHE_CONTROL,
                        Metadata=ours.to_metadata(status),
                        **condition,  # type: ignore[arg-type]
                    )
            except StorageError as exc:
                code = error_code(exc.__cause__ or exc)
                if code in _CONFLICT_CODES or (etag and code in {"NoSuchKey", "404"}):
                    continue
                raise
            self.metrics.badges_written.labels(status=status.value).inc()
            log.info("badge %s: %s", key, status.value)
            return True
        raise Conflict(f"s3://{self.bucket}/{key} kept changing under {MAX_ATTEMPTS} attempts")

    async def _head(self, key: str) -> tuple[str | None, Shown | None]:
        try:
            with translated(f"read the badge s3://{self.bucket}/{key}", transient=StorageError):
                reply = await self.s3.head_object(Bucket=self.bucket, Key=key)
        except StorageError as exc:
            if error_code(exc.__cause__ or exc) in {"NoSuchKey", "404", "NotFound"}:
                return None, None
            raise
        return reply.get("ETag"), Shown.from_metadata(dict(reply.get("Metadata", {})))
