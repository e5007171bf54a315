"""CodeBuild's auto-retry (rule field ``retries``, service/retries.py): the StartBuild parameter
(requests validated against botocore's model by the CodeBuild stand-in), and how the ledger
follows the attempts whatever order their events come in: the last attempt decides. The end
to end run through the service: ``tests/test_badges.py``, the build that passes on retry 2.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aioboto3
import pytest

from localdev.codebuild import CodeBuildStandIn, StandInBuild
from service.build_state import Outcomes, parse_build_state
from service.builds import BuildRequest, CodeBuild, StartedBuild
from service.errors import ConfigurationError
from service.ledger import Entry, Ledger
from service.metrics import Metrics
from service.pipelines import parse_config
from service.records import Records
from service.retries import RETRYING
from service.scheduler import WaitingPush
from service.settings import Settings, load_settings
from service.supersede import Supersede
from tests.helpers import AwsResources, push_for

ARCHIVE = "app/feature/a/" + "a" * 40 + ".zip"


def settings(bucket: str = "bucket") -> Settings:
    return load_settings(queue_url="q", work_queue_url="w", bucket=bucket)


@pytest.mark.parametrize("value", ["11", "-1", "two"])
def test_retries_outside_0_to_10_are_refused(value: str) -> None:
    text = f"version: 1\nrules:\n  - repository: app\n    retries: {value}\n"
    with pytest.raises(ConfigurationError, match="retries"):
        parse_config(text, "pipelines.yaml", settings())


def test_retries_is_the_rules_and_absent_means_the_projects_own() -> None:
    text = "version: 1\nrules:\n  - repository: app\n    retries: 0\n  - repository: web\n"
    config = parse_config(text, "pipelines.yaml", settings())
    assert config.rule_for("app").retries == 0
    assert config.rule_for("web").retries is None


def test_a_waiting_push_keeps_its_retries() -> None:
    request = BuildRequest(push_for("app", "a"), "app", "bucket", ARCHIVE, retries=3)
    waiting = WaitingPush("k", request, "r", 0, "behind", 1.0, None, 0.0)
    assert WaitingPush.from_document("k", waiting.to_document()).request.retries == 3
    older = waiting.to_document()
    del older["retries"]  # written before the field existed
    assert WaitingPush.from_document("k", older).request.retries is None


@dataclass
class World:
    aws: AwsResources
    standin: CodeBuildStandIn
    codebuild: CodeBuild
    events: list[dict[str, Any]] = field(default_factory=list)

    def outcomes(self, metrics: Metrics) -> Outcomes:
        records = Records(self.aws.s3, self.aws.bucket)
        return Outcomes(
            records, settings(self.aws.bucket), metrics, retry_lookup=self.codebuild.retry_link
        )

    def event(self, build: StandInBuild, status: str) -> str:
        """The stand-in's event of ``build`` reaching ``status``, as EventBridge delivers it."""
        [found] = [
            e
            for e in self.events
            if e["detail"]["build-id"].endswith(build.id) and e["detail"]["build-status"] == status
        ]
        return json.dumps(found)

    async def start(self, retries: int | None) -> StandInBuild:
        request = BuildRequest(
            push_for("app", "a"), "app", self.aws.bucket, ARCHIVE, retries=retries
        )
        started = await self.codebuild.start(request)
        entry = Entry(
            commit="a" * 40,
            ref="refs/heads/a",
            build_id=started.build_id,
            project="app",
            retries=str(started.retries) if started.retries else None,
        )
        await Ledger(Records(self.aws.s3, self.aws.bucket)).started(ARCHIVE, entry)
        return self.standin.builds[started.build_id]


@pytest.fixture
async def world(aws: AwsResources) -> AsyncIterator[World]:
    events: list[dict[str, Any]] = []

    async def collect(event: dict[str, Any]) -> None:
        events.append(event)

    async with CodeBuildStandIn(quota=5, on_event=collect, retry_limits={"app": 1}) as standin:
        session = aioboto3.Session()
        async with session.client("codebuild", endpoint_url=standin.endpoint) as client:
            yield World(aws, standin, CodeBuild(client), events)


async def test_start_build_passes_the_rules_retries_and_records_codebuilds_limit(
    world: World,
) -> None:
    build = await world.start(3)
    assert world.standin.requests[-1][1]["autoRetryLimitOverride"] == 3
    assert build.retry_limit == 3
    assert (await world.aws.object(ARCHIVE + ".build.json")).count(b'"retries": "3"') == 1
    # No ``retries`` in the rule: no override, and the project's own limit is followed.
    await world.standin.finish(build.id, "SUCCEEDED")
    other = BuildRequest(push_for("app", "b"), "app", world.aws.bucket, "app/b/x.zip")
    started = await world.codebuild.start(other)
    assert "autoRetryLimitOverride" not in world.standin.requests[-1][1]
    assert started.retries == 1


async def test_events_in_any_order_the_last_attempt_decides(world: World) -> None:
    metrics = Metrics()
    outcomes = world.outcomes(metrics)
    ledger = Ledger(Records(world.aws.s3, world.aws.bucket))
    first = await world.start(2)
    retry1 = await world.standin.finish(first.id, "FAILED")
    assert retry1 is not None

    async def record(build: StandInBuild, status: str) -> str:
        return await outcomes.record(parse_build_state(world.event(build, status)))

    # The retry's start comes before the first attempt's end.
    assert await record(retry1, "IN_PROGRESS") == "recorded"
    entry = await ledger.read(ARCHIVE)
    assert entry is not None
    assert (entry.status, entry.attempt, entry.attempt_build_id) == ("IN_PROGRESS", "1", retry1.id)
    assert await record(first, "FAILED") == "stale"
    assert await record(first, "IN_PROGRESS") == "stale"
    assert (await ledger.read(ARCHIVE)).status == "IN_PROGRESS"  # type: ignore[union-attr]

    retry2 = await world.standin.finish(retry1.id, "TIMED_OUT")
    assert retry2 is not None
    assert await record(retry1, "TIMED_OUT") == "recorded"
    assert (await ledger.read(ARCHIVE)).status == RETRYING  # type: ignore[union-attr]
    assert metrics.build_results.labels(status="timed_out")._value.get() == 0
    assert await record(retry2, "IN_PROGRESS") == "recorded"
    assert await world.standin.finish(retry2.id, "FAILED") is None  # the limit: no retry 3
    assert await record(retry2, "FAILED") == "recorded"
    entry = await ledger.read(ARCHIVE)
    assert entry is not None
    assert (entry.status, entry.attempt, entry.build_id) == ("FAILED", "2", first.id)
    assert metrics.build_results.labels(status="failed")._value.get() == 1
    assert metrics.build_retries._value.get() == 2
    # Late and redelivered events of earlier attempts change nothing.
    for build, status in ((retry1, "IN_PROGRESS"), (first, "FAILED"), (retry2, "FAILED")):
        assert await record(build, status) in {"stale", "ignored"}
    assert await ledger.read(ARCHIVE) == entry
    assert metrics.build_results.labels(status="failed")._value.get() == 1


async def test_a_build_of_the_same_archive_that_is_no_auto_retry_is_ignored(world: World) -> None:
    outcomes = world.outcomes(Metrics())
    first = await world.start(2)
    # Someone starts a build by hand with the same variables (a console "retry").
    [stray] = await world.standin.occupy(1, project="app")
    world.standin.builds[stray].variables = dict(first.variables)
    world.standin.builds[stray].retry_limit = 2  # it has an autoRetryConfig: attempt 0
    event = build_event(world, stray, "SUCCEEDED")
    assert await outcomes.record(parse_build_state(event)) == "ignored"
    entry = await Ledger(Records(world.aws.s3, world.aws.bucket)).read(ARCHIVE)
    assert entry is not None and entry.status is None and entry.attempt is None


def build_event(world: World, build_id: str, status: str) -> str:
    build = world.standin.builds[build_id]
    arn = f"arn:aws:codebuild:eu-west-1:123456789012:build/{build_id}"
    variables = [{"name": k, "value": v, "type": "PLAINTEXT"} for k, v in build.variables.items()]
    return json.dumps(
        {
            "id": "e-1",
            "source": "aws.codebuild",
            "detail-type": "CodeBuild Build State Change",
            "time": datetime.now(UTC).isoformat(),
            "detail": {
                "build-status": status,
                "project-name": build.project,
                "build-id": arn,
                "additional-information": {"environment": {"environment-variables": variables}},
            },
        }
    )


async def test_superseding_a_retried_build_stops_the_attempt_that_runs(world: World) -> None:
    outcomes = world.outcomes(Metrics())
    records = Records(world.aws.s3, world.aws.bucket)
    supersede = Supersede(records, world.codebuild.client, settings(world.aws.bucket), Metrics())
    older = push_for("app", "a", "a" * 40, time="2026-12-01T10:00:00Z")
    first = await world.start(2)
    await supersede.started(older, StartedBuild(first.id, "app", 2), ARCHIVE)
    retry1 = await world.standin.finish(first.id, "FAILED")
    assert retry1 is not None
    await outcomes.record(parse_build_state(world.event(retry1, "IN_PROGRESS")))

    newer = push_for("app", "a", "b" * 40, time="2026-12-01T10:05:00Z")
    await supersede.started(newer, StartedBuild("app:newer", "app"), "app/a/" + "b" * 40 + ".zip")
    assert world.standin.builds[retry1.id].status == "STOPPED"
    assert ("StopBuild", {"id": retry1.id}) in world.standin.requests
    await outcomes.record(parse_build_state(world.event(retry1, "STOPPED")))
    entry = await Ledger(records).read(ARCHIVE)
    assert entry is not None
    assert (entry.status, entry.superseded_by) == ("STOPPED", "b" * 40)


async def test_a_retried_builds_status_is_its_last_attempts(world: World) -> None:
    """What the scheduler's running-slot reconciliation reads (BatchGetBuilds): a build whose
    first attempt failed is still running while CodeBuild's retry runs."""
    first = await world.start(2)
    request = BuildRequest(push_for("app", "b"), "app", world.aws.bucket, "app/b/x.zip")
    other = world.standin.builds[(await world.codebuild.start(request)).build_id]
    retry1 = await world.standin.finish(first.id, "FAILED")
    assert retry1 is not None
    assert await world.codebuild.statuses([first.id, other.id]) == {
        first.id: "IN_PROGRESS",
        other.id: "IN_PROGRESS",
    }
    retry2 = await world.standin.finish(retry1.id, "FAILED")
    assert retry2 is not None
    await world.standin.finish(retry2.id, "SUCCEEDED")
    await world.standin.finish(other.id, "FAILED")  # the project's limit: retried once
    assert await world.codebuild.statuses([first.id, other.id, "app:gone"]) == {
        first.id: "SUCCEEDED",
        other.id: "IN_PROGRESS",
    }
