"""Aggregate the raw runs: medians and spreads, the targets, a console table and summary.md."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

SIZE_ORDER = {"tiny": 0, "small": 1, "medium": 2, "large": 3, "history-tiny": 4, "history": 5}
SCENARIO_ORDER = {
    "burst": 0,
    "single-warm": 1,
    "single-warm-many": 2,
    "single-cold": 3,
    "fresh-instances": 4,
}


def percentile(values: list[float], pct: float) -> float:
    """Linear-interpolated percentile; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: list[float]) -> float:
    return percentile(values, 50)


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(median(values), 4),
        "min": round(min(values), 4) if values else 0.0,
        "max": round(max(values), 4) if values else 0.0,
        "n": len(values),
    }


def rss_of(run: dict[str, Any]) -> float:
    """The memory figure compared: the long-lived Python process for B (the service) and F
    (floor.py), without their git children, whose RSS counts the repository's memory-mapped
    pack; for A, with no long-lived process, the whole tree (bash, aws, git, zip)."""
    return float(run["peak_rss_mb"] if run["variant"] == "A" else run["process_rss_mb"])


def one_line(run: dict[str, Any]) -> str:
    return (
        f"  {run['size']:<6} {run['label']:<16} {run['scenario']:<11} "
        f"{run['events']:>3} ev  {run['throughput_eps']:>7.2f} ev/s  "
        f"p50 {run['latency_p50']:>6.2f} s  p95 {run['latency_p95']:>6.2f} s  "
        f"cpu/ev {run['cpu_per_event']:>6.3f} s  rss {rss_of(run):>6.1f} MB  "
        f"builds {run['builds']}"
    )


def groups(document: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (size, label, scenario) with median and min/max over its runs."""
    by: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in document["runs"]:
        by[(run["size"], run["label"], run["scenario"])].append(run)
    rows = []
    for (size, label, scenario), runs in by.items():
        rows.append(
            {
                "size": size,
                "label": label,
                "scenario": scenario,
                "variant": runs[0]["variant"],
                "settings": runs[0].get("settings", {}),
                "runs": len(runs),
                "events": runs[0]["events"],
                "branches": runs[0]["branches"],
                "builds": _spread([r["builds"] for r in runs]),
                "superseded": _spread([r["superseded"] for r in runs]),
                "errors": sum(r["errors"] for r in runs),
                "throughput_eps": _spread([r["throughput_eps"] for r in runs]),
                "latency_p50": _spread([r["latency_p50"] for r in runs]),
                "latency_p95": _spread([r["latency_p95"] for r in runs]),
                "cpu_per_event": _spread([r["cpu_per_event"] for r in runs]),
                "rss_mb": _spread([rss_of(r) for r in runs]),
                "disk_mb": _spread([max(r["peak_disk_mb"].values(), default=0.0) for r in runs]),
                "uploaded_mb": _spread([r["bytes_uploaded"] / 1024 / 1024 for r in runs]),
                "machine_busy": _spread(
                    [r["cpu_breakdown"].get("machine_busy", 0.0) for r in runs]
                ),
                "githost_cores": _spread(
                    [
                        r["cpu_breakdown"].get("githost_cpu_own", 0.0)
                        / max(r["cpu_breakdown"].get("window_seconds", 1.0), 1e-9)
                        for r in runs
                    ]
                ),
                "moto_cores": _spread(
                    [
                        r["cpu_breakdown"].get("moto_cpu_own", 0.0)
                        / max(r["cpu_breakdown"].get("window_seconds", 1.0), 1e-9)
                        for r in runs
                    ]
                ),
            }
        )
    rows.sort(
        key=lambda r: (
            SIZE_ORDER.get(r["size"], 9),
            SCENARIO_ORDER.get(r["scenario"], 9),
            r["variant"],
            _concurrency(r["label"]),
            r["label"],
        )
    )
    return rows


def _concurrency(label: str) -> int:
    for word in label.split():
        if word.startswith("c="):
            return int(word[2:])
    return 0


def _find(
    rows: list[dict[str, Any]], size: str, scenario: str, label: str
) -> dict[str, Any] | None:
    for row in rows:
        if row["size"] == size and row["scenario"] == scenario and row["label"] == label:
            return row
    return None


def _best_b(rows: list[dict[str, Any]], size: str) -> dict[str, Any] | None:
    candidates = [
        r
        for r in rows
        if r["size"] == size
        and r["variant"] == "B"
        and r["scenario"] == "burst"
        and "zip=" not in r["label"]
    ]
    return max(candidates, key=lambda r: r["throughput_eps"]["median"], default=None)


def summarize(document: dict[str, Any]) -> dict[str, Any]:
    rows = groups(document)
    targets: list[dict[str, Any]] = []
    # 1. Small-repository throughput at least 30x the original's.
    a = _find(rows, "small", "burst", "A original.sh")
    best = _best_b(rows, "small")
    default = _find(rows, "small", "burst", "B c=8")
    if a and best and a["throughput_eps"]["median"] > 0:
        ratio = best["throughput_eps"]["median"] / a["throughput_eps"]["median"]
        ratio_default = (
            default["throughput_eps"]["median"] / a["throughput_eps"]["median"] if default else 0
        )
        targets.append(
            {
                "target": "small-repo throughput >= 30x A",
                "value": f"{ratio:.1f}x at best ({best['label']}), {ratio_default:.1f}x at default",
                "ratio": round(ratio, 2),
                "met": ratio >= 30,
            }
        )
    # 2. A single medium push within 1.25x of the floor, warm and cold.
    for scenario, floor_text in (("single-warm", "F warm"), ("single-cold", "F cold")):
        b = _find(rows, "medium", scenario, "B c=8")
        f = _find(rows, "medium", scenario, "F floor")
        if b and f and f["latency_p50"]["median"] > 0:
            ratio = b["latency_p50"]["median"] / f["latency_p50"]["median"]
            targets.append(
                {
                    "target": (
                        f"medium single push, {scenario.split('-')[1]} cache, <= 1.25x {floor_text}"
                    ),
                    "value": (
                        f"{b['latency_p50']['median']:.2f} s vs {f['latency_p50']['median']:.2f} s "
                        f"= {ratio:.2f}x"
                    ),
                    "ratio": round(ratio, 3),
                    "met": ratio <= 1.25,
                }
            )
    # 3. Service peak RSS under 200 MB while streaming, whatever the repository's size: one
    # push at a time (one archive stream), and in bursts (several streams at once).
    for scenario, what in (("single-warm", "one push at a time"), ("burst", "bursts")):
        peaks: dict[str, float] = {}
        for row in rows:
            if row["variant"] == "B" and row["scenario"] == scenario:
                peaks[row["size"]] = max(peaks.get(row["size"], 0.0), row["rss_mb"]["max"])
        if peaks:
            targets.append(
                {
                    "target": f"service peak RSS < 200 MB while streaming, {what}",
                    "value": ", ".join(
                        f"{s}: {v:.0f} MB"
                        for s, v in sorted(peaks.items(), key=lambda kv: SIZE_ORDER.get(kv[0], 9))
                    ),
                    "met": max(peaks.values()) < 200,
                }
            )
    # 4. Throughput grows with concurrency until the cores saturate.
    for size in sorted({r["size"] for r in rows}, key=lambda s: SIZE_ORDER.get(s, 9)):
        sweep = sorted(
            (
                (
                    _concurrency(r["label"]),
                    r["throughput_eps"]["median"],
                    r["machine_busy"]["median"],
                )
                for r in rows
                if r["size"] == size
                and r["variant"] == "B"
                and r["scenario"] == "burst"
                and "zip=" not in r["label"]
            ),
        )
        if len(sweep) >= 2:
            targets.append(
                {
                    "target": f"{size}: throughput vs concurrency (machine CPU busy)",
                    "value": ", ".join(f"c={c}: {t:.2f}/s ({b:.0%})" for c, t, b in sweep),
                    "met": None,
                }
            )
    targets += cold_start_targets(document, rows)
    return {"groups": rows, "targets": targets, "cpu_shares": cpu_shares(document, rows)}


def cold_start_targets(
    document: dict[str, Any], rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The cold-start section: fresh and warm single pushes on the history-heavy repository
    against their floors, and the git host's work for N fresh instances."""
    found: list[dict[str, Any]] = []
    for size in ("history-tiny", "history"):
        b = _find(rows, size, "single-cold", "B c=8")
        for label, limit, what in (
            ("F depth-1", 1.25, "<= 1.25x the depth-1 floor"),
            ("F full history", None, "vs the full-history floor (the service before)"),
        ):
            f = _find(rows, size, "single-cold", label)
            if b and f and f["latency_p50"]["median"] > 0:
                ratio = b["latency_p50"]["median"] / f["latency_p50"]["median"]
                found.append(
                    {
                        "target": f"{size}: single push, fresh instance, {what}",
                        "value": f"{_pair(b, f)} = {ratio:.2f}x",
                        "ratio": round(ratio, 3),
                        "met": None if limit is None else ratio <= limit,
                    }
                )
        for scenario, when in (("single-warm", ""), ("single-warm-many", ", after the bursts")):
            b, f = _find(rows, size, scenario, "B c=8"), _find(rows, size, scenario, "F floor")
            if b and f and f["latency_p50"]["median"] > 0:
                ratio = b["latency_p50"]["median"] / f["latency_p50"]["median"]
                found.append(
                    {
                        "target": f"{size}: single push, warm shallow cache{when}, <= 1.04x F warm",
                        "value": f"{_pair(b, f)} = {ratio:.2f}x",
                        "ratio": round(ratio, 3),
                        "met": ratio <= 1.04,
                    }
                )
        fresh = sorted(
            (
                r
                for r in document["runs"]
                if r["size"] == size and r["scenario"] == "fresh-instances"
            ),
            key=lambda r: (r["variant"], r["events"]),
        )
        if fresh:
            found.append(
                {
                    "target": f"{size}: N fresh instances at once, the git host's work",
                    "value": "; ".join(
                        f"{r['label']}: {host_cpu(r):.2f} CPU-s, "
                        f"{r['cpu_breakdown'].get('githost_bytes_sent', 0) / 1024 / 1024:.1f} MB "
                        f"sent, p50 {r['latency_p50']:.2f} s"
                        for r in fresh
                    ),
                    "met": None,
                }
            )
    return found


def host_cpu(run: dict[str, Any]) -> float:
    """CPU seconds of the git host (its Python, and the git upload-packs it ran)."""
    window = run["cpu_breakdown"]
    return float(window.get("githost_cpu_own", 0.0) + window.get("githost_cpu_children", 0.0))


def _pair(b: dict[str, Any], f: dict[str, Any]) -> str:
    return f"{b['latency_p50']['median']:.2f} s vs {f['latency_p50']['median']:.2f} s"


def cpu_shares(document: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the CPU of the best B burst went, per size: the service's Python, its git (and
    ssh) children, the git host's Python and its git, moto, and anything else on the machine."""
    found: dict[str, Any] = {}
    for size in {r["size"] for r in rows}:
        best = _best_b(rows, size)
        if best is None:
            continue
        runs = [
            r
            for r in document["runs"]
            if r["size"] == size and r["label"] == best["label"] and r["scenario"] == "burst"
        ]
        parts = {
            "service Python": "service_cpu_own",
            "service git+ssh": "service_cpu_children",
            "git host Python": "githost_cpu_own",
            "git host git": "githost_cpu_children",
            "moto": "moto_cpu_own",
            "other processes": "other_cpu_seconds",
        }
        seconds = {
            name: sum(r["cpu_breakdown"].get(key, 0.0) for r in runs) for name, key in parts.items()
        }
        events = sum(r["events"] for r in runs)
        wall = sum(r["cpu_breakdown"].get("window_seconds", 0.0) for r in runs)
        found[size] = {
            "label": best["label"],
            "cpu_seconds_per_event": {k: round(v / events, 4) for k, v in seconds.items()},
            "cores_busy": {k: round(v / wall, 3) for k, v in seconds.items()} if wall else {},
        }
    return found


def _fmt(spread: dict[str, float], digits: int = 2, unit: str = "") -> str:
    if spread["n"] <= 1:
        return f"{spread['median']:.{digits}f}{unit}"
    return (
        f"{spread['median']:.{digits}f}{unit} "
        f"({spread['min']:.{digits}f}–{spread['max']:.{digits}f})"
    )


_HEADER = (
    "size",
    "variant",
    "scenario",
    "runs",
    "events",
    "throughput ev/s",
    "latency p50 s",
    "latency p95 s",
    "CPU s/event",
    "peak RSS MB",
    "peak disk MB",
    "uploaded MB",
    "builds (superseded)",
)


def _cells(row: dict[str, Any]) -> list[str]:
    return [
        row["size"],
        row["label"],
        row["scenario"],
        str(row["runs"]),
        f"{row['events']}/{row['branches']}br",
        _fmt(row["throughput_eps"]),
        _fmt(row["latency_p50"]),
        _fmt(row["latency_p95"]),
        _fmt(row["cpu_per_event"], 3),
        _fmt(row["rss_mb"], 0),
        _fmt(row["disk_mb"], 0),
        _fmt(row["uploaded_mb"], 1),
        f"{row['builds']['median']:.0f} ({row['superseded']['median']:.0f})"
        + (f" {row['errors']} err" if row["errors"] else ""),
    ]


def table(document: dict[str, Any]) -> str:
    rows = [list(_HEADER)] + [_cells(r) for r in document["summary"]["groups"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for t in document["summary"]["targets"]:
        mark = {True: "MET", False: "NOT MET", None: "info"}[t["met"]]
        lines.append(f"[{mark}] {t['target']}: {t['value']}")
    return "\n".join(lines)


def markdown(document: dict[str, Any]) -> str:
    m = document["machine"]
    out = [
        f"Measured on {m['cpus']} CPUs ({m['cpu_model'] or 'unknown CPU'}), "
        f"{m['memory_gib']} GiB, Python {m['python']}, {m['git']}, service at "
        f"{m.get('service_commit', 'unknown')}; mode `{document['mode']}`, "
        f"{document['seconds'] / 60:.0f} min. Median over the runs, (min–max) when more than one.",
        "",
        "| repository | files | size |",
        "|---|---:|---:|",
    ]
    for size, repo in sorted(
        document["repositories"].items(), key=lambda kv: SIZE_ORDER.get(kv[0], 9)
    ):
        out.append(
            f"| {size} (`{repo['repository']}`) | {repo['files']} | "
            f"{repo['bytes'] / 1024 / 1024:.0f} MB |"
        )
    out += ["", "| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    for row in document["summary"]["groups"]:
        out.append("| " + " | ".join(_cells(row)) + " |")
    out += ["", "| target | measured | met |", "|---|---|---|"]
    for t in document["summary"]["targets"]:
        mark = {True: "yes", False: "**no**", None: "–"}[t["met"]]
        out.append(f"| {t['target']} | {t['value']} | {mark} |")
    shares = document["summary"].get("cpu_shares", {})
    if shares:
        names = list(next(iter(shares.values()))["cpu_seconds_per_event"])
        out += [
            "",
            "CPU seconds per event of the best B burst, by process (cores busy in brackets):",
            "",
            "| size | config | " + " | ".join(names) + " |",
            "|---|---|" + "---:|" * len(names),
        ]
        for size, share in sorted(shares.items(), key=lambda kv: SIZE_ORDER.get(kv[0], 9)):
            cells = [
                f"{share['cpu_seconds_per_event'][n]:.3f} ({share['cores_busy'].get(n, 0):.2f})"
                for n in names
            ]
            out.append(f"| {size} | {share['label']} | " + " | ".join(cells) + " |")
    profile = document.get("profile") or {}
    if profile:
        out += ["", "Where the Python processes spend their CPU (py-spy, small burst):", ""]
        for name, found in profile.items():
            packages = ", ".join(f"{f} {p:.0%}" for f, p in found["packages"][:6])
            frames = ", ".join(f"`{f}` {p:.0%}" for f, p in found["service_frames"][:5])
            out.append(
                f"- **{name}**: {found['cores']:.2f} cores busy in Python over "
                f"{found['wall']:.1f} s; by package: {packages}; by our frame: {frames}"
            )
    return "\n".join(out) + "\n"


_IDLE = {"select", "wait", "_do_waitpid", "_worker", "join", "sleep", "poll"}


def _frame(frame: str) -> tuple[str, str]:
    """ "func (pkg/mod.py:12)" -> ("pkg/mod.py", "func")."""
    name, _, where = frame.partition(" (")
    return where.rsplit(":", 1)[0], name


def main(argv: list[str]) -> None:
    """Re-render summary.md and the console table from a results directory's results.json."""
    out = Path(argv[0] if argv else "bench/results")
    document = json.loads((out / "results.json").read_text())
    document["summary"] = summarize(document)
    (out / "results.json").write_text(json.dumps(document, indent=1))
    (out / "summary.md").write_text(markdown(document))
    sys.stdout.write(table(document) + "\n")


def collapse(raw: str, *, rate: int, wall: float) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks -> where the Python CPU went.

    Samples whose innermost frame is a wait (epoll, a condition, waitpid) are idle and left
    out. The rest are counted three ways: by innermost function, by the package of the
    innermost frame (botocore, aiohttp, asyncssh, ...), and by the innermost frame of our own
    code (``service/...``), which says which step of a job pays for the library time under it.
    """
    leaf: Counter[str] = Counter()
    package: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    total = idle = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [_frame(f) for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames:
            continue
        count = int(count_text)
        path, name = frames[-1]
        if name.rsplit(".", 1)[-1] in _IDLE:
            idle += count
            continue
        total += count
        module = path.rsplit("/", 1)[-1].removesuffix(".py")
        leaf[f"{module}.{name}"] += count
        package[path.split("/", 1)[0] if "/" in path else module] += count
        own = [f"{p.removesuffix('.py')}:{n}" for p, n in frames if p.startswith("service/")]
        ours[own[-1] if own else "(outside service/)"] += count

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(v / total, 4)) for k, v in counter.most_common(12)] if total else []

    return {
        "samples": total,
        "idle_samples": idle,
        "wall": round(wall, 2),
        "cores": round(total / rate / wall, 3) if wall else 0.0,
        "top": shares(leaf),
        "packages": shares(package),
        "service_frames": shares(ours),
    }


if __name__ == "__main__":
    main(sys.argv[1:])
