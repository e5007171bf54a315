"""Crash safety: pushes over many branches while the service is SIGKILLed and restarted.

`make test` runs the short version; `make chaos` (CHAOS=long) pushes a few hundred events
over dozens of branches and repositories and prints the figures as a table. Afterwards:
every branch's newest eligible commit has exactly one build; no event was lost; nothing was
built for protected branches; only the poisoned messages are in the DLQ; no incomplete
multipart upload is left.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from service.localdev.githost import codecommit_event
from tests.helpers import AwsResources, GitWorld, StartService, WorkCopy, create_project, wait_for

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
        "BRANCHBUILD_VISIBILITY_TIMEOUT": str(max(12, 4 * scale.kills + 4)),
        "BRANCHBUILD_HEARTBEAT_INTERVAL": "1",
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
