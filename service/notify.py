"""Notifications: how a branch's builds end, and the pushes that could not be built, on SNS.

Each rule (``notify: {topics, on}``, by default ``BRANCHBUILD_NOTIFY_TOPICS`` and
``BRANCHBUILD_NOTIFY_ON``) names SNS topics and the outcomes that notify them:

* ``failed`` (FAILED, FAULT, TIMED_OUT), ``succeeded``, ``stopped`` (not by branchbuild:
  a build stopped because a newer commit replaced it is ``superseded`` and never notifies);
* ``fixed``: a success whose branch's previous decided build (succeeded or failed) failed;
  ``on: [succeeded]`` notifies fixed builds too (their outcome still reads ``fixed``);
* ``dead_lettered``: a push moved to the work queue's dead-letter queue, with the reason.

One message serves every subscriber (``MessageStructure=json``): e-mail gets a short text,
HTTP(S) subscribers (AWS Chatbot, i.e. Amazon Q Developer in chat applications) the Chatbot
custom notification format, the other protocols (SQS, Lambda, Firehose, e-mail-json) a JSON
body; message attributes (``repository``, ``branch``, ``outcome``, ``pusher``) let each
subscription filter. docs/notifications.md shows all three.

Exactly once per build and outcome (per topic), across redeliveries and instances: the
outcome is decided once and kept in ``branchbuild-state/notify/builds/<sha256(archive)>.json``
(written by compare-and-swap, :mod:`service.records`), and each topic's publish is claimed
there first (``pending``, with a lease) and marked ``published`` after SNS accepted it. A
failed publish releases its claim and raises, so the build state event is retried; a claim
whose holder died is taken over when its lease lapses. What remains: a holder that dies (or
whose S3 write fails) after SNS accepted the message and before it is marked leads to a
second message once the lease lapses; a FIFO topic (``.fifo``) deduplicates even that, with
the claim's id as ``MessageDeduplicationId``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import anyio
from botocore.exceptions import ClientError

from .aws import error_code, region, translated
from .build_state import FINAL, Change
from .builds import StartedBuild
from .errors import (
    BranchbuildError,
    MalformedEvent,
    NotificationBusy,
    NotificationRefused,
    PermanentError,
    TransientError,
    unexpected,
)
from .events import Push, parse_work
from .ledger import Entry, Ledger
from .metrics import Metrics
from .pipelines import Pipelines, Rule
from .queue import Message
from .records import STATE_PREFIX, Document, Records
from .settings import Settings

if TYPE_CHECKING:
    from types_aiobotocore_sns import SNSClient
    from types_aiobotocore_sns.type_defs import MessageAttributeValueTypeDef

log = logging.getLogger("branchbuild.notify")

NOTIFY_PREFIX = STATE_PREFIX + "notify/"
BUILDS_PREFIX = NOTIFY_PREFIX + "builds/"
BRANCHES_PREFIX = NOTIFY_PREFIX + "branches/"
DEAD_LETTERS_PREFIX = NOTIFY_PREFIX + "dead-letters/"
HISTORY = 20  # decided results kept per branch (for "fixed")
# A pending claim older than this is taken over (its holder died); longer than a publish can
# take with the SNS client's timeouts and retries (service.app: 10 s reads, 3 retries: 4 attempts).
LEASE_SECONDS = 60.0
DEAD_LETTER_TIMEOUT = 20.0  # the dead-letter hook runs shielded: never hold a shutdown longer

_FAILED = frozenset({"FAILED", "FAULT", "TIMED_OUT"})
# SNS's codes that no retry fixes: a permission, the topic, its KMS key, the message.
_REFUSED = frozenset(
    {
        "AuthorizationError",
        "NotFound",
        "NotFoundException",
        "InvalidParameter",
        "InvalidParameterValue",
        "InvalidSecurity",
        "KMSAccessDenied",
        "KMSDisabled",
        "KMSInvalidState",
        "KMSNotFound",
        "KMSOptInRequired",
    }
)
_HEADLINES = {
    "failed": "❌ Build failed",
    "fixed": "✅ Build fixed",
    "succeeded": "✅ Build succeeded",
    "stopped": "⏹️ Build stopped",
    "dead_lettered": "🚫 Push not built",
}
# Protocols that get the JSON body; http(s) get the Chatbot format; the rest the text.
_MACHINE_PROTOCOLS = ("sqs", "lambda", "firehose", "email-json")


@dataclass(frozen=True)
class Notice:
    """What one notification says."""

    outcome: str
    repository: str
    ref: str
    commit: str | None
    pusher: str | None
    account: str
    region: str  # the repository's (CodeCommit links)
    build_region: str  # the service's (CodeBuild links)
    build_id: str | None = None
    project: str | None = None
    status: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    logs: str | None = None
    pull_requests: tuple[str, ...] = ()
    reason: str | None = None
    error_kind: str | None = None
    time: str = field(default_factory=lambda: _now())

    @property
    def branch(self) -> str:
        return self.ref.removeprefix("refs/heads/").removeprefix("refs/tags/")

    @property
    def headline(self) -> str:
        return _HEADLINES.get(self.outcome, self.outcome)

    def links(self) -> dict[str, str | None]:
        repo = quote(self.repository, safe="")
        codecommit = f"https://{self.region}.console.aws.amazon.com/codesuite/codecommit"
        build = None
        if self.build_id and self.project:
            build = (
                f"https://{self.build_region}.console.aws.amazon.com/codesuite/codebuild/"
                f"projects/{quote(self.project, safe='')}/build/{quote(self.build_id, safe='')}"
                f"/?region={self.build_region}"
            )
        return {
            "commit": (
                f"{codecommit}/repositories/{repo}/commit/{self.commit}?region={self.region}"
                if self.commit
                else None
            ),
            "build": build,
            "logs": self.logs,
        }

    def pull_request_link(self, pull_request_id: str) -> str:
        return (
            f"https://{self.region}.console.aws.amazon.com/codesuite/codecommit/repositories/"
            f"{quote(self.repository, safe='')}/pull-requests/{quote(pull_request_id, safe='')}"
            f"/details?region={self.region}"
        )


# -- what a notification says -------------------------------------------------------------------


def body(notice: Notice) -> dict[str, Any]:
    """The JSON body (version 1) for machines: SQS, Lambda, Firehose, e-mail-json."""
    links = notice.links()
    build = None
    if notice.build_id is not None:
        build = {
            "id": notice.build_id,
            "project": notice.project,
            "status": notice.status,
            "started_at": notice.started_at,
            "ended_at": notice.ended_at,
            "console": links["build"],
            "logs": links["logs"],
        }
    return {
        "version": 1,
        "source": "branchbuild",
        "outcome": notice.outcome,
        "time": notice.time,
        "account": notice.account,
        "region": notice.region,
        "repository": notice.repository,
        "branch": notice.branch,
        "ref": notice.ref,
        "commit": notice.commit,
        "commit_link": links["commit"],
        "pusher": notice.pusher,
        "build": build,
        "pull_requests": [
            {"id": p, "link": notice.pull_request_link(p)} for p in notice.pull_requests
        ],
        "reason": notice.reason,
        "error_kind": notice.error_kind,
    }


def text(notice: Notice) -> str:
    """The short text for people (e-mail, SMS and any protocol without its own part)."""
    links = notice.links()
    rows = [
        ("Repository", notice.repository),
        ("Branch", notice.branch),
        ("Commit", notice.commit),
        ("Pushed by", notice.pusher),
        ("Reason", notice.reason),
        ("Build", f"{notice.build_id} ({notice.status})" if notice.build_id else None),
        ("Console", links["build"]),
        ("Logs", links["logs"]),
    ]
    rows += [("Pull request", f"{p} {notice.pull_request_link(p)}") for p in notice.pull_requests]
    lines = [f"{name + ':':<14}{value}" for name, value in rows if value]
    return f"{notice.headline}: {notice.repository} {notice.branch}\n\n" + "\n".join(lines) + "\n"


def subject(notice: Notice) -> str:
    """SNS's e-mail subject: ASCII, one line, under 100 characters."""
    what = {"dead_lettered": "push not built"}.get(notice.outcome, f"build {notice.outcome}")
    raw = f"branchbuild: {notice.repository} {notice.branch} {what}"
    ascii_ = "".join(c if " " <= c <= "~" else "?" for c in raw)
    return ascii_ if len(ascii_) < 100 else ascii_[:96] + "..."


def chatbot(notice: Notice) -> dict[str, Any]:
    """The AWS Chatbot (Amazon Q Developer in chat applications) custom notification."""
    links = notice.links()
    facts = [f"*Repository:* {notice.repository}", f"*Branch:* `{notice.branch}`"]
    if notice.commit:
        commit = f"`{notice.commit[:12]}`"
        facts.append(f"*Commit:* <{links['commit']}|{commit}>" if links["commit"] else commit)
    if notice.pusher:
        facts.append(f"*Pushed by:* {notice.pusher}")
    if notice.build_id:
        facts.append(f"*Build:* `{notice.build_id}` ({notice.status})")
    if notice.reason:
        facts.append(f"*Reason:* {notice.reason[:2000]}")
    steps = []
    if links["logs"]:
        steps.append(f"Read the <{links['logs']}|build logs>")
    if links["build"]:
        steps.append(f"Open the <{links['build']}|build in the CodeBuild console>")
    steps += [f"See <{notice.pull_request_link(p)}|pull request {p}>" for p in notice.pull_requests]
    if notice.outcome == "dead_lettered":
        steps.append("An operator redrives it with `branchbuild dlq` once the reason is fixed")
    title = f"{notice.headline}: {notice.repository} {notice.branch}"
    context = {
        "repository": notice.repository,
        "branch": notice.branch,
        "outcome": notice.outcome,
        "commit": notice.commit or "",
        "pusher": notice.pusher or "",
        "build_id": notice.build_id or "",
    }
    return {
        "version": "1.0",
        "source": "custom",
        "content": {
            "textType": "client-markdown",
            "title": title[:250],
            "description": "\n".join(facts)[:8000],
            "nextSteps": steps,
            "keywords": [notice.repository, notice.branch, notice.outcome],
        },
        "metadata": {
            # One thread per branch in the chat channel.
            "threadId": _digest(notice.repository, notice.ref)[:32],
            "summary": title[:250],
            "eventType": f"branchbuild.{notice.outcome}",
            "relatedResources": [r for r in (links["build"], links["commit"]) if r],
            "additionalContext": {k: v for k, v in context.items() if v},
        },
    }


def attributes(notice: Notice) -> dict[str, MessageAttributeValueTypeDef]:
    """SNS message attributes for subscription filter policies (an unknown pusher: none)."""
    values = {
        "repository": notice.repository,
        "branch": notice.branch,
        "outcome": notice.outcome,
        "pusher": notice.pusher,
    }
    return {k: {"DataType": "String", "StringValue": v} for k, v in values.items() if v}


def message(notice: Notice) -> str:
    """The ``Message`` of a ``MessageStructure=json`` publish: one part per protocol."""
    short = text(notice)
    machine = json.dumps(body(notice), separators=(",", ":"))
    chat = json.dumps(chatbot(notice), separators=(",", ":"), ensure_ascii=False)
    parts = {"default": short, "email": short, "http": chat, "https": chat}
    parts |= {protocol: machine for protocol in _MACHINE_PROTOCOLS}
    return json.dumps(parts, ensure_ascii=False)


# -- outcomes -----------------------------------------------------------------------------------


def result_of(entry: Entry) -> str | None:
    """A finished build's result: succeeded, failed, stopped or superseded (None: running)."""
    status = entry.status or ""
    if status not in FINAL:
        return None
    if status == "SUCCEEDED":
        return "succeeded"
    if status in _FAILED:
        return "failed"
    return "superseded" if entry.superseded_by else "stopped"


def outcome_of(result: str, previous: str | None) -> str:
    """The outcome: ``fixed`` for a success after a failure, else the result itself."""
    return "fixed" if result == "succeeded" and previous == "failed" else result


def notifies(outcome: str, rule: Rule) -> bool:
    """Whether ``outcome`` notifies under ``rule`` (``succeeded`` covers ``fixed``)."""
    if not rule.notify_topics:
        return False
    return outcome in rule.notify_on or (outcome == "fixed" and "succeeded" in rule.notify_on)


def build_key(archive: str) -> str:
    return BUILDS_PREFIX + _digest(archive) + ".json"


def branch_key(repository: str, ref: str) -> str:
    return BRANCHES_PREFIX + _digest(repository, ref) + ".json"


def dead_letter_key(message_id: str) -> str:
    return DEAD_LETTERS_PREFIX + _digest(message_id) + ".json"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Notifier:
    """Publishes build outcomes and dead-lettered pushes; the one owner of the documents
    under ``branchbuild-state/notify/``."""

    def __init__(
        self,
        sns: SNSClient,
        records: Records,
        settings: Settings,
        metrics: Metrics,
        pipelines: Pipelines | None = None,
        *,
        pull_requests: Callable[[str, str], Awaitable[list[str]]] | None = None,
    ) -> None:
        """``pull_requests(archive, build_id)``: the pull requests showing a build's result."""
        self.sns = sns
        self.records = records
        self.settings = settings
        self.metrics = metrics
        self.pipelines = pipelines
        self.pull_requests = pull_requests

    def _rule(self, repository: str) -> Rule:
        if self.pipelines is None:
            return Rule.from_settings(self.settings)
        return self.pipelines.rule_for(repository)

    def _anywhere(self) -> bool:
        """Whether any rule notifies (else a finished build costs not even an S3 read)."""
        if self.pipelines is None:
            return bool(self.settings.notify_topics)
        config = self.pipelines.current
        return bool(config.defaults.notify_topics) or any(
            rule.notify_topics for _, rule in config.rules
        )

    # -- the three moments ----------------------------------------------------------------

    async def started(self, push: Push, build: StartedBuild, archive: str) -> None:
        """Job hook: remember who pushed what for the build's notification (only for a
        repository whose rule notifies).

        Raises:
            StorageError: S3 failed (transient: the job is retried, this runs again).
            TransientError: as :meth:`changed`, for a build that had already ended (a
                refusal is logged and counted there: the state event's path reports it).
        """
        if not self._rule(push.repository).notify_topics:
            return
        fresh: Document = {
            "build_id": build.build_id,
            "repository": push.repository,
            "account": push.account,
            "region": push.region,
            "ref": push.ref,
            "commit": push.commit,
            "pusher": push.pusher,
            "archive": archive,
        }

        def remember(current: Document | None) -> Document | None:
            if current is not None and current.get("build_id") == build.build_id:
                return None
            return fresh

        await self.records.update(build_key(archive), remember)
        # A build that ended before this document was written (its state event came between
        # the ledger's write and this hook) found nothing to notify: it is notified here.
        entry = await Ledger(self.records).read(archive)
        if entry is not None and entry.build_id == build.build_id and result_of(entry):
            try:
                await self.changed(Change(archive=archive, before=entry, after=entry))
            except PermanentError as exc:  # never fail the push's job for its notification:
                # the build state event's path reports it (and dead-letters that event)
                self.metrics.errors.labels(kind=exc.kind).inc()
                log.error("the notification of %s could not be sent: %s", archive, exc)
            except NotificationBusy as exc:  # its holder (the state event) sends it, or
                # releases it and is retried: the built push's job must not fail for it (it
                # was retried, then dead-lettered, with a "dead_lettered" notification)
                log.info("the notification of %s is its holder's: %s", archive, exc)

    async def changed(self, change: Change) -> None:
        """Outcomes listener: a build's ledger entry changed (or a redelivery re-checks).

        Raises:
            TransientError: S3 or SNS failed, or another instance is publishing it now:
                the state event is retried, and nothing is published twice.
            NotificationRefused: SNS refused it for good (the event is dead-lettered with
                the reason; redriven once fixed, it notifies).
        """
        entry = change.after
        if entry is None or result_of(entry) is None or not self._anywhere():
            return
        key = build_key(change.archive)
        found = await self.records.read(key)
        if found is None or found.data.get("build_id") != entry.build_id:
            return  # started before notifications were on for its repository
        doc = found.data
        if "outcome" not in doc:
            doc = await self._decide(key, doc, entry)
        topics = [str(t) for t in doc.get("topics", [])]
        if not topics:
            return
        pull_requests: list[str] = []
        if self.pull_requests is not None:
            pull_requests = await self.pull_requests(change.archive, entry.build_id)
        notice = Notice(
            outcome=str(doc["outcome"]),
            repository=str(doc["repository"]),
            ref=str(doc["ref"]),
            commit=entry.commit,
            pusher=_optional(doc.get("pusher")),
            account=str(doc["account"]),
            region=str(doc["region"]),
            build_region=region() or str(doc["region"]),
            build_id=entry.current_build,  # the attempt that decided (retries)
            project=entry.project,
            status=entry.status,
            started_at=entry.started_at,
            ended_at=entry.ended_at,
            logs=entry.logs,
            pull_requests=tuple(pull_requests),
            time=str(doc.get("decided_at") or _now()),
        )
        for topic in topics:
            await self._publish(key, topic, notice)

    async def dead_lettered(self, message: Message, reason: str, kind: str) -> None:
        """Work queue hook: a push was dead-lettered. Never raises (the queue's settling must
        not): the message is in the dead-letter queue already; a failure is logged and
        counted."""
        try:
            await self._dead_lettered(message, reason, kind)
        except Exception as exc:  # a bug: never let it stop settling the message
            log.exception("notifying the dead-lettered message %s failed", message.id)
            self._dead_letter_failed(message, unexpected(exc))

    async def _dead_lettered(self, message: Message, reason: str, kind: str) -> None:
        try:
            push = parse_work(message.body)
        except MalformedEvent:
            return  # no push to tell anyone about: the operators' alarm sees it
        rule = self._rule(push.repository)
        if not notifies("dead_lettered", rule):
            return
        key = dead_letter_key(message.id)
        fresh: Document = {
            "message_id": message.id,
            "outcome": "dead_lettered",
            "topics": list(rule.notify_topics),
            "decided_at": _now(),
            "sent": {},
        }
        with anyio.move_on_after(DEAD_LETTER_TIMEOUT) as scope:
            try:
                written = await self.records.update(key, lambda c: fresh if c is None else None)
                found = None if written else await self.records.read(key)
            except BranchbuildError as exc:
                self._dead_letter_failed(message, exc)
                return
            doc = written or (found.data if found else fresh)
            notice = Notice(
                outcome="dead_lettered",
                repository=push.repository,
                ref=push.ref,
                commit=push.commit or push.old_commit,
                pusher=push.pusher,
                account=push.account,
                region=push.region,
                build_region=region() or push.region,
                reason=reason,
                error_kind=kind,
                time=str(doc.get("decided_at") or _now()),
            )
            for topic in doc.get("topics", []):
                try:
                    await self._publish(key, str(topic), notice)
                except BranchbuildError as exc:
                    self._dead_letter_failed(message, exc)
        if scope.cancelled_caught:
            self._dead_letter_failed(message, TransientError("timed out"))

    def _dead_letter_failed(self, message: Message, exc: BranchbuildError) -> None:
        self.metrics.errors.labels(kind=exc.kind).inc()
        log.error("could not notify that message %s was dead-lettered: %s", message.id, exc)

    # -- deciding and publishing ----------------------------------------------------------

    async def _decide(self, key: str, doc: Document, entry: Entry) -> Document:
        """Decide the build's outcome and topics once; a redelivery finds them."""
        result = result_of(entry)
        assert result is not None
        previous = None
        if result in ("succeeded", "failed"):
            previous = await self._previous(str(doc["repository"]), str(doc["ref"]), entry, result)
        outcome = outcome_of(result, previous)
        rule = self._rule(str(doc["repository"]))
        topics = list(rule.notify_topics) if notifies(outcome, rule) else []
        decided = {"outcome": outcome, "topics": topics, "decided_at": _now(), "sent": {}}

        def decide(current: Document | None) -> Document | None:
            if current is None or current.get("build_id") != entry.build_id:
                return None
            return None if "outcome" in current else current | decided

        written = await self.records.update(key, decide)
        if written is not None:
            log.info("build %s: %s, notifying %s topic(s)", entry.build_id, outcome, len(topics))
            return written
        found = await self.records.read(key)  # decided by another delivery meanwhile
        if found is None or "outcome" not in found.data:
            raise TransientError(f"the notification record {key} changed while deciding")
        return found.data

    async def _previous(self, repository: str, ref: str, entry: Entry, result: str) -> str | None:
        """The branch's decided result before this build's (recorded once, in order)."""
        seen: list[Any] = []

        def record(current: Document | None) -> Document | None:
            nonlocal seen
            seen = list((current or {}).get("results", []))
            if any(isinstance(r, dict) and r.get("build_id") == entry.build_id for r in seen):
                return None
            seen.append({"build_id": entry.build_id, "result": result, "commit": entry.commit})
            seen = seen[-HISTORY:]
            return {"repository": repository, "ref": ref, "results": seen}

        await self.records.update(branch_key(repository, ref), record)
        before = None
        for item in seen:
            if not isinstance(item, dict):
                continue
            if item.get("build_id") == entry.build_id:
                return before
            before = item.get("result")
        return before

    async def _publish(self, key: str, topic: str, notice: Notice) -> None:
        """Publish ``notice`` to ``topic`` unless it was; claim first, mark after.

        Raises:
            TransientError: another holder's claim is still fresh, or S3 or SNS failed.
            NotificationRefused: SNS refused it for good.
        """
        token = uuid.uuid4().hex
        state = ""

        def claim(current: Document | None) -> Document | None:
            nonlocal state
            if current is None:
                state = "gone"
                return None
            sent = dict(current.get("sent") or {})
            held = sent.get(topic) or {}
            if held.get("state") == "published":
                state = "published"
                return None
            if held.get("state") == "pending" and time.time() - held.get("at", 0) < LEASE_SECONDS:
                state = "busy"
                return None
            state = "claimed"
            sent[topic] = {"state": "pending", "token": token, "at": time.time()}
            return current | {"sent": sent}

        await self.records.update(key, claim)
        if state == "published":
            self.metrics.notifications.labels(outcome=notice.outcome, result="duplicate").inc()
            log.info("%s notification to %s was published before", notice.outcome, topic)
            return
        if state == "busy":
            raise NotificationBusy(f"the {notice.outcome} notification to {topic} is being sent")
        if state != "claimed":
            return
        try:
            message_id = await self._send(key, topic, notice)
        except BranchbuildError:
            self.metrics.notifications.labels(outcome=notice.outcome, result="failed").inc()
            with anyio.CancelScope(shield=True):
                await self._mark(key, topic, token, None)
            raise

        await self._mark(key, topic, token, message_id)
        self.metrics.notifications.labels(outcome=notice.outcome, result="published").inc()
        log.info(
            "notified %s: %s %s %s (%s)",
            topic,
            notice.repository,
            notice.branch,
            notice.outcome,
            message_id,
        )

    async def _mark(self, key: str, topic: str, token: str, message_id: str | None) -> None:
        """Our claim on ``topic``: published (``message_id``), or released (None)."""

        def mark(current: Document | None) -> Document | None:
            sent = dict((current or {}).get("sent") or {})
            if current is None or (sent.get(topic) or {}).get("token") != token:
                return None
            if message_id is None:
                sent.pop(topic)
            else:
                sent[topic] = {"state": "published", "message_id": message_id, "at": time.time()}
            return current | {"sent": sent}

        await self.records.update(key, mark)

    async def _send(self, key: str, topic: str, notice: Notice) -> str:
        extra: dict[str, str] = {}
        if topic.endswith(".fifo"):  # SNS FIFO deduplicates for 5 minutes: even a retake
            extra = {
                "MessageGroupId": _digest(notice.repository, notice.ref)[:128],
                "MessageDeduplicationId": _digest(key, topic)[:128],
            }
        action = f"publish the {notice.outcome} notification to {topic}"
        with translated(action, permanent=NotificationRefused):
            try:
                reply = await self.sns.publish(
                    TopicArn=topic,
                    Message=message(notice),
                    MessageStructure="json",
                    Subject=subject(notice),
                    MessageAttributes=attributes(notice),
                    **extra,
                )
            except ClientError as exc:
                if error_code(exc) in _REFUSED:
                    raise NotificationRefused(f"cannot {action}: {exc}") from exc
                raise
        return str(reply.get("MessageId", ""))


def _optional(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
