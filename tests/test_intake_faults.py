"""The intake stage never dies of one message: every AWS call it makes raises, in turn, each
botocore exception it can raise, and the consumer keeps running with every message settled.

The intake runs in-process as the service runs it (``Intake`` with ``Outcomes`` and pull
request feedback) against moto over HTTP and the CodeCommit stand-in. Each round brings a
push, a build's IN_PROGRESS and SUCCEEDED events, a pull request opened on that build's commit
and a poison message, with one operation armed to raise once: the round ends when the intake
queue is empty (every message done, retried to done, or dead-lettered) and the armed fault has
fired. The clients make one attempt per call, so botocore's own retries do not hide a fault.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aioboto3
import anyio
import pytest
from aiobotocore.config import AioConfig
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from localdev.codecommit import CodeCommitStandIn
from service.aws import AccountClients, Clients
from service.badges import Badges
from service.badges import branch_key as badges_branch_key
from service.build_state import Outcomes
from service.builds import StartedBuild
from service.events import Push
from service.health import Health
from service.intake import Intake, work_message
from service.job import JobResult
from service.ledger import Entry, Ledger
from service.metrics import Metrics
from service.notify import Notifier
from service.notify import build_key as notify_build_key
from service.outcome import Outcome
from service.pullrequests import FEEDBACK_SUFFIX, PullRequests
from service.queue import Leases, Queue
from service.records import Records
from service.worker import Worker
from tests.helpers import AwsResources, event_for, push_for, wait_for
from tests.test_build_state import build_state_event, send_build_event
from tests.test_intake import counts
from tests.test_worker import settings_for

pytestmark = pytest.mark.e2e

# Every AWS operation the intake stage calls in a round.
OPERATIONS = (
    "ReceiveMessage",
    "SendMessageBatch",
    "DeleteMessageBatch",
    "ChangeMessageVisibilityBatch",
    "SendMessage",
    "GetObject",
    "PutObject",
    "ListPullRequests",
    "GetPullRequest",
    "PostCommentForPullRequest",
    "UpdateComment",
    "UpdatePullRequestApprovalState",
    # Added after the intake was proven: the badges' and the notifications' own calls.
    "HeadObject",
    "Publish",
)
URL = "http://127.0.0.1:9/"
FAULTS: dict[str, Callable[[str], Exception]] = {
    "Throttling": lambda op: ClientError({"Error": {"Code": "Throttling"}}, op),
    "InternalError": lambda op: ClientError({"Error": {"Code": "InternalError"}}, op),
    "AccessDenied": lambda op: ClientError({"Error": {"Code": "AccessDenied"}}, op),
    "EndpointConnectionError": lambda op: EndpointConnectionError(endpoint_url=URL),
    "ConnectTimeoutError": lambda op: ConnectTimeoutError(endpoint_url=URL),
    "ReadTimeoutError": lambda op: ReadTimeoutError(endpoint_url=URL),
    "ConnectionClosedError": lambda op: ConnectionClosedError(endpoint_url=URL),
    "NoCredentialsError": lambda op: NoCredentialsError(),
}


@dataclass(eq=False)
class Armed:
    """Makes the calls of ``operation`` (by any of the clients) raise the next of ``faults``,
    until none is left: each failed message is retried into the next fault. Receives fail
    every other call (a failed receive backs off, 2 s after a success, 30 s in a row)."""

    operation: str = ""
    faults: list[str] = field(default_factory=list)
    fired: list[str] = field(default_factory=list)
    _spare: bool = False

    def __call__(self, event_name: str, **_: Any) -> None:
        operation = event_name.rsplit(".", 1)[-1]
        if operation != self.operation or not self.faults:
            return
        self._spare = not self._spare
        if self._spare or operation != "ReceiveMessage":
            name = self.faults.pop(0)
            self.fired.append(name)
            raise FAULTS[name](operation)


@asynccontextmanager
async def intake_stage(
    aws: AwsResources, standin: CodeCommitStandIn, armed: Armed, topic: str
) -> AsyncIterator[tuple[Intake, Notifier, anyio.Event]]:
    s = settings_for(
        aws,
        badges=True,
        notify_topics=topic,
        notify_on="succeeded",
        wait_time=0,
        intake_visibility_timeout=2,
        retry_base_delay=0,
        retry_max_delay=0,
        pull_request_feedback="comment+approval",
    )
    config = AioConfig(retries={"mode": "standard", "max_attempts": 1}, read_timeout=10)
    session = aioboto3.Session()
    async with AsyncExitStack() as stack:
        sqs = await stack.enter_async_context(session.client("sqs", config=config))
        s3 = await stack.enter_async_context(session.client("s3", config=config))
        codebuild = await stack.enter_async_context(session.client("codebuild", config=config))
        codecommit = await stack.enter_async_context(
            session.client("codecommit", config=config, endpoint_url=standin.endpoint)
        )
        sns = await stack.enter_async_context(session.client("sns", config=config))
        for client in (sqs, s3, codecommit, sns):
            client.meta.events.register("before-send", armed)
        clients = Clients(sqs, s3, codebuild, codecommit, session, config)
        metrics = Metrics()
        records = Records(s3, aws.bucket)
        badges = Badges(records, s, metrics)
        pull_requests = PullRequests(
            AccountClients(clients, stack, ""), records, s, metrics, badges=badges
        )
        notifier = Notifier(sns, records, s, metrics, pull_requests=pull_requests.commented)
        outcomes = Outcomes(
            records,
            s,
            metrics,
            listeners=(pull_requests.changed, notifier.changed, badges.changed),
            pull_requests=pull_requests.event,
        )
        intake_queue = Queue(sqs, aws.intake_url, name="intake")
        await intake_queue.describe()
        leases = Leases(visibility=2, interval=2 / 3, metrics=metrics)
        health = Health(liveness_timeout=60)
        intake = Intake(
            intake_queue,
            Queue(sqs, aws.work_url, name="work"),
            s,
            metrics,
            health,
            leases,
            outcomes=outcomes,
        )
        stopping, done = anyio.Event(), anyio.Event()

        async def run() -> None:
            await intake.run(stopping)
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(leases.run)
            tg.start_soon(run)
            yield intake, notifier, done
            stopping.set()
            with anyio.fail_after(30):
                await done.wait()
            tg.cancel_scope.cancel()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("operation", OPERATIONS)
async def test_every_intake_call_raising_each_botocore_error_never_stops_the_intake(
    aws: AwsResources, operation: str
) -> None:
    """One round per operation (each its own test, so that they run in parallel)."""
    # Enough receives for a message hit by every fault in a round to be handled after them.
    policy = {
        "deadLetterTargetArn": await queue_arn(aws, aws.intake_dlq_url),
        "maxReceiveCount": 12,
    }
    await aws.sqs.set_queue_attributes(
        QueueUrl=aws.intake_url, Attributes={"RedrivePolicy": json.dumps(policy)}
    )
    heads: dict[str, str] = {"refs/heads/main": "0" * 40}

    async def resolve(repository: str, ref: str) -> str | None:
        return heads.get(ref)

    async def forward(event: dict[str, Any]) -> None:  # the pipeline's PullRequestRule
        await aws.sqs.send_message(
            QueueUrl=aws.intake_url,
            MessageBody=json.dumps(event),
            MessageGroupId="pullrequest",
            MessageDeduplicationId=uuid.uuid4().hex,
        )

    armed = Armed()
    ledger = Ledger(Records(aws.s3, aws.bucket))
    async with aioboto3.Session().client("sns", endpoint_url=aws.endpoint) as sns:
        topic = (await sns.create_topic(Name=f"builds-{uuid.uuid4().hex[:8]}"))["TopicArn"]
    developer = aioboto3.Session(aws_access_key_id="developer", aws_secret_access_key="x")
    async with (
        CodeCommitStandIn(resolve=resolve, on_event=forward) as standin,
        developer.client("codecommit", endpoint_url=standin.endpoint) as cc,
        intake_stage(aws, standin, armed, topic) as (intake, notifier, done),
    ):
        number = OPERATIONS.index(operation) + 1
        branch = f"feature/r{number}"
        commit = f"{number:x}".rjust(40, "c")
        heads[f"refs/heads/{branch}"] = commit
        archive = f"shop/{branch}/{commit}.zip"
        build_id = f"shop:{uuid.uuid4()}"
        # What the job left: the build's ledger entry and its feedback document.
        entry = Entry(commit, f"refs/heads/{branch}", build_id, "shop", repository="shop")
        await ledger.started(archive, entry)
        push = push_for("shop", branch, commit)
        await notifier.started(push, StartedBuild(build_id, "shop"), archive)
        await Records(aws.s3, aws.bucket).write(
            archive + FEEDBACK_SUFFIX,
            {
                "repository": "shop",
                "account": "123456789012",
                "ref": f"refs/heads/{branch}",
                "commit": commit,
                "build_id": build_id,
                "comments": {},
                "approvals": {},
            },
            replacing=None,
        )
        order = sorted(FAULTS)
        armed.operation, armed.faults = operation, order[number:] + order[:number]
        await aws.send_event(event_for("shop", f"refs/heads/{branch}", commit))
        await cc.create_pull_request(
            title=branch,
            targets=[{"repositoryName": "shop", "sourceReference": branch}],
        )
        for status in ("IN_PROGRESS", "SUCCEEDED"):
            at = datetime.now(UTC)
            await send_build_event(aws, build_state_event(build_id, status, archive=archive, at=at))
        for poison in range(len(FAULTS)):  # each in its own lane, dead-lettered in the end
            await aws.sqs.send_message(
                QueueUrl=aws.intake_url,
                MessageBody="not json",
                MessageGroupId=f"poison-{poison}",
                MessageDeduplicationId=uuid.uuid4().hex,
            )

        async def settled() -> bool:
            assert not done.is_set(), f"the intake stopped on a failed {operation}"
            if await counts(aws, aws.intake_url) != (0, 0):
                return False
            if armed.faults:  # e.g. a refused approval is not retried: a redelivery is
                event = build_state_event(
                    build_id, "SUCCEEDED", archive=archive, at=datetime.now(UTC)
                )
                await send_build_event(aws, event)
                return False
            return True

        await wait_for(settled, within=90, what=f"{operation}: every message settled")
        assert sorted(armed.fired) == sorted(FAULTS)
        assert not done.is_set()
    # Only the poison messages were dead-lettered; every push was queued once.
    assert await aws.count(aws.intake_dlq_url) == len(FAULTS)
    assert await aws.count(aws.work_url) == 1
    # The pull request feedback went through in the end: the round's build approved.
    assert all(standin.approvals(pr) for pr in standin.pull_requests)
    assert len(standin.pull_requests) == 1
    # The build's notification was published and its branch's badge written, once each.
    record = await Records(aws.s3, aws.bucket).read(notify_build_key(archive))
    assert record is not None and record.data["sent"][topic]["state"] == "published"
    assert b"passing" in await aws.object(badges_branch_key("shop", branch))


async def queue_arn(aws: AwsResources, url: str) -> str:
    reply = await aws.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
    return reply["Attributes"]["QueueArn"]


# -- the worker stage: a job, or the worker's own queue calls, raising each botocore error ----


@pytest.mark.timeout(300)
@pytest.mark.parametrize("operation", ["job", "ReceiveMessage", "DeleteMessageBatch"])
async def test_a_job_or_a_work_queue_call_raising_each_botocore_error_never_stops_the_worker(
    aws: AwsResources, operation: str
) -> None:
    """The job raises each botocore exception itself (an unmapped failure of any AWS call in
    it), or the worker's receive or acknowledgement does: the worker keeps running, and the
    push is built in the end, never dead-lettered."""
    policy = {
        "deadLetterTargetArn": await queue_arn(aws, aws.work_dlq_url),
        "maxReceiveCount": 12,
    }
    await aws.sqs.set_queue_attributes(
        QueueUrl=aws.work_url, Attributes={"RedrivePolicy": json.dumps(policy)}
    )
    armed = Armed(operation, sorted(FAULTS))
    built: list[str] = []

    async def job(push: Push, recovering: bool) -> JobResult:
        if operation == "job" and armed.faults:
            name = armed.faults.pop(0)
            armed.fired.append(name)
            raise FAULTS[name]("StartBuild")
        built.append(str(push.commit))
        return JobResult(Outcome.BUILT, f"build-{push.commit}", "key")

    s = settings_for(aws, wait_time=0, visibility_timeout=2, retry_base_delay=0, retry_max_delay=0)
    config = AioConfig(retries={"mode": "standard", "max_attempts": 1}, read_timeout=10)
    metrics = Metrics()
    async with aioboto3.Session().client("sqs", config=config) as sqs:
        sqs.meta.events.register("before-send", armed)
        queue = Queue(sqs, aws.work_url, name="work")
        await queue.describe()
        leases = Leases(visibility=2, interval=2 / 3, metrics=metrics)
        worker = Worker(
            queue, leases, Health(liveness_timeout=60), settings=s, metrics=metrics, job=job
        )
        stopping, done = anyio.Event(), anyio.Event()

        async def run() -> None:
            await worker.run(stopping)
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(leases.run)
            tg.start_soon(run)
            message = work_message(push_for("shop", "feature/w", "d" * 40))
            await aws.sqs.send_message(
                QueueUrl=aws.work_url,
                MessageBody=message.body,
                MessageGroupId=message.group,
                MessageDeduplicationId=message.dedup,
            )

            async def settled() -> bool:
                assert not done.is_set(), f"the worker stopped on a failed {operation}"
                if armed.faults or not built:
                    return False
                return await counts(aws, aws.work_url) == (0, 0)

            await wait_for(settled, within=120, what=f"{operation}: the push settled")
            assert sorted(armed.fired) == sorted(FAULTS)
            assert not done.is_set()
            stopping.set()
            with anyio.fail_after(30):
                await done.wait()
            tg.cancel_scope.cancel()
    assert await aws.count(aws.work_dlq_url) == 0
