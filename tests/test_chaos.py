"""Crash safety: pushes over many branches while the service is SIGKILLed and restarted.

`make test` runs the short version; `make chaos` (CHAOS=long) pushes a few hundred events
over dozens of branches and repositories and prints the figures as a table. Afterwards:
every branch's newest eligible commit has exactly one build; no event was lost; nothing was
built for protected branches; only the poisoned messages are in the DLQ; no incomplete
multipart upload is left.

The second test is about availability: three instances on the same queues, pushes arriving
steadily, one instance SIGKILLed and later another SIGTERMed; it prints the push-to-StartBuild
latency after each (`make chaos` runs it longer).
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from service.events import codecommit_event
from service.settings import Settings
from tests.helpers import (
    AwsResources,
    GitWorld,
    StartService,
    WorkCopy,
    create_project,
    event_for,
    wait_for,
)

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Scale:
    repositories: int
    branches: int  # per repository, one of them protected
    pushes: int  # per branch
    kills: int
    poison: int


SHORT = Scale(repositories=3, branches=4, pushes=3, kills=3, poison=3)
LONG = Scale(repositories=6, branches=10, pushes=5, kills=8, poison=10)


async def test_chaos(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    scale = LONG if os.environ.get("CHAOS") == "long" else SHORT
    rng = random.Random(20261126)
    newest: dict[tuple[str, str], str] = {}  # (repository, branch) -> newest commit
    protected: set[tuple[str, str]] = set()
    events = []
    for r in range(scale.repositories):
        name = f"chaos{r}"
        await create_project(aws, name)
        repo = await WorkCopy.create(git_world, tmp_path, name)
        for p in range(scale.pushes):
            for b in range(scale.branches):
                branch = "develop" if b == 0 else f"feature/{b}"
                commit = await repo.commit({f"{branch}.txt": f"{p}\n"}, message=f"{branch} {p}")
                await repo.push(f"HEAD:refs/heads/{branch}")
                events.append(codecommit_event(git_world.changes[-1]))
                newest[(name, branch)] = commit
                if branch == "develop":
                    protected.add((name, branch))
    poison = [f"poison {i}: not an event" for i in range(scale.poison)]
    bodies: list[dict[str, object] | str] = [*events, *poison]
    rng.shuffle(bodies)  # EventBridge does not promise order across branches either
    # ...but within a branch, pushes keep their order (FIFO), so re-sort those by push.
    order = {id(e): i for i, e in enumerate(events)}
    slots = sorted(i for i, b in enumerate(bodies) if not isinstance(b, str))
    for slot, event in zip(slots, sorted(events, key=lambda e: order[id(e)]), strict=True):
        bodies[slot] = event

    # Kills come at random moments but all within one visibility timeout, as in production
    # (120 s): a message faces at most one crash. Every receive counts toward maxReceiveCount
    # (2), so SQS itself dead-letters a message whose holders die twice; see README
    # "Guarantees".
    settings = {
        "BRANCHBUILD_INTAKE_VISIBILITY_TIMEOUT": str(max(12, 4 * scale.kills + 4)),
        "BRANCHBUILD_VISIBILITY_TIMEOUT": str(max(12, 4 * scale.kills + 4)),
        "BRANCHBUILD_CONCURRENCY": "4",
        "BRANCHBUILD_LOG_LEVEL": "INFO",
    }
    service = await start_service(**settings)
    for body in bodies:
        await aws.send_event(body)
    kills = 0
    for _ in range(scale.kills):
        await anyio.sleep(rng.uniform(0.3, 2.5))  # a random moment: chaos, not a condition
        assert service.process is not None
        service.process.send_signal(signal.SIGKILL)
        await service.process.wait()
        kills += 1
        service = await start_service(**settings)

    eligible = {key: commit for key, commit in newest.items() if key not in protected}

    async def settled() -> bool:
        requests = await aws.start_builds()
        built = {r["environmentVariablesOverride"][0]["value"] for r in requests}
        return all(c in built for c in eligible.values()) and all(
            [await aws.count(url) == 0 for url in (aws.intake_url, aws.work_url)]
        )

    await wait_for(settled, within=300 if scale is LONG else 150, what="every branch built")
    requests = await aws.start_builds()
    per_commit = Counter(r["environmentVariablesOverride"][0]["value"] for r in requests)
    tokens = {r["idempotencyToken"] for r in requests}
    branches_built = {
        (
            r["environmentVariablesOverride"][2]["value"],
            r["environmentVariablesOverride"][1]["value"],
        )
        for r in requests
    }
    dead = sorted(await aws.dlq_bodies(aws.intake_dlq_url))
    uploads = await aws.open_uploads()
    figures = [
        ("events pushed", len(events)),
        ("poisoned messages", len(poison)),
        ("SIGKILLs", kills),
        ("branches (eligible / protected)", f"{len(eligible)} / {len(protected)}"),
        ("StartBuild requests", len(requests)),
        ("distinct builds (idempotency tokens)", len(tokens)),
        ("newest commits built", sum(c in per_commit for c in eligible.values())),
        ("duplicate StartBuild requests", sum(n - 1 for n in per_commit.values())),
        ("builds of protected branches", len(branches_built & protected)),
        ("intake DLQ (expected: the poison)", len(dead)),
        ("work DLQ", len(await aws.dlq_bodies(aws.work_dlq_url))),
        ("open multipart uploads", uploads),
    ]
    width = max(len(k) for k, _ in figures)
    sys.stdout.write("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in figures) + "\n")

    # Every branch's newest eligible commit: built, as exactly one build.
    assert all(per_commit[c] >= 1 for c in eligible.values())
    assert len(tokens) == len(per_commit)  # one token per commit: CodeBuild starts one build
    # A kill between StartBuild and the ledger write can repeat the request (the token makes
    # it the same build in CodeBuild); anything more would be a real duplicate.
    assert sum(n - 1 for n in per_commit.values()) <= kills
    assert not branches_built & protected
    assert dead == sorted(poison)
    assert await aws.dlq_bodies(aws.work_dlq_url) == []
    assert uploads == 0


@dataclass(frozen=True)
class Steady:
    branches: int
    pushes: int  # in all, round-robin over the branches
    interval: float  # seconds between two pushes
    kill_at: int  # the push before which one instance is SIGKILLed
    term_at: int  # ...and another SIGTERMed, once the kill's effects are over


STEADY_SHORT = Steady(branches=6, pushes=76, interval=0.5, kill_at=6, term_at=60)
STEADY_LONG = Steady(branches=12, pushes=240, interval=0.25, kill_at=20, term_at=160)


@pytest.mark.timeout(300)
async def test_three_instances_one_killed_one_stopped(
    aws: AwsResources, git_world: GitWorld, tmp_path: Path, start_service: StartService
) -> None:
    """Three instances share the queues, as ECS tasks do, while pushes arrive steadily; one is
    SIGKILLed, later another is SIGTERMed. Every push is built once (or superseded by a newer
    push of its branch), in order, and the time from each push to the StartBuild that covers
    it stays within bounds: the lanes the dead instance held come back within their
    visibility timeouts, and a SIGTERM strands nothing."""
    scale = STEADY_LONG if os.environ.get("CHAOS") == "long" else STEADY_SHORT
    await create_project(aws, "steady")
    repo = await WorkCopy.create(git_world, tmp_path, "steady")
    await repo.commit({"README": "steady\n"})
    rounds = -(-scale.pushes // scale.branches)
    commits: list[list[str]] = []  # per branch, in push order
    for b in range(scale.branches):
        await repo.checkout(f"feature/{b}")
        commits.append([await repo.commit({"n.txt": f"{b} {k}\n"}) for k in range(rounds)])
        await repo.checkout("main", new=False)
    await repo.push(*(f"feature/{b}" for b in range(scale.branches)))
    pushes = [(i % scale.branches, i // scale.branches) for i in range(scale.pushes)]
    newest = {commits[b][k] for b, k in dict(pushes).items()}  # each branch's last push

    # The production defaults for everything that governs recovery.
    fields = Settings.model_fields
    settings = {
        f"BRANCHBUILD_{name.upper()}": str(fields[name].default)
        for name in ("wait_time", "intake_visibility_timeout", "visibility_timeout")
    } | {"BRANCHBUILD_LOG_LEVEL": "INFO"}
    services = [
        await start_service(**settings, BRANCHBUILD_CACHE_DIR=str(tmp_path / f"cache-{n}"))
        for n in range(3)
    ]

    sent: list[float] = []
    seen: dict[str, float] = {}  # commit -> when its first StartBuild reached CodeBuild

    async def watch_builds() -> None:
        while True:
            for request in await aws.start_builds():
                seen.setdefault(request["environmentVariablesOverride"][0]["value"], _now())
            await anyio.sleep(0.2)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_builds)
        for i, (b, k) in enumerate(pushes):
            if i == scale.kill_at:
                services[0].signal(signal.SIGKILL)
                assert await services[0].wait() == -signal.SIGKILL
            if i == scale.term_at:
                services[1].signal(signal.SIGTERM)
            sent.append(_now())
            old = commits[b][k - 1] if k else None
            await aws.send_event(event_for("steady", f"refs/heads/feature/{b}", commits[b][k], old))
            await anyio.sleep(scale.interval)  # a steady stream of pushes, not a condition
        assert await services[1].wait(within=60) == 0

        async def settled() -> bool:
            return all(c in seen for c in newest) and all(
                [await aws.count(u) == 0 for u in (aws.intake_url, aws.work_url)]
            )

        await wait_for(settled, within=120, what="every branch's newest push built")
        tg.cancel_scope.cancel()

    requests = [r["environmentVariablesOverride"][0]["value"] for r in await aws.start_builds()]
    index = {c: (b, k) for b, branch in enumerate(commits) for k, c in enumerate(branch)}
    per_branch: dict[int, list[int]] = {}
    for commit in dict.fromkeys(requests):
        b, k = index[commit]
        per_branch.setdefault(b, []).append(k)
    # A push waits for the first build of its branch at it or a newer push (supersede).
    latency = []
    for (b, k), at in zip(pushes, sent, strict=True):
        covering = [seen[c] for c in commits[b][k:] if c in seen and seen[c] >= at]
        latency.append(min(covering) - at)
    phases = {
        "before the kill": latency[: scale.kill_at],
        "after the SIGKILL": latency[scale.kill_at : scale.term_at],
        "after the SIGTERM": latency[scale.term_at :],
    }
    rows = [
        (
            "pushes / builds / superseded",
            f"{len(pushes)} / {len(set(requests))} / {len(pushes) - len(set(requests))}",
        )
    ]
    for phase, values in phases.items():
        ordered = sorted(values)
        rows.append(
            (
                f"push to StartBuild {phase} (s)",
                f"median {statistics.median(ordered):.1f}  p90 "
                f"{ordered[int(0.9 * (len(ordered) - 1))]:.1f}  longest stall {ordered[-1]:.1f}",
            )
        )
    width = max(len(k) for k, _ in rows)
    sys.stdout.write("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\n")

    # In order, each once.
    assert all(ks == sorted(set(ks)) for ks in per_branch.values()), per_branch
    assert all(c in seen for c in newest)  # so every push was built or superseded
    # A kill between StartBuild and the ledger write may repeat one request (same token).
    assert len(requests) - len(set(requests)) <= 1
    assert await aws.dlq_bodies(aws.intake_dlq_url) == []
    assert await aws.dlq_bodies(aws.work_dlq_url) == []
    # Generous bounds (the issue saw 117 s for every push; the targets are 10 and 30 s):
    assert max(phases["after the SIGKILL"]) < 60
    assert max(phases["after the SIGTERM"]) < 20


def _now() -> float:
    return time.monotonic()
