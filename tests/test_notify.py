"""Notifications (service/notify.py): what a message says, and end to end through LocalStack's
SNS (an SQS subscription filtered on the pusher, one unfiltered, and an HTTP subscriber that gets
the Chatbot format), with the service as a real process on moto's queues, bucket and CodeBuild
and the real SSH git host.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aioboto3
import anyio
import pytest
from aiohttp import web

from localdev.githost import codecommit_event
from service.build_state import Change
from service.builds import StartedBuild
from service.errors import ConfigurationError, NotificationBusy, NotificationRefused, TransientError
from service.events import Action, Push, RefChange, RefType, parse_event, parse_work
from service.ledger import Entry, Ledger
from service.metrics import Metrics
from service.notify import (
    Notice,
    Notifier,
    attributes,
    build_key,
    chatbot,
    message,
    notifies,
    outcome_of,
    result_of,
    subject,
)
from service.pipelines import Rule, parse_config
from service.records import Records
from service.settings import load_settings
from tests.faultproxy import Fault, FaultProxy
from tests.helpers import (
    AwsResources,
    GitWorld,
    ServiceProcess,
    StartService,
    WorkCopy,
    create_project,
    wait_for,
)
from tests.test_build_state import build_state_event, counted, ledger, send_build_event
from tests.test_localstack import localstack_endpoint  # noqa: F401 - the fixture

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

REGION = "eu-west-1"
ALICE = "arn:aws:iam::123456789012:user/alice"
BOB = "arn:aws:iam::123456789012:user/bob"
SETTINGS = {"queue_url": "q", "work_queue_url": "w", "bucket": "bkt"}


def notice(**more: Any) -> Notice:
    fields: dict[str, Any] = {
        "outcome": "failed",
        "repository": "shop",
        "ref": "refs/heads/feature/pay",
        "commit": "a" * 40,
        "pusher": ALICE,
        "account": "123456789012",
        "region": REGION,
        "build_region": REGION,
        "build_id": "shop:0b9e1c2d-1111-2222-3333-444455556666",
        "project": "shop",
        "status": "FAILED",
        "logs": "https://console.aws.amazon.com/cloudwatch/home?region=eu-west-1#logEvent:x",
        "pull_requests": ("7",),
    }
    return Notice(**(fields | more))


# -- what a message says ------------------------------------------------------------------------


def test_one_message_has_text_for_people_chatbot_for_https_and_json_for_machines() -> None:
    parts = json.loads(message(notice()))
    assert parts["default"] == parts["email"]
    text = parts["email"]
    assert text.startswith("❌ Build failed: shop feature/pay\n")
    for line in (
        "Repository:   shop",
        "Branch:       feature/pay",
        f"Commit:       {'a' * 40}",
        f"Pushed by:    {ALICE}",
        "Build:        shop:0b9e1c2d-1111-2222-3333-444455556666 (FAILED)",
        "Logs:         https://console.aws.amazon.com/cloudwatch/",
        "Pull request: 7 https://eu-west-1.console.aws.amazon.com/codesuite/codecommit/"
        "repositories/shop/pull-requests/7/details?region=eu-west-1",
    ):
        assert line in text, line
    console = (
        "https://eu-west-1.console.aws.amazon.com/codesuite/codebuild/projects/shop/build/"
        "shop%3A0b9e1c2d-1111-2222-3333-444455556666/?region=eu-west-1"
    )
    assert f"Console:      {console}" in text

    body = json.loads(parts["sqs"])
    assert parts["lambda"] == parts["firehose"] == parts["email-json"] == parts["sqs"]
    assert body["version"] == 1 and body["source"] == "branchbuild"
    assert (body["outcome"], body["repository"], body["branch"]) == (
        "failed",
        "shop",
        "feature/pay",
    )
    assert (body["commit"], body["pusher"], body["ref"]) == (
        "a" * 40,
        ALICE,
        "refs/heads/feature/pay",
    )
    assert body["build"]["id"] == "shop:0b9e1c2d-1111-2222-3333-444455556666"
    assert body["build"]["console"] == console and body["build"]["status"] == "FAILED"
    assert body["build"]["logs"].startswith("https://console.aws.amazon.com/cloudwatch/")
    assert body["pull_requests"][0]["id"] == "7"
    assert body["commit_link"].endswith(f"/repositories/shop/commit/{'a' * 40}?region=eu-west-1")

    chat = json.loads(parts["https"])
    assert parts["http"] == parts["https"] and chat == chatbot(notice())
    assert (chat["version"], chat["source"]) == ("1.0", "custom")
    content = chat["content"]
    assert content["textType"] == "client-markdown"
    assert content["title"] == "❌ Build failed: shop feature/pay"
    assert f"*Pushed by:* {ALICE}" in content["description"]
    assert all(isinstance(step, str) for step in content["nextSteps"])
    assert any("build logs" in step for step in content["nextSteps"])
    assert any("pull request 7" in step for step in content["nextSteps"])
    metadata = chat["metadata"]
    assert metadata["eventType"] == "branchbuild.failed" and len(metadata["threadId"]) == 32
    assert metadata["additionalContext"]["pusher"] == ALICE
    assert all(isinstance(v, str) for v in metadata["additionalContext"].values())


def test_attributes_subject_and_a_dead_lettered_push() -> None:
    assert attributes(notice()) == {
        "repository": {"DataType": "String", "StringValue": "shop"},
        "branch": {"DataType": "String", "StringValue": "feature/pay"},
        "outcome": {"DataType": "String", "StringValue": "failed"},
        "pusher": {"DataType": "String", "StringValue": ALICE},
    }
    assert "pusher" not in attributes(notice(pusher=None))  # SNS refuses an empty value
    assert subject(notice()) == "branchbuild: shop feature/pay build failed"
    long = subject(notice(ref="refs/heads/ünïcode/" + "x" * 200))
    assert len(long) < 100 and long.isascii() and "\n" not in long

    gone = notice(
        outcome="dead_lettered",
        build_id=None,
        project=None,
        status=None,
        logs=None,
        pull_requests=(),
        reason="commit aaaa is not in the repository",
        error_kind="commit_not_found",
    )
    parts = json.loads(message(gone))
    assert "Reason:       commit aaaa is not in the repository" in parts["email"]
    body = json.loads(parts["sqs"])
    assert body["build"] is None and body["error_kind"] == "commit_not_found"
    assert subject(gone) == "branchbuild: shop feature/pay push not built"
    assert json.loads(parts["https"])["content"]["title"].startswith("🚫 Push not built")


def entry(status: str | None, superseded_by: str | None = None) -> Entry:
    return Entry("a" * 40, "refs/heads/x", "p:1", "p", status=status, superseded_by=superseded_by)


def test_outcomes_and_which_notify() -> None:
    assert [result_of(entry(s)) for s in ("SUCCEEDED", "FAILED", "FAULT", "TIMED_OUT")] == [
        "succeeded",
        "failed",
        "failed",
        "failed",
    ]
    assert result_of(entry("STOPPED")) == "stopped"
    assert result_of(entry("STOPPED", superseded_by="b" * 40)) == "superseded"
    # A build that ended on its own before StopBuild reached it keeps its result: it failed
    # (and a success after it is a fix), though a newer commit marked it superseded.
    assert result_of(entry("FAILED", superseded_by="b" * 40)) == "failed"
    assert result_of(entry("IN_PROGRESS")) is None and result_of(entry(None)) is None
    assert outcome_of("succeeded", "failed") == "fixed"
    assert outcome_of("succeeded", "succeeded") == outcome_of("succeeded", None) == "succeeded"
    assert outcome_of("failed", "failed") == "failed"

    settings = load_settings(**SETTINGS, notify_topics=f"arn:aws:sns:{REGION}:123456789012:t")
    rule = Rule.from_settings(settings)
    assert rule.notify_on == ("failed", "fixed", "dead_lettered")
    assert [notifies(o, rule) for o in ("failed", "fixed", "succeeded", "stopped")] == [
        True,
        True,
        False,
        False,
    ]
    assert not notifies("superseded", rule)
    only_successes = Rule.from_settings(load_settings(**SETTINGS, notify_on="succeeded"))
    assert not notifies("succeeded", only_successes)  # no topic: nothing notifies
    with_topic = Rule.from_settings(
        load_settings(**SETTINGS, notify_on="succeeded", notify_topics=settings.notify_topics[0])
    )
    assert notifies("fixed", with_topic) and notifies("succeeded", with_topic)


def test_settings_and_rules_validate_topics_and_outcomes() -> None:
    with pytest.raises(ConfigurationError, match="BRANCHBUILD_NOTIFY_TOPICS.*not an SNS topic"):
        load_settings(**SETTINGS, notify_topics="arn:aws:sqs:eu-west-1:123456789012:q")
    with pytest.raises(ConfigurationError, match="BRANCHBUILD_NOTIFY_ON.*'broken' is not one"):
        load_settings(**SETTINGS, notify_on="failed,broken")
    topic = f"arn:aws:sns:{REGION}:123456789012:team.fifo"
    settings = load_settings(**SETTINGS, notify_topics=f"arn:aws:sns:{REGION}:123456789012:all")
    config = parse_config(
        f"""
version: 1
rules:
  - repository: shop
    notify: {{topics: ["{topic}"], on: [failed, stopped]}}
  - repository: quiet
    notify: {{topics: []}}
  - repository: "*"
""",
        "rules.yaml",
        settings,
    )
    shop = config.rule_for("shop")
    assert shop.notify_topics == (topic,) and shop.notify_on == ("failed", "stopped")
    assert config.rule_for("quiet").notify_topics == ()
    other = config.rule_for("other")
    assert other.notify_topics == settings.notify_topics
    assert other.notify_on == ("failed", "fixed", "dead_lettered")
    with pytest.raises(ConfigurationError, match=r"rules.yaml:4: .*notify.on.*'flaky'"):
        parse_config(
            "version: 1\nrules:\n  - repository: shop\n    notify: {on: [flaky]}\n",
            "rules.yaml",
            settings,
        )


# -- end to end: LocalStack's SNS ---------------------------------------------------------------


@dataclass
class HttpSubscriber:
    """An HTTP(S) subscription's endpoint, as AWS Chatbot's: confirms, then keeps messages."""

    confirmations: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        envelope = json.loads(await request.text())
        if envelope.get("Type") == "SubscriptionConfirmation":
            self.confirmations.append(envelope)
        elif envelope.get("Type") == "Notification":
            self.messages.append(envelope)
        return web.Response(text="ok")


@dataclass
class Topic:
    arn: str
    sqs: SQSClient
    everything: str  # no filter policy
    alices: str  # FilterPolicy {"pusher": [ALICE]}
    http: HttpSubscriber
    received: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    async def messages(self, url: str, count: int) -> list[dict[str, Any]]:
        """Wait until ``url`` has received ``count`` notifications (SNS envelopes)."""
        seen = self.received.setdefault(url, [])

        async def probe() -> list[dict[str, Any]] | None:
            reply = await self.sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1
            )
            for m in reply.get("Messages", []):
                seen.append(json.loads(m["Body"]))
                await self.sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
            assert len(seen) <= count, [json.loads(e["Message"])["outcome"] for e in seen]
            return list(seen) if len(seen) == count else None

        return await wait_for(probe, within=90, what=f"{count} notification(s) in {url}")


@pytest.fixture
async def topic(localstack_endpoint: str) -> AsyncIterator[Topic]:  # noqa: F811
    session = aioboto3.Session(aws_access_key_id="test", aws_secret_access_key="test")
    subscriber = HttpSubscriber()
    app = web.Application()
    app.router.add_post("/", subscriber.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    suffix = uuid.uuid4().hex[:8]
    try:
        async with (
            session.client("sns", endpoint_url=localstack_endpoint, region_name=REGION) as sns,
            session.client("sqs", endpoint_url=localstack_endpoint, region_name=REGION) as sqs,
        ):
            arn = (await sns.create_topic(Name=f"notify-{suffix}"))["TopicArn"]
            urls = []
            for name, policy in (("everything", None), ("alices", {"pusher": [ALICE]})):
                url = (await sqs.create_queue(QueueName=f"{name}-{suffix}"))["QueueUrl"]
                queue_arn = (
                    await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
                )["Attributes"]["QueueArn"]
                extra = {"FilterPolicy": json.dumps(policy)} if policy else {}
                await sns.subscribe(
                    TopicArn=arn, Protocol="sqs", Endpoint=queue_arn, Attributes=extra
                )
                urls.append(url)
            await sns.subscribe(TopicArn=arn, Protocol="http", Endpoint=f"http://127.0.0.1:{port}/")
            [confirmation] = await wait_for(
                lambda: _some(subscriber.confirmations), what="the subscription confirmation"
            )
            await sns.confirm_subscription(TopicArn=arn, Token=confirmation["Token"])
            yield Topic(arn, sqs, urls[0], urls[1], subscriber)
    finally:
        await runner.cleanup()


async def _some(items: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    return items or None


@dataclass
class Pushes:
    aws: AwsResources
    git: GitWorld
    repo: WorkCopy

    async def push(self, branch: str, n: int, pusher: str) -> str:
        commit = await self.repo.commit({"n.txt": f"{n}\n"}, message=f"change {n}")
        await self.repo.push(f"HEAD:{branch}")
        event = codecommit_event(self.git.changes[-1])
        event["detail"]["callerUserArn"] = pusher
        await self.aws.send_event(event)
        return commit

    async def ended(self, branch: str, commit: str, status: str) -> str:
        archive = f"shop/{branch}/{commit}.zip"
        build_id = str((await ledger(self.aws, archive))["build_id"])
        event = build_state_event(build_id, status, archive=archive, at=datetime.now(UTC))
        await send_build_event(self.aws, event)
        return build_id


@pytest.fixture
async def pushes(aws: AwsResources, git_world: GitWorld, tmp_path: Path) -> Pushes:
    await create_project(aws, "shop")
    repo = await WorkCopy.create(git_world, tmp_path, "shop")
    await repo.commit({"README.md": "# shop\n"})
    await repo.push("main")
    return Pushes(aws, git_world, repo)


def outcome(envelope: dict[str, Any]) -> str:
    return str(envelope["MessageAttributes"]["outcome"]["Value"])


async def start(start_service: StartService, topic: Topic, endpoint: str) -> ServiceProcess:
    return await start_service(
        BRANCHBUILD_NOTIFY_TOPICS=topic.arn,
        BRANCHBUILD_NOTIFY_ON="failed,fixed,dead_lettered",
        AWS_ENDPOINT_URL_SNS=endpoint,
    )


@pytest.mark.e2e
@pytest.mark.timeout(300)
async def test_failed_then_fixed_notify_once_each_filtered_by_pusher(
    topic: Topic,
    pushes: Pushes,
    start_service: StartService,
    localstack_endpoint: str,  # noqa: F811
) -> None:
    service = await start(start_service, topic, localstack_endpoint)
    await pushes.repo.checkout("feature/pay")
    broken = await pushes.push("feature/pay", 1, ALICE)
    broken_build = await pushes.ended("feature/pay", broken, "FAILED")
    [failed] = await topic.messages(topic.alices, 1)
    assert outcome(failed) == "failed"
    assert failed["Subject"] == "branchbuild: shop feature/pay build failed"
    attributes_ = {k: v["Value"] for k, v in failed["MessageAttributes"].items()}
    assert attributes_ == {
        "repository": "shop",
        "branch": "feature/pay",
        "outcome": "failed",
        "pusher": ALICE,
    }
    body = json.loads(failed["Message"])  # the sqs part: the JSON body
    assert (body["repository"], body["branch"], body["commit"]) == ("shop", "feature/pay", broken)
    assert body["pusher"] == ALICE and body["build"]["id"] == broken_build
    assert body["build"]["status"] == "FAILED"
    assert body["build"]["logs"].startswith("https://console.aws.amazon.com/cloudwatch/")
    assert "/codebuild/projects/shop/build/shop%3A" in body["build"]["console"]

    good = await pushes.push("feature/pay", 2, ALICE)
    good_build = await pushes.ended("feature/pay", good, "SUCCEEDED")
    _, fixed = await topic.messages(topic.alices, 2)
    assert outcome(fixed) == "fixed" and json.loads(fixed["Message"])["commit"] == good
    assert json.loads(fixed["Message"])["build"]["id"] == good_build

    # Redelivered outcome events: nothing is published again.
    await pushes.ended("feature/pay", good, "SUCCEEDED")
    await pushes.ended("feature/pay", broken, "FAILED")
    await counted(service, 2, "branchbuild_notifications_total", result="duplicate")

    # Bob's failure reaches the unfiltered queue only; a second success is not "fixed" (and
    # "succeeded" does not notify here).
    await pushes.repo.checkout("feature/bob")
    bobs = await pushes.push("feature/bob", 3, BOB)
    await pushes.ended("feature/bob", bobs, "FAILED")
    await pushes.repo.checkout("feature/pay", new=False)
    again = await pushes.push("feature/pay", 4, ALICE)
    await pushes.ended("feature/pay", again, "SUCCEEDED")
    everything = await topic.messages(topic.everything, 3)
    assert sorted(outcome(e) for e in everything) == ["failed", "failed", "fixed"]
    assert {json.loads(e["Message"])["pusher"] for e in everything} == {ALICE, BOB}
    await counted(service, 1, "branchbuild_events_total", event="build_state", outcome="recorded")
    # Counted once marked, which is after SNS delivered it.
    await counted(service, 3, "branchbuild_notifications_total", result="published")
    assert await service.metric("branchbuild_notifications_total", result="published") == 3

    # The HTTP subscriber (as AWS Chatbot) got the Chatbot custom notification format.
    async def three() -> list[dict[str, Any]] | None:
        return topic.http.messages if len(topic.http.messages) >= 3 else None

    chats = [json.loads(m["Message"]) for m in await wait_for(three, within=60, what="3 posts")]
    assert {(c["version"], c["source"], c["content"]["textType"]) for c in chats} == {
        ("1.0", "custom", "client-markdown")
    }
    titles = sorted(c["content"]["title"] for c in chats)
    assert titles == [
        "✅ Build fixed: shop feature/pay",
        "❌ Build failed: shop feature/bob",
        "❌ Build failed: shop feature/pay",
    ]
    assert len(topic.http.messages) == 3

    # Alice's queue still has her two only (the barrier: everything else has arrived).
    assert [outcome(e) for e in await topic.messages(topic.alices, 2)] == ["failed", "fixed"]


@pytest.mark.e2e
@pytest.mark.timeout(300)
async def test_a_dead_lettered_push_notifies_with_its_reason(
    topic: Topic,
    pushes: Pushes,
    aws: AwsResources,
    start_service: StartService,
    localstack_endpoint: str,  # noqa: F811
) -> None:
    service = await start(start_service, topic, localstack_endpoint)
    missing = "f" * 40  # a commit the repository does not have
    event = codecommit_event(pushes.git.changes[-1])
    event["detail"] |= {
        "callerUserArn": ALICE,
        "referenceName": "feature/gone",
        "referenceFullName": "refs/heads/feature/gone",
        "commitId": missing,
    }
    await pushes.aws.send_event(event)
    [notified] = await topic.messages(topic.alices, 1)
    assert outcome(notified) == "dead_lettered"
    assert notified["Subject"] == "branchbuild: shop feature/gone push not built"
    body = json.loads(notified["Message"])
    assert (body["branch"], body["commit"], body["pusher"]) == ("feature/gone", missing, ALICE)
    assert body["build"] is None and body["reason"] and body["error_kind"]

    async def dead_letter() -> list[tuple[str, dict[str, str]]] | None:
        return await aws.dlq_messages(aws.work_dlq_url) or None

    [(_, reason)] = await wait_for(dead_letter, within=60, what="the dead-lettered push")
    assert body["reason"] == reason["branchbuild.reason"]
    assert body["error_kind"] == reason["branchbuild.error_kind"]
    await counted(service, 1, "branchbuild_notifications_total", outcome="dead_lettered")


def test_the_pusher_is_read_from_the_event_and_travels_with_the_push() -> None:
    event = codecommit_event(RefChange("shop", "refs/heads/feature/pay", None, "a" * 40))
    event["detail"]["callerUserArn"] = ALICE
    push = parse_event(json.dumps(event))
    assert isinstance(push, Push) and push.pusher == ALICE
    assert parse_work(push.to_json()).pusher == ALICE  # the work queue's message keeps it
    for odd in ("not-an-arn", "arn:aws:iam::1:user/a\nb", 7, None):
        event["detail"]["callerUserArn"] = odd
        parsed = parse_event(json.dumps(event))
        assert isinstance(parsed, Push) and parsed.pusher is None


@pytest.mark.e2e
@pytest.mark.timeout(300)
async def test_a_failed_publish_is_retried_and_sent_once(
    topic: Topic,
    pushes: Pushes,
    start_service: StartService,
    localstack_endpoint: str,  # noqa: F811
) -> None:
    """SNS fails every attempt of the first Publish (botocore's retries included): the state
    event is retried, and the notification arrives, once."""
    error = (
        b"<ErrorResponse><Error><Type>Receiver</Type><Code>InternalError</Code>"
        b"<Message>injected</Message></Error></ErrorResponse>"
    )
    first: list[str] = []

    def first_call(request: web.Request) -> bool:
        # Every attempt of one call carries the same invocation id: refuse all of the first
        # Publish call's attempts (botocore's own retries), and nothing after it.
        invocation = request.headers.get("amz-sdk-invocation-id", "")
        if not first:
            first.append(invocation)
        return request.method == "POST" and invocation == first[0]

    async with FaultProxy(upstream=localstack_endpoint).running() as proxy:
        fault = proxy.add(
            Fault(
                match=first_call,
                body_contains=b"Action=Publish",
                status=500,
                body=error,
                content_type="text/xml",
                times=1_000,
            )
        )
        service = await start(start_service, topic, proxy.endpoint)
        await pushes.repo.checkout("feature/pay")
        broken = await pushes.push("feature/pay", 1, ALICE)
        await pushes.ended("feature/pay", broken, "FAILED")
        [failed] = await topic.messages(topic.alices, 1)
        assert outcome(failed) == "failed" and json.loads(failed["Message"])["commit"] == broken
        assert fault.hits > 1 and not proxy.errors  # botocore's own retries came first
        assert await service.metric("branchbuild_notifications_total", result="failed") == 1
        await counted(service, 1, "branchbuild_events_total", outcome="retried")
        # A redelivery after it was sent publishes nothing; Bob's failure is the barrier.
        await pushes.ended("feature/pay", broken, "FAILED")
        await counted(service, 1, "branchbuild_notifications_total", result="duplicate")
        await pushes.repo.checkout("feature/bob")
        bobs = await pushes.push("feature/bob", 2, BOB)
        await pushes.ended("feature/bob", bobs, "FAILED")
        everything = await topic.messages(topic.everything, 2)
        assert sorted(json.loads(e["Message"])["commit"] for e in everything) == sorted(
            [broken, bobs]
        )
        await counted(service, 2, "branchbuild_notifications_total", result="published")
        assert await service.metric("branchbuild_notifications_total", result="published") == 2


# -- in-process: two instances, one notification -------------------------------------------------


async def test_two_instances_and_redeliveries_publish_once(aws: AwsResources) -> None:
    """Two service instances handle the same final state at once (a redelivery while the first
    is still at it), then again: one Publish in all, against moto's S3 and SNS."""
    session = aioboto3.Session()
    async with (
        session.client("sns", endpoint_url=aws.endpoint) as sns_a,
        session.client("sns", endpoint_url=aws.endpoint) as sns_b,
    ):
        arn = (await sns_a.create_topic(Name=f"notify-{uuid.uuid4().hex[:8]}"))["TopicArn"]
        url = (await aws.sqs.create_queue(QueueName=f"inbox-{uuid.uuid4().hex[:8]}"))["QueueUrl"]
        queue_arn = (await aws.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"]))[
            "Attributes"
        ]["QueueArn"]
        await sns_a.subscribe(TopicArn=arn, Protocol="sqs", Endpoint=queue_arn)
        settings = load_settings(**(SETTINGS | {"bucket": aws.bucket}), notify_topics=arn)
        records = Records(aws.s3, aws.bucket)
        a = Notifier(sns_a, records, settings, Metrics())
        b = Notifier(sns_b, records, settings, Metrics())
        push = Push(
            event_id="e",
            account="123456789012",
            region=REGION,
            repository="shop",
            ref_type=RefType.BRANCH,
            name="feature/pay",
            action=Action.UPDATED,
            commit="a" * 40,
            pusher=ALICE,
        )
        archive = "shop/feature/pay/" + "a" * 40 + ".zip"
        await a.started(push, StartedBuild("shop:1", "shop"), archive)
        await b.started(push, StartedBuild("shop:1", "shop"), archive)  # the job redelivered
        done = Entry("a" * 40, push.ref, "shop:1", "shop", status="FAILED")
        change = Change(archive=archive, before=None, after=done)
        busy: list[TransientError] = []

        async def handle(notifier: Notifier) -> None:
            try:
                await notifier.changed(change)
            except TransientError as exc:  # the other holds a fresh claim: retried later
                busy.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(handle, a)
            tg.start_soon(handle, b)
        await handle(b)
        await handle(a)
        published = [
            m.registry.get_sample_value(
                "branchbuild_notifications_total", {"outcome": "failed", "result": "published"}
            )
            or 0
            for m in (a.metrics, b.metrics)
        ]
        assert sorted(published) == [0, 1]
        assert not busy or "being sent" in str(busy[0])

        async def one() -> int | None:
            return await aws.count(url) or None

        assert await wait_for(one, what="the notification in the inbox") == 1
        document = json.loads(await aws.object(build_key(archive)))
        assert document["outcome"] == "failed" and document["sent"][arn]["state"] == "published"


async def test_a_build_that_ended_before_its_start_was_recorded_still_notifies(
    aws: AwsResources,
) -> None:
    """The state event of a quick build can come between the ledger's write and the
    notification's start hook: the hook finds the build ended and notifies it."""
    session = aioboto3.Session()
    async with session.client("sns", endpoint_url=aws.endpoint) as sns:
        arn = (await sns.create_topic(Name=f"notify-{uuid.uuid4().hex[:8]}"))["TopicArn"]
        url = (await aws.sqs.create_queue(QueueName=f"inbox-{uuid.uuid4().hex[:8]}"))["QueueUrl"]
        queue_arn = (await aws.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"]))[
            "Attributes"
        ]["QueueArn"]
        await sns.subscribe(TopicArn=arn, Protocol="sqs", Endpoint=queue_arn)
        settings = load_settings(**(SETTINGS | {"bucket": aws.bucket}), notify_topics=arn)
        records = Records(aws.s3, aws.bucket)
        notifier = Notifier(sns, records, settings, Metrics())
        push = Push(
            "e", "123456789012", REGION, "shop", RefType.BRANCH, "quick", Action.UPDATED, "b" * 40
        )
        archive = "shop/quick/" + "b" * 40 + ".zip"
        done = Entry("b" * 40, push.ref, "shop:2", "shop", status="FAILED")
        await Ledger(records).update(archive, lambda _: done)
        await notifier.changed(Change(archive=archive, before=None, after=done))  # too early
        assert await aws.count(url) == 0
        await notifier.started(push, StartedBuild("shop:2", "shop"), archive)

        async def one() -> int | None:
            return await aws.count(url) or None

        assert await wait_for(one, what="the notification in the inbox") == 1
        await notifier.started(push, StartedBuild("shop:2", "shop"), archive)  # the job again
        published = notifier.metrics.registry.get_sample_value(
            "branchbuild_notifications_total", {"outcome": "failed", "result": "published"}
        )
        assert published == 1
        assert await aws.count(url) == 1


async def test_a_notification_another_holder_is_sending_never_fails_the_pushs_job(
    aws: AwsResources,
) -> None:
    """A quick build's state event is publishing its notification (its claim is fresh) when
    the job's start hook finds the build ended: the hook leaves it to that holder. It raised
    'is being sent', so the built push's job was retried, then dead-lettered, and a
    'dead_lettered' notification went out for a push that was built (seen in CI)."""
    session = aioboto3.Session()
    async with session.client("sns", endpoint_url=aws.endpoint) as sns:
        arn = (await sns.create_topic(Name=f"notify-{uuid.uuid4().hex[:8]}"))["TopicArn"]
        settings = load_settings(**(SETTINGS | {"bucket": aws.bucket}), notify_topics=arn)
        records = Records(aws.s3, aws.bucket)
        notifier = Notifier(sns, records, settings, Metrics())
        push = Push(
            "e", "123456789012", REGION, "shop", RefType.BRANCH, "held", Action.UPDATED, "d" * 40
        )
        archive = "shop/held/" + "d" * 40 + ".zip"
        build = StartedBuild("shop:4", "shop")
        await notifier.started(push, build, archive)  # the job, before the build ended
        done = Entry("d" * 40, push.ref, "shop:4", "shop", status="FAILED")
        await Ledger(records).update(archive, lambda _: done)
        # The state event's handler decided the outcome and holds a fresh claim on the topic
        # (it is publishing).
        holder = {"state": "pending", "token": "theirs", "at": time.time()}
        decided = {"outcome": "failed", "topics": [arn], "decided_at": "x", "sent": {arn: holder}}
        await records.update(build_key(archive), lambda doc: (doc or {}) | decided)
        with pytest.raises(NotificationBusy):  # what that state event's path would see
            await notifier.changed(Change(archive=archive, before=None, after=done))
        await notifier.started(push, build, archive)  # the job redelivered: no raise
        document = json.loads(await aws.object(build_key(archive)))
        assert document["sent"][arn] == holder  # left to its holder


async def test_a_refused_notification_never_fails_the_pushs_job(aws: AwsResources) -> None:
    """The start hook finds the build ended and notifies it, but SNS refuses for good (no such
    topic): the job's hook returns (the push was built; the state event's path reports the
    refusal), and the error is counted."""
    session = aioboto3.Session()
    async with session.client("sns", endpoint_url=aws.endpoint) as sns:
        arn = f"arn:aws:sns:{REGION}:123456789012:no-such-topic-{uuid.uuid4().hex[:8]}"
        settings = load_settings(**(SETTINGS | {"bucket": aws.bucket}), notify_topics=arn)
        records = Records(aws.s3, aws.bucket)
        notifier = Notifier(sns, records, settings, Metrics())
        push = Push(
            "e", "123456789012", REGION, "shop", RefType.BRANCH, "gone", Action.UPDATED, "c" * 40
        )
        archive = "shop/gone/" + "c" * 40 + ".zip"
        done = Entry("c" * 40, push.ref, "shop:3", "shop", status="FAILED")
        await Ledger(records).update(archive, lambda _: done)
        await notifier.started(push, StartedBuild("shop:3", "shop"), archive)  # no raise
        with pytest.raises(NotificationRefused):  # what the state event's path sees
            await notifier.changed(Change(archive=archive, before=None, after=done))
        errors = notifier.metrics.registry.get_sample_value
        assert errors("branchbuild_errors_total", {"kind": "notification_refused"}) == 1
