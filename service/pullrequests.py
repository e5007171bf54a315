"""Build results on CodeCommit pull requests (``BRANCHBUILD_PULL_REQUEST_FEEDBACK``).

For each open pull request whose source branch is the built branch and whose source commit is
the built commit, branchbuild keeps **one comment per pull request and commit**: posted when
the build starts (``PostCommentForPullRequest`` with a ``clientRequestToken`` derived from the
pull request, commit and build, so a redelivery posts nothing new) and edited in place
(``UpdateComment``) as the build progresses. With ``comment+approval`` it also approves the
pull request's revision on success and revokes its approval on failure
(``UpdatePullRequestApprovalState``), so an approval rule can require a green build.

What was posted where lives in ``<archive>.feedback.json`` beside the ledger entry (written by
compare-and-swap, see :mod:`service.records`). Three moments sync a build's pull requests:
the build started (a job hook), its ledger entry changed (a build state event), and a pull
request was opened or its source branch moved (``CodeCommit Pull Request State Change``): a
pull request opened after its commit was built gets the result at once.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from botocore.exceptions import ClientError
from pydantic import model_validator

from .aws import AccountClients, error_code, naming, translated
from .badges import Badges, pull_request_key, url
from .build_state import PULL_REQUEST_DETAIL_TYPE, Change, duration
from .builds import StartedBuild
from .decide import check_account
from .errors import MalformedEvent, PermanentError
from .events import (
    Account,
    Action,
    Commit,
    Envelope,
    EventTime,
    Named,
    Push,
    RefType,
    Region,
    Repository,
    check_ref_name,
    load,
    merged_pull_request,
    text,
    validated,
)
from .ledger import Entry, Ledger, archive_key
from .metrics import Metrics
from .pipelines import Pipelines, Rule
from .records import Document, Records
from .retries import RETRYING, attempt_text
from .settings import PullRequestFeedback, Settings

if TYPE_CHECKING:
    from types_aiobotocore_codecommit import CodeCommitClient

log = logging.getLogger("branchbuild.pullrequests")

FEEDBACK_SUFFIX = ".feedback.json"
SOURCE = "aws.codecommit"
HANDLED_EVENTS = frozenset({"pullRequestCreated", "pullRequestSourceBranchUpdated"})
_FAILED = frozenset({"FAILED", "FAULT", "TIMED_OUT"})


class _PullRequestEvent(Envelope):
    KIND = (SOURCE, PULL_REQUEST_DETAIL_TYPE)
    SENDER = "CodeCommit"

    detail: Named


class _PullRequestDetail(Named):
    pullRequestId: Annotated[str, text(128)]
    sourceReference: Annotated[str, text(4096)]
    sourceCommit: Commit
    pullRequestStatus: Annotated[str, text(64)]
    repositoryNames: list[Repository] = []

    @model_validator(mode="after")
    def _one_repository(self) -> Self:
        if len(self.repositoryNames) != 1:
            raise MalformedEvent("repositoryNames is not a list of one repository")
        return self


class _PullRequestChange(_PullRequestEvent):
    """A pull request opened, or its source branch moved."""

    detail: _PullRequestDetail
    account: Account
    region: Region | None = None  # merge builds need it (service.mergebuilds)
    time: EventTime = None  # merge builds order their triggers by it


def parse_pull_request(body: str) -> _PullRequestChange | None:
    """A ``CodeCommit Pull Request State Change`` event; None if it is not one of
    ``HANDLED_EVENTS`` (only their fields are checked).

    Raises:
        MalformedEvent: not such an event, or unusable fields.
    """
    data = load(body)
    if validated(_PullRequestEvent, data).detail.event not in HANDLED_EVENTS:
        return None
    return validated(_PullRequestChange, data)


@dataclass(frozen=True)
class Target:
    """An open pull request whose source is the built branch at the built commit."""

    pull_request_id: str
    revision: str
    source_commit: str
    destination_commit: str


def render(ledger: Entry, feedback: Document, badge: str | None = None) -> str:
    """The comment: status, duration, commit, build and CloudWatch Logs link; ``badge``: the
    pull request's badge image (its URL, or its S3 key when it has none), shown on top."""
    status = ledger.status or "STARTED"
    headline = {
        "STARTED": "⏳ Build started",
        "IN_PROGRESS": "🔄 Build in progress",
        "SUCCEEDED": "✅ Build succeeded",
        "FAILED": "❌ Build failed",
        "FAULT": "❌ Build failed (CodeBuild fault)",
        "TIMED_OUT": "⏱️ Build timed out",
        "STOPPED": "⏹️ Build stopped",
    }.get(status, status)
    superseded = ledger.superseded_by
    if status == "STOPPED" and superseded:
        headline = f"⏭️ Build superseded by `{str(superseded)[:12]}`"
    headline = retried_headline(ledger, headline)
    took = duration(ledger)
    rows = [
        ("Status", status if not (status == "STOPPED" and superseded) else "SUPERSEDED"),
        ("Commit", f"`{feedback['commit']}`"),
        ("Branch", f"`{str(feedback['ref']).removeprefix('refs/heads/')}`"),
        ("Build", f"`{feedback['build_id']}`"),
        ("Duration", _duration(took) if took is not None else "running"),
    ]
    if ledger.logs:
        rows.append(("Logs", f"[CloudWatch Logs]({ledger.logs})"))
    attempt = attempt_text(ledger)
    if attempt is not None:
        rows.insert(3, ("Attempt", f"{attempt} (build `{ledger.current_build}`)"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    top = ""
    if badge is not None:
        top = f"![build status]({badge})\n\n" if "://" in badge else f"Badge: `{badge}`\n\n"
    return f"{top}**branchbuild**: {headline}\n\n| | |\n|---|---|\n{table}\n"


def retried_headline(ledger: Entry, headline: str) -> str:
    """The headline of a build CodeBuild retried (service.retries): the last attempt decides."""
    n = ledger.attempt_number
    if ledger.status == RETRYING:
        limit = ledger.retry_limit
        return f"🔁 Attempt {n + 1} failed, CodeBuild retries it (retry {n + 1} of {limit})"
    if n < 1 or ledger.superseded_by:
        return headline
    if ledger.status == "SUCCEEDED":
        return f"✅ Build passed on retry {n}"
    if ledger.status in _FAILED:
        return f"{headline} (and on every retry: {n} of {n})"
    if ledger.status == "IN_PROGRESS":
        return f"🔄 Build in progress (retry {n} of {ledger.retry_limit})"
    return headline


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


async def open_targets(
    client: CodeCommitClient, repository: str
) -> list[tuple[str, str, dict[str, Any]]]:
    """The open pull requests of ``repository``: (id, revision id, target) for each of their
    targets in it.

    Raises:
        TransientError, PermanentError: CodeCommit failed (as :func:`service.aws.translated`).
    """
    ids: list[str] = []
    pages = client.get_paginator("list_pull_requests").paginate(
        repositoryName=repository, pullRequestStatus="OPEN"
    )
    with translated(f"list the pull requests of {repository}"):
        async for page in pages:
            ids += page.get("pullRequestIds", [])
    found = []
    for pull_request_id in ids:
        with translated(f"read pull request {pull_request_id}"):
            reply = await client.get_pull_request(pullRequestId=pull_request_id)
        pr = reply["pullRequest"]
        for target in pr.get("pullRequestTargets", []):
            if target.get("repositoryName") == repository:
                found.append((pull_request_id, pr.get("revisionId", ""), dict(target)))
    return found


async def post_comment_once(
    client: CodeCommitClient,
    *,
    pull_request_id: str,
    repository: str,
    before: str,
    after: str,
    content: str,
    token: str,
) -> str:
    """Post ``content`` as the comment of ``token`` (idempotent), or, when a comment was
    posted with that token before (its record lost, or a concurrent writer's), find it on
    every page of the pull request's comments and make it show ``content``: its id.

    Raises:
        TransientError: CodeCommit could not be reached (every failure is translated).
        PermanentError: CodeCommit refused, or the token's comment cannot be found.
    """
    with translated(f"comment on pull request {pull_request_id}"):
        try:
            reply = await client.post_comment_for_pull_request(
                pullRequestId=pull_request_id,
                repositoryName=repository,
                beforeCommitId=before,
                afterCommitId=after,
                content=content,
                clientRequestToken=token,
            )
            return reply["comment"]["commentId"]
        except ClientError as exc:
            if error_code(exc) != "IdempotencyParameterMismatchException":
                raise
    pages = client.get_paginator("get_comments_for_pull_request").paginate(
        pullRequestId=pull_request_id, repositoryName=repository, afterCommitId=after
    )
    with translated(f"read the comments of pull request {pull_request_id}"):
        async for page in pages:
            for group in page.get("commentsForPullRequestData", []):
                for comment in group.get("comments", []):
                    if comment.get("clientRequestToken") == token and "commentId" in comment:
                        if comment.get("content") != content:  # it shows another state
                            await client.update_comment(
                                commentId=comment["commentId"], content=content
                            )
                        return comment["commentId"]
    raise PermanentError(f"the comment posted with token {token} cannot be found")


def comment_token(pull_request_id: str, commit: str, build_id: str) -> str:
    return hashlib.sha256(f"{pull_request_id}\0{commit}\0{build_id}".encode()).hexdigest()


class PullRequests:
    def __init__(
        self,
        accounts: AccountClients,
        records: Records,
        settings: Settings,
        metrics: Metrics,
        pipelines: Pipelines | None = None,
        badges: Badges | None = None,
    ) -> None:
        """``pipelines``: a repository's rule may name its own archive key template;
        ``badges``: the pull requests' badges are written and shown (BRANCHBUILD_BADGES)."""
        self.badges = badges if badges is not None and badges.enabled else None
        self.accounts = accounts
        self.records = records
        self.ledger = Ledger(records)
        self.pipelines = pipelines
        self.settings = settings
        self.metrics = metrics

    @property
    def enabled(self) -> bool:
        return self.settings.pull_request_feedback is not PullRequestFeedback.OFF

    # -- the three moments ----------------------------------------------------------------

    async def started(self, push: Push, build: StartedBuild, archive: str) -> None:
        """Job hook: remember the build for feedback, then post on its pull requests.

        Raises:
            TransientError: CodeCommit or S3 failed (the job is retried, this runs again).
        """
        if not self.enabled or push.ref_type is not RefType.BRANCH:
            return
        if merged_pull_request(push) is not None:
            return  # a merge build: service.mergebuilds reports it
        fresh: Document = {
            "repository": push.repository,
            "account": push.account,
            "ref": push.ref,
            "commit": push.commit,
            "build_id": build.build_id,
            "comments": {},
            "approvals": {},
        }

        def remember(current: Document | None) -> Document | None:
            if current is not None and current.get("build_id") == build.build_id:
                return None
            return fresh

        await self.records.update(archive + FEEDBACK_SUFFIX, remember)
        await self.sync(archive)

    async def changed(self, change: Change) -> None:
        """Outcomes listener: the build's ledger entry changed (or a redelivery re-checks)."""
        if self.enabled:
            await self.sync(change.archive)

    async def event(self, body: str) -> str:
        """Handle a ``CodeCommit Pull Request State Change`` event; returns the outcome label.

        Raises:
            MalformedEvent: not such an event, or unusable fields.
            RejectedEvent: its account is not in BRANCHBUILD_ALLOWED_ACCOUNTS.
            TransientError: CodeCommit or S3 failed.
        """
        event = parse_pull_request(body)
        if event is None or not self.enabled or event.detail.pullRequestStatus != "OPEN":
            return "ignored"
        detail = event.detail
        if not detail.sourceReference.startswith("refs/heads/"):
            return "ignored"
        check_account(event.account, self.settings)
        push = Push(
            event_id="-",
            account=event.account,
            region="-",
            repository=detail.repositoryNames[0],
            ref_type=RefType.BRANCH,
            name=check_ref_name(detail.sourceReference.removeprefix("refs/heads/")),
            action=Action.UPDATED,
            commit=detail.sourceCommit,
        )
        archive = archive_key(self._rule(push.repository).key_template, push)
        if await self.records.read(archive + FEEDBACK_SUFFIX) is None:
            return "ignored"  # not built (yet): the build's start will find this pull request
        await self.sync(archive)
        return "recorded"

    async def commented(self, archive: str, build_id: str) -> list[str]:
        """The pull requests that show ``build_id``'s result (notifications name them).

        Raises:
            StorageError: S3 failed (transient).
        """
        found = await self.records.read(archive + FEEDBACK_SUFFIX)
        if found is None or found.data.get("build_id") != build_id:
            return []
        return sorted(str(pull_request_id) for pull_request_id in found.data.get("comments", {}))

    def _rule(self, repository: str) -> Rule:
        if self.pipelines is None:
            return Rule.from_settings(self.settings)
        return self.pipelines.rule_for(repository)

    # -- syncing ----------------------------------------------------------------------------

    async def sync(self, archive: str) -> None:
        """Make every matching pull request show the build's current state.

        Raises:
            TransientError: CodeCommit or S3 failed; nothing is lost by retrying.
        """
        feedback = await self.records.read(archive + FEEDBACK_SUFFIX)
        entry = await self.ledger.read(archive)
        if feedback is None or entry is None:
            return
        doc = feedback.data
        if entry.build_id != doc.get("build_id"):
            return
        with naming(repositoryName=str(doc["repository"])):
            await self._sync(archive, doc, entry)

    async def _sync(self, archive: str, doc: Document, entry: Entry) -> None:
        try:
            client = await self.accounts.codecommit(str(doc["account"]))
            targets = await self._targets(client, doc)
            for target in targets:
                if self.badges is not None:  # this build is of the pull request's newest commit
                    badge = self.badges.pull_request(
                        str(doc["repository"]), target.pull_request_id, entry
                    )
                    await self.badges.never_blocking(badge, archive)  # never the comment's
                content = self._render(entry, doc, target.pull_request_id)
                await self._comment(client, archive, doc, target, content)
            # Pull requests that moved on to a newer commit keep this commit's comment, and
            # it still tells how this build ended (e.g. superseded); no approval there.
            matching = {t.pull_request_id for t in targets}
            for pull_request_id in doc.get("comments", {}):
                if pull_request_id not in matching:
                    earlier = Target(pull_request_id, "", str(doc["commit"]), "")
                    content = self._render(entry, doc, pull_request_id)
                    await self._comment(client, archive, doc, earlier, content)
            for target in targets:
                if self.settings.pull_request_feedback is PullRequestFeedback.COMMENT_AND_APPROVAL:
                    await self._approval(client, archive, doc, target, str(entry.status))
        except PermanentError as exc:  # a permission or a setting: never block a build for it
            self.metrics.pull_request_updates.labels(action="failed").inc()
            self.metrics.errors.labels(kind=exc.kind).inc()
            log.error("pull request feedback for %s failed: %s", archive, exc)

    def _render(self, entry: Entry, doc: Document, pull_request_id: str) -> str:
        content = render(entry, doc, self._badge(doc, pull_request_id))
        if self._rule(str(doc["repository"])).merge_build:  # issue 25
            content += (
                "\nThis is the **branch build** (the source branch as pushed); the "
                "**merge build** has its own comment.\n"
            )
        return content

    def _badge(self, doc: Document, pull_request_id: str) -> str | None:
        if self.badges is None:
            return None
        key = pull_request_key(str(doc["repository"]), pull_request_id)
        return url(self.settings, key) or key

    async def _targets(self, client: CodeCommitClient, doc: Document) -> list[Target]:
        repository, ref, commit = str(doc["repository"]), str(doc["ref"]), str(doc["commit"])
        return [
            Target(
                pull_request_id=pull_request_id,
                revision=revision,
                source_commit=commit,
                destination_commit=target.get("destinationCommit", ""),
            )
            for pull_request_id, revision, target in await open_targets(client, repository)
            if target.get("sourceReference") == ref and target.get("sourceCommit") == commit
        ]

    async def _comment(
        self, client: CodeCommitClient, archive: str, doc: Document, target: Target, content: str
    ) -> None:
        digest = hashlib.sha256(content.encode()).hexdigest()
        known: dict[str, Any] = doc.get("comments", {}).get(target.pull_request_id) or {}
        if known.get("digest") == digest:
            return
        comment_id = known.get("id")
        if comment_id is None:
            comment_id = await self._post(client, doc, target, content)
            action = "comment_created"
        else:
            with translated(f"update comment {comment_id}"):
                await client.update_comment(commentId=comment_id, content=content)
            action = "comment_updated"
        self.metrics.pull_request_updates.labels(action=action).inc()
        log.info("pull request %s: %s", target.pull_request_id, action.replace("_", " "), extra={})

        def record(current: Document | None) -> Document | None:
            if current is None or current.get("build_id") != doc["build_id"]:
                return None
            comments = dict(current.get("comments", {}))
            comments[target.pull_request_id] = {"id": comment_id, "digest": digest}
            return current | {"comments": comments}

        await self.records.update(archive + FEEDBACK_SUFFIX, record)

    async def _post(
        self, client: CodeCommitClient, doc: Document, target: Target, content: str
    ) -> str:
        return await post_comment_once(
            client,
            pull_request_id=target.pull_request_id,
            repository=str(doc["repository"]),
            before=target.destination_commit,
            after=target.source_commit,
            content=content,
            token=comment_token(target.pull_request_id, str(doc["commit"]), str(doc["build_id"])),
        )

    async def _approval(
        self, client: CodeCommitClient, archive: str, doc: Document, target: Target, status: str
    ) -> None:
        state: Literal["APPROVE", "REVOKE"]
        if status == "SUCCEEDED":
            state = "APPROVE"
        elif status in _FAILED:
            state = "REVOKE"
        else:
            return
        pull_request_id, revision = target.pull_request_id, target.revision
        done = f"{state}@{revision}"
        if doc.get("approvals", {}).get(pull_request_id) == done:
            return
        with translated(f"set the approval of pull request {pull_request_id}"):
            try:
                await client.update_pull_request_approval_state(
                    pullRequestId=pull_request_id, revisionId=revision, approvalState=state
                )
                moved = False
            except ClientError as exc:
                if error_code(exc) != "RevisionNotCurrentException":
                    raise
                moved = True
        if moved:
            # The pull request moved on: still about this commit (its destination moved)?
            # Then approve the new revision; otherwise the newer commit's build decides.
            with translated(f"read pull request {pull_request_id}"):
                reply = await client.get_pull_request(pullRequestId=pull_request_id)
            pr = reply["pullRequest"]
            sources = {t.get("sourceCommit") for t in pr.get("pullRequestTargets", [])}
            if target.source_commit not in sources:
                self.metrics.pull_request_updates.labels(action="revision_moved").inc()
                log.info("pull request %s moved past %s", pull_request_id, target.source_commit)
                return
            revision = pr.get("revisionId", "")
            done = f"{state}@{revision}"
            with translated(f"set the approval of pull request {pull_request_id}"):
                await client.update_pull_request_approval_state(
                    pullRequestId=pull_request_id, revisionId=revision, approvalState=state
                )
        self.metrics.pull_request_updates.labels(
            action="approved" if state == "APPROVE" else "revoked"
        ).inc()
        log.info("pull request %s: %s", pull_request_id, state.lower())

        def record(current: Document | None) -> Document | None:
            if current is None or current.get("build_id") != doc["build_id"]:
                return None
            approvals = dict(current.get("approvals", {}))
            approvals[pull_request_id] = done
            return current | {"approvals": approvals}

        await self.records.update(archive + FEEDBACK_SUFFIX, record)
