"""The exception tree: every failure is either transient (retry later) or permanent (never will)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class BranchbuildError(Exception):
    """Root of every error branchbuild raises on purpose."""

    #: A short, bounded label for metrics (``errors_total{kind=...}``).
    kind = "error"


class ConfigurationError(BranchbuildError):
    """Raised at start-up when a setting is missing or invalid; the message names the variable."""

    kind = "configuration"


class TransientError(BranchbuildError):
    """Raised when a retry may succeed: throttling, 5xx, network, an SSH drop, a timeout."""

    kind = "transient"


class PermanentError(BranchbuildError):
    """Raised when a retry can never succeed: the message goes to the dead-letter queue."""

    kind = "permanent"


class MalformedEvent(PermanentError):
    """Raised when a message body is not a well-formed CodeCommit push event."""

    kind = "malformed_event"


class RejectedEvent(PermanentError):
    """Raised when a well-formed event comes from an account, region or repository not allowed."""

    kind = "rejected_event"


class GitError(TransientError):
    """Raised when git fails in a way that may pass (network, SSH drop, server busy)."""

    kind = "git"


class DiskFull(TransientError):
    """Raised when the disk is full; idle repositories are evicted from the cache first."""

    kind = "disk_full"


class HostKeyMismatch(PermanentError):
    """Raised when the git host's SSH key does not match the pinned known_hosts entry."""

    kind = "host_key"


class GitAccessDenied(PermanentError):
    """Raised when the git host refuses our key or the repository does not exist for us."""

    kind = "git_access"


class CommitNotFound(PermanentError):
    """Raised when the pushed commit is no longer on the server (a force-push removed it)."""

    kind = "commit_not_found"


class ArchiveTooLarge(PermanentError):
    """Raised when a file or the whole archive exceeds the configured size limits."""

    kind = "archive_too_large"


class SubmoduleError(PermanentError):
    """Raised when a submodule cannot be included: no URL in .gitmodules, a URL on a host not
    allowed, refused or gone at the server, or nested deeper than allowed."""

    kind = "submodule"


class StorageError(TransientError):
    """Raised when S3 fails in a way that may pass (throttling, 5xx, network)."""

    kind = "storage"


class BuildError(TransientError):
    """Raised when starting a build fails in a way that may pass (throttling, account limit)."""

    kind = "build"


class CapacityRefused(BuildError):
    """Raised when CodeBuild refuses a build for lack of capacity (queue full, a project's
    concurrent build limit, throttling): the push waits (service.scheduler), never a failure."""

    kind = "capacity"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        #: account_queue_full, project_limit or throttled (the metrics' ``reason`` label)
        self.reason = reason


class AccessDenied(PermanentError):
    """Raised when AWS refuses an action for lack of permission or a missing resource."""

    kind = "access_denied"


class NotificationRefused(PermanentError):
    """Raised when SNS refuses a notification for good (no permission, no such topic, its key)."""

    kind = "notification_refused"


class NotificationBusy(TransientError):
    """Another holder (a build state event, another instance) is publishing this
    notification now: it publishes it, or releases it and is retried."""

    kind = "notification_busy"


class LeaseLost(TransientError):
    """Raised when a message's visibility could not be extended: another consumer may own it."""

    kind = "lease_lost"


class Unexpected(TransientError):
    """Raised in place of what no code path expected while handling one message (a bug, or a
    library failure not mapped here): retried, then dead-lettered with it as the reason."""

    kind = "unexpected"


def unexpected(exc: Exception) -> Unexpected:
    """``exc`` as the error a consumer settles its message with (it never ends a consumer)."""
    return Unexpected(f"unexpected {type(exc).__name__}: {exc}")


@contextmanager
def unwrap_group() -> Iterator[None]:
    """Re-raise the first real error of a task group's ExceptionGroup, so callers see the
    transient/permanent error itself (cancellation stays as it is)."""
    try:
        yield
    except BaseExceptionGroup as group:
        errors = [e for e in _leaves(group) if isinstance(e, Exception)]
        if errors:
            raise errors[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
