"""Capacity scheduling end to end: the service as real processes, moto's SQS and S3, the real
git host, and the CodeBuild stand-in (localdev/codebuild.py) that runs out of capacity
as CodeBuild does: a concurrency quota, a queue of 5× the quota, then
``AccountLimitExceededException``; its builds end when the test says so, and their state
events go to the intake queue as EventBridge would put them.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aioboto3
import anyio
import pytest
from aiobotocore.config import AioConfig
from botocore.retries import standard

from localdev.codebuild import CodeBuildStandIn
from service.build_state import Change
from service.builds import THROTTLE_CODES, BuildRequest, CodeBuild, StartedBuild
from service.errors import BuildError, CapacityRefused, ConfigurationError
from service.events import Action, codecommit_event, parse_work
from service.ledger import Entry
from service.metrics import Metrics
from service.outcome import Outcome
from service.pipelines import Pipelines, Rule, parse_config
from service.queue import Queue
from service.records import Records
from service.scheduler import (
    RUNNING_KEY,
    WAITING_PREFIX,
    Scheduler,
    WaitingPush,
    dispatch_order,
    running_builds,
)
from service.settings import Settings
from tests.helpers import (
    AwsResources,
    GitWorld,
    ServiceProcess,
    StartService,
    WorkCopy,
    push_for,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

# Fast enough for tests; the defaults are documented in docs/capacity.md.
FAST = {
    "BRANCHBUILD_CAPACITY_PROBE_INTERVAL": "0.3",
    "BRANCHBUILD_RUNNING_RECONCILE_INTERVAL": "1",
}

PRIORITIES = """
version: 1
rules:
  - repository: app
    priority: 10
"""


@dataclass
class World:
    aws: AwsResources
    git: GitWorld
    tmp: Path
    codebuild: CodeBuildStandIn
    repos: dict[str, WorkCopy] = field(default_factory=dict)
    newest: dict[tuple[str, str], str] = field(default_factory=dict)

    async def push(self, repository: str, branch: str, content: str) -> str:
        """Commit on ``branch`` and push it; its event goes to the intake queue."""
        if repository not in self.repos:
            self.repos[repository] = await WorkCopy.create(self.git, self.tmp, repository)
        repo = self.repos[repository]
        commit = await repo.commit({f"{branch}.txt": content}, message=f"{branch} {content}")
        await repo.push(f"HEAD:refs/heads/{branch}")
        await self.aws.send_event(codecommit_event(self.git.changes[-1]))
        self.newest[(repository, branch)] = commit
        return commit

    async def waiting(self) -> dict[tuple[str, str], dict[str, Any]]:
        """The waiting store, by (repository, branch)."""
        reply = await self.aws.s3.list_objects_v2(Bucket=self.aws.bucket, Prefix=WAITING_PREFIX)
        found = {}
        for item in reply.get("Contents", []):
            data = json.loads(await self.aws.object(item["Key"]))
            if "push" in data:
                push = json.loads(data["push"])
                found[(push["repository"], push["name"])] = data | {"commit": push["commit"]}
        return found

    def built(self) -> list[tuple[str, str, str]]:
        """(repository, branch, commit) of each build branchbuild started, in order."""
        return [
            (b.variables["REPOSITORY_NAME"], b.variables["BRANCH_NAME"], b.variables["COMMIT_ID"])
            for b in self.codebuild.started_by()
        ]

    async def dead_letters(self) -> int:
        return await self.aws.count(self.aws.work_dlq_url) + await self.aws.count(
            self.aws.intake_dlq_url
        )


@pytest.fixture
async def world(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[World]:
    async def forward(event: dict[str, Any]) -> None:  # EventBridge's BuildStateRule
        await aws.send_event(event)

    async with CodeBuildStandIn(quota=1, on_event=forward) as codebuild:
        monkeypatch.setenv("AWS_ENDPOINT_URL_CODEBUILD", codebuild.endpoint)
        yield World(aws, git_world, tmp_path, codebuild)


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "pipelines.yaml"
    path.write_text(text)
    return str(path)


async def finish_one_at_a_time(world: World, expected: int) -> list[float]:
    """End the oldest active build, once at a time, until ``expected`` of branchbuild's builds
    were accepted: each end frees one place, so each start is the scheduler's choice. Returns
    the seconds from each end to the start it allowed."""
    cb = world.codebuild
    resumed = []
    while len(cb.started_by()) < expected:
        before = len(cb.started_by())
        oldest = min(cb.active, key=lambda b: b.requested)
        freed = time.monotonic()
        await cb.finish(oldest.id)

        async def one_more(before: int = before) -> bool:
            return len(cb.started_by()) > before

        await wait_for(one_more, within=60, what=f"build {before + 1} of {expected}")
        resumed.append(time.monotonic() - freed)
    return resumed


async def test_a_burst_at_quota_1_waits_supersedes_and_starts_by_priority_and_fairness(
    world: World, start_service: StartService, tmp_path: Path
) -> None:
    """The account's queue is full (quota 1: one running, five queued, all someone else's)
    for longer than several visibility timeouts and redeliveries: nothing is dead-lettered,
    each branch's newest push is built exactly once, the intermediate ones are superseded
    while they wait, and the starts follow priority, then round robin across repositories."""
    cb = world.codebuild
    await cb.occupy(6)
    full_since = time.monotonic()
    service = await start_service(BRANCHBUILD_CONFIG=config(tmp_path, PRIORITIES), **FAST)
    first_round = [
        ("web", "feature/a"),
        ("web", "feature/b"),
        ("web", "feature/c"),
        ("lib", "feature/a"),
        ("app", "feature/a"),
        ("lib", "feature/b"),
        ("app", "feature/b"),
    ]
    for n, (repository, branch) in enumerate(first_round, 1):
        await world.push(repository, branch, "1")

        # One at a time, so that the branches' places in line are the order of the pushes
        # (jobs of different branches run in parallel and may end in any order).
        async def settled(n: int = n) -> bool:  # waiting, or (the old code) dead-lettered
            return len(await world.waiting()) + await world.dead_letters() == n

        await wait_for(settled, within=120, what=f"push {n} waiting or dead-lettered")
    assert await world.dead_letters() == 0

    # Newer pushes of waiting branches replace the waiting ones, one after the other.
    for content in ("2", "3"):
        for repository, branch in (("web", "feature/a"), ("lib", "feature/b")):
            commit = await world.push(repository, branch, content)

            async def replaced(
                key: tuple[str, str] = (repository, branch), c: str = commit
            ) -> bool:
                return (await world.waiting()).get(key, {}).get("commit") == c

            await wait_for(replaced, within=60, what=f"{repository} {branch} waiting at {commit}")

    # Stay full for several visibility timeouts (6 s) and the redeliveries they would cause.
    async def refused_long() -> bool:
        return cb.refusals.get("AccountLimitExceededException", 0) >= 60  # probes 0.3 s apart

    await wait_for(refused_long, within=120, what="CodeBuild refusing for over 18 s")
    assert await world.dead_letters() == 0
    assert await world.aws.count(world.aws.work_url) == 0  # nothing held in SQS while waiting
    assert world.built() == []
    assert await service.metric("branchbuild_waiting_pushes", reason="account_queue_full") == 7

    async def counted() -> bool:  # (the last refusal's answer may still be on its way)
        return await service.metric("branchbuild_capacity_refusals_total") >= 60

    await wait_for(counted, what="the refusals counted")

    full_for = time.monotonic() - full_since
    resumed = await finish_one_at_a_time(world, expected=len(first_round))
    order = [(repository, branch) for repository, branch, _ in world.built()]
    assert order == [
        ("app", "feature/a"),  # priority 10 first
        ("app", "feature/b"),
        ("web", "feature/a"),  # then one per repository in turn, each in its own order
        ("lib", "feature/a"),
        ("web", "feature/b"),
        ("lib", "feature/b"),
        ("web", "feature/c"),
    ]
    assert sorted(world.built()) == sorted((r, b, c) for (r, b), c in world.newest.items())
    assert await world.dead_letters() == 0
    assert await service.metric("branchbuild_jobs_total", outcome="superseded") == 4
    await service.metric_reaches(0, "branchbuild_waiting_pushes")
    assert await service.metric("branchbuild_wait_duration_seconds_count") == len(first_round)
    pushes = len(first_round) + 4
    report(
        "CodeBuild full (quota 1, queue 5 taken by others), a burst of pushes",
        [
            ("pushes (one StartBuild each without the scheduler)", str(pushes)),
            ("builds started with the scheduler", str(len(world.built()))),
            ("builds saved by superseding while waiting", str(pushes - len(world.built()))),
            ("dead-lettered", str(await world.dead_letters())),
            ("CodeBuild full for", f"{full_for:.1f} s"),
            ("capacity back -> first start", f"{resumed[0]:.2f} s"),
            ("capacity back -> start, longest", f"{max(resumed):.2f} s"),
            ("probe interval (default 5 s)", f"{FAST['BRANCHBUILD_CAPACITY_PROBE_INTERVAL']} s"),
        ],
    )


def report(title: str, rows: list[tuple[str, str]]) -> None:
    """The figures `make chaos` prints (pytest -s); captured, and silent, otherwise."""
    width = max(len(name) for name, _ in rows)
    lines = [title] + [f"  {name.ljust(width)}  {value}" for name, value in rows]
    print("\n" + "\n".join(lines))  # noqa: T201


async def test_three_instances_never_run_more_than_max_running(
    world: World, start_service: StartService
) -> None:
    cb = world.codebuild
    cb.quota = 20  # CodeBuild has room: only branchbuild's own limit holds builds back
    services = [await start_service(BRANCHBUILD_MAX_RUNNING="2", **FAST) for _ in range(3)]
    branches = [(f"repo{r}", f"feature/{b}") for r in range(3) for b in range(3)]
    for repository, branch in branches:
        await world.push(repository, branch, "1")

    while len(cb.started_by()) < len(branches) or cb.active:

        async def progress() -> bool:
            return len(cb.active) == 2 or (len(cb.started_by()) == len(branches))

        try:
            await wait_for(progress, within=60, what="two builds running, or all started")
        except TimeoutError as stuck:  # what held the slots (a CI run once stopped here)
            running = await running_builds(Records(world.aws.s3, world.aws.bucket))
            raise AssertionError(
                f"{stuck}: active {[b.id for b in cb.active]}, started {len(cb.started_by())}"
                f", running set {running}, waiting {sorted(await world.waiting())}"
            ) from None
        assert cb.most_active <= 2
        if cb.active:
            await cb.finish(min(cb.active, key=lambda b: b.requested).id)
    assert cb.most_active == 2
    assert sorted(world.built()) == sorted((r, b, c) for (r, b), c in world.newest.items())
    assert await world.dead_letters() == 0
    for service in services:
        assert (await service.get("/healthz"))[0] == 200


async def test_pushes_waiting_on_a_killed_instance_are_built_by_another(
    world: World, start_service: StartService
) -> None:
    cb = world.codebuild
    await cb.occupy(6)
    first = await start_service(**FAST)
    branches = [("kill", f"feature/{n}") for n in range(3)] + [("other", "feature/x")]
    for repository, branch in branches:
        await world.push(repository, branch, "1")

    async def all_waiting() -> bool:
        return len(await world.waiting()) == len(branches)

    await wait_for(all_waiting, within=60, what="every push waiting")
    refused = cb.refusals.get("AccountLimitExceededException", 0)

    async def probing() -> bool:  # killed while it probes (and holds a claim)
        return cb.refusals.get("AccountLimitExceededException", 0) > refused + 2

    await wait_for(probing, within=30, what="the first instance probing")
    first.signal(signal.SIGKILL)
    await first.wait()
    await start_service(**FAST)
    await finish_one_at_a_time(world, expected=len(branches))
    assert sorted(world.built()) == sorted((r, b, c) for (r, b), c in world.newest.items())

    async def store_empty() -> bool:  # (the last start is recorded just after StartBuild)
        return await world.waiting() == {}

    await wait_for(store_empty, what="the waiting store to empty")
    assert await world.dead_letters() == 0


async def test_sigterm_stops_the_dispatcher_and_the_waiting_pushes_stay(
    world: World, start_service: StartService
) -> None:
    await world.codebuild.occupy(6)
    service = await start_service(**FAST)
    for branch in ("feature/a", "feature/b"):
        await world.push("term", branch, "1")

    async def both_waiting() -> bool:
        return len(await world.waiting()) == 2

    await wait_for(both_waiting, what="both pushes waiting")
    service.signal(signal.SIGTERM)
    assert await service.wait(within=20) == 0
    assert "dispatcher stopped" in service.logs()
    assert {w["commit"] for w in (await world.waiting()).values()} == {
        world.newest[("term", "feature/a")],
        world.newest[("term", "feature/b")],
    }
    assert await world.dead_letters() == 0


async def test_a_lost_final_event_frees_its_slot_through_batch_get_builds(
    world: World, start_service: StartService
) -> None:
    cb = world.codebuild
    cb.quota = 5
    service: ServiceProcess = await start_service(BRANCHBUILD_MAX_RUNNING="1", **FAST)
    await world.push("lost", "feature/a", "1")
    await wait_for(lambda: _count(cb, 1), what="the first build")
    await cb.finish(cb.started_by()[0].id, emit=False)  # its SUCCEEDED event never comes
    await world.push("lost", "feature/b", "1")
    await wait_for(lambda: _count(cb, 2), what="the second build, once the slot is freed")
    assert [p for op, p in cb.requests if op == "BatchGetBuilds"]
    assert sorted(world.built()) == sorted((r, b, c) for (r, b), c in world.newest.items())
    assert (await service.get("/healthz"))[0] == 200


async def _count(cb: CodeBuildStandIn, n: int) -> bool:
    return len(cb.started_by()) >= n


def test_dispatch_order_is_priority_then_round_robin_across_repositories() -> None:
    def entry(repository: str, branch: str, since: float, priority: int = 0) -> WaitingPush:
        push = push_for(repository, branch)
        request = BuildRequest(push=push, project=repository, bucket="b", key=f"{branch}.zip")
        return WaitingPush("k", request, "rule", priority, "account_queue_full", since, None, 0)

    entries = [
        entry("big", "b1", 1),
        entry("big", "b2", 2),
        entry("big", "b3", 3),
        entry("small", "s1", 4),
        entry("urgent", "u1", 9, priority=5),
    ]
    order = [(e.push.repository, e.push.name) for e in dispatch_order(entries)]
    assert order == [
        ("urgent", "u1"),
        ("big", "b1"),
        ("small", "s1"),  # one burst of "big" does not starve "small"
        ("big", "b2"),
        ("big", "b3"),
    ]


# -- in-process: the scheduler against moto's S3 and SQS ----------------------------------------


def scheduler_for(aws: AwsResources, **overrides: Any) -> tuple[Scheduler, Metrics]:
    settings = Settings(
        queue_url=aws.intake_url, work_queue_url=aws.work_url, bucket=aws.bucket, **overrides
    )
    metrics = Metrics()
    work = Queue(aws.sqs, aws.work_url, name="work")
    work.dead_letter_url = aws.work_dlq_url
    pipelines = Pipelines.from_settings(settings)
    return Scheduler(Records(aws.s3, aws.bucket), settings, metrics, pipelines, work), metrics


def request_for(
    aws: AwsResources, repository: str, branch: str, commit: str | None = None
) -> BuildRequest:
    push = push_for(repository, branch, commit, time="2026-12-06T03:00:00Z")
    return BuildRequest(push=push, project=repository, bucket=aws.bucket, key=f"{branch}.zip")


async def test_a_rule_max_running_holds_its_own_builds_back_only(aws: AwsResources) -> None:
    scheduler, _ = scheduler_for(aws)
    limited = replace(Rule.from_settings(scheduler.settings), name="limited", max_running=1)
    free = Rule.from_settings(scheduler.settings)
    first, second = request_for(aws, "a", "one"), request_for(aws, "a", "two")
    assert await scheduler.admit(first, limited) is None  # a slot reserved
    assert await scheduler.admit(second, limited) == "rule_limit"
    assert await scheduler.admit(request_for(aws, "b", "x"), free) is None  # not counted
    await scheduler.started(first, limited, StartedBuild("a:1", "a"))
    assert [b["build_id"] for b in (await running_builds(scheduler.records)).values()] == ["a:1"]
    await scheduler.build_changed(
        Change(
            archive=first.key,
            before=None,
            after=Entry(
                commit="1" * 40, ref="refs/heads/one", build_id="a:1", project="a", status="FAILED"
            ),
        )
    )
    assert await running_builds(scheduler.records) == {}
    assert await scheduler.admit(second, limited) is None


async def test_a_push_waiting_longer_than_max_wait_is_dead_lettered_with_that_reason(
    aws: AwsResources,
) -> None:
    scheduler, metrics = scheduler_for(aws, max_wait=0.01)
    rule = Rule.from_settings(scheduler.settings)
    request = request_for(aws, "shop", "feature/slow")
    assert await scheduler.wait(request, rule, "account_queue_full") is Outcome.WAITING
    await anyio.sleep(0.05)  # older than max_wait (0.01 s): the point of this test

    async def never(request: BuildRequest) -> StartedBuild:
        raise AssertionError("an expired push must not start")

    assert await scheduler.dispatch(never) == 0
    [(body, attributes)] = await aws.dlq_messages(aws.work_dlq_url)
    assert parse_work(body) == request.push
    assert attributes["branchbuild.error_kind"] == "capacity_timeout"
    assert "waited longer than BRANCHBUILD_MAX_WAIT" in attributes["branchbuild.reason"]
    assert "account_queue_full" in attributes["branchbuild.reason"]
    assert await scheduler.listing() == []
    sample = metrics.registry.get_sample_value
    assert sample("branchbuild_jobs_total", {"outcome": "dead_lettered"}) == 1


@pytest.mark.parametrize(
    "failure",
    [BuildError("CodeBuild answered InternalFailure"), RuntimeError("a bug in the start")],
    ids=["transient", "unexpected"],
)
async def test_a_push_whose_start_keeps_failing_never_holds_back_the_pushes_behind_it(
    aws: AwsResources, failure: Exception
) -> None:
    """A waiting push whose StartBuild fails for a reason other than capacity is tried again
    every round, and the round goes on to the pushes behind it (it stopped every round, so
    they waited until BRANCHBUILD_MAX_WAIT and were dead-lettered as capacity timeouts); once
    its own wait is over it is dead-lettered with its last error, not as a capacity timeout."""
    scheduler, metrics = scheduler_for(aws)
    rule = Rule.from_settings(scheduler.settings)
    failing = request_for(aws, "shop", "feature/broken")
    behind = request_for(aws, "shop", "feature/fine")
    assert await scheduler.wait(failing, rule, "account_queue_full") is Outcome.WAITING
    assert await scheduler.wait(behind, rule, "behind") is Outcome.WAITING
    tried: list[str] = []

    async def start(request: BuildRequest) -> StartedBuild:
        tried.append(request.push.ref)
        if request.push.ref == failing.push.ref:
            raise failure
        return StartedBuild(f"shop:{len(tried)}", "shop")

    for _ in range(2):
        assert await scheduler.dispatch(start) == 1
    assert tried == [failing.push.ref, behind.push.ref, failing.push.ref]
    [waiting] = await scheduler.listing()
    assert (waiting.push.ref, waiting.reason) == (failing.push.ref, "start_failed")
    assert str(failure) in waiting.error
    sample = metrics.registry.get_sample_value
    assert sample("branchbuild_waiting_pushes", {"reason": "start_failed"}) == 1
    assert await aws.dlq_messages(aws.work_dlq_url) == []

    scheduler.settings = scheduler.settings.model_copy(update={"max_wait": 0.01})
    await anyio.sleep(0.05)
    assert await scheduler.dispatch(start) == 0
    [(body, attributes)] = await aws.dlq_messages(aws.work_dlq_url)
    assert parse_work(body) == failing.push
    assert attributes["branchbuild.error_kind"] == "start_failed"
    assert str(failure) in attributes["branchbuild.reason"]
    assert "could not be started" in attributes["branchbuild.reason"]


async def test_an_older_push_does_not_replace_a_newer_waiting_one(aws: AwsResources) -> None:
    scheduler, _ = scheduler_for(aws)
    rule = Rule.from_settings(scheduler.settings)
    newer = request_for(aws, "shop", "feature/x", "b" * 40)
    older = BuildRequest(
        push=replace(newer.push, commit="a" * 40, time="2026-12-06T02:00:00Z"),
        project="shop",
        bucket=aws.bucket,
        key="old.zip",
    )
    assert await scheduler.wait(newer, rule, "account_queue_full") is Outcome.WAITING
    assert await scheduler.wait(older, rule, "behind") is Outcome.SUPERSEDED  # a redriven one
    assert await scheduler.wait(newer, rule, "behind") is Outcome.WAITING  # a redelivery
    [waiting] = await scheduler.listing()
    assert waiting.push.commit == "b" * 40
    assert waiting.reason == "account_queue_full"


def test_rules_take_a_priority_and_a_running_limit() -> None:
    text = (
        "version: 1\nrules:\n  - repository: app\n    priority: 10\n    max_running: 3\n"
        "  - repository: other\n"
    )
    s = Settings(queue_url="q", work_queue_url="w", bucket="bucket")
    config = parse_config(text, "p.yaml", s)
    assert (config.rule_for("app").priority, config.rule_for("app").max_running) == (10, 3)
    assert (config.rule_for("other").priority, config.rule_for("other").max_running) == (0, None)
    with pytest.raises(ConfigurationError, match=r"p.yaml:5: rules\[0\].max_running"):
        parse_config(text.replace("max_running: 3", "max_running: 0"), "p.yaml", s)


async def test_a_deleted_branch_has_no_push_left_waiting(aws: AwsResources) -> None:
    scheduler, _ = scheduler_for(aws)
    rule = Rule.from_settings(scheduler.settings)
    request = request_for(aws, "shop", "feature/gone")
    await scheduler.wait(request, rule, "account_queue_full")
    await scheduler.wait(request_for(aws, "shop", "feature/kept"), rule, "behind")
    await scheduler.forget(replace(request.push, action=Action.DELETED, commit=None))
    assert [w.push.name for w in await scheduler.listing()] == ["feature/kept"]


async def test_an_instance_that_loses_the_claim_never_frees_the_winners_slot(
    aws: AwsResources,
) -> None:
    """Two dispatchers on one waiting push: the one that claimed it reserves its slot and
    starts it; the other, which listed it too, must not free that slot on its way out (it did:
    it reserved first, found the slot "already ours", lost the claim and released it, so a
    third build could start beyond BRANCHBUILD_MAX_RUNNING)."""
    winner, _ = scheduler_for(aws, max_running=1)
    loser, _ = scheduler_for(aws, max_running=1)
    rule = Rule.from_settings(winner.settings)
    request = request_for(aws, "shop", "feature/raced")
    assert await winner.wait(request, rule, "account_queue_full") is Outcome.WAITING
    [entry] = await loser.listing()  # both listed it
    assert await winner._claim(entry)
    assert await winner._reserve(entry.request, rule) is None  # about to StartBuild

    async def never(request: BuildRequest) -> StartedBuild:
        raise AssertionError("the push is the other instance's to start")

    assert await loser._try(entry, never) is None
    assert list(await running_builds(loser.records)) == [request.idempotency_token]
    other = request_for(aws, "shop", "feature/other")
    assert await loser.admit(other, rule) is not None  # the one slot is still taken


# -- in-process: every kind of capacity refusal, over HTTP from the CodeBuild stand-in ----------

# Throttling as the services name it (botocore's standard retry mode's throttle codes, which a
# proxy or another region's front end may answer), and a bare HTTP 429 without a code.
THROTTLES = [
    ("ThrottlingException", 400),
    ("TooManyRequestsException", 400),
    ("RequestLimitExceeded", 400),
    ("Throttling", 400),
    ("RequestThrottledException", 400),
    ("SlowDown", 503),
    ("", 429),
]


@asynccontextmanager
async def standin_backend(codebuild: CodeBuildStandIn) -> AsyncIterator[CodeBuild]:
    """The production backend over HTTP to the stand-in; one attempt a call (botocore's own
    retries of a throttle would only make the test slower: what reaches branchbuild is the
    last attempt's refusal either way)."""
    config = AioConfig(retries={"mode": "standard", "total_max_attempts": 1})
    session = aioboto3.Session()
    async with session.client("codebuild", endpoint_url=codebuild.endpoint, config=config) as c:
        yield CodeBuild(c)


@pytest.mark.parametrize(("code", "status"), THROTTLES)
async def test_every_throttle_code_is_a_capacity_refusal_not_a_failure(
    code: str, status: int
) -> None:
    async with CodeBuildStandIn(quota=1) as cb, standin_backend(cb) as backend:
        cb.throttle(1, code=code, status=status)
        request = BuildRequest(push_for("shop", "feature/t"), "shop", "bucket", "t.zip")
        with pytest.raises(CapacityRefused) as refused:
            await backend.start(request)
        assert refused.value.reason == "throttled"
        assert (await backend.start(request)).build_id == cb.started_by()[0].id


def test_the_throttle_codes_cover_botocores() -> None:
    """A botocore upgrade that names a new throttle code fails here, not in production."""
    botocores = vars(standard.ThrottledRetryableChecker)["_THROTTLED_ERROR_CODES"]
    assert botocores and set(botocores) <= THROTTLE_CODES


@pytest.mark.parametrize(
    ("quota", "occupied", "limits", "reason"),
    [
        (0, {}, {}, "account_queue_full"),  # "... more than 0 builds in queue for the account"
        (1, {"someone-else": 6}, {}, "account_queue_full"),  # one running, five queued
        (5, {"shop": 2}, {"shop": 2}, "project_limit"),  # the project's concurrentBuildLimit
    ],
)
async def test_account_limit_refusals_are_capacity_refusals_with_their_reason(
    quota: int, occupied: dict[str, int], limits: dict[str, int], reason: str
) -> None:
    async with (
        CodeBuildStandIn(quota=quota, project_limits=limits) as cb,
        standin_backend(cb) as backend,
    ):
        for project, count in occupied.items():
            await cb.occupy(count, project=project)
        request = BuildRequest(push_for("shop", "feature/q"), "shop", "bucket", "q.zip")
        with pytest.raises(CapacityRefused) as refused:
            await backend.start(request)
        assert refused.value.reason == reason
        assert cb.refusals == {"AccountLimitExceededException": 1}


async def test_waiting_pushes_behind_a_throttle_and_a_project_limit(aws: AwsResources) -> None:
    """A throttle (of a code other than ThrottlingException) holds the whole round back and
    every push waits for it; a project at its concurrentBuildLimit holds back only its own
    pushes; each push starts exactly once when its capacity returns, and the refusals are
    counted by reason, apart from failures."""
    async with (
        CodeBuildStandIn(quota=5, project_limits={"a": 1}) as cb,
        standin_backend(cb) as backend,
    ):
        scheduler, metrics = scheduler_for(aws)
        rule = Rule.from_settings(scheduler.settings)
        [other] = await cb.occupy(1, project="a")  # project a is at its limit
        requests = [request_for(aws, name, "feature/w") for name in ("a", "b", "c")]
        for request in requests:
            await scheduler.wait(request, rule, "account_queue_full")
        sample = metrics.registry.get_sample_value

        cb.throttle(1, code="TooManyRequestsException")
        assert await scheduler.dispatch(backend.start) == 3
        assert cb.started_by() == []
        assert sample("branchbuild_capacity_refusals_total", {"reason": "throttled"}) == 1
        # The first refused (as it now says), the two behind it untried (their last reason).
        assert sample("branchbuild_waiting_pushes", {"reason": "throttled"}) == 1
        assert sample("branchbuild_waiting_pushes", {"reason": "account_queue_full"}) == 2
        assert {w.push.repository: w.reason for w in await scheduler.listing()} == {
            "a": "throttled",
            "b": "account_queue_full",
            "c": "account_queue_full",
        }

        assert await scheduler.dispatch(backend.start) == 1  # b and c start, a waits
        assert [b.project for b in cb.started_by()] == ["b", "c"]
        [waiting] = await scheduler.listing()
        assert (waiting.push.repository, waiting.reason) == ("a", "project_limit")
        assert sample("branchbuild_capacity_refusals_total", {"reason": "project_limit"}) == 1
        assert sample("branchbuild_waiting_pushes", {"reason": "project_limit"}) == 1
        assert sample("branchbuild_waiting_pushes", {"reason": "throttled"}) == 0

        await cb.finish(other)
        assert await scheduler.dispatch(backend.start) == 0
        assert [b.project for b in cb.started_by()] == ["b", "c", "a"]
        assert sample("branchbuild_wait_duration_seconds_count") == 3
        assert await aws.count(aws.work_dlq_url) == 0


async def test_a_push_held_back_by_its_rules_limit_says_so_and_starts_when_a_slot_frees(
    aws: AwsResources,
) -> None:
    """A waiting push whose rule is at its ``max_running`` is skipped (others start), and the
    gauge and ``branchbuild status`` (the store) say ``rule_limit``, not ``behind``; the final
    event of the rule's running build frees the slot and the push starts."""
    async with CodeBuildStandIn(quota=5) as cb, standin_backend(cb) as backend:
        scheduler, metrics = scheduler_for(aws)
        text = "version: 1\nrules:\n  - repository: lim\n    max_running: 1\n"
        scheduler.pipelines.current = parse_config(text, "p.yaml", scheduler.settings)
        limited = scheduler.pipelines.rule_for("lim")
        running = request_for(aws, "lim", "feature/one")
        assert await scheduler.admit(running, limited) is None  # the rule's one slot
        build = await backend.start(running)
        await scheduler.started(running, limited, build)
        held, free = request_for(aws, "lim", "feature/two"), request_for(aws, "other", "x")
        await scheduler.wait(held, limited, "behind")
        await scheduler.wait(free, scheduler.pipelines.rule_for("other"), "behind")

        assert await scheduler.dispatch(backend.start) == 1
        assert [b.variables["REPOSITORY_NAME"] for b in cb.started_by()] == ["lim", "other"]
        [waiting] = await scheduler.listing()
        assert (waiting.push.name, waiting.reason) == ("feature/two", "rule_limit")
        sample = metrics.registry.get_sample_value
        assert sample("branchbuild_waiting_pushes", {"reason": "rule_limit"}) == 1
        assert not sample("branchbuild_waiting_pushes", {"reason": "behind"})

        assert await scheduler.dispatch(backend.start) == 1  # still held: nothing written
        await cb.finish(build.build_id)
        entry = Entry(
            commit=running.commit, ref=running.push.ref, build_id=build.build_id, project="lim"
        )
        await scheduler.build_changed(
            Change(archive=running.key, before=None, after=replace(entry, status="SUCCEEDED"))
        )
        assert await scheduler.dispatch(backend.start) == 0
        assert [b.variables["BRANCH_NAME"] for b in cb.started_by()][-1] == "feature/two"
        assert len(await running_builds(scheduler.records)) == 1  # feature/two's slot


async def test_round_robin_holds_when_capacity_frees_one_build_at_a_time(
    aws: AwsResources,
) -> None:
    """CodeBuild frees one place per round (builds end one by one, minutes apart): each round
    starts one push, and the turns still go round the repositories, whatever instance
    dispatches. Ranked afresh each round without memory, the big repository's burst went
    first to its last push (first come, first served) and the small one waited behind it."""
    async with CodeBuildStandIn(quota=1) as cb, standin_backend(cb) as backend:
        first, _ = scheduler_for(aws)
        second, _ = scheduler_for(aws)  # another instance: the turns are the fleet's
        rule = Rule.from_settings(first.settings)
        someone_else = await cb.occupy(6)  # one running, five queued: full
        for repository, branch in [("big", "1"), ("big", "2"), ("big", "3"), ("small", "1")]:
            await first.wait(request_for(aws, repository, branch), rule, "account_queue_full")
        await first.wait(request_for(aws, "small", "2"), rule, "account_queue_full")
        assert await first.dispatch(backend.start) == 5  # refused: nothing starts
        started = []
        for n, build_id in enumerate(someone_else[:5]):
            await cb.finish(build_id)  # one place in CodeBuild's queue
            assert await (first, second)[n % 2].dispatch(backend.start) == 4 - n
            [newest] = cb.started_by()[n:]
            started.append((newest.variables["REPOSITORY_NAME"], newest.variables["BRANCH_NAME"]))
        assert started == [("big", "1"), ("small", "1"), ("big", "2"), ("small", "2"), ("big", "3")]


async def test_reconciliation_frees_only_the_slots_of_builds_that_ended_or_never_started(
    aws: AwsResources,
) -> None:
    """The running set after lost events and a crash: a build that ended without its event
    (SUCCEEDED, FAILED, STOPPED), one CodeBuild no longer knows, and a reservation whose
    StartBuild never happened (older than the lapse) are freed by BatchGetBuilds; a running
    build, a queued one and a fresh reservation keep their slots."""
    async with CodeBuildStandIn(quota=1) as cb, standin_backend(cb) as backend:
        scheduler, _ = scheduler_for(aws, max_running=10)
        scheduler.statuses = backend.statuses
        rule = Rule.from_settings(scheduler.settings)
        kept: set[str] = set()
        freed: set[str] = set()
        for n, ending in enumerate(["SUCCEEDED", "FAILED", "STOPPED", None, None]):
            request = request_for(aws, "rec", f"feature/{n}")
            assert await scheduler.admit(request, rule) is None
            build = await backend.start(request)  # the first runs, the others queue
            await scheduler.started(request, rule, build)
            if ending is not None:
                await cb.finish(build.build_id, ending, emit=False)  # its event is lost
            (freed if ending else kept).add(request.idempotency_token)
        gone = request_for(aws, "rec", "feature/gone")  # CodeBuild knows no such build
        await scheduler.admit(gone, rule)
        await scheduler.started(gone, rule, StartedBuild("rec:no-such-build", "rec"))
        stale, fresh = request_for(aws, "rec", "feature/stale"), request_for(aws, "rec", "new")
        await scheduler.admit(stale, rule)  # reserved, then its instance died
        await scheduler.admit(fresh, rule)  # reserved, StartBuild about to happen
        freed |= {gone.idempotency_token, stale.idempotency_token}
        kept.add(fresh.idempotency_token)

        def backdate(current: Any) -> Any:
            builds = dict(current["builds"])
            builds[stale.idempotency_token] = builds[stale.idempotency_token] | {"since": 0}
            return {"builds": builds}

        await scheduler.records.update(RUNNING_KEY, backdate)
        assert await scheduler.reconcile_running() == len(freed)
        assert set(await running_builds(scheduler.records)) == kept
        assert await scheduler.reconcile_running() == 0


async def test_a_rules_pull_request_builds_can_start_before_its_other_branches(
    aws: AwsResources,
) -> None:
    """``pull_requests.priority``: a rule's merge builds (``pr/<id>/.merge``, the pull
    requests' own builds) wait with that priority, ahead of the repository's other branches
    and other repositories' pushes of the rule's priority; the rule's other pushes keep it."""
    scheduler, _ = scheduler_for(aws)
    text = (
        "version: 1\nrules:\n  - repository: shop\n    priority: 1\n"
        "    pull_requests:\n      merge_build: true\n      priority: 10\n"
        "  - repository: '*'\n    priority: 1\n"
    )
    scheduler.pipelines.current = parse_config(text, "p.yaml", scheduler.settings)
    shop, other = scheduler.pipelines.rule_for("shop"), scheduler.pipelines.rule_for("tools")
    await scheduler.wait(request_for(aws, "shop", "feature/x"), shop, "account_queue_full")
    await scheduler.wait(request_for(aws, "tools", "feature/y"), other, "behind")
    await scheduler.wait(request_for(aws, "shop", "pr/7/.merge"), shop, "behind")
    order = [(w.push.name, w.priority) for w in dispatch_order(await scheduler.listing())]
    assert order == [("pr/7/.merge", 10), ("feature/x", 1), ("feature/y", 1)]
    with pytest.raises(ConfigurationError, match=r"pull_requests.priority"):
        parse_config(text.replace("priority: 10", "priority: 1001"), "p.yaml", scheduler.settings)


async def test_max_wait_holds_for_a_push_behind_one_that_is_refused(aws: AwsResources) -> None:
    """A push waiting longer than ``BRANCHBUILD_MAX_WAIT`` is dead-lettered though a newer
    push ranked before it (a higher priority) is refused every round: the round stopped at
    the refusal, and the pushes behind it were never checked for their wait."""
    async with CodeBuildStandIn(quota=0) as cb, standin_backend(cb) as backend:  # always full
        scheduler, _ = scheduler_for(aws, max_wait=0.5)
        low = Rule.from_settings(scheduler.settings)
        high = replace(low, name="high", priority=10)
        old = request_for(aws, "tools", "feature/old")
        await scheduler.wait(old, low, "account_queue_full")
        await anyio.sleep(0.6)  # longer than max_wait: the point of this test
        await scheduler.wait(request_for(aws, "shop", "feature/new"), high, "behind")
        assert await scheduler.dispatch(backend.start) == 1
        assert cb.refusals == {"AccountLimitExceededException": 1}
        [(body, attributes)] = await aws.dlq_messages(aws.work_dlq_url)
        assert parse_work(body) == old.push
        assert attributes["branchbuild.error_kind"] == "capacity_timeout"
        [waiting] = await scheduler.listing()
        assert waiting.push.name == "feature/new"
