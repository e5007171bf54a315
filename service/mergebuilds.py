"""Pull requests built as merged: a rule's ``pull_requests: {merge_build: true}``.

For each open pull request of such a repository, CodeCommit makes an unreferenced merge commit
of the source into the destination (``CreateUnreferencedMergeCommit``, with the rule's
``merge_strategy``), and branchbuild builds that commit as a build of its own: queued on the
work queue as the branch ``pr/<id>/.merge`` (:func:`service.events.merge_branch`, a name git
refuses for a real branch), so it has its own archive key, ledger entry, work-queue lane and
superseding: a newer merge of the same pull request supersedes the older one's build.

A pull request is merged again when either side moves: its source (the pull request events
``pullRequestCreated`` and ``pullRequestSourceBranchUpdated``) or its destination (a push to
the destination branch, seen by the intake even when that branch is protected). A merge that
needs a manual resolution (``ManualMergeRequiredException``) is no build: the conflicting
files (``GetMergeConflicts``) are reported on the pull request in a comment.

Documents (compare-and-swap, :mod:`service.records`), owned here:

* ``branchbuild-state/merges/<sha256(repository, pull request)>.json``: the pull request's
  last merge (source, destination and strategy, and the merge commit or the conflict), so a
  redelivered event makes no second merge commit.
* ``<archive>.merge.json`` beside the merge build's ledger entry: which pull request and
  commits it merged, its build and its comment (one per merge build, posted when it starts
  and edited in place, as the branch build's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from .aws import AccountClients, error_code, naming, translated
from .build_state import Change, duration
from .builds import StartedBuild
from .decide import check_account
from .errors import MalformedEvent, PermanentError
from .events import Action, Push, RefType, merge_branch, merged_pull_request
from .intake import work_message
from .ledger import Entry, Ledger, archive_key
from .metrics import Metrics
from .pipelines import MergeStrategy, Pipelines, Rule
from .pullrequests import open_targets, parse_pull_request, post_comment_once
from .queue import Queue
from .records import STATE_PREFIX, Document, Records
from .settings import Settings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from types_aiobotocore_codecommit import CodeCommitClient

log = logging.getLogger("branchbuild.mergebuilds")

MERGES_PREFIX = STATE_PREFIX + "merges/"
MERGE_SUFFIX = ".merge.json"
AUTHOR = "branchbuild"
_MAX_CONFLICT_FILES = 20


@dataclass(frozen=True)
class Sides:
    """What one merge build merges: a pull request's source into its destination."""

    account: str
    region: str
    repository: str
    pull_request_id: str
    source_ref: str
    source_commit: str
    destination_ref: str
    destination_commit: str
    strategy: MergeStrategy
    # When the change that asked for this merge happened (its event's time, UTC ...Z): a late
    # or redriven event never replaces the merge of sides seen later.
    since: str | None = None

    @property
    def wanted(self) -> Document:
        return {
            "source": self.source_commit,
            "destination": self.destination_commit,
            "strategy": self.strategy.value,
        }


def merges_key(repository: str, pull_request_id: str) -> str:
    digest = hashlib.sha256(f"{repository}\0{pull_request_id}".encode()).hexdigest()
    return MERGES_PREFIX + digest + ".json"


def _branch(ref: str) -> str:
    return ref.removeprefix("refs/heads/")


def render(entry: Entry, doc: Document) -> str:
    """The merge build's comment: which build it is, what it merged, and how it went."""
    status = entry.status or "STARTED"
    headline = {
        "STARTED": "⏳ Merge build started",
        "IN_PROGRESS": "🔄 Merge build in progress",
        "SUCCEEDED": "✅ Merge build succeeded",
        "FAILED": "❌ Merge build failed",
        "FAULT": "❌ Merge build failed (CodeBuild fault)",
        "TIMED_OUT": "⏱️ Merge build timed out",
        "STOPPED": "⏹️ Merge build stopped",
    }.get(status, f"Merge build {status}")
    superseded = status == "STOPPED" and entry.superseded_by
    if superseded:
        headline = f"⏭️ Merge build superseded by `{str(entry.superseded_by)[:12]}`"
    source, destination = _branch(str(doc["source_ref"])), _branch(str(doc["destination_ref"]))
    took = duration(entry)
    rows = [
        ("Status", "SUPERSEDED" if superseded else status),
        ("Merge commit", f"`{doc['commit']}`"),
        ("Source", f"`{source}` at `{doc['source_commit']}`"),
        ("Destination", f"`{destination}` at `{doc['destination_commit']}`"),
        ("Strategy", str(doc["strategy"])),
        ("Build", f"`{doc['build_id']}`"),
        ("Duration", _duration(took) if took is not None else "running"),
    ]
    if entry.logs:
        rows.append(("Logs", f"[CloudWatch Logs]({entry.logs})"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return (
        f"**branchbuild**: {headline}\n\n"
        f"This is the **merge build**: `{source}` merged into `{destination}` as the pull "
        "request would merge now. The **branch build** (the source branch as pushed) has its "
        f"own comment.\n\n| | |\n|---|---|\n{table}\n"
    )


def render_conflict(sides: Sides, files: list[str], more: bool) -> str:
    """The comment that replaces a merge build when the pull request does not merge."""
    source, destination = _branch(sides.source_ref), _branch(sides.destination_ref)
    if sides.strategy is MergeStrategy.FAST_FORWARD_MERGE:
        why = f"`{destination}` cannot be fast-forwarded to `{source}`"
    else:
        why = f"`{source}` does not merge into `{destination}` without conflicts"
    lines = [
        f"**branchbuild**: ⚠️ No merge build: {why} ({sides.strategy.value}).",
        "",
        f"Source `{sides.source_commit}`, destination `{sides.destination_commit}`. The "
        "**branch build** (the source branch as pushed) is reported in its own comment; the "
        "merge is built again when either branch moves.",
    ]
    if files:
        lines += ["", "Conflicting files:", *(f"- `{path}`" for path in files)]
        if more:
            lines.append("- ...")
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def with_merges(
    feedback: Callable[[str], Awaitable[str]], merges: MergeBuilds
) -> Callable[[str], Awaitable[str]]:
    """One handler for pull request events: the feedback's, then the merge builds'."""

    async def handle(body: str) -> str:
        outcome = await feedback(body)
        merged = await merges.event(body)
        return outcome if merged == "ignored" else merged

    return handle


class MergeBuilds:
    def __init__(
        self,
        accounts: AccountClients,
        records: Records,
        settings: Settings,
        metrics: Metrics,
        pipelines: Pipelines,
        work: Queue,
    ) -> None:
        self.accounts = accounts
        self.records = records
        self.ledger = Ledger(records)
        self.settings = settings
        self.metrics = metrics
        self.pipelines = pipelines
        self.work = work

    # -- when a side moves ---------------------------------------------------------------

    async def event(self, body: str) -> str:
        """A ``CodeCommit Pull Request State Change`` event: merge an opened pull request, or
        one whose source moved. Returns the outcome label.

        Raises:
            MalformedEvent: unusable fields.
            RejectedEvent: its account is not in BRANCHBUILD_ALLOWED_ACCOUNTS.
            TransientError: CodeCommit, S3 or SQS failed.
        """
        event = parse_pull_request(body)
        if event is None or event.detail.pullRequestStatus != "OPEN":
            return "ignored"
        repository = event.detail.repositoryNames[0]
        rule = self.pipelines.rule_for(repository)
        if not rule.merge_build:
            return "ignored"
        account, region = event.account, event.region
        check_account(account, self.settings)
        if region is None:
            raise MalformedEvent("region is missing or not a string")
        pull_request_id = event.detail.pullRequestId
        merge_branch(pull_request_id)  # refuses an id that is not one
        with naming(repositoryName=repository):
            try:
                client = await self.accounts.codecommit(account)
                with translated(f"read pull request {pull_request_id}"):
                    reply = await client.get_pull_request(pullRequestId=pull_request_id)
                pr = reply["pullRequest"]
                if pr.get("pullRequestStatus") != "OPEN":
                    return "ignored"
                for target in pr.get("pullRequestTargets", []):
                    sides = _sides(account, region, repository, pull_request_id, dict(target), rule)
                    if sides is not None:
                        sides = replace(sides, since=event.time)
                    if sides is not None:
                        await self._merge(client, sides, rule)
            except PermanentError as exc:
                self._failed(exc, repository)
        return "recorded"

    async def pushed(self, push: Push) -> None:
        """Intake hook for every push: merge the open pull requests into the pushed branch.

        Raises:
            TransientError: CodeCommit, S3 or SQS failed (the push's message is retried).
        """
        if push.ref_type is not RefType.BRANCH or push.commit is None:
            return
        if merged_pull_request(push) is not None:
            return
        rule = self.pipelines.rule_for(push.repository)
        if not rule.merge_build:
            return
        with naming(repositoryName=push.repository):
            try:
                client = await self.accounts.codecommit(push.account)
                for pull_request_id, _, target in await open_targets(client, push.repository):
                    if target.get("destinationReference") != push.ref:
                        continue
                    # The pushed commit, not the pull request's record of it: the event is
                    # the newest word on where the destination is.
                    target = target | {"destinationCommit": push.commit}
                    sides = _sides(
                        push.account, push.region, push.repository, pull_request_id, target, rule
                    )
                    if sides is not None:
                        await self._merge(client, replace(sides, since=push.time), rule)
            except PermanentError as exc:
                self._failed(exc, push.repository)

    def _failed(self, exc: PermanentError, repository: str) -> None:
        # A permission or a setting: never block the push's own build for it.
        self.metrics.merge_builds.labels(outcome="failed").inc()
        self.metrics.errors.labels(kind=exc.kind).inc()
        log.error("merge builds of %s failed: %s", repository, exc)

    # -- merging ---------------------------------------------------------------------------

    async def _merge(self, client: CodeCommitClient, sides: Sides, rule: Rule) -> None:
        key = merges_key(sides.repository, sides.pull_request_id)
        current = await self.records.read(key)
        if current is not None and _earlier(sides, current.data):
            log.info(
                "pull request %s: a late event's merge (of sides seen before %s) is not built",
                sides.pull_request_id,
                current.data.get("since"),
            )
            return
        if current is not None and _same(current.data, sides):
            # Merged before (a redelivered event, or the same move seen twice): queue the
            # same commit again (the work queue and the ledger drop a duplicate).
            known = current.data.get("commit")
            if isinstance(known, str):
                await self._queue(sides, known, rule)
            return
        commit: str | None = None
        with translated(f"merge pull request {sides.pull_request_id}"):
            try:
                reply = await client.create_unreferenced_merge_commit(
                    repositoryName=sides.repository,
                    sourceCommitSpecifier=sides.source_commit,
                    destinationCommitSpecifier=sides.destination_commit,
                    mergeOption=sides.strategy.value,
                    authorName=AUTHOR,
                    commitMessage=(
                        f"Merge pull request {sides.pull_request_id}: "
                        f"{_branch(sides.source_ref)} into {_branch(sides.destination_ref)}"
                    ),
                )
                commit = reply["commitId"]
            except ClientError as exc:
                if error_code(exc) != "ManualMergeRequiredException":
                    raise

        def record(now: Document | None) -> Document | None:
            if now is not None and (_same(now, sides) or _earlier(sides, now)):
                return None  # another instance merged these (or later) sides first
            return sides.wanted | {"commit": commit, "since": sides.since}

        await self.records.update(key, record)
        settled = await self.records.read(key)
        if settled is None or not _same(settled.data, sides):
            return  # a newer merge replaced it meanwhile
        commit = settled.data.get("commit")
        if isinstance(commit, str):
            await self._queue(sides, commit, rule)
            self.metrics.merge_builds.labels(outcome="queued").inc()
            log.info("pull request %s: merge %s queued", sides.pull_request_id, commit)
        else:
            await self._conflict(client, sides)
            self.metrics.merge_builds.labels(outcome="conflict").inc()
            log.info("pull request %s: merge conflict reported", sides.pull_request_id)

    async def _queue(self, sides: Sides, commit: str, rule: Rule) -> None:
        push = Push(
            event_id=f"merge:{sides.pull_request_id}:{commit}",
            account=sides.account,
            region=sides.region,
            repository=sides.repository,
            ref_type=RefType.BRANCH,
            name=merge_branch(sides.pull_request_id),
            action=Action.UPDATED,
            commit=commit,
            # The trigger's time: superseding orders a pull request's merge builds by it.
            time=sides.since or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        fresh: Document = {
            "repository": sides.repository,
            "account": sides.account,
            "pull_request": sides.pull_request_id,
            "commit": commit,
            "source_ref": sides.source_ref,
            "source_commit": sides.source_commit,
            "destination_ref": sides.destination_ref,
            "destination_commit": sides.destination_commit,
            "strategy": sides.strategy.value,
            "build_id": None,
            "comment": None,
        }
        archive = archive_key(rule.key_template, push)
        await self.records.update(
            archive + MERGE_SUFFIX, lambda now: fresh if now is None else None
        )
        await self.work.send([work_message(push)])

    async def _conflict(self, client: CodeCommitClient, sides: Sides) -> None:
        with translated(f"read the merge conflicts of pull request {sides.pull_request_id}"):
            reply = await client.get_merge_conflicts(
                repositoryName=sides.repository,
                destinationCommitSpecifier=sides.destination_commit,
                sourceCommitSpecifier=sides.source_commit,
                mergeOption=sides.strategy.value,
                maxConflictFiles=_MAX_CONFLICT_FILES,
            )
        files = [
            str(c["filePath"]) for c in reply.get("conflictMetadataList", []) if "filePath" in c
        ]
        content = render_conflict(sides, files, more=bool(reply.get("nextToken")))
        token = hashlib.sha256(
            f"conflict\0{sides.pull_request_id}\0{json.dumps(sides.wanted)}".encode()
        ).hexdigest()
        with translated(f"comment on pull request {sides.pull_request_id}"):
            try:
                await client.post_comment_for_pull_request(
                    pullRequestId=sides.pull_request_id,
                    repositoryName=sides.repository,
                    beforeCommitId=sides.destination_commit,
                    afterCommitId=sides.source_commit,
                    content=content,
                    clientRequestToken=token,
                )
            except ClientError as exc:  # posted before (with other files listed): it stands
                if error_code(exc) != "IdempotencyParameterMismatchException":
                    raise
        self.metrics.pull_request_updates.labels(action="comment_created").inc()

    # -- reporting the merge build ---------------------------------------------------------

    async def started(self, push: Push, build: StartedBuild, archive: str) -> None:
        """Job hook: the merge build started (or a redelivery found it): comment on its pull
        request.

        Raises:
            TransientError: CodeCommit or S3 failed (the job is retried, this runs again).
        """
        if merged_pull_request(push) is None:
            return

        def remember(now: Document | None) -> Document | None:
            if now is None or now.get("build_id") == build.build_id:
                return None
            return now | {"build_id": build.build_id, "comment": None}

        await self.records.update(archive + MERGE_SUFFIX, remember)
        await self.sync(archive)

    async def changed(self, change: Change) -> None:
        """Outcomes listener: a merge build's ledger entry changed."""
        if ".merge/" in change.archive:  # else no merge build's (see merge_branch)
            await self.sync(change.archive)

    async def sync(self, archive: str) -> None:
        """Make the merge build's comment show its current state.

        The job (started) and the build's events (its result) sync concurrently: a writer
        that read an older state may write last, so each writer reads the state again after
        its write, and writes again if it moved (the ledger only moves forward).

        Raises:
            TransientError: CodeCommit or S3 failed; nothing is lost by retrying.
        """
        for _ in range(3):
            if not await self._sync_once(archive):
                return

    async def _sync_once(self, archive: str) -> bool:
        """One write of the comment, if it does not show the current state: whether it wrote."""
        doc = await self.records.read(archive + MERGE_SUFFIX)
        entry = await self.ledger.read(archive)
        if doc is None or entry is None or entry.build_id != doc.data.get("build_id"):
            return False
        data = doc.data
        content = render(entry, data)
        digest = hashlib.sha256(content.encode()).hexdigest()
        known: dict[str, Any] = data.get("comment") or {}
        if known.get("digest") == digest:
            return False
        pull_request_id = str(data["pull_request"])
        with naming(repositoryName=str(data["repository"])):
            try:
                client = await self.accounts.codecommit(str(data["account"]))
                comment_id = known.get("id")
                if comment_id is None:
                    comment_id = await self._post(client, data, content)
                    action = "comment_created"
                else:
                    with translated(f"update comment {comment_id}"):
                        await client.update_comment(commentId=comment_id, content=content)
                    action = "comment_updated"
            except PermanentError as exc:
                self.metrics.pull_request_updates.labels(action="failed").inc()
                self._failed(exc, str(data["repository"]))
                return False
        self.metrics.pull_request_updates.labels(action=action).inc()
        log.info("pull request %s: merge build %s", pull_request_id, action.replace("_", " "))

        def record(now: Document | None) -> Document | None:
            if now is None or now.get("build_id") != data["build_id"]:
                return None
            return now | {"comment": {"id": comment_id, "digest": digest}}

        await self.records.update(archive + MERGE_SUFFIX, record)
        return True

    async def _post(self, client: CodeCommitClient, data: Document, content: str) -> str:
        pull_request_id = str(data["pull_request"])
        token = hashlib.sha256(
            f"merge\0{pull_request_id}\0{data['commit']}\0{data['build_id']}".encode()
        ).hexdigest()
        return await post_comment_once(
            client,
            pull_request_id=pull_request_id,
            repository=str(data["repository"]),
            before=str(data["destination_commit"]),
            after=str(data["source_commit"]),
            content=content,
            token=token,
        )


def _same(data: Document, sides: Sides) -> bool:
    return all(data.get(k) == v for k, v in sides.wanted.items())


def _earlier(sides: Sides, recorded: Document) -> bool:
    """Whether ``sides`` come from a change older than the one the record merged."""
    since = recorded.get("since")
    return bool(sides.since and isinstance(since, str) and sides.since < since)


def _sides(
    account: str,
    region: str,
    repository: str,
    pull_request_id: str,
    target: dict[str, Any],
    rule: Rule,
) -> Sides | None:
    """The pull request target to merge, if it is one of branches with both commits known."""
    source, destination = target.get("sourceReference"), target.get("destinationReference")
    source_commit, destination_commit = target.get("sourceCommit"), target.get("destinationCommit")
    if target.get("repositoryName") != repository:
        return None
    for value in (source, destination):
        if not isinstance(value, str) or not value.startswith("refs/heads/"):
            return None
    for value in (source_commit, destination_commit):
        if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{40}", value):
            return None
    return Sides(
        account=account,
        region=region,
        repository=repository,
        pull_request_id=pull_request_id,
        source_ref=str(source),
        source_commit=str(source_commit),
        destination_ref=str(destination),
        destination_commit=str(destination_commit),
        strategy=rule.merge_strategy,
    )
