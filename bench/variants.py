"""The three variants, each measured the same way: A (original.sh), B (the service), F (floor)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.settings import Settings

from . import procstat, report
from .core import Bench, Size, _mb, _throughput, wait4
from .infra import PYTHON, ROOT, terminate, wait_until
from .repos import git
from .service_proc import Service, metric

BENCH = Path(__file__).resolve().parent
BENCH_VENV = ROOT / ".venv-bench"
SETTLED = ("built", "superseded", "duplicate", "failed", "dead_lettered")
STAGES = ("fetch", "archive", "upload", "start_build")
# The floor compresses as much as the service does by default, so the two do the same work.
DEFAULT_ZIP_LEVEL: int = Settings.model_fields["zip_level"].default


# -- A: the original design ---------------------------------------------------------------------


def run_a(bench: Bench, size: Size, repeat: int) -> None:
    plan = size.plan
    events = bench.push(size, plan.events, plan.branches)
    queues = bench.aws.queues(f"a-{size.name}")
    bucket = bench.aws.bucket(f"a-{size.name}")
    workdir = bench.work / f"a-{size.name}-{repeat}"
    workdir.mkdir(parents=True)
    env = bench.env | {
        "QUEUE_URL": queues.intake,
        "CODE_BUCKET": bucket,
        "GIT_URL_PREFIX": bench.host.url(""),
        "WORK_DIR": str(workdir),
        "AWS": str(BENCH_VENV / "bin" / "aws"),
        "MAX_MESSAGES": str(len(events)),
        "GIT_SSH_COMMAND": bench.host.ssh_command,
        "HOME": str(workdir),
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    first = bench.recorder.count()
    log = (bench.work / f"a-{size.name}-{repeat}.log").open("wb")
    with bench.window({}) as window:
        enqueued = bench.aws.send_events(queues.intake, events)
        process = subprocess.Popen(
            ["bash", str(BENCH / "original.sh")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        with procstat.Sampler(process.pid, {"work": workdir}) as sampler:
            status, cpu = wait4(process.pid, time.monotonic() + plan.timeout)
            process.returncode = status
        window["extra_cpu"] = cpu
    log.close()
    builds = bench.recorder.since(first)
    bench.result(
        size,
        "A",
        "A original.sh",
        "burst",
        events=len(events),
        branches=plan.branches,
        builds=len(builds),
        superseded=0,
        errors=0 if status == 0 else 1,
        exit_status=status,
        **_throughput(events, enqueued, builds),
        cpu_seconds=round(cpu, 3),
        cpu_per_event=round(cpu / len(events), 4),
        peak_rss_mb=_mb(sampler.peaks.tree_rss),
        process_rss_mb=_mb(sampler.peaks.rss),
        peak_disk_mb={k: _mb(v) for k, v in sampler.peaks.disk.items()},
        bytes_uploaded=bench.bytes_uploaded(bucket, events),
        cpu_breakdown=window,
    )
    bench.aws.empty(bucket)
    shutil.rmtree(workdir, ignore_errors=True)


# -- B: branchbuild -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BJob:
    scenario: str  # burst | single-warm | single-cold
    events: int
    branches: int


def run_b(
    bench: Bench,
    size: Size,
    label: str,
    overrides: dict[str, str],
    jobs: list[BJob],
    cache_dir: Path,
    *,
    warm_up: bool = True,
) -> None:
    """One service instance (one configuration) for ``jobs``, measured one after the other.

    With ``warm_up``, an empty cache is first filled by one build of an unmeasured push.
    """
    warm_up = warm_up and not cache_dir.exists()
    overrides = overrides | bench.args.extra_env  # --service-env
    tmp = bench.work / f"tmp-{label.replace(' ', '_').replace('=', '')}"
    service = _service(bench, f"b-{size.name}", cache_dir, tmp, overrides)
    queues, bucket = service.queues, service.bucket
    try:
        if warm_up:  # the cache holds the repository (main) before the measured pushes
            warm = bench.push(size, 1, 1)
            first = bench.recorder.count()
            bench.aws.send_events(queues.intake, warm)
            wait_until(
                lambda: bench.recorder.count() > first,
                within=size.plan.timeout,
                what="the warm-up build",
                every=0.1,
            )
        for number, job in enumerate(jobs):
            _b_job(
                bench,
                size,
                label,
                overrides,
                job,
                number,
                service,
                queues.intake,
                bucket,
                cache_dir,
                tmp,
            )
            bench.aws.empty(bucket)
    finally:
        service.stop()


def _b_job(
    bench: Bench,
    size: Size,
    label: str,
    overrides: dict[str, str],
    job: BJob,
    number: int,
    service: Service,
    intake: str,
    bucket: str,
    cache_dir: Path,
    tmp: Path,
) -> None:
    events = bench.push(size, job.events, job.branches)
    first = bench.recorder.count()
    finals = {e["detail"]["referenceName"]: e["detail"]["commitId"] for e in events}
    before = service.metrics()
    settled0 = sum(metric(before, "branchbuild_jobs_total", outcome=o) for o in SETTLED)

    def done() -> bool:
        built = {b.commit for b in bench.recorder.since(first)}
        if not set(finals.values()) <= built:
            return False
        now = service.metrics()
        settled = sum(metric(now, "branchbuild_jobs_total", outcome=o) for o in SETTLED)
        return settled - settled0 >= len(events)

    with bench.window({"service": service.pid}) as window:
        with procstat.Sampler(service.pid, {"cache": cache_dir, "tmp": tmp}) as sampler:
            enqueued = bench.aws.send_events(intake, events)
            try:
                wait_until(
                    done, within=size.plan.timeout, what=f"{label} {job.scenario}", every=0.05
                )
                timed_out = False
            except TimeoutError:
                timed_out = True
    after = service.metrics()
    builds = bench.recorder.since(first)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    stages = {}
    for stage in STAGES:
        count = delta("branchbuild_stage_duration_seconds_count", stage=stage)
        total = delta("branchbuild_stage_duration_seconds_sum", stage=stage)
        stages[stage] = round(total / count, 4) if count else 0.0
    cpu = window.get("service_cpu_own", 0.0) + window.get("service_cpu_children", 0.0)
    bench.result(
        size,
        "B",
        label,
        job.scenario,
        settings=overrides,
        events=len(events),
        branches=job.branches,
        builds=len(builds),
        superseded=int(delta("branchbuild_jobs_total", outcome="superseded")),
        errors=int(delta("branchbuild_errors_total")) + (1 if timed_out else 0),
        timed_out=timed_out,
        **_throughput(events, enqueued, builds),
        cpu_seconds=round(cpu, 3),
        cpu_per_event=round(cpu / len(events), 4),
        peak_rss_mb=_mb(sampler.peaks.tree_rss),
        process_rss_mb=_mb(sampler.peaks.rss),
        service_rss_hwm_mb=_mb(procstat.rss_high_water(service.pid)),
        peak_disk_mb={k: _mb(v) for k, v in sampler.peaks.disk.items()},
        bytes_uploaded=bench.bytes_uploaded(bucket, events),
        bytes_uploaded_metric=int(delta("branchbuild_upload_bytes_total")),
        cache_hits=int(delta("branchbuild_git_fetches_total", result="hit")),
        receives={
            queue: int(delta("branchbuild_receive_batch_size_count", queue=queue))
            for queue in ("intake", "work")
        },
        stage_mean_seconds=stages,
        cpu_breakdown=window,
        run=number,
    )


# -- F: the floor -------------------------------------------------------------------------------


def run_f(
    bench: Bench,
    size: Size,
    label: str,
    scenario: str,
    events: list[dict[str, Any]],
    *,
    mode: str,
    parallel: int = 1,
    zip_level: int = DEFAULT_ZIP_LEVEL,
) -> None:
    bucket = bench.aws.bucket(f"f-{size.name}")
    scratch = bench.work / f"floor-{size.name}"
    scratch.mkdir(parents=True, exist_ok=True)
    bare = bench.work / "floor-warm" / f"{size.spec.name}.git"  # stays warm between runs
    bare.parent.mkdir(parents=True, exist_ok=True)
    if mode == "warm" and bare.exists():
        # Keep it at main only, so a warm fetch transfers exactly one push's objects.
        git(
            "--git-dir",
            str(bare),
            "fetch",
            "--quiet",
            bench.host.url(size.spec.name),
            "+refs/heads/main:refs/heads/main",
            env=bench.env | {"GIT_SSH_COMMAND": bench.host.ssh_command},
        )
    job = {
        "mode": mode,
        "parallel": parallel,
        "zip_level": zip_level,
        "bucket": bucket,
        "bare": str(bare),
        "scratch": str(scratch),
        "warm_url": bench.host.url(size.spec.name),
        "git_env": {
            "PATH": os.environ["PATH"],
            "HOME": str(scratch),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_SSH_COMMAND": bench.host.ssh_command,
            "LC_ALL": "C",
        },
        "events": [
            {
                "repository": e["detail"]["repositoryName"],
                "commit": e["detail"]["commitId"],
                "branch": e["detail"]["referenceName"],
                "url": bench.host.url(e["detail"]["repositoryName"]),
            }
            for e in events
        ],
    }
    if mode == "warm" and not bare.exists():
        git(
            "clone",
            "--bare",
            "--quiet",
            "--single-branch",
            "--branch",
            "main",
            bench.host.url(size.spec.name),
            str(bare),
            env=bench.env | {"GIT_SSH_COMMAND": bench.host.ssh_command},
        )
    job_file, result_file = scratch / "job.json", scratch / "result.json"
    job_file.write_text(json.dumps(job))
    first = bench.recorder.count()
    with bench.window({}) as window:
        process = subprocess.Popen(
            [PYTHON, "-m", "bench.floor", str(job_file), str(result_file)],
            cwd=ROOT,
            env=bench.env,
            start_new_session=True,
        )
        with procstat.Sampler(process.pid, {"scratch": scratch, "bare": bare}) as sampler:
            status, floor_cpu = wait4(process.pid, time.monotonic() + size.plan.timeout)
        window["extra_cpu"] = floor_cpu
    if status != 0:
        raise RuntimeError(f"the floor script failed ({status})")
    out = json.loads(result_file.read_text())
    lat = [e["seconds"] for e in out["events"]]
    builds = bench.recorder.since(first)
    cpu = out["cpu_seconds"]
    bench.result(
        size,
        "F",
        label,
        scenario,
        settings={"mode": mode, "parallel": parallel, "zip_level": zip_level},
        events=len(events),
        branches=len({e["detail"]["referenceName"] for e in events}),
        builds=len(builds),
        superseded=0,
        errors=0,
        wall_seconds=round(out["wall_seconds"], 3),
        throughput_eps=round(len(events) / out["wall_seconds"], 4),
        latencies=[round(x, 3) for x in lat],
        latency_p50=round(report.percentile(lat, 50), 3),
        latency_p95=round(report.percentile(lat, 95), 3),
        cpu_seconds=round(cpu, 3),
        cpu_per_event=round(cpu / len(events), 4),
        peak_rss_mb=_mb(sampler.peaks.tree_rss),
        process_rss_mb=_mb(sampler.peaks.rss),
        peak_disk_mb={k: _mb(v) for k, v in sampler.peaks.disk.items()},
        bytes_uploaded=sum(e["bytes"] for e in out["events"]),
        stage_mean_seconds={
            k: round(sum(e[k] for e in out["events"]) / len(events), 4)
            for k in ("fetch", "archive_upload", "start_build")
        },
        cpu_breakdown=window,
    )
    bench.aws.empty(bucket)
    shutil.rmtree(scratch, ignore_errors=True)


# -- profile ------------------------------------------------------------------------------------


def _service(
    bench: Bench, label: str, cache_dir: Path, tmp_dir: Path, overrides: dict[str, str]
) -> Service:
    """A started service with its own queues and bucket (named after ``label``)."""
    service = Service(
        aws_env=bench.env,
        queues=bench.aws.queues(label),
        bucket=bench.aws.bucket(label),
        host=bench.host,
        cache_dir=cache_dir,
        tmp_dir=tmp_dir,
        log=bench.work / "service.log",
        overrides=overrides,
    )
    service.start()
    return service


def profile(bench: Bench, size: Size, concurrency: int) -> dict[str, Any]:
    """py-spy on the service and the git host during one burst (not a measured run)."""
    spy = BENCH_VENV / "bin" / "py-spy"
    if not spy.exists():
        return {}
    cache = bench.work / f"profile-cache-{size.name}"
    overrides = {"BRANCHBUILD_CONCURRENCY": str(concurrency)}
    service = _service(bench, f"p-{size.name}", cache, bench.work / "tmp-profile", overrides)
    queues, bucket = service.queues, service.bucket
    found: dict[str, Any] = {}
    try:
        warm = bench.push(size, 1, 1)
        first = bench.recorder.count()
        bench.aws.send_events(queues.intake, warm)
        wait_until(lambda: bench.recorder.count() > first, within=120, what="warm-up build")
        events = bench.push(size, size.plan.events, size.plan.branches)
        finals = {e["detail"]["commitId"] for e in events[-size.plan.branches :]}
        spies = {}
        for name, pid in (
            ("service", service.pid),
            ("githost", bench.host.process.pid),
            ("moto", bench.moto_pid),
        ):
            raw = bench.work / f"profile-{name}.txt"
            spies[name] = (
                raw,
                subprocess.Popen(
                    [
                        str(spy),
                        "record",
                        "--pid",
                        str(pid),
                        "--rate",
                        "200",
                        "--format",
                        "raw",
                        "--output",
                        str(raw),
                        "--nonblocking",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                ),
            )
        time.sleep(1)  # py-spy attaches asynchronously
        first = bench.recorder.count()
        start = time.time()
        bench.aws.send_events(queues.intake, events)
        wait_until(
            lambda: finals <= {b.commit for b in bench.recorder.since(first)},
            within=size.plan.timeout,
            what="profiled burst",
            every=0.1,
        )
        wall = time.time() - start
        for name, (raw, process) in spies.items():
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                terminate(process)
            if raw.exists():
                found[name] = report.collapse(raw.read_text(), rate=200, wall=wall)
                shutil.copy(raw, bench.args.out / f"profile-{size.name}-{name}.txt")
    finally:
        service.stop()
        bench.aws.empty(bucket)
    return found
