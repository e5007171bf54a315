"""``make bench``: the original design (A), branchbuild (B) and the floor (F), side by side.

One run starts everything on 127.0.0.1 (a moto server, the project's SSH git host, a CodeBuild
recorder), generates or reuses the synthetic repositories, pushes real commits, puts the git
host's CodeCommit events on the intake queue as EventBridge would, and measures each variant.
Raw results go to ``bench/results/results.json``, a Markdown table to ``summary.md``, and
charts (with .venv-bench's matplotlib) to PNG files beside them.

    python -m bench.run                       # everything (about 40 minutes on 2 cores)
    python -m bench.run --sizes small --quick # a quick subset
    python -m bench.run --smoke               # B and F on a tiny repository (the test suite)
    python -m bench.run --sections cold-start # only fresh instances on the history-heavy repo
    python -m bench.run --sections archive-extras --sizes small,medium  # git_metadata, submodules
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from . import extras, procstat, report
from .coldstart import COLD_PLANS, measure_cold_start
from .core import Bench, Plan, Size, _mb
from .infra import ROOT, Aws, BuildRecorder, aws_env, git_host, moto_server
from .repos import git
from .variants import BENCH_VENV, BJob, profile, run_a, run_b, run_f

BENCH = Path(__file__).resolve().parent

# Events over branches, repeats, A's repeats, the concurrency sweep, other zip levels, single
# pushes, repeats of the floor two at a time, timeout. A costs about 4 s per small push and
# over a minute per large one, so it gets fewer repeats; the large repository costs about
# 35 CPU-seconds per push to compress, so it gets two pushes and no sweep.
PLANS: dict[str, dict[str, Plan]] = {
    "full": {
        "small": Plan(40, 20, 3, 2, (1, 2, 4, 8, 16, 32), (0, 6), 3, 3, 600),
        "medium": Plan(8, 4, 2, 1, (1, 2, 8), (0, 6), 3, 1, 900),
        "large": Plan(2, 2, 1, 1, (8,), (0,), 1, 0, 1800),
    },
    "quick": {
        "small": Plan(20, 10, 1, 1, (1, 4, 8), (), 1, 1, 300),
        "medium": Plan(4, 2, 1, 1, (8,), (), 1, 1, 600),
        "large": Plan(2, 2, 1, 1, (8,), (), 1, 0, 1200),
    },
    "smoke": {"tiny": Plan(3, 3, 1, 0, (8,), (), 1, 0, 60)},
}


# -- the whole run ------------------------------------------------------------------------------


def measure_a(bench: Bench, size: Size) -> None:
    """A: the original, one message at a time."""
    for repeat in range(size.plan.a_repeats):
        bench.log(f"{size.name}: A burst {repeat + 1}/{size.plan.a_repeats}")
        run_a(bench, size, repeat)


def measure_b(bench: Bench, size: Size) -> None:
    """B: the concurrency sweep (the default, 8, is part of it, and also takes the warm single
    pushes), the other zip levels at the best concurrency, then single pushes on a cold cache."""
    plan = size.plan
    burst = BJob("burst", plan.events, plan.branches)
    warm_cache = bench.work / f"cache-{size.name}"
    for concurrency in plan.sweep:
        label = f"B c={concurrency}"
        jobs = [burst] * plan.repeats
        if concurrency == 8:
            jobs += [BJob("single-warm", 1, 1)] * plan.singles
        bench.log(f"{size.name}: {label} ({len(jobs)} measurements)")
        overrides = {"BRANCHBUILD_CONCURRENCY": str(concurrency)}
        run_b(bench, size, label, overrides, jobs, warm_cache)
    for level in plan.zip_levels:
        best = best_concurrency(bench, size)
        label = f"B c={best} zip={level}"
        bench.log(f"{size.name}: {label}")
        overrides = {"BRANCHBUILD_CONCURRENCY": str(best), "BRANCHBUILD_ZIP_LEVEL": str(level)}
        run_b(bench, size, label, overrides, [burst] * plan.repeats, warm_cache)
    if not bench.args.smoke:  # cold: an empty cache and a fresh process for each push
        for repeat in range(plan.singles):
            bench.log(f"{size.name}: B cold single push {repeat + 1}/{plan.singles}")
            cold = bench.work / f"cold-{size.name}-{repeat}"
            run_b(bench, size, "B c=8", {}, [BJob("single-cold", 1, 1)], cold, warm_up=False)
            shutil.rmtree(cold, ignore_errors=True)
    bench.repos[size.name]["service_cache_mb"] = _mb(procstat.disk_usage(warm_cache))


def measure_f(bench: Bench, size: Size) -> None:
    """F: the floor, serial and two at a time, then single pushes warm and cold."""
    plan = size.plan
    smoke = bench.args.smoke
    for repeat in range(plan.repeats):
        bench.log(f"{size.name}: F burst {repeat + 1}/{plan.repeats}")
        events = bench.push(size, plan.events, plan.branches)
        run_f(bench, size, "F floor", "burst", events, mode="warm")
    for _ in range(plan.pair_repeats):
        events = bench.push(size, plan.events, plan.branches)
        run_f(bench, size, "F floor x2", "burst", events, mode="warm", parallel=2)
    for _ in range(plan.singles):
        run_f(bench, size, "F floor", "single-warm", bench.push(size, 1, 1), mode="warm")
        if not smoke:
            run_f(bench, size, "F floor", "single-cold", bench.push(size, 1, 1), mode="cold")


def measure_size(bench: Bench, args: argparse.Namespace, size: Size) -> dict[str, Any] | None:
    """A, B and F on one size; the py-spy profiles for the small one."""
    if not args.no_a:
        measure_a(bench, size)
    if "B" in args.variant_set:
        measure_b(bench, size)
    if "F" in args.variant_set:
        measure_f(bench, size)
    if size.name == "small" and not args.no_profile:
        bench.log("small: profiling the service and the git host with py-spy")
        return profile(bench, size, best_concurrency(bench, size))
    return None


def best_concurrency(bench: Bench, size: Size) -> int:
    """The sweep's concurrency with the highest median burst throughput (8 without a sweep)."""
    by: dict[int, list[float]] = {}
    for r in bench.runs:
        if (
            r["size"] == size.name
            and r["variant"] == "B"
            and r["scenario"] == "burst"
            and "BRANCHBUILD_ZIP_LEVEL" not in r["settings"]
        ):
            concurrency = int(r["settings"]["BRANCHBUILD_CONCURRENCY"])
            by.setdefault(concurrency, []).append(r["throughput_eps"])
    return max(by, key=lambda c: report.median(by[c])) if by else 8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        default="small,medium,large",
        help="comma-separated: small, medium, large (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer events, one repeat")
    parser.add_argument(
        "--sections",
        default="sizes,cold-start,archive-extras",
        help="comma-separated: sizes (A, B and F per --sizes), cold-start (fresh instances on "
        "the history-heavy repository), archive-extras (the cost of git_metadata and "
        "submodules per --sizes); default: all three",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="B and F only, a tiny repository, 3 events (what the tests run)",
    )
    parser.add_argument("--repeats", type=int, help="override the plan's repeats")
    parser.add_argument("--variants", default="A,B,F", help="which of A, B, F to run")
    parser.add_argument("--sweep", help="B's concurrencies, e.g. 2,8 (default: the plan's)")
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra environment variable for every B service process (repeatable)",
    )
    parser.add_argument("--no-a", action="store_true", help="skip A (needs .venv-bench's aws)")
    parser.add_argument("--no-charts", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--cache", type=Path, default=BENCH / ".cache")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=15,
        help="seconds to wait for an idle machine before each measurement (0: never)",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.no_a, args.no_charts, args.no_profile = "tiny", True, True, True
        args.quiet_wait = 0
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    wanted = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in wanted if s not in PLANS[args.mode]]
    if unknown:
        parser.error(
            f"unknown size(s) {unknown} for this mode; choose from {list(PLANS[args.mode])}"
        )
    args.size_list = wanted
    args.section_set = {x for x in args.sections.split(",") if x}
    known = {"sizes", "cold-start", "archive-extras"}
    if args.section_set - known:
        parser.error(f"unknown section(s) {sorted(args.section_set - known)}")
    if not args.section_set & {"sizes", "archive-extras"}:
        args.size_list = []
    args.variant_set = set(args.variants.upper().split(","))
    if "A" not in args.variant_set:
        args.no_a = True
    if not args.no_a and not (BENCH_VENV / "bin" / "aws").exists():
        parser.error(f"A needs the AWS CLI in {BENCH_VENV} (make bench creates it), or --no-a")
    args.extra_env = dict(item.split("=", 1) for item in args.service_env)
    args.out = args.out.resolve()
    args.cache = args.cache.resolve()
    return args


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(memory / 1024**3, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "git": git("--version"),
        "service_commit": _commit(),
    }


def _commit() -> str:
    """The project's commit the service ran from ("+dirty" with uncommitted changes)."""
    try:
        head = git("rev-parse", "--short", "HEAD", cwd=ROOT)
        dirty = git("status", "--porcelain", "--untracked-files=no", "service", cwd=ROOT)
    except RuntimeError:
        return "unknown"
    return head + ("+dirty" if dirty else "")


def isolate_aws(work: Path) -> None:
    """No ~/.aws, no stray AWS_* variables: everything talks only to this run's emulator."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "BRANCHBUILD_")):
            del os.environ[name]
    os.environ["AWS_CONFIG_FILE"] = str(work / "no-aws-config")
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(work / "no-aws-credentials")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (timeout, kill) unwinds like Ctrl-C: moto, the git host and any service stop too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    work = args.cache / f"work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    isolate_aws(work)
    started = time.time()
    load_before = os.getloadavg()
    host_machine = machine()  # before the run: the service's commit it starts from
    try:
        with ExitStack() as stack:
            endpoint, moto = stack.enter_context(moto_server(work / "moto"))
            recorder = stack.enter_context(BuildRecorder(endpoint))
            host = stack.enter_context(git_host(work))
            env = aws_env(endpoint, recorder.endpoint, work)
            bench = Bench(
                args, work, Aws(endpoint, recorder.endpoint), env, host, recorder, moto.pid
            )
            profiles: dict[str, Any] = {}
            plans: dict[str, Plan] = {}
            cold_start: dict[str, Any] = {}
            archive_extras: list[dict[str, Any]] = []
            for name in args.size_list:
                plan = PLANS[args.mode][name]
                if args.repeats:
                    plan = replace(
                        plan,
                        repeats=args.repeats,
                        a_repeats=min(plan.a_repeats, args.repeats) if plan.a_repeats else 0,
                    )
                if args.sweep:
                    plan = replace(plan, sweep=tuple(int(c) for c in args.sweep.split(",")))
                plans[name] = plan
                size = bench.prepare(name, plan)
                if "archive-extras" in args.section_set:
                    bench.log(f"{name}: archive-extras")
                    archive_extras.append(extras.measure_archive_extras(bench, size, plan.repeats))
                if "sizes" in args.section_set:
                    profiles = measure_size(bench, args, size) or profiles
            if "cold-start" in args.section_set:
                cold_plan = COLD_PLANS[args.mode]
                cold_start = asdict(cold_plan)
                measure_cold_start(bench, cold_plan)
            document = {
                "version": 1,
                "mode": args.mode,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                "seconds": round(time.time() - started, 1),
                "machine": host_machine,
                "plans": {n: asdict(p) for n, p in plans.items()},
                "sections": sorted(args.section_set),
                "cold_start_plan": cold_start,
                "archive_extras": archive_extras,
                "load_before": load_before,
                "repositories": bench.repos,
                "runs": bench.runs,
                "profile": profiles,
            }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    document["summary"] = report.summarize(document)
    (args.out / "results.json").write_text(json.dumps(document, indent=1))
    summary = report.markdown(document) + "\n" + extras.markdown(document["archive_extras"])
    (args.out / "summary.md").write_text(summary)
    sys.stdout.write(report.table(document) + "\n" + extras.markdown(document["archive_extras"]))
    if not args.no_charts:
        charts(args.out)
    return 0


def charts(out: Path) -> None:
    python = BENCH_VENV / "bin" / "python"
    if not python.exists():
        sys.stderr.write(f"no charts: {python} is missing (make bench creates it)\n")
        return
    subprocess.run([str(python), str(BENCH / "charts.py"), str(out)], check=True)


if __name__ == "__main__":
    sys.exit(main())
