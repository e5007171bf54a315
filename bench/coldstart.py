"""The cold-start section: fresh instances on a history-heavy repository.

On Fargate a task's disk dies with it, so every deploy, scale-out and replaced task starts with
an empty git cache. Measured side by side, on ``history`` (25,000 commits over 2,500 files):

* single pushes on a cold cache: B (a fresh service process, empty cache) against the depth-1
  floor (``git init --bare``; ``git fetch --depth 1`` of the commit; archive; upload;
  StartBuild) and the full-history floor (the same fetch without ``--depth``: what the service
  fetched before its cache went shallow), interleaved, one of each per repeat;
* single pushes on a warm cache, before and after a few bursts of pushes into the shallow
  cache, each followed by one through the warm floor (a fetch into a full clone of main);
* N fresh instances starting at once (N = 1, 2, 4), each getting one push of the repository:
  N service processes with empty caches, against N full-history fetches (the floor, N at a
  time). The git host's CPU and the bytes it sent are in each run's ``cpu_breakdown``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import procstat
from .core import Bench, Plan, Size, _mb, _throughput
from .infra import wait_until
from .service_proc import Service, metric
from .variants import SETTLED, STAGES, BJob, _b_job, _service, run_b, run_f


@dataclass(frozen=True)
class ColdPlan:
    size: str  # a history-heavy repository of bench.repos.SPECS
    singles: int  # cold and warm single pushes, each variant
    fill: tuple[int, int, int]  # (events, branches, bursts) pushed into the warm cache
    fresh: tuple[int, ...]  # numbers of fresh instances started at once
    timeout: float


COLD_PLANS = {
    "full": ColdPlan("history", 5, (40, 10, 2), (1, 2, 4), 600),
    "quick": ColdPlan("history", 1, (20, 10, 1), (1, 2, 4), 600),
    "smoke": ColdPlan("history-tiny", 1, (3, 3, 1), (2,), 60),
}


def measure_cold_start(bench: Bench, plan: ColdPlan) -> None:
    events, branches, _ = plan.fill
    size = bench.prepare(plan.size, Plan(events, branches, 1, 0, (), (), 1, 0, plan.timeout))
    for repeat in range(plan.singles):
        bench.log(f"{size.name}: cold single pushes {repeat + 1}/{plan.singles}")
        run_f(bench, size, "F depth-1", "single-cold", bench.push(size, 1, 1), mode="cold-shallow")
        run_f(
            bench, size, "F full history", "single-cold", bench.push(size, 1, 1), mode="cold-full"
        )
        cold = bench.work / f"cold-{size.name}-{repeat}"
        run_b(bench, size, "B c=8", {}, [BJob("single-cold", 1, 1)], cold, warm_up=False)
        shutil.rmtree(cold, ignore_errors=True)

    warm_cache = bench.work / f"cache-{size.name}"
    tmp = bench.work / "tmp-warm"
    service = _service(bench, f"warm-{size.name}", warm_cache, tmp, {})
    try:
        # The cache starts as a fresh instance's would: one cold (depth-1) fetch.
        first = bench.recorder.count()
        bench.aws.send_events(service.queues.intake, bench.push(size, 1, 1))
        wait_until(lambda: bench.recorder.count() > first, within=plan.timeout, what="warm-up")
        bench.log(f"{size.name}: warm single pushes, B and F alternately")
        warm_pairs(bench, size, plan, service, warm_cache, tmp, "single-warm")
        bench.log(f"{size.name}: {plan.fill[2]} burst(s) of {events} pushes into the cache")
        for number in range(plan.fill[2]):
            job = BJob("burst", events, branches)
            b_job(bench, size, job, number, service, warm_cache, tmp)
        warm_pairs(bench, size, plan, service, warm_cache, tmp, "single-warm-many")
    finally:
        service.stop()
    bench.repos[size.name]["service_cache"] = cache_shape(warm_cache)

    for n in plan.fresh:
        bench.log(f"{size.name}: {n} fresh instance(s) at once")
        fresh_services(bench, size, n)
        run_f(
            bench,
            size,
            f"F full history x{n}",
            "fresh-instances",
            bench.push(size, n, n),
            mode="cold-full",
            parallel=n,
        )


def warm_pairs(
    bench: Bench,
    size: Size,
    plan: ColdPlan,
    service: Service,
    cache: Path,
    tmp: Path,
    scenario: str,
) -> None:
    """``plan.singles`` single pushes through the running service, each followed by one
    through the warm floor: side by side, so that load from elsewhere hits both alike."""
    for number in range(plan.singles):
        job = BJob(scenario, 1, 1)
        b_job(bench, size, job, number, service, cache, tmp)
        run_f(bench, size, "F floor", scenario, bench.push(size, 1, 1), mode="warm")


def b_job(
    bench: Bench, size: Size, job: BJob, number: int, service: Service, cache: Path, tmp: Path
) -> None:
    """One measured job through the running service (at its defaults: "B c=8")."""
    intake, bucket = service.queues.intake, service.bucket
    _b_job(bench, size, "B c=8", {}, job, number, service, intake, bucket, cache, tmp)
    bench.aws.empty(bucket)


def cache_shape(cache: Path) -> dict[str, Any]:
    """The shallow cache after many pushes: disk, packs, shallow boundary commits."""
    [repo] = (cache / "repos").glob("*.git")
    shallow = repo / "shallow"
    return {
        "mb": _mb(procstat.disk_usage(cache)),
        "packs": len(list((repo / "objects" / "pack").glob("*.pack"))),
        "loose_objects": len(list((repo / "objects").glob("[0-9a-f][0-9a-f]/*"))),
        "shallow_commits": len(shallow.read_text().split()) if shallow.exists() else 0,
    }


def fresh_services(bench: Bench, size: Size, n: int) -> None:
    """``n`` service processes with empty caches, one push each, all enqueued at once."""
    caches = [bench.work / f"fresh-{n}-{i}" for i in range(n)]
    tmp = bench.work / "tmp-fresh"  # shared by the instances: it must stay empty
    services: list[Service] = []
    try:
        for i, cache in enumerate(caches):
            services.append(_service(bench, f"fresh-{n}-{i}", cache, tmp, {}))
        events = bench.push(size, n, n)
        first = bench.recorder.count()
        befores = [s.metrics() for s in services]
        pids = {f"service{i}": s.pid for i, s in enumerate(services)}

        def settled() -> bool:
            done = 0
            for service, before in zip(services, befores, strict=True):
                now = service.metrics()
                done += int(
                    sum(
                        metric(now, "branchbuild_jobs_total", outcome=o)
                        - metric(before, "branchbuild_jobs_total", outcome=o)
                        for o in SETTLED
                    )
                )
            return done >= n

        with bench.window(pids) as window:
            dirs = {f"cache{i}": c for i, c in enumerate(caches)} | {"tmp": tmp}
            with procstat.Sampler(services[0].pid, dirs) as sampler:
                enqueued: list[float] = []
                for service, event in zip(services, events, strict=True):
                    enqueued += bench.aws.send_events(service.queues.intake, [event])
                try:
                    wait_until(settled, within=size.plan.timeout, what=f"{n} fresh", every=0.05)
                    timed_out = False
                except TimeoutError:
                    timed_out = True
        builds = bench.recorder.since(first)
        afters = [s.metrics() for s in services]

        def total(name: str, **labels: str) -> float:
            return sum(
                metric(a, name, **labels) - metric(b, name, **labels)
                for a, b in zip(afters, befores, strict=True)
            )

        stages = {}
        for stage in STAGES:
            count = total("branchbuild_stage_duration_seconds_count", stage=stage)
            seconds = total("branchbuild_stage_duration_seconds_sum", stage=stage)
            stages[stage] = round(seconds / count, 4) if count else 0.0
        cpu = sum(
            window.get(f"{name}_cpu_own", 0.0) + window.get(f"{name}_cpu_children", 0.0)
            for name in pids
        )
        uploaded = sum(
            bench.bytes_uploaded(s.bucket, [e]) for s, e in zip(services, events, strict=True)
        )
        bench.result(
            size,
            "B",
            f"B x{n}",
            "fresh-instances",
            settings={"instances": n},
            events=n,
            branches=n,
            builds=len(builds),
            superseded=0,
            errors=int(total("branchbuild_errors_total")) + (1 if timed_out else 0),
            timed_out=timed_out,
            **_throughput(events, enqueued, builds),
            cpu_seconds=round(cpu, 3),
            cpu_per_event=round(cpu / n, 4),
            peak_rss_mb=_mb(sampler.peaks.tree_rss),
            process_rss_mb=_mb(sampler.peaks.rss),
            peak_disk_mb={k: _mb(v) for k, v in sampler.peaks.disk.items()},
            bytes_uploaded=uploaded,
            bytes_uploaded_metric=int(total("branchbuild_upload_bytes_total")),
            stage_mean_seconds=stages,
            cpu_breakdown=window,
        )
        for service in services:
            bench.aws.empty(service.bucket)
    finally:
        for service in services:
            service.stop()
        for cache in caches:
            shutil.rmtree(cache, ignore_errors=True)
