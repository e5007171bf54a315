"""Charts from bench/results/results.json (run with .venv-bench's Python: it has matplotlib).

    .venv-bench/bin/python bench/charts.py bench/results

Writes throughput-vs-concurrency.png and latency-vs-size.png into that directory.
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


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    document = json.loads((out / "results.json").read_text())
    throughput_chart(document, out)
    latency_chart(document, out)
    sys.stdout.write(f"charts: {out}/throughput-vs-concurrency.png, latency-vs-size.png\n")


if __name__ == "__main__":
    main(sys.argv[1:])
