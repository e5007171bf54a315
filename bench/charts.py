"""Charts from bench/results/results.json (run with .venv-bench's Python: it has matplotlib).

    .venv-bench/bin/python bench/charts.py bench/results

Writes throughput-vs-concurrency.png and latency-vs-size.png (the sizes section) and
cold-start.png (the cold-start section) into that directory, for the sections it ran.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib  # type: ignore[import-not-found,unused-ignore]

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]  # noqa: E402

SIZES = ["tiny", "small", "medium", "large"]


def _rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = document["summary"]["groups"]
    return rows


def _concurrency(label: str) -> int | None:
    for word in label.split():
        if word.startswith("c="):
            return int(word[2:])
    return None


def throughput_chart(document: dict[str, Any], out: Path) -> None:
    rows = _rows(document)
    sizes = [s for s in SIZES if any(r["size"] == s for r in rows)]
    if not sizes:
        return
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        sweep = sorted(
            (_concurrency(r["label"]) or 0, r["throughput_eps"])
            for r in rows
            if r["size"] == size
            and r["variant"] == "B"
            and r["scenario"] == "burst"
            and "zip=" not in r["label"]
        )
        if sweep:
            xs = [c for c, _ in sweep]
            ax.errorbar(
                xs,
                [t["median"] for _, t in sweep],
                yerr=[
                    [t["median"] - t["min"] for _, t in sweep],
                    [t["max"] - t["median"] for _, t in sweep],
                ],
                marker="o",
                capsize=3,
                label="B branchbuild",
            )
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
        for label, style in (("A original.sh", "r--"), ("F floor", "g:"), ("F floor x2", "g-.")):
            for r in rows:
                if r["size"] == size and r["label"] == label and r["scenario"] == "burst":
                    ax.axhline(
                        r["throughput_eps"]["median"],
                        linestyle=style[1:],
                        color=style[0],
                        label=label,
                    )
        for r in rows:
            if r["size"] == size and r["variant"] == "B" and "zip=" in r["label"]:
                ax.plot(
                    [_concurrency(r["label"])],
                    [r["throughput_eps"]["median"]],
                    "k^",
                    label=r["label"],
                )
        ax.set_title(
            f"{size}: burst of {next(r['events'] for r in rows if r['size'] == size)} pushes"
        )
        ax.set_xlabel("BRANCHBUILD_CONCURRENCY")
        ax.set_ylabel("events / s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "throughput-vs-concurrency.png", dpi=110)
    plt.close(fig)


def latency_chart(document: dict[str, Any], out: Path) -> None:
    rows = _rows(document)
    repos = document["repositories"]
    sizes = [s for s in SIZES if s in repos]
    if not sizes:
        return
    mb = {s: repos[s]["bytes"] / 1024 / 1024 for s in sizes}
    series = [
        ("A original.sh", "burst", "r-o", "A in a burst (queueing included)"),
        ("B c=8", "burst", "b-o", "B c=8 in a burst (queueing included)"),
        ("F floor", "burst", "g-o", "F per push, serial (no queue)"),
        ("B c=8", "single-warm", "b--s", "B single push, warm"),
        ("F floor", "single-warm", "g--s", "F single push, warm"),
        ("B c=8", "single-cold", "b:^", "B single push, cold"),
        ("F floor", "single-cold", "g:^", "F single push, cold"),
    ]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, scenario, style, name in series:
        points = [
            (mb[r["size"]], r["latency_p50"]["median"])
            for r in rows
            if r["label"] == label and r["scenario"] == scenario and r["size"] in mb
        ]
        if points:
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([mb[s] for s in sizes], [f"{s}\n{mb[s]:.0f} MB" for s in sizes])
    ax.set_xlabel("repository (files at the pushed commit)")
    ax.set_ylabel("enqueue → StartBuild, p50 (s)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency-vs-size.png", dpi=110)
    plt.close(fig)


def cold_start_chart(document: dict[str, Any], out: Path) -> None:
    """Left: single pushes on the history-heavy repository, B against its floors, cold and
    warm. Right: the git host's CPU and bytes sent for N fresh instances at once."""
    rows = _rows(document)
    size = next((s for s in ("history", "history-tiny") if s in document["repositories"]), None)
    if size is None:
        return
    bars = [
        ("single-cold", "B c=8", "B, fresh\ninstance", "tab:blue"),
        ("single-cold", "F depth-1", "F depth-1\n(cold floor)", "tab:green"),
        ("single-cold", "F full history", "F full history\n(the service\nbefore)", "tab:red"),
        ("single-warm", "B c=8", "B, warm", "tab:blue"),
        ("single-warm", "F floor", "F warm", "tab:green"),
        ("single-warm-many", "B c=8", "B, warm\nafter the\nbursts", "tab:blue"),
        ("single-warm-many", "F floor", "F warm", "tab:green"),
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names: list[str] = []
    values: list[float] = []
    errors: list[list[float]] = [[], []]
    colours: list[str] = []
    for scenario, label, name, colour in bars:
        row = next(
            (
                r
                for r in rows
                if r["size"] == size and r["scenario"] == scenario and r["label"] == label
            ),
            None,
        )
        if row is None:
            continue
        lat = row["latency_p50"]
        names.append(name)
        values.append(lat["median"])
        errors[0].append(lat["median"] - lat["min"])
        errors[1].append(lat["max"] - lat["median"])
        colours.append(colour)
    left.bar(range(len(values)), values, yerr=errors, color=colours, capsize=3)
    left.set_xticks(range(len(values)), names, fontsize=7)
    left.set_ylabel("enqueue → StartBuild, p50 (s)")
    repo = document["repositories"][size]
    left.set_title(
        f"{size}: {repo['files']} files, {repo['history_commits']} commits; single pushes"
    )
    left.grid(alpha=0.3, axis="y")
    fresh = [
        r for r in document["runs"] if r["size"] == size and r["scenario"] == "fresh-instances"
    ]
    mb_axis = right.twinx()
    for variant, style, name in (("B", "b-o", "B (depth 1)"), ("F", "r-s", "full history")):
        points = sorted(
            (
                r["events"],
                r["cpu_breakdown"].get("githost_cpu_own", 0.0)
                + r["cpu_breakdown"].get("githost_cpu_children", 0.0),
                r["cpu_breakdown"].get("githost_bytes_sent", 0) / 1024 / 1024,
            )
            for r in fresh
            if r["variant"] == variant
        )
        if points:
            xs = [p[0] for p in points]
            right.plot(xs, [p[1] for p in points], style, label=f"{name}: CPU-s")
            mb_axis.plot(
                xs, [p[2] for p in points], style[0] + ":" + style[2], label=f"{name}: MB sent"
            )
            right.set_xticks(xs, [str(x) for x in xs])
    right.set_xlabel("fresh instances starting at once")
    right.set_ylabel("git host CPU seconds (solid)")
    mb_axis.set_ylabel("MB the git host sent (dotted)")
    mb_axis.set_ylim(bottom=0)
    right.set_title("a deploy: the git host's work")
    right.set_ylim(bottom=0)
    right.grid(alpha=0.3)
    lines = right.get_legend_handles_labels()
    more = mb_axis.get_legend_handles_labels()
    right.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "cold-start.png", dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    document = json.loads((out / "results.json").read_text())
    throughput_chart(document, out)
    latency_chart(document, out)
    cold_start_chart(document, out)
    written = sorted(p.name for p in out.glob("*.png"))
    sys.stdout.write(f"charts in {out}: {', '.join(written)}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
