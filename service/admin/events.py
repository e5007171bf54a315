"""``branchbuild replay`` and ``send-test-event``: put an event on the intake queue as EventBridge
would.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from ..aws import translated
from ..events import (
    OtherEvent,
    Push,
    RefChange,
    codecommit_event,
    parse_event,
)

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient


def event_body(text: str) -> tuple[str, Push | OtherEvent]:
    """The SQS body EventBridge would deliver for an event file, and what it parses to.

    Raises:
        MalformedEvent: the event would be dead-lettered by the service.
    """
    parsed = parse_event(text)  # also refuses anything that is not a JSON object
    return json.dumps(json.loads(text), separators=(",", ":")), parsed


def build_test_event(
    repository: str, name: str, commit: str, *, tag: bool, account: str, region: str
) -> dict[str, Any]:
    """A ``CodeCommit Repository State Change`` event for a new branch (or tag) at ``commit``.

    Raises:
        MalformedEvent: a name, the commit, the account or the region is invalid.
    """
    ref = ("refs/tags/" if tag else "refs/heads/") + name
    event = codecommit_event(
        RefChange(repository, ref, None, commit), account=account, region=region
    )
    parse_event(json.dumps(event))  # the same checks the service makes
    return event


async def put_event(sqs: SQSClient, url: str, body: str, *, group: str) -> str:
    """Put an event on the intake queue as the EventBridge rule does; returns the message id.

    Raises:
        AccessDenied, TransientError: the queue refused it or could not be reached.
    """
    with translated("send to the intake queue"):
        reply = await sqs.send_message(
            QueueUrl=url,
            MessageBody=body,
            MessageGroupId=group,
            MessageDeduplicationId=uuid.uuid4().hex,
        )
    return reply["MessageId"]


def describe_event(parsed: Push | OtherEvent) -> str:
    if isinstance(parsed, OtherEvent):
        return f"{parsed.event} event {parsed.event_id}"
    commit = (parsed.commit or parsed.old_commit or "")[:12]
    return (
        f"{parsed.action.value} {parsed.repository} {parsed.ref} {commit} (event {parsed.event_id})"
    )
