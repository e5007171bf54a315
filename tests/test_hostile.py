"""Hostile input through the real service: names, bodies, accounts; secrets; a flood.

None crashes the service, none runs anything, none writes outside its S3 prefix; each gets
a clear logged reason and the right outcome.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import anyio
import pytest

from service.events import codecommit_event
from service.records import STATE_PREFIX
from tests.helpers import (
    ROOT,
    AwsResources,
    GitWorld,
    StartService,
    WorkCopy,
    create_project,
    wait_for,
)

pytestmark = pytest.mark.e2e

CORPUS = Path(__file__).parent / "corpus"

# Valid git branch names that look like shell: built under their exact names, nothing runs.
SHELLY = ["$(touch${IFS}pwned1)", "`touch${IFS}pwned2`", "a;touch${IFS}pwned3", "feature/ünïcödé"]


async def rss_kib(pid: int) -> int:
    status = await anyio.Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


async def test_hostile_events_are_refused_or_built_safely(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    await create_project(aws, "shop")
    repo = await WorkCopy.create(git_world, tmp_path, "shop")
    commit = await repo.commit({"README": "shop\n"})
    for name in SHELLY:
        await repo.push(f"main:refs/heads/{name}")
    service = await start_service(
        BRANCHBUILD_ALLOWED_ACCOUNTS="123456789012", BRANCHBUILD_ALLOWED_REPOSITORIES="shop"
    )
    for change in git_world.changes:
        await aws.send_event(codecommit_event(change))
    # A large but valid event (unknown fields are ignored): built like any other.
    big = codecommit_event(git_world.changes[0])
    big["detail"]["referenceName"] = big["detail"]["referenceFullName"] = None
    big["detail"] |= {
        "referenceName": "big",
        "referenceFullName": "refs/heads/big",
        "pad": "x" * 200_000,
    }
    await repo.push("main:big")
    await aws.send_event(big)
    hostile: list[str] = [p.read_text(errors="replace") for p in sorted(CORPUS.glob("*.json"))]
    hostile = [body for body in hostile if len(body.encode()) < 256 * 1024]  # SQS's own limit
    foreign = codecommit_event(git_world.changes[0], account="999999999999")
    elsewhere = codecommit_event(git_world.changes[0])
    elsewhere["detail"]["repositoryName"] = "other"
    for body in [*hostile, json.dumps(foreign), json.dumps(elsewhere)]:
        await aws.send_event(body)

    expected_builds = len(SHELLY) + 1

    async def settled() -> bool:
        builds = len(await aws.start_builds())
        dead = await aws.sqs.get_queue_attributes(
            QueueUrl=aws.intake_dlq_url, AttributeNames=["ApproximateNumberOfMessages"]
        )
        return (
            builds == expected_builds
            and int(dead["Attributes"]["ApproximateNumberOfMessages"]) == len(hostile) + 2
        )

    await wait_for(settled, within=120, what="every event settled")
    # Archives and ledgers stay under the repository; the rest is branchbuild's own state.
    keys = [key for key in await aws.keys() if not key.startswith(STATE_PREFIX)]
    assert keys and all(key.startswith("shop/") for key in keys), keys
    built = {r["environmentVariablesOverride"][1]["value"] for r in await aws.start_builds()}
    assert built == {*SHELLY, "big"}
    for name in SHELLY:
        assert f"shop/{name}/{commit}.zip" in keys
    # Nothing ran: no file created anywhere the service could have run a command.
    for folder in (ROOT, tmp_path, Path.cwd()):
        assert not list(folder.rglob("pwned*"))
    reasons = []
    while True:
        reply = await aws.sqs.receive_message(
            QueueUrl=aws.intake_dlq_url, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
        )
        if not reply.get("Messages"):
            break
        for message in reply["Messages"]:
            attributes = message.get("MessageAttributes", {})
            reasons.append(attributes["branchbuild.reason"]["StringValue"])
            await aws.sqs.delete_message(
                QueueUrl=aws.intake_dlq_url, ReceiptHandle=message["ReceiptHandle"]
            )
    assert len(reasons) == len(hostile) + 2 and all(reasons)
    assert any("BRANCHBUILD_ALLOWED_ACCOUNTS" in r for r in reasons)
    assert any("BRANCHBUILD_ALLOWED_REPOSITORIES" in r for r in reasons)
    assert any("invalid ref name" in r for r in reasons)
    assert (await service.get("/healthz"))[0] == 200


async def test_secrets_never_leave_the_process(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    key_material = git_world.key.read_text()
    secret = "aws-secret-that-must-not-leak-0123456789"
    await create_project(aws, "vault")
    repo = await WorkCopy.create(git_world, tmp_path, "vault")
    await repo.commit({"a.txt": "x"})
    await repo.push("main:feature/ok")
    service = await start_service(
        AWS_SECRET_ACCESS_KEY=secret,
        BRANCHBUILD_SSH_KEY_FILE="",
        BRANCHBUILD_SSH_PRIVATE_KEY=key_material,
        BRANCHBUILD_LOG_LEVEL="DEBUG",
    )
    await aws.send_event(codecommit_event(git_world.changes[-1]))

    async def first_built() -> bool:
        return await service.metric("branchbuild_jobs_total", outcome="built") == 1

    await wait_for(first_built, within=60, what="the first build")
    # And a failure path: a host key mismatch, whose error text is logged and dead-lettered.
    repo2 = await WorkCopy.create(git_world, tmp_path, "vault2")
    await repo2.commit({"b.txt": "y"})
    await repo2.push("main:feature/ko")
    git_world.known_hosts.write_text("")  # the pinned key is gone: every fetch is refused
    await aws.send_event(codecommit_event(git_world.changes[-1]))

    async def built() -> bool:
        return await service.metric("branchbuild_jobs_total", outcome="built") == 1

    async def done() -> bool:
        return await service.metric("branchbuild_jobs_total", outcome="dead_lettered") == 1

    await wait_for(done, within=90, what="the dead letter")
    assert await built()
    _, metrics = await service.get("/metrics")
    dead = await aws.dlq_messages(aws.work_dlq_url)
    archives = [await aws.object(k) for k in await aws.keys() if k.endswith(".zip")]
    texts = [service.logs(), metrics, json.dumps(dead)]
    for archive in archives:
        with zipfile.ZipFile(io.BytesIO(archive)) as z:
            texts += [z.read(n).decode(errors="replace") for n in z.namelist()]
    body_line = key_material.splitlines()[1]  # a line of the key's base64 body
    for text in texts:
        assert secret not in text
        assert body_line not in text
    assert "host key" in json.dumps(dead)


async def test_memory_stays_bounded_under_a_flood(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    repo = await WorkCopy.create(git_world, tmp_path, "flood")
    await repo.commit({"a.txt": "x"})
    await repo.push("main:develop")
    service = await start_service()
    assert service.process is not None
    event: dict[str, Any] = codecommit_event(git_world.changes[-1])
    peak = 0
    entries = []
    for i in range(600):
        event["id"] = f"flood-{i}"
        event["detail"]["pad"] = "p" * 20_000  # ~20 KiB events: 12 MB of intake in all
        entries.append(
            {
                "Id": str(i % 10),
                "MessageBody": json.dumps(event),
                "MessageGroupId": "codecommit",
                "MessageDeduplicationId": f"flood-{i}",
            }
        )
        if len(entries) == 10:
            await aws.sqs.send_message_batch(QueueUrl=aws.intake_url, Entries=entries)  # type: ignore[arg-type]
            entries = []
            peak = max(peak, await rss_kib(service.process.pid))

    async def drained() -> bool:
        nonlocal peak
        peak = max(peak, await rss_kib(service.process.pid))  # type: ignore[union-attr]
        return await service.metric("branchbuild_events_total", outcome="protected") == 600

    await wait_for(drained, within=120, what="600 events handled")
    assert peak < 200 * 1024, f"peak RSS {peak} KiB"
