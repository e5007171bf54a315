"""``make soak``: thousands of pushes across thousands of branches and hundreds of repositories
through one real service process; its resident memory, open file descriptors and asyncio
tasks are sampled after every wave and must be flat once warmed up.

The service runs as ``python -m service run`` (CodeBuild backend on moto, over HTTP), fetching
from bare repositories on local disk (``file://``: the same git fetch and archive as over SSH,
without an SSH process per fetch on a 2-core machine). Every repository gets its branches and
their commits up front (``git fast-import``); each wave pushes the next commit of a slice of
the branches, so every push fetches, archives, uploads, starts a build and supersedes the
branch's previous one. Results: a table on stdout and ``bench/results/soak.json``.

    python -m bench.soak [--repositories 200] [--branches 10] [--waves 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from localdev.githost import codecommit_event
from service.events import RefChange

from .infra import PYTHON, ROOT, Aws, aws_env, free_port, moto_server, terminate, wait_until
from .procstat import rss
from .service_proc import metric, scrape

RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Sample:
    wave: int
    pushes: int
    builds: float
    seconds: float
    rss_mb: float
    open_fds: int
    asyncio_tasks: float
    dead_lettered: int  # pushes on the work dead-letter queue so far (not built)


Repositories = dict[str, dict[str, list[str]]]


def make_repositories(root: Path, repositories: int, branches: int, commits: int) -> Repositories:
    """Bare repositories, each with ``branches`` branches of ``commits`` commits; returns
    repository -> branch -> the commit ids in order."""
    made: Repositories = {}
    for r in range(repositories):
        name = f"soak-{r:03d}"
        path = root / f"{name}.git"
        subprocess.run(["git", "init", "-q", "--bare", str(path)], check=True)
        subprocess.run(
            ["git", f"--git-dir={path}", "config", "uploadpack.allowAnySHA1InWant", "true"],
            check=True,
        )
        stream: list[str] = []
        mark, marks = 0, {}
        for b in range(branches):
            branch = f"feature/{b % 3}/topic-{b}"
            parent = None
            for c in range(commits):
                mark += 1
                content = f"{name} {branch} {c}\n"
                stream.append(
                    f"commit refs/heads/{branch}\nmark :{mark}\n"
                    f"committer soak <soak@example.com> {1700000000 + c} +0000\n"
                    f"data {len(f'change {c}')}\nchange {c}\n"
                    + (f"from :{parent}\n" if parent else "")
                    + f"M 100644 inline README.md\ndata {len(content)}\n{content}\n"
                )
                marks[mark] = (branch, c)
                parent = mark
        exported = path / "marks"
        subprocess.run(
            ["git", f"--git-dir={path}", "fast-import", "--quiet", f"--export-marks={exported}"],
            input="".join(stream).encode(),
            check=True,
        )
        commits_of: dict[str, list[str]] = {}
        for line in exported.read_text().splitlines():
            number, commit = line.split()
            branch, _ = marks[int(number[1:])]
            commits_of.setdefault(branch, []).append(commit)
        made[name] = commits_of
    return made


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repositories", type=int, default=200)
    parser.add_argument("--branches", type=int, default=10, help="per repository")
    parser.add_argument("--waves", type=int, default=8)
    parser.add_argument("--warm-up", type=int, default=2, help="waves before the baseline")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        work = Path(tmp)
        started = time.monotonic()
        # Each wave pushes one more commit to half of the branches (alternating halves).
        commits = (args.waves + 1) // 2 + 1  # wave w pushes commit (w + 1) // 2
        repos = make_repositories(work / "repos", args.repositories, args.branches, commits)
        print(  # noqa: T201
            f"{args.repositories} repositories, {args.repositories * args.branches} branches "
            f"made in {time.monotonic() - started:.0f} s",
            flush=True,
        )
        with moto_server(work / "moto") as (endpoint, _):
            aws = Aws(endpoint, endpoint)
            queues = aws.queues("soak")
            bucket = aws.bucket("soak")
            aws.project("soak", bucket)
            port = free_port()
            env = aws_env(endpoint, endpoint, work) | {
                "BRANCHBUILD_QUEUE_URL": queues.intake,
                "BRANCHBUILD_WORK_QUEUE_URL": queues.work,
                "BRANCHBUILD_BUCKET": bucket,
                "BRANCHBUILD_PROJECT_TEMPLATE": "soak",
                "BRANCHBUILD_GIT_URL_TEMPLATE": f"file://{work}/repos/{{repository}}.git",
                "BRANCHBUILD_CACHE_DIR": str(work / "cache"),
                "BRANCHBUILD_HTTP_HOST": "127.0.0.1",
                "BRANCHBUILD_HTTP_PORT": str(port),
                "BRANCHBUILD_LOG_FORMAT": "json",
                "BRANCHBUILD_LOG_LEVEL": "WARNING",
                "BRANCHBUILD_WAIT_TIME": "1",
                "BRANCHBUILD_PROTECTED_BRANCHES": "",
            }
            log = work / "service.log"
            with log.open("wb") as out:
                service = subprocess.Popen(
                    [PYTHON, "-m", "service", "run"], env=env, cwd=ROOT, stdout=out, stderr=out
                )
            try:
                samples = run_waves(aws, queues, service, port, repos, args.waves)
            finally:
                terminate(service, within=60)
            errors = [line for line in log.read_text().splitlines() if '"ERROR"' in line]
    return report(samples, args.warm_up, errors)


def run_waves(
    aws: Aws,
    queues: object,
    service: subprocess.Popen[bytes],
    port: int,
    repos: Repositories,
    waves: int,
) -> list[Sample]:
    def ready() -> bool:
        if service.poll() is not None:
            raise RuntimeError(f"the service exited {service.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    wait_until(ready, within=60, what="service readiness")
    intake, work = queues.intake, queues.work  # type: ignore[attr-defined]
    samples: list[Sample] = []
    pushed = 0
    for wave in range(1, waves + 1):
        start = time.monotonic()
        events = []
        for repository, branches in repos.items():
            for number, (branch, commits) in enumerate(sorted(branches.items())):
                if number % 2 != wave % 2:
                    continue
                step = (wave + 1) // 2
                old, new = commits[step - 1], commits[step]
                change = RefChange(repository, f"refs/heads/{branch}", old=old, new=new)
                events.append(codecommit_event(change))
        aws.send_events(intake, events)
        pushed += len(events)

        def drained(total: int = pushed) -> bool:
            if service.poll() is not None:
                raise RuntimeError(f"the service exited {service.returncode}")
            done = metric(scrape(port), "branchbuild_jobs_total")
            return done >= total and aws.queue_depth(intake) == 0 and aws.queue_depth(work) == 0

        wait_until(drained, within=1800, what=f"wave {wave} built", every=1.0)
        found = scrape(port)
        sample = Sample(
            wave=wave,
            pushes=pushed,
            builds=metric(found, "branchbuild_builds_started_total"),
            seconds=round(time.monotonic() - start, 1),
            rss_mb=round(rss(service.pid) / 1e6, 1),
            open_fds=open_fds(service.pid),
            asyncio_tasks=metric(found, "branchbuild_asyncio_tasks"),
            dead_lettered=aws.queue_depth(queues.work_dlq),  # type: ignore[attr-defined]
        )
        samples.append(sample)
        print(sample, flush=True)  # noqa: T201
    return samples


def report(samples: list[Sample], warm_up: int, errors: list[str]) -> int:
    baseline, after = samples[:warm_up], samples[warm_up:]
    rss_base = max(s.rss_mb for s in baseline)
    fds_base = max(s.open_fds for s in baseline)
    tasks_base = max(s.asyncio_tasks for s in baseline)
    flat = {
        # RSS within 10 % of the warm-up's peak; fds and tasks within 2 of it (a pooled HTTP
        # connection opened or closed, or a delete batch still lingering, at the sample).
        "rss": max(s.rss_mb for s in after) <= rss_base * 1.10,
        "open_fds": max(s.open_fds for s in after) <= fds_base + 2,
        "asyncio_tasks": max(s.asyncio_tasks for s in after) <= tasks_base + 2,
    }
    lines = [
        "| wave | pushes | builds | dead-lettered | s | RSS MB | open fds | asyncio tasks |",
        "|" + "---|" * 8,
    ]
    lines += [
        f"| {s.wave} | {s.pushes} | {s.builds:.0f} | {s.dead_lettered} | {s.seconds} | "
        f"{s.rss_mb} | {s.open_fds} | {s.asyncio_tasks:.0f} |"
        for s in samples
    ]
    print("\n".join(lines))  # noqa: T201
    print(f"flat after {warm_up} warm-up waves: {flat}; service errors logged: {len(errors)}")  # noqa: T201
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(
        json.dumps({"samples": [asdict(s) for s in samples], "flat": flat}, indent=2)
    )
    return 0 if all(flat.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
