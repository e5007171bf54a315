"""The rules that need the pushed commit itself: skip markers and path filters.

Run by the job once the commit is in the cache, before anything is archived or started, so a
skipped or filtered push is acknowledged with nothing half-done.

* **Skip markers**: a marker (``[skip ci]``, ...; case-insensitive) anywhere in the pushed
  commit's message skips the build.
* **Path filters**: the push builds only if a path changed between ``oldCommitId`` and
  ``commitId`` matches an ``include`` glob (all paths when there is none) and no ``exclude``
  glob. The changes are a diff of the two commits' trees (``git diff-tree``), which needs only
  those two commits, so it works on a shallow cache. Whenever the push cannot be compared it
  builds: a new branch (no old commit: always built, by design, rather than guessing a merge
  base on a shallow cache), or an old commit the server no longer has (a rewritten history
  whose old commit is gone). A force push whose old commit still exists is judged by the
  two trees: the cache is shallow and has no history to tell rewritten from fast-forward.
"""

from __future__ import annotations

import logging
from fnmatch import fnmatchcase

from .decide import Skip
from .errors import CommitNotFound, GitError
from .events import Push
from .git import Fetched, Git
from .outcome import Outcome
from .pipelines import Rule

log = logging.getLogger("branchbuild.changes")

_NO_COMMIT = "0" * 40


async def screen(push: Push, rule: Rule, git: Git, fetched: Fetched) -> Skip | None:
    """Why the fetched push is not built (a skip marker, or no path of the rule changed),
    or None to build it.

    Raises:
        GitError: git could not run on the cache (transient).
    """
    if rule.skip_markers:
        message = await commit_message(git, fetched)
        lowered = message.lower()
        for marker in rule.skip_markers:
            if marker.lower() in lowered:
                return Skip(Outcome.SKIPPED, f"the commit message contains {marker!r}")
    if rule.filters_paths:
        paths = await changed_paths(push, git)
        if paths is None:
            return None
        relevant = [path for path in paths if matches_paths(path, rule)]
        if not relevant:
            return Skip(
                Outcome.FILTERED,
                f"none of the {len(paths)} changed path(s) match the paths of {rule.name}",
            )
        log.info("%s of %s changed path(s) match %s", len(relevant), len(paths), rule.name)
    return None


def matches_paths(path: str, rule: Rule) -> bool:
    """Whether a changed path counts for ``rule``: globs as fnmatch (``*`` crosses ``/``)."""
    included = not rule.include_paths or any(fnmatchcase(path, p) for p in rule.include_paths)
    return included and not any(fnmatchcase(path, p) for p in rule.exclude_paths)


async def commit_message(git: Git, fetched: Fetched) -> str:
    """The full message of the fetched commit.

    Raises:
        GitError: git could not read it (transient: the commit was just fetched, so the job
            is retried rather than built with its skip markers unchecked).
    """
    status, body = await git.query(fetched.git_dir, "cat-file", "commit", fetched.commit)
    if status != 0:
        raise GitError(f"git cat-file could not read commit {fetched.commit} (status {status})")
    _, _, message = body.partition(b"\n\n")
    return message.decode("utf-8", errors="replace")


async def changed_paths(push: Push, git: Git) -> list[str] | None:
    """The paths changed from the push's old commit to its new one; None when they cannot
    be known (then the push builds): a new branch, or an old commit the server no longer has.

    Raises:
        GitError: git failed in a way that may pass (the job is retried, never built blind).
    """
    old = push.old_commit
    if old is None or old == _NO_COMMIT:
        log.info("a new branch: built without a path comparison")
        return None
    try:
        return await git.changed_paths(push, old)
    except CommitNotFound as exc:
        log.warning("replaced commit %s: %s; built without a path comparison", old, exc)
        if git.metrics is not None:
            git.metrics.fallbacks.labels(decision="paths_unknown_built").inc()
        return None
