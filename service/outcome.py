"""How a message ends: the ``outcome`` label of ``branchbuild_events_total`` and
``branchbuild_jobs_total``, in one place for the deciding, consuming and settling code."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """How a received event or job ended."""

    BUILT = "built"
    PROTECTED = "protected"
    EXCLUDED = "excluded"
    SUPERSEDED = "superseded"
    DELETED = "deleted"
    IGNORED = "ignored"
    DUPLICATE = "duplicate"
    QUEUED = "queued"
    RETRIED = "retried"
    FAILED = "failed"
    RELEASED = "released"
    DEAD_LETTERED = "dead_lettered"
    WAITING = "waiting"  # CodeBuild full or a running limit reached: held by service.scheduler
    SKIPPED = "skipped"  # a skip marker in the pushed commit's message (pipeline rules)
    FILTERED = "filtered"  # no changed path matches the rule's path filters
