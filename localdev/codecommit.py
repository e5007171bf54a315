"""A local stand-in for CodeCommit's pull request API, next to the local git host.

No emulator implements CodeCommit pull requests (moto has no comments or approvals), so this
HTTP server speaks CodeCommit's JSON protocol (``X-Amz-Target: CodeCommit_20150413.<Op>``)
for the few calls branchbuild and its tests use. Every request is validated against
botocore's own service model before it is served: unknown operations and parameters, missing
required members, wrong types, out-of-range lengths and values outside an enum are refused
with ``InvalidParameterException``-style errors, as AWS would, so a call the real service
would reject fails here too.

The caller is the access key id of the request's signature (``arn:aws:iam::<account>:user/<key
id>``): a pull request's author cannot approve it, and only a comment's author may edit it.
A push to a pull request's source branch (:meth:`CodeCommitStandIn.pushed`, fed by the git
host) moves its source commit, gives it a new revision and clears its approvals. Pull request
events (``CodeCommit Pull Request State Change``) are handed to ``on_event``.

Given the git host's repositories (``repositories``), it also merges as CodeCommit does for
merge builds: ``CreateUnreferencedMergeCommit`` writes the merge with real git in the host's
bare repository (``git merge-tree --write-tree``, then ``git commit-tree``), on no branch; the
host serves it by id (protocol v2 lets a client want any object the repository has).
``GetMergeConflicts`` reports the same merge's conflicting files.

``branchbuild``'s service reaches it through ``AWS_ENDPOINT_URL_CODECOMMIT``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aioboto3
import anyio
from aiohttp import web
from botocore.exceptions import BotoCoreError, ClientError

from .awsjson import JsonStandIn, StandInError
from .githost import GitHost, RefChange

__all__ = [
    "CodeCommitStandIn",
    "PullRequestView",
    "StandInError",
    "create_pull_request",
    "describe",
    "view_pull_request",
]

TARGET_PREFIX = "CodeCommit_20150413."
_CREDENTIAL = re.compile(r"Credential=([A-Za-z0-9]+)/")

Handler = Callable[[dict[str, Any], str], Awaitable[dict[str, Any]]]
Resolve = Callable[[str, str], Awaitable[str | None]]
Repositories = Callable[[str], Path]  # a repository's bare git directory
OnEvent = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class _PullRequest:
    id: str
    title: str
    repository: str
    source_ref: str
    destination_ref: str
    source_commit: str
    destination_commit: str
    author: str
    revision: str
    status: str = "OPEN"
    created: float = field(default_factory=time.time)
    approvals: dict[str, str] = field(default_factory=dict)  # caller ARN → APPROVE

    def to_api(self) -> dict[str, Any]:
        return {
            "pullRequestId": self.id,
            "title": self.title,
            "pullRequestStatus": self.status,
            "revisionId": self.revision,
            "authorArn": self.author,
            "creationDate": self.created,
            "lastActivityDate": self.created,
            "pullRequestTargets": [
                {
                    "repositoryName": self.repository,
                    "sourceReference": self.source_ref,
                    "destinationReference": self.destination_ref,
                    "sourceCommit": self.source_commit,
                    "destinationCommit": self.destination_commit,
                    "mergeMetadata": {"isMerged": False},
                }
            ],
            "approvalRules": [],
        }


@dataclass
class _Comment:
    id: str
    pull_request: str
    repository: str
    before: str
    after: str
    content: str
    author: str
    token: str | None
    fingerprint: str  # of the creating request: a retry must repeat it exactly
    created: float = field(default_factory=time.time)
    modified: float = field(default_factory=time.time)

    def to_api(self) -> dict[str, Any]:
        return {
            "commentId": self.id,
            "content": self.content,
            "authorArn": self.author,
            "creationDate": self.created,
            "lastModifiedDate": self.modified,
            "deleted": False,
            **({"clientRequestToken": self.token} if self.token else {}),
        }


class CodeCommitStandIn(JsonStandIn):
    """The server; ``async with`` it, then point ``AWS_ENDPOINT_URL_CODECOMMIT`` at
    :attr:`endpoint`."""

    target_prefix = TARGET_PREFIX
    service = "codecommit"

    def __init__(
        self,
        *,
        resolve: Resolve,
        on_event: OnEvent | None = None,
        repositories: Repositories | None = None,
        account: str = "123456789012",
        region: str = "eu-west-1",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.resolve = resolve
        self.on_event = on_event
        self.repositories = repositories
        self.account = account
        self.region = region
        self.pull_requests: dict[str, _PullRequest] = {}
        self.comments: dict[str, _Comment] = {}
        self.requests: list[tuple[str, dict[str, Any]]] = []  # every valid request, in order
        # Awaited before a valid request of that operation is served (tests use it to move a
        # pull request between two calls of the service).
        self.before: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = {}
        self._ids = itertools.count(1)
        self._handlers: dict[str, Handler] = {
            "CreatePullRequest": self._create_pull_request,
            "ListPullRequests": self._list_pull_requests,
            "GetPullRequest": self._get_pull_request,
            "PostCommentForPullRequest": self._post_comment,
            "UpdateComment": self._update_comment,
            "GetCommentsForPullRequest": self._get_comments,
            "UpdatePullRequestApprovalState": self._update_approval,
            "GetPullRequestApprovalStates": self._get_approvals,
            "CreateUnreferencedMergeCommit": self._create_merge_commit,
            "GetMergeConflicts": self._get_merge_conflicts,
        }

    def calls(self, operation: str) -> list[dict[str, Any]]:
        return [params for name, params in self.requests if name == operation]

    def approvals(self, pull_request_id: str) -> dict[str, str]:
        return dict(self.pull_requests[pull_request_id].approvals)

    def comments_on(self, pull_request_id: str) -> list[_Comment]:
        return [c for c in self.comments.values() if c.pull_request == pull_request_id]

    async def pushed(self, change: RefChange) -> None:
        """A push moved a branch: open pull requests from it get the new commit (a new
        revision, approvals cleared); those into it get a new destination commit (a new
        revision too, so an approval of the old one is refused as not current)."""
        if change.new is None:
            return
        for pr in self.pull_requests.values():
            if pr.status != "OPEN" or pr.repository != change.repository:
                continue
            if pr.source_ref == change.ref and change.new != pr.source_commit:
                pr.source_commit = change.new
                pr.revision = uuid.uuid4().hex + uuid.uuid4().hex
                pr.approvals.clear()
                await self._emit(pr, "pullRequestSourceBranchUpdated")
            elif pr.destination_ref == change.ref and change.new != pr.destination_commit:
                pr.destination_commit = change.new
                pr.revision = uuid.uuid4().hex + uuid.uuid4().hex

    # -- the protocol ---------------------------------------------------------------------

    async def call(
        self, operation: str, params: dict[str, Any], request: web.Request
    ) -> dict[str, Any]:
        handler = self._handlers.get(operation)
        if handler is None:
            raise StandInError("UnknownOperationException", f"{operation} is not served here")
        self.requests.append((operation, params))
        if operation in self.before:
            await self.before.pop(operation)(params)
        return await handler(params, self._caller(request.headers.get("Authorization", "")))

    def _caller(self, authorization: str) -> str:
        match = _CREDENTIAL.search(authorization)
        return f"arn:aws:iam::{self.account}:user/{match[1] if match else 'anonymous'}"

    def _pull_request(self, pull_request_id: str) -> _PullRequest:
        pr = self.pull_requests.get(pull_request_id)
        if pr is None:
            raise StandInError(
                "PullRequestDoesNotExistException", f"pull request {pull_request_id} not found"
            )
        return pr

    async def _emit(self, pr: _PullRequest, event: str) -> None:
        if self.on_event is None:
            return
        arn = f"arn:aws:codecommit:{self.region}:{self.account}:{pr.repository}"
        await self.on_event(
            {
                "version": "0",
                "id": str(uuid.uuid4()),
                "detail-type": "CodeCommit Pull Request State Change",
                "source": "aws.codecommit",
                "account": self.account,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "region": self.region,
                "resources": [arn],
                "detail": {
                    "author": pr.author,
                    "callerUserArn": pr.author,
                    "event": event,
                    "isMerged": "False",
                    "pullRequestId": pr.id,
                    "pullRequestStatus": pr.status,
                    "repositoryNames": [pr.repository],
                    "revisionId": pr.revision,
                    "sourceReference": pr.source_ref,
                    "sourceCommit": pr.source_commit,
                    "destinationReference": pr.destination_ref,
                    "destinationCommit": pr.destination_commit,
                    "title": pr.title,
                },
            }
        )

    # -- operations -----------------------------------------------------------------------

    async def _create_pull_request(self, params: dict[str, Any], caller: str) -> dict[str, Any]:
        [target] = params["targets"]  # CodeCommit allows exactly one target
        repository = target["repositoryName"]
        source = _full_ref(target["sourceReference"])
        destination = _full_ref(target.get("destinationReference", "main"))
        source_commit = await self.resolve(repository, source)
        destination_commit = await self.resolve(repository, destination)
        if source_commit is None or destination_commit is None:
            raise StandInError("ReferenceDoesNotExistException", "a reference does not exist")
        if source_commit == destination_commit:
            raise StandInError("SourceAndDestinationAreSameException", "nothing to merge")
        pr = _PullRequest(
            id=str(next(self._ids)),
            title=params["title"],
            repository=repository,
            source_ref=source,
            destination_ref=destination,
            source_commit=source_commit,
            destination_commit=destination_commit,
            author=caller,
            revision=uuid.uuid4().hex + uuid.uuid4().hex,
        )
        self.pull_requests[pr.id] = pr
        await self._emit(pr, "pullRequestCreated")
        return {"pullRequest": pr.to_api()}

    async def _list_pull_requests(self, params: dict[str, Any], caller: str) -> dict[str, Any]:
        status = params.get("pullRequestStatus")
        ids = [
            pr.id
            for pr in self.pull_requests.values()
            if pr.repository == params["repositoryName"] and status in (None, pr.status)
        ]
        # Pages of at most maxResults (100 by default), as CodeCommit pages them.
        start = int(params.get("nextToken", "0") or 0)
        size = int(params.get("maxResults", 100))
        reply: dict[str, Any] = {"pullRequestIds": ids[start : start + size]}
        if start + size < len(ids):
            reply["nextToken"] = str(start + size)
        return reply

    async def _get_pull_request(self, params: dict[str, Any], caller: str) -> dict[str, Any]:
        return {"pullRequest": self._pull_request(params["pullRequestId"]).to_api()}

    async def _post_comment(self, params: dict[str, Any], caller: str) -> dict[str, Any]:
        pr = self._pull_request(params["pullRequestId"])
        if params["repositoryName"] != pr.repository:
            raise StandInError("RepositoryNotAssociatedWithPullRequestException", pr.repository)
        token = params.get("clientRequestToken")
        fingerprint = hashlib.sha256(
            json.dumps(
                {k: v for k, v in params.items() if k != "clientRequestToken"}, sort_keys=True
            ).encode()
        ).hexdigest()
        if token:
            for comment in self.comments.values():
                if comment.token == token and comment.author == caller:
                    if comment.fingerprint != fingerprint:
                        raise StandInError(
                            "IdempotencyParameterMismatchException",
                            "the token was used with different parameters",
                        )
                    return self._comment_reply(comment)
        comment = _Comment(
            id=uuid.uuid4().hex,
            pull_request=pr.id,
            repository=pr.repository,
            before=params["beforeCommitId"],
            after=params["afterCommitId"],
            content=params["content"],
            author=caller,
            token=token,
            fingerprint=fingerprint,
        )
        self.comments[comment.id] = comment
        return self._comment_reply(comment)

    def _comment_reply(self, comment: _Comment) -> dict[str, Any]:
        return {
            "repositoryName": comment.repository,
            "pullRequestId": comment.pull_request,
            "beforeCommitId": comment.before,
            "afterCommitId": comment.after,
            "comment": comment.to_api(),
        }

    async def _update_comment(self, params: dict[str, Any], caller: str) -> dict[str, Any]:
        comment = self.comments.get(params["commentId"])
        if comment is None:
            raise StandInError("CommentDoesNotExistException", "no such comment")
        if comment.author != caller:
            raise StandInError("CommentNotCreatedByCallerException", "not your comment")
        comment.content = params["content"]
        comment.modified = time.time()
        return {"comment": comment.to_api()}

    async def _get_comments(self, params: dict[str, Any], caller: str) -> dict[str, Any]:
        pr = self._pull_request(params["pullRequestId"])
        listed = [
            comment
            for comment in self.comments_on(pr.id)
            if params.get("afterCommitId") in (None, comment.after)
            and params.get("beforeCommitId") in (None, comment.before)
        ]
        # Pages of at most maxResults comments (100 by default), as CodeCommit pages them.
        start = int(params.get("nextToken", "0") or 0)
        size = int(params.get("maxResults", 100))
        groups: dict[tuple[str, str], list[_Comment]] = {}
        for comment in listed[start : start + size]:
            groups.setdefault((comment.before, comment.after), []).append(comment)
        token = {"nextToken": str(start + size)} if start + size < len(listed) else {}
        return token | {
            "commentsForPullRequestData": [
                {
                    "pullRequestId": pr.id,
                    "repositoryName": pr.repository,
                    "beforeCommitId": before,
                    "afterCommitId": after,
                    "comments": [c.to_api() for c in comments],
                }
                for (before, after), comments in groups.items()
            ]
        }

    async def _update_approval(self, params: dict[str, Any], caller: str) -> dict[str, Any]:
        pr = self._pull_request(params["pullRequestId"])
        if params["revisionId"] != pr.revision:
            raise StandInError("RevisionNotCurrentException", "the revision is not current")
        if pr.status != "OPEN":
            raise StandInError("PullRequestAlreadyClosedException", "closed")
        if caller == pr.author:
            raise StandInError(
                "PullRequestCannotBeApprovedByAuthorException", "authors cannot approve"
            )
        if params["approvalState"] == "APPROVE":
            pr.approvals[caller] = "APPROVE"
        else:
            pr.approvals.pop(caller, None)
        return {}

    async def _get_approvals(self, params: dict[str, Any], caller: str) -> dict[str, Any]:
        pr = self._pull_request(params["pullRequestId"])
        if params["revisionId"] != pr.revision:
            return {"approvals": []}
        return {
            "approvals": [
                {"userArn": user, "approvalState": state} for user, state in pr.approvals.items()
            ]
        }

    # -- merges (real git in the host's repository) ------------------------------------------

    async def _create_merge_commit(self, params: dict[str, Any], caller: str) -> dict[str, Any]:
        merge = await self._merge(params)
        if merge.conflicts or not merge.mergeable:
            raise StandInError(
                "ManualMergeRequiredException",
                "the merge has conflicts that must be resolved"
                if merge.conflicts
                else "the destination cannot be fast-forwarded to the source",
            )
        option = params["mergeOption"]
        if option == "FAST_FORWARD_MERGE":  # the destination would simply move to the source
            return {"commitId": merge.source, "treeId": merge.tree}
        parents = ["-p", merge.destination]
        if option == "THREE_WAY_MERGE":
            parents += ["-p", merge.source]
        name = params.get("authorName") or caller.rsplit("/", 1)[-1]
        email = params.get("email") or f"{name}@localhost"
        env = {
            "PATH": os.environ.get("PATH", ""),
            "GIT_AUTHOR_NAME": name,
            "GIT_AUTHOR_EMAIL": email,
            "GIT_COMMITTER_NAME": name,
            "GIT_COMMITTER_EMAIL": email,
        }
        message = params.get("commitMessage") or "Merge"
        commit = await _git(
            merge.git_dir, "commit-tree", merge.tree, *parents, "-m", message, env=env
        )
        return {"commitId": commit.decode().strip(), "treeId": merge.tree}

    async def _get_merge_conflicts(self, params: dict[str, Any], caller: str) -> dict[str, Any]:
        merge = await self._merge(params)
        start = int(params.get("nextToken", "0") or 0)
        size = int(params.get("maxConflictFiles", 100))
        page = merge.conflicts[start : start + size]
        reply: dict[str, Any] = {
            "mergeable": merge.mergeable and not merge.conflicts,
            "destinationCommitId": merge.destination,
            "sourceCommitId": merge.source,
            "conflictMetadataList": [
                {
                    "filePath": path,
                    "numberOfConflicts": 1,
                    "contentConflict": True,
                    "fileModeConflict": False,
                    "objectTypeConflict": False,
                }
                for path in page
            ],
        }
        if merge.base:
            reply["baseCommitId"] = merge.base
        if start + size < len(merge.conflicts):
            reply["nextToken"] = str(start + size)
        return reply

    async def _merge(self, params: dict[str, Any]) -> _Merge:
        """Merge the source specifier into the destination's (in git's object store only)."""
        if self.repositories is None:
            raise StandInError("UnknownOperationException", "no repositories to merge in")
        try:
            git_dir = self.repositories(params["repositoryName"])
        except ValueError:
            git_dir = Path("/nonexistent")
        if not (git_dir / "HEAD").is_file():
            raise StandInError(
                "RepositoryDoesNotExistException", f"{params['repositoryName']} does not exist"
            )
        source = await _commit(git_dir, params["sourceCommitSpecifier"])
        destination = await _commit(git_dir, params["destinationCommitSpecifier"])
        base = await _git(git_dir, "merge-base", destination, source, check=False)
        if params["mergeOption"] == "FAST_FORWARD_MERGE":
            ancestor = await anyio.run_process(
                [
                    "git",
                    "--git-dir",
                    str(git_dir),
                    "merge-base",
                    "--is-ancestor",
                    destination,
                    source,
                ],
                check=False,
            )
            tree = (await _git(git_dir, "rev-parse", source + "^{tree}")).decode().strip()
            return _Merge(
                git_dir,
                source,
                destination,
                base.decode().strip(),
                tree,
                (),
                mergeable=ancestor.returncode == 0,
            )
        result = await anyio.run_process(
            [
                "git",
                "--git-dir",
                str(git_dir),
                "merge-tree",
                "--write-tree",
                "-z",
                "--name-only",
                "--no-messages",
                destination,
                source,
            ],
            check=False,
        )
        if result.returncode not in (0, 1):
            raise StandInError("InvalidCommitException", result.stderr.decode(errors="replace"))
        fields = [f.decode() for f in result.stdout.split(b"\0") if f]
        conflicts = tuple(dict.fromkeys(fields[1:])) if result.returncode == 1 else ()
        return _Merge(
            git_dir,
            source,
            destination,
            base.decode().strip(),
            fields[0],
            conflicts,
            mergeable=True,
        )


@dataclass(frozen=True)
class _Merge:
    git_dir: Path
    source: str
    destination: str
    base: str
    tree: str
    conflicts: tuple[str, ...]
    mergeable: bool


async def _git(
    git_dir: Path, *args: str, env: dict[str, str] | None = None, check: bool = True
) -> bytes:
    result = await anyio.run_process(
        ["git", "--git-dir", str(git_dir), *args], env=env, check=False
    )
    if check and result.returncode != 0:
        raise StandInError("InvalidCommitException", result.stderr.decode(errors="replace"))
    return result.stdout if result.returncode == 0 else b""


async def _commit(git_dir: Path, specifier: str) -> str:
    """A commit specifier (commit id, branch or tag name) as CodeCommit resolves it."""
    for candidate in (specifier, "refs/heads/" + specifier, "refs/tags/" + specifier):
        result = await anyio.run_process(
            [
                "git",
                "--git-dir",
                str(git_dir),
                "rev-parse",
                "--verify",
                "--quiet",
                "--end-of-options",
                candidate + "^{commit}",
            ],
            check=False,
        )
        if result.returncode == 0:
            return result.stdout.decode().strip()
    raise StandInError("CommitDoesNotExistException", f"{specifier} does not exist")


def _full_ref(reference: str) -> str:
    return reference if reference.startswith("refs/") else "refs/heads/" + reference


def git_resolver(host: GitHost) -> Resolve:
    """Resolve references in the local git host's bare repositories (for CreatePullRequest)."""

    async def resolve(repository: str, ref: str) -> str | None:
        path = host.repository_path(repository)
        if not path.is_dir():
            return None
        result = await anyio.run_process(
            ["git", "--git-dir", str(path), "rev-parse", "--verify", "--quiet", ref + "^{commit}"],
            check=False,
        )
        return result.stdout.decode().strip() or None if result.returncode == 0 else None

    return resolve


# -- the developer's side (``make run``'s banner, ``make demo``) ------------------------------

DEVELOPER_KEY = "developer"  # not the service's key: an author cannot approve their own PR


@dataclass(frozen=True)
class PullRequestView:
    """A pull request as a developer sees it: its comments and the approvals of its revision."""

    id: str
    title: str
    source: str
    destination: str
    source_commit: str
    comments: tuple[tuple[str, str, str], ...]  # (after commit, author ARN, content)
    approvals: tuple[tuple[str, str], ...]  # (user ARN, state) of the current revision


def _client(endpoint: str, region: str) -> Any:
    session = aioboto3.Session(
        aws_access_key_id=DEVELOPER_KEY, aws_secret_access_key="local", region_name=region
    )
    return session.client("codecommit", endpoint_url=endpoint)


async def create_pull_request(
    endpoint: str, region: str, *, repository: str, source: str, destination: str, title: str
) -> str:
    """Open a pull request as the developer; returns its id.

    Raises:
        botocore.exceptions.ClientError: as CodeCommit would (e.g. an unknown branch).
    """
    async with _client(endpoint, region) as client:
        reply = await client.create_pull_request(
            title=title,
            targets=[
                {
                    "repositoryName": repository,
                    "sourceReference": source,
                    "destinationReference": destination,
                }
            ],
        )
    return str(reply["pullRequest"]["pullRequestId"])


async def view_pull_request(endpoint: str, region: str, pull_request_id: str) -> PullRequestView:
    """Read a pull request, its comments and approvals through the API, as a developer."""
    async with _client(endpoint, region) as client:
        pr = (await client.get_pull_request(pullRequestId=pull_request_id))["pullRequest"]
        [target] = pr["pullRequestTargets"]
        groups = await client.get_comments_for_pull_request(
            pullRequestId=pull_request_id, repositoryName=target["repositoryName"]
        )
        approvals = await client.get_pull_request_approval_states(
            pullRequestId=pull_request_id, revisionId=pr["revisionId"]
        )
    comments = tuple(
        (group["afterCommitId"], comment["authorArn"], comment["content"])
        for group in groups["commentsForPullRequestData"]
        for comment in group["comments"]
    )
    return PullRequestView(
        id=pull_request_id,
        title=pr["title"],
        source=target["sourceReference"].removeprefix("refs/heads/"),
        destination=target["destinationReference"].removeprefix("refs/heads/"),
        source_commit=target["sourceCommit"],
        comments=comments,
        approvals=tuple((a["userArn"], a["approvalState"]) for a in approvals["approvals"]),
    )


def describe(view: PullRequestView) -> str:
    """The pull request as text: its comments in full, then its approvals."""
    lines = [
        f"pull request {view.id} ({view.source} -> {view.destination}): {view.title}",
        f"  source commit {view.source_commit}",
    ]
    for commit, author, content in view.comments:
        lines.append(f"  comment on {commit[:12]} by {author}:")
        lines += [f"    {line}".rstrip() for line in content.splitlines()]
    if not view.comments:
        lines.append("  no comment")
    for user, state in view.approvals:
        lines.append(f"  approval of the current revision: {state} by {user}")
    if not view.approvals:
        lines.append("  no approval of the current revision")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m localdev.codecommit``: open or show a pull request on the stand-in."""
    parser = argparse.ArgumentParser(
        prog="python -m localdev.codecommit",
        description="Pull requests on make run's CodeCommit stand-in.",
    )
    parser.add_argument("--endpoint", required=True, help="the stand-in (make run prints it)")
    parser.add_argument("--region", default=os.environ.get("AWS_REGION", "eu-west-1"))
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create-pr", help="open a pull request")
    create.add_argument("--repository", default="demo")
    create.add_argument("--source", required=True, help="the source branch")
    create.add_argument("--destination", default="main", help="the destination branch")
    create.add_argument("--title", default="a change")
    show = commands.add_parser("show", help="a pull request's comments and approvals")
    show.add_argument("pull_request_id")
    args = parser.parse_args(argv)

    async def act() -> str:
        if args.command == "create-pr":
            number = await create_pull_request(
                args.endpoint,
                args.region,
                repository=args.repository,
                source=args.source,
                destination=args.destination,
                title=args.title,
            )
            return f"pull request {number} opened\n"
        return describe(await view_pull_request(args.endpoint, args.region, args.pull_request_id))

    try:
        sys.stdout.write(anyio.run(act))
    except (ClientError, BotoCoreError) as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
