"""PNG plots of a ``spigot bench`` results dict: one line per server.

Left: output tokens/s against concurrency. Right: TTFT p50 (solid) and p99
(dashed) against concurrency. Drawn on a bare ``Figure`` with the Agg canvas,
so no GUI backend or global pyplot state is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot(results: dict[str, Any], path: Path) -> Path:
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    throughput, ttft = figure.subplots(1, 2)
    levels = results["config"]["concurrency"]
    for i, server in enumerate(results["servers"]):
        colour = f"C{i}"
        xs = [lv["concurrency"] for lv in server["levels"]]
        throughput.plot(
            xs,
            [lv["output_tokens_per_s"] for lv in server["levels"]],
            marker="o",
            color=colour,
            label=server["name"],
        )
        # Levels where every request failed have no TTFT; matplotlib skips NaN.
        p50 = [_or_nan(lv["ttft_ms"]["p50"]) for lv in server["levels"]]
        p99 = [_or_nan(lv["ttft_ms"]["p99"]) for lv in server["levels"]]
        ttft.plot(xs, p50, marker="o", color=colour, label=f"{server['name']} p50")
        ttft.plot(xs, p99, marker="^", color=colour, linestyle="--", label=f"{server['name']} p99")
    config = results["config"]
    workload = config["prompts_file"] or config["workload"]
    for axes, title, ylabel in (
        (throughput, "Output throughput", "output tokens/s"),
        (ttft, "Time to first token", "TTFT (ms)"),
    ):
        axes.set_title(title)
        axes.set_xlabel("concurrency")
        axes.set_ylabel(ylabel)
        if len(levels) > 1 and min(levels) > 0:
            axes.set_xscale("log", base=2)
        axes.set_xticks(levels, [str(c) for c in levels])
        axes.set_ylim(bottom=0)
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.suptitle(f"spigot bench: {workload}, {config['max_tokens']} output tokens per request")
    figure.savefig(path, format="png", dpi=110)
    return path


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value
