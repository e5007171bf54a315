"""What every measurement shares: the plan, the repositories, and how a run is measured."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import procstat, report
from .infra import Aws, BuildRecorder, GitHostProcess, StartBuild
from .repos import SPECS, Pusher, RepoSpec, cached, git, tree_bytes


@dataclass(frozen=True)
class Plan:
    """How much to run for one repository size."""

    events: int  # a burst of this many pushes ...
    branches: int  # ... over this many branches
    repeats: int  # runs of each burst measurement (median and min/max over them)
    a_repeats: int  # runs of A's burst
    sweep: tuple[int, ...]  # BRANCHBUILD_CONCURRENCY values for B's burst
    zip_levels: tuple[int, ...]  # also B at these BRANCHBUILD_ZIP_LEVEL values (best c)
    singles: int  # single-push latency measurements, warm and cold
    pair_repeats: int  # runs of the floor two at a time
    timeout: float  # seconds one measurement may take


@dataclass
class Size:
    """A repository size with its generated repository, on the git host, ready to push to."""

    name: str
    spec: RepoSpec
    plan: Plan
    source: Path
    head: str
    pusher: Pusher
    files: int
    bytes: int
    pushes: int = 0


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    aws: Aws
    env: dict[str, str]
    host: GitHostProcess
    recorder: BuildRecorder
    moto_pid: int
    runs: list[dict[str, Any]] = field(default_factory=list)
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)

    def log(self, text: str) -> None:
        if not self.args.quiet:
            sys.stdout.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
            sys.stdout.flush()

    # -- set-up -------------------------------------------------------------------------------

    def prepare(self, name: str, plan: Plan) -> Size:
        spec = SPECS[name]
        self.log(f"{name}: repository {spec.name} (generated once, cached in {self.args.cache})")
        source, head = cached(spec, self.args.cache)
        files, size = tree_bytes(source, head)
        served = self.host.root / "v1" / "repos" / f"{spec.name}.git"
        if not served.exists():  # a local clone hard-links the objects: instant
            served.parent.mkdir(parents=True, exist_ok=True)
            git("clone", "--bare", "--quiet", str(source), str(served))
        pusher = Pusher(
            source, self.work / "push" / spec.name, self.host.url(spec.name), self.host.ssh_command
        )
        self.aws.project(spec.name, "placeholder-bucket")
        self.repos[name] = {
            "repository": spec.name,
            "files": files,
            "bytes": size,
            "head": head,
            "history_commits": spec.commits,
            "binary_files": spec.binaries,
        }
        return Size(name, spec, plan, source, head, pusher, files, size)

    def push(self, size: Size, events: int, branches: int) -> list[dict[str, Any]]:
        """``events`` real pushes over ``branches`` new branches; the git host's events."""
        size.pushes += 1
        names = [f"feature/p{size.pushes:03d}-b{j:02d}" for j in range(min(branches, events))]
        offset = self.host.log_offset()
        for start in range(0, events, len(names)):
            batch = names[: min(len(names), events - start)]
            for n, branch in enumerate(batch):
                size.pusher.commit(branch, f"push {start + n} on {branch}")
            size.pusher.push(batch)  # one push moving every branch of the batch
        found = self.host.events_since(offset)
        if len(found) != events:
            raise RuntimeError(f"expected {events} events from the git host, got {len(found)}")
        return found

    # -- measurement helpers ------------------------------------------------------------------

    def result(
        self, size: Size, variant: str, label: str, scenario: str, **fields: Any
    ) -> dict[str, Any]:
        row = {
            "size": size.name,
            "repository": size.spec.name,
            "variant": variant,
            "label": label,
            "scenario": scenario,
        } | fields
        self.runs.append(row)
        self.log(report.one_line(row))
        return row

    def bytes_uploaded(self, bucket: str, events: list[dict[str, Any]]) -> int:
        commits = {e["detail"]["commitId"] for e in events}
        objects = self.aws.objects(bucket)
        return sum(
            s
            for k, s in objects.items()
            if k.endswith(".zip") and k[:-4].rsplit("/", 1)[-1] in commits
        )

    def wait_for_quiet(self) -> dict[str, float]:
        """Wait (up to --quiet-wait seconds) until the machine is nearly idle: other work on
        it (another test run, say) would slow whatever is measured next."""
        waited, busy = 0.0, 0.0
        deadline = time.monotonic() + self.args.quiet_wait
        while self.args.quiet_wait > 0:
            b0, _, t0 = _machine()
            time.sleep(0.5)
            b1, _, t1 = _machine()
            busy = (b1 - b0) / max(1, t1 - t0)
            if busy < 0.15 or time.monotonic() > deadline:
                break
            waited += 0.5
        return {"quiet_wait_seconds": waited, "busy_before": round(busy, 3)}

    @contextmanager
    def window(self, pids: dict[str, int]) -> Iterator[dict[str, Any]]:
        """CPU of the git host, moto, the machine, and ``pids`` over the block.

        A block that measures a process of its own with wait4 puts that CPU in
        ``out["extra_cpu"]``, so that it is not counted as other work on the machine.
        """
        quiet = self.wait_for_quiet()
        log_offset = self.host.log_offset()
        watched = {"githost": self.host.process.pid, "moto": self.moto_pid} | pids
        before = {name: procstat.cpu(pid) for name, pid in watched.items()}
        me0 = procstat.cpu(os.getpid()).own  # its reaped children are in extra_cpu
        busy0, steal0, total0 = _machine()
        out: dict[str, Any] = dict(quiet)
        start = time.time()
        yield out
        wall = time.time() - start
        busy1, steal1, total1 = _machine()
        me = procstat.cpu(os.getpid()).own - me0
        ours = out.pop("extra_cpu", 0.0) + me
        for name, pid in watched.items():
            try:
                delta = procstat.cpu(pid) - before[name]
            except OSError:
                continue
            out[f"{name}_cpu_own"] = round(delta.own, 3)
            out[f"{name}_cpu_children"] = round(delta.children, 3)
            ours += delta.total
        # Busy and stolen shares of all CPUs, and the CPU seconds used by none of the watched
        # processes nor this orchestrator: other work on the machine disturbs the run.
        jiffies = max(1, total1 - total0)
        out["window_seconds"] = round(wall, 3)
        # What the git host served: upload-pack sessions and the bytes they sent.
        out["githost_fetches"], out["githost_bytes_sent"] = self.host.uploads_since(log_offset)
        out["orchestrator_cpu"] = round(me, 3)
        out["machine_busy"] = round((busy1 - busy0) / jiffies, 3)
        out["machine_steal"] = round((steal1 - steal0) / jiffies, 3)
        out["other_cpu_seconds"] = round(max(0.0, (busy1 - busy0) / _TICK - ours), 2)


_TICK = os.sysconf("SC_CLK_TCK")


def _machine() -> tuple[int, int, int]:
    """(busy excluding steal, steal, total) jiffies over all CPUs since boot."""
    # user nice system idle iowait irq softirq steal guest guest_nice; guest is inside user.
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle, steal = values[3] + values[4], values[7]
    return sum(values) - idle - steal, steal, sum(values)


def latencies(
    events: list[dict[str, Any]], enqueued: list[float], builds: list[StartBuild]
) -> list[float]:
    """Enqueue -> StartBuild for every event. A push that was superseded by a newer push of its
    branch counts until the build of that newer commit started (its change is in that build)."""
    order: dict[str, tuple[str, int]] = {}
    per_branch: dict[str, int] = {}
    for event in events:
        branch = event["detail"]["referenceName"]
        per_branch[branch] = per_branch.get(branch, 0) + 1
        order[event["detail"]["commitId"]] = (branch, per_branch[branch])
    found: list[float] = []
    for event, at in zip(events, enqueued, strict=True):
        branch, seq = order[event["detail"]["commitId"]]
        times = [
            b.at
            for b in builds
            if b.commit in order and order[b.commit][0] == branch and order[b.commit][1] >= seq
        ]
        if times:
            found.append(min(times) - at)
    return found


def wait4(pid: int, deadline: float) -> tuple[int, float]:
    """Wait for child ``pid``; return (exit status, CPU of it and its reaped descendants)."""
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done == pid:
            return os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            return -9, usage.ru_utime + usage.ru_stime
        time.sleep(0.02)


def _throughput(
    events: list[dict[str, Any]], enqueued: list[float], builds: list[StartBuild]
) -> dict[str, Any]:
    lat = latencies(events, enqueued, builds)
    end = max((b.at for b in builds), default=time.time())
    wall = end - min(enqueued)
    return {
        "wall_seconds": round(wall, 3),
        "throughput_eps": round(len(events) / wall, 4) if builds else 0.0,
        "latencies": [round(x, 3) for x in lat],
        "latency_p50": round(report.percentile(lat, 50), 3),
        "latency_p95": round(report.percentile(lat, 95), 3),
    }


def _mb(n: int) -> float:
    return round(n / 1024 / 1024, 1)
