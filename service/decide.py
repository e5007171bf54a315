"""Decide what a parsed event means *before* any work is done: build it, or skip it and why."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from .errors import RejectedEvent
from .events import Action, OtherEvent, Push, RefType
from .outcome import Outcome
from .pipelines import OnDelete, Rule
from .settings import Settings


@dataclass(frozen=True)
class Skip:
    """The event is acknowledged without a build."""

    outcome: Outcome
    reason: str


def decide(event: Push | OtherEvent, settings: Settings, rule: Rule | None = None) -> Push | Skip:
    """Return the push to build (or, for a rule with ``on_delete: delete``, the deletion to
    clean up after), or why it is skipped, under the repository's ``rule`` (by
    default the environment's settings). Path filters and skip markers need the commit: they
    are applied by the job (:mod:`service.changes`).

    Raises:
        RejectedEvent: the event comes from an account, region or repository not allowed.
    """
    if isinstance(event, OtherEvent):
        return Skip(Outcome.IGNORED, f"event {event.event!r} is not a ref change")
    _check_allowed(event, settings)
    rule = rule or Rule.from_settings(settings)
    if event.action is Action.DELETED:
        if rule.on_delete is OnDelete.DELETE:
            return event  # the job deletes its archives, in the branch's lane (service.cleanup)
        return Skip(Outcome.DELETED, f"{event.ref} was deleted")
    if event.ref_type is RefType.TAG:
        if not rule.build_tags:
            return Skip(Outcome.IGNORED, f"tag builds are disabled ({rule.name})")
        return event
    if _matches(event.name, rule.protected_branches):
        return Skip(Outcome.PROTECTED, f"branch {event.name!r} is protected ({rule.name})")
    if not _matches(event.name, rule.include_branches):
        return Skip(
            Outcome.EXCLUDED, f"branch {event.name!r} is not in the include list ({rule.name})"
        )
    if _matches(event.name, rule.exclude_branches):
        return Skip(Outcome.EXCLUDED, f"branch {event.name!r} is excluded ({rule.name})")
    return event


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def check_account(account: str, settings: Settings) -> None:
    """Refuse an event of an account not in ``BRANCHBUILD_ALLOWED_ACCOUNTS`` (pull request
    events too: the service assumes its feedback role in the account the event names).

    Raises:
        RejectedEvent: the account is not allowed.
    """
    allowed = settings.allowed_accounts
    if allowed and account not in allowed:
        raise RejectedEvent(f"account {account!r} is not in BRANCHBUILD_ALLOWED_ACCOUNTS")


def _check_allowed(push: Push, settings: Settings) -> None:
    check_account(push.account, settings)
    for value, allowed, what, variable in (
        (push.region, settings.allowed_regions, "region", "BRANCHBUILD_ALLOWED_REGIONS"),
        (
            push.repository,
            settings.allowed_repositories,
            "repository",
            "BRANCHBUILD_ALLOWED_REPOSITORIES",
        ),
    ):
        if allowed and not _matches(value, allowed):
            raise RejectedEvent(f"{what} {value!r} is not in {variable}")
