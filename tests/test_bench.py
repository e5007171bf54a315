"""The benchmark's smoke mode: `make bench`'s own code path, end to end, on a tiny repository.

It starts a real moto server, the SSH git host and the service, pushes 3 real commits, and
measures B (the service) and F (the floor); then the cold-start section on a small
history-heavy repository: fresh and warm single pushes against their floors, and two fresh
instances at once. Only the shape of the results is checked: the
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

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

COLD_START = {
    ("B", "single-cold"),
    ("F", "single-cold"),
    ("B", "single-warm"),
    ("F", "single-warm"),
    ("B", "burst"),
    ("B", "single-warm-many"),
    ("F", "single-warm-many"),
    ("B", "fresh-instances"),
    ("F", "fresh-instances"),
}

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


# Session-scoped: one smoke run for all its tests, which conftest keeps on one xdist worker
# (a module fixture is set up again each time that worker comes back to this module).
@pytest.fixture(scope="session")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-results")
    cache = tmp_path_factory.mktemp("bench-cache")
    completed = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(out), "--cache", str(cache)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert (out / "summary.md").read_text().startswith("Measured on")
    document: dict[str, Any] = json.loads((out / "results.json").read_text())
    document["_stdout"] = completed.stdout
    return document


def test_smoke_runs_b_and_f_on_the_tiny_repository(results: dict[str, Any]) -> None:
    assert results["mode"] == "smoke"
    assert set(results["repositories"]) == {"tiny", "history-tiny"}
    assert results["repositories"]["tiny"]["files"] > 0
    measured = {(r["variant"], r["scenario"]) for r in results["runs"] if r["size"] == "tiny"}
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
        expected = {"burst": 3, "fresh-instances": 2}.get(run["scenario"], 1)
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


def test_cold_start_measures_fresh_instances_against_both_floors(
    results: dict[str, Any],
) -> None:
    runs = [r for r in results["runs"] if r["size"] == "history-tiny"]
    assert {(r["variant"], r["scenario"]) for r in runs} == COLD_START
    assert results["repositories"]["history-tiny"]["history_commits"] == 300
    labels = {r["label"] for r in runs if r["scenario"] == "single-cold"}
    assert labels == {"B c=8", "F depth-1", "F full history"}
    sent = {}
    for run in runs:
        window = run["cpu_breakdown"]
        if run["scenario"] in ("single-cold", "fresh-instances"):  # an empty cache fetches
            assert window["githost_fetches"] >= run["events"], run["label"]
            sent[(run["label"], run["scenario"])] = window["githost_bytes_sent"]
    # A depth-1 fetch sends one tree; the full-history fetch sends 300 commits' worth.
    assert 0 < sent[("F depth-1", "single-cold")] < sent[("F full history", "single-cold")]
    assert 0 < sent[("B c=8", "single-cold")] < sent[("F full history", "single-cold")]
    assert 0 < sent[("B x2", "fresh-instances")] < sent[("F full history x2", "fresh-instances")]
    cache = results["repositories"]["history-tiny"]["service_cache"]
    assert cache["shallow_commits"] >= 1 and cache["loose_objects"] == 0
    targets = {t["target"] for t in results["summary"]["targets"]}
    assert "history-tiny: single push, fresh instance, <= 1.25x the depth-1 floor" in targets
    assert "history-tiny: N fresh instances at once, the git host's work" in targets


def test_summary_and_table(results: dict[str, Any]) -> None:
    groups = [g for g in results["summary"]["groups"] if g["size"] == "tiny"]
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


def test_archive_extras_measures_git_metadata_and_submodules(results: dict[str, Any]) -> None:
    [row] = results["archive_extras"]
    assert row["size"] == "tiny"
    assert row["git_metadata_bytes"] > row["plain_bytes"] > 0  # the .git is in the zip
    # The superproject's archive holds the submodule's files: at least the plain archive's.
    assert row["submodules_bytes"] > row["superproject_plain_bytes"]
    assert row["submodules_bytes"] >= row["plain_bytes"]
