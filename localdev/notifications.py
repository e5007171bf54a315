"""``make run`` / ``make demo``: branchbuild's notifications (service/notify.py) in LocalStack.

An SNS topic that the local service notifies, and an inbox: an SQS queue subscribed with the
filter policy a developer would use for their own pushes' failures and fixes (every push of the
local git host is made by the same IAM user, its events' ``callerUserArn``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio

from .demo import FAILING, PASSING
from .options import ACCOUNT, Options, local_session

log = logging.getLogger("branchbuild.localdev")

PUSHER = f"arn:aws:iam::{ACCOUNT}:user/localdev"  # service.events.codecommit_event's
FILTER_POLICY = {"pusher": [PUSHER], "outcome": ["failed", "fixed"]}
BRANCH = "feature/demo-notify"


def _names(options: Options) -> tuple[str, str]:
    return f"{options.prefix}-notifications", f"{options.prefix}-notifications-inbox"


async def create_inbox(options: Options) -> dict[str, str]:
    """Create (or find) the topic and its inbox, emptied; returns the service's settings."""
    topic_name, queue_name = _names(options)
    session = local_session(options)
    async with AsyncExitStack() as clients:
        sns = await clients.enter_async_context(
            session.client("sns", endpoint_url=options.endpoint)
        )
        sqs = await clients.enter_async_context(
            session.client("sqs", endpoint_url=options.endpoint)
        )
        topic = (await sns.create_topic(Name=topic_name))["TopicArn"]
        url = (await sqs.create_queue(QueueName=queue_name))["QueueUrl"]
        await sqs.purge_queue(QueueUrl=url)
        attributes = await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
        await sns.subscribe(
            TopicArn=topic,
            Protocol="sqs",
            Endpoint=attributes["Attributes"]["QueueArn"],
            Attributes={"FilterPolicy": json.dumps(FILTER_POLICY)},
        )
    log.info("notifications: topic %s, inbox %s", topic, url)
    return {"BRANCHBUILD_NOTIFY_TOPICS": topic, "BRANCHBUILD_NOTIFY_ON": "failed,fixed"}


async def _read_inbox(options: Options, seen: list[dict[str, Any]]) -> None:
    _, queue_name = _names(options)
    session = local_session(options)
    async with session.client("sqs", endpoint_url=options.endpoint) as sqs:
        url = (await sqs.get_queue_url(QueueName=queue_name))["QueueUrl"]
        reply = await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        for message in reply.get("Messages", []):
            seen.append(json.loads(message["Body"]))
            await sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])


async def demo_notifications(
    options: Options,
    git: Callable[..., Awaitable[str]],
    work: Path,
    status: Callable[[str], str | None],
) -> tuple[list[tuple[str, str, str]], list[bool], str]:
    """Break a branch, then fix it: the inbox gets a ``failed`` and then a ``fixed``
    notification. Returns the demo's rows, whether each is as expected, and what arrived."""
    await git("checkout", "--quiet", "-b", BRANCH)
    (work / "buildspec.yml").write_text(FAILING)
    (work / "notify.txt").write_text(BRANCH + "\n")
    await git("add", "--all")
    await git("commit", "--quiet", "-m", "break the build")
    broken = await git("rev-parse", "HEAD")
    await git("push", "--quiet", "--force", "origin", f"HEAD:{BRANCH}")
    await _until(lambda: status(broken) is not None, 120)
    (work / "buildspec.yml").write_text(PASSING)
    await git("commit", "--quiet", "-am", "fix the build")
    fixed = await git("rev-parse", "HEAD")
    await git("push", "--quiet", "origin", f"HEAD:{BRANCH}")
    await _until(lambda: status(fixed) is not None, 120)

    seen: list[dict[str, Any]] = []

    def about(commit: str) -> dict[str, Any] | None:
        for envelope in seen:
            body = json.loads(envelope["Message"])
            if body.get("commit") == commit:
                return envelope
        return None

    with anyio.move_on_after(60):
        while about(broken) is None or about(fixed) is None:
            await _read_inbox(options, seen)
    rows, ok, shown = [], [], []
    for commit, expected in ((broken, "failed"), (fixed, "fixed")):
        envelope = about(commit)
        got = _outcome(envelope) if envelope else "nothing"
        rows.append((f"notify {BRANCH}", f"notification: {expected}", f"notification: {got}"))
        ok.append(got == expected)
        if envelope:
            shown.append(_describe(envelope))
    policy = json.dumps(FILTER_POLICY)
    text = f"What the inbox subscribed to the SNS topic (filter policy {policy}) got:\n\n"
    return rows, ok, text + "\n".join(shown)


def _outcome(envelope: dict[str, Any]) -> str:
    return str(envelope.get("MessageAttributes", {}).get("outcome", {}).get("Value", "?"))


def _describe(envelope: dict[str, Any]) -> str:
    body = json.loads(envelope["Message"])
    build = body.get("build") or {}
    return (
        f"  Subject: {envelope.get('Subject', '')}\n"
        f"    outcome {body['outcome']}, {body['repository']} {body['branch']} at "
        f"{str(body['commit'])[:12]}, pushed by {body['pusher']}\n"
        f"    build {build.get('id')} {build.get('status')}; attributes "
        + ", ".join(
            f"{k}={v.get('Value')}" for k, v in sorted(envelope["MessageAttributes"].items())
        )
        + "\n"
    )


async def _until(done: Callable[[], bool], within: float) -> None:
    with anyio.move_on_after(within):
        while True:
            if done():
                return
            await anyio.sleep(0.5)
