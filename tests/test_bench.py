"""The benchmark's smoke mode: `make bench`'s own code path, end to end, on a tiny repository.

It starts a real moto server, the SSH git host and the service, pushes 3 real commits, and
measures B (the service) and F (the floor). Only the shape of the results is checked: the
numbers are whatever this machine gives, so there are no timing assertions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e

RUN_KEYS = {
    "size",
    "variant",
    "label",
    "scenario",
    "events",
    "branches",
    "builds",
    "superseded",
    "errors",
    "wall_seconds",
    "throughput_eps",
    "latencies",
    "latency_p50",
    "latency_p95",
    "cpu_seconds",
    "cpu_per_event",
    "peak_rss_mb",
    "process_rss_mb",
    "peak_disk_mb",
    "bytes_uploaded",
    "cpu_breakdown",
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-results")
    cache = tmp_path_factory.mktemp("bench-cache")
    completed = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(out), "--cache", str(cache)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert (out / "summary.md").read_text().startswith("Measured on")
    document: dict[str, Any] = json.loads((out / "results.json").read_text())
    document["_stdout"] = completed.stdout
    return document


def test_smoke_runs_b_and_f_on_the_tiny_repository(results: dict[str, Any]) -> None:
    assert results["mode"] == "smoke"
    assert set(results["repositories"]) == {"tiny"}
    assert results["repositories"]["tiny"]["files"] > 0
    measured = {(r["variant"], r["scenario"]) for r in results["runs"]}
    assert measured == {
        ("B", "burst"),
        ("B", "single-warm"),
        ("F", "burst"),
        ("F", "single-warm"),
    }
    assert results["machine"]["cpus"] >= 1


def test_every_run_is_complete_and_its_counts_match_its_events(results: dict[str, Any]) -> None:
    for run in results["runs"]:
        assert RUN_KEYS <= set(run), sorted(RUN_KEYS - set(run))
        expected = 3 if run["scenario"] == "burst" else 1
        assert run["events"] == expected
        assert len(run["latencies"]) == run["events"]  # every event got its build
        assert run["errors"] == 0
        if run["variant"] == "B":  # a superseded push is built by the newer build of its branch
            assert run["builds"] + run["superseded"] == run["events"]
        else:
            assert run["builds"] == run["events"]
        for key in ("wall_seconds", "throughput_eps", "latency_p50", "latency_p95"):
            assert run[key] > 0, key
        assert run["latency_p95"] >= run["latency_p50"]
        assert all(x > 0 for x in run["latencies"])
        assert run["cpu_seconds"] > 0 and run["cpu_per_event"] > 0
        assert run["process_rss_mb"] > 0 and run["peak_rss_mb"] >= run["process_rss_mb"]
        assert run["bytes_uploaded"] > 0
        assert run["cpu_breakdown"]["window_seconds"] > 0


def test_the_service_streams_its_archives(results: dict[str, Any]) -> None:
    for run in results["runs"]:
        if run["variant"] == "B":
            assert run["bytes_uploaded_metric"] == run["bytes_uploaded"]
            assert run["peak_disk_mb"]["tmp"] == 0  # nothing spooled to a temporary file
            assert set(run["stage_mean_seconds"]) == {"fetch", "archive", "upload", "start_build"}


def test_summary_and_table(results: dict[str, Any]) -> None:
    groups = results["summary"]["groups"]
    assert {(g["label"], g["scenario"]) for g in groups} == {
        ("B c=8", "burst"),
        ("B c=8", "single-warm"),
        ("F floor", "burst"),
        ("F floor", "single-warm"),
    }
    for group in groups:
        assert group["runs"] == 1
        assert group["throughput_eps"]["median"] > 0
    assert isinstance(results["summary"]["targets"], list)
    assert "throughput ev/s" in results["_stdout"]
