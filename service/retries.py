"""CodeBuild's auto-retry, as the ledger follows it (a rule's ``retries``).

A rule's ``retries: N`` is StartBuild's ``autoRetryLimitOverride``: CodeBuild itself retries a
failed build up to N times, each retry **a new build id** that carries the same environment
variables (so the same ``BRANCHBUILD_ARCHIVE``). The ledger entry keeps naming the build
branchbuild started (``build_id``: supersede, pull request feedback and the running slots key
on it) and follows the attempt under way (``attempt``, ``attempt_build_id``):

* a failing end (``FAILED``, ``FAULT``, ``TIMED_OUT``) of an attempt with retries left is not
  final: the entry becomes ``RETRYING``, nothing is counted, approved or revoked;
* an event of a build the entry does not name is looked up (``BatchGetBuilds``, its
  ``autoRetryConfig``): an auto-retry whose ``previousAutoRetry`` chain leads back to the
  entry's build moves the entry to that attempt (counted in ``branchbuild_build_retries_total``);
* events of an attempt the entry has moved past are stale; the last attempt's end decides.

CodeBuild's own ``autoRetryLimit`` (StartBuild's reply) is what the ledger records, so a limit
set on the project (no ``retries`` in the rule) is followed too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace

from .builds import RetryLink
from .ledger import Entry

RETRYING = "RETRYING"
# CodeBuild retries "a failed build"; a STOPPED build was stopped on purpose.
RETRIED = frozenset({"FAILED", "FAULT", "TIMED_OUT"})
# autoRetryLimit is at most 10: a longer chain is not CodeBuild's.
MAX_CHAIN = 11

Lookup = Callable[[str], Awaitable[RetryLink | None]]


def will_retry(entry: Entry, status: str) -> bool:
    """Whether CodeBuild retries the entry's current attempt ending with ``status``."""
    return status in RETRIED and entry.attempt_number < entry.retry_limit


async def find_attempt(lookup: Lookup, entry: Entry, build_id: str) -> RetryLink | None:
    """``build_id``'s link if it is an auto-retry of the entry's build (its
    ``previousAutoRetry`` chain leads back to ``entry.build_id``), else None.

    Raises:
        BuildError: BatchGetBuilds failed (transient).
    """
    first: RetryLink | None = None
    current = build_id
    for _ in range(MAX_CHAIN):
        link = await lookup(current)
        if link is None or link.previous is None or link.number < 1:
            return None
        first = first or link
        if link.previous == entry.build_id:
            return first
        current = link.previous
    return None


def move(entry: Entry, link: RetryLink) -> Entry | None:
    """The entry following attempt ``link`` (None: it follows that attempt or a later one
    already, or its build ended for good, e.g. stopped as superseded)."""
    from .build_state import FINAL  # service.build_state imports this module

    if entry.status in FINAL or link.number <= entry.attempt_number:
        return None
    return replace(
        entry,
        attempt=str(link.number),
        attempt_build_id=link.build_id,
        status=None,
        ended_at=None,
        logs=None,
    )


def attempt_text(entry: Entry) -> str | None:
    """``retry 2 of 3`` for an entry past its first attempt, else None."""
    if entry.attempt_number < 1:
        return None
    return f"retry {entry.attempt_number} of {max(entry.retry_limit, entry.attempt_number)}"
