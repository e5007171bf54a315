"""Prometheus metrics: one registry per service instance, few and bounded labels."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)

from . import __version__

# The *_created series double the exposition for no operational value.
disable_created_metrics()  # type: ignore[no-untyped-call]

STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
BUILD_BUCKETS = (30, 60, 120, 300, 600, 900, 1200, 1800, 2700, 3600, 5400, 7200, 14400, 28800)
WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.events = Counter(
            "branchbuild_events",
            "Events taken from the intake queue, by event type and outcome.",
            ["event", "outcome"],
            registry=r,
        )
        self.jobs = Counter(
            "branchbuild_jobs",
            "Build jobs taken from the work queue, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "branchbuild_stage_duration_seconds",
            "Time spent in each stage of a job.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "branchbuild_event_to_build_seconds",
            "From the push event's time to StartBuild returning.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.builds = Counter(
            "branchbuild_builds_started", "Builds started.", ["backend"], registry=r
        )
        self.in_flight = Gauge(
            "branchbuild_jobs_in_flight", "Jobs received and not yet settled.", registry=r
        )
        self.upload_bytes = Counter(
            "branchbuild_upload_bytes", "Archive bytes uploaded to S3.", registry=r
        )
        self.errors = Counter("branchbuild_errors", "Errors, by kind.", ["kind"], registry=r)
        self.fetches = Counter(
            "branchbuild_git_fetches",
            "Commits asked of the git cache, by result (hit: no network).",
            ["result"],
            registry=r,
        )
        self.cache_bytes = Gauge(
            "branchbuild_git_cache_bytes", "Bytes used by the git cache on disk.", registry=r
        )
        self.cache_evictions = Counter(
            "branchbuild_git_cache_evictions",
            "Repositories evicted from the git cache (disk budget or full disk).",
            registry=r,
        )
        self.aws_retries = Counter(
            "branchbuild_aws_retries",
            "Retries botocore made before an AWS call succeeded or failed, by service.",
            ["service"],
            registry=r,
        )
        self.batch_size = Histogram(
            "branchbuild_receive_batch_size",
            "Messages returned by one ReceiveMessage call.",
            ["queue"],
            buckets=(0, 1, 2, 3, 5, 8, 10),
            registry=r,
        )
        self.heartbeats = Counter(
            "branchbuild_visibility_extensions",
            "Visibility timeout extensions of in-flight messages (heartbeats).",
            registry=r,
        )
        # -- pipeline configuration (service/pipelines.py) --
        self.config_reloads = Counter(
            "branchbuild_config_reloads",
            "New versions of the pipeline configuration file, by result (loaded, refused).",
            ["result"],
            registry=r,
        )
        # -- reconciliation of missed events (service/reconcile.py) --
        self.reconcile_runs = Counter(
            "branchbuild_reconcile_runs",
            "Reconciliation rounds, by result (done, not_leader, failed).",
            ["result"],
            registry=r,
        )
        self.reconciled = Counter(
            "branchbuild_reconciled_pushes",
            "Pushes with no event and no build, found by reconciliation and queued.",
            registry=r,
        )
        # Build outcomes (service.build_state, service.supersede, service.pullrequests).
        self.build_results = Counter(
            "branchbuild_build_results",
            "Builds branchbuild started that finished, by final status (superseded: stopped "
            "because a newer commit of the branch was built).",
            ["status"],
            registry=r,
        )
        self.build_seconds = Histogram(
            "branchbuild_build_duration_seconds",
            "From a build's start to its final state, per CodeBuild's state events.",
            buckets=BUILD_BUCKETS,
            registry=r,
        )
        self.builds_stopped = Counter(
            "branchbuild_builds_stopped",
            "Running builds stopped (StopBuild) because a newer commit of the branch started.",
            registry=r,
        )
        self.pull_request_updates = Counter(
            "branchbuild_pull_request_updates",
            "Changes made on CodeCommit pull requests, by action.",
            ["action"],
            registry=r,
        )
        # Capacity scheduling (service/scheduler.py).
        self.waiting = Gauge(
            "branchbuild_waiting_pushes",
            "Pushes waiting to start (fleet-wide, as this instance last listed them), by reason.",
            ["reason"],
            registry=r,
        )
        self.wait_seconds = Histogram(
            "branchbuild_wait_duration_seconds",
            "From a push starting to wait to its build starting (or its dead-lettering).",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.capacity_refusals = Counter(
            "branchbuild_capacity_refusals",
            "StartBuild calls CodeBuild refused for lack of capacity, by reason.",
            ["reason"],
            registry=r,
        )
        # Issue 21: what the service decided when something could not be known (bounded).
        self.fallbacks = Counter(
            "branchbuild_fallbacks",
            "Stated decisions taken when something could not be read or known, by decision.",
            ["decision"],
            registry=r,
        )
        # Issue 25: status badges and CodeBuild's auto-retry (docs/badges-and-retries.md).
        self.badges_written = Counter(
            "branchbuild_badges_written",
            "Badge images written to S3, by the status they show.",
            ["status"],
            registry=r,
        )
        self.build_retries = Counter(
            "branchbuild_build_retries",
            "Failed build attempts that CodeBuild retried (its auto-retry), counted once each.",
            registry=r,
        )
        # Read at each scrape, in the event loop that serves /metrics (make soak samples it).
        self.asyncio_tasks = Gauge(
            "branchbuild_asyncio_tasks",
            "asyncio tasks alive in the service's event loop.",
            registry=r,
        )
        self.asyncio_tasks.set_function(_asyncio_tasks)
        # Pull requests built as merged (service/mergebuilds.py).
        self.merge_builds = Counter(
            "branchbuild_merge_builds",
            "Pull request merges made for a merge build, by outcome.",
            ["outcome"],
            registry=r,
        )
        # Notifications (service/notify.py).
        self.notifications = Counter(
            "branchbuild_notifications",
            "SNS notifications, by outcome (failed, fixed, ...) and result (published, "
            "duplicate, failed).",
            ["outcome", "result"],
            registry=r,
        )
        self.info = Info("branchbuild_build", "Version of the running service.", registry=r)
        self.info.info({"version": __version__})


def _asyncio_tasks() -> float:
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # no event loop in this thread
        return 0.0
