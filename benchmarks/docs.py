"""The generated sections of ``docs/benchmarks.md``: their markers and their markdown.

A section is whatever lies between ``<!-- bench:NAME:start -->`` and
``<!-- bench:NAME:end -->``; it is replaced whole, and nothing outside the
markers is touched, so the hand-written prose around the tables survives every
run. Each ``render_*`` takes one part of ``bench-results.json`` (see
``standard.py``) and returns markdown; plots are drawn into ``img_dir``.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from spigot.bench.report import per_level

# Each part of the suite and the markers its results fill; every run also
# fills the "machine" marker.
MARKERS: dict[str, tuple[str, ...]] = {
    "decode": ("decode",),
    "peers": ("peers-llama-server", "peers-llama-cpp-python"),
    "prefix": ("prefix",),
    "interference": ("interference",),
}


class MarkerError(ValueError):
    pass


def start_marker(name: str) -> str:
    return f"<!-- bench:{name}:start -->"


def end_marker(name: str) -> str:
    return f"<!-- bench:{name}:end -->"


def missing_markers(text: str, names: Iterable[str]) -> list[str]:
    """The markers among ``names`` that are absent, doubled or out of order in ``text``."""
    bad = []
    for name in names:
        start, end = start_marker(name), end_marker(name)
        if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
            bad.append(name)
    return bad


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with what lies between ``name``'s markers replaced by ``body``."""
    if missing_markers(text, [name]):
        raise MarkerError(f"need exactly one {start_marker(name)} before one {end_marker(name)}")
    start, end = start_marker(name), end_marker(name)
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    # Blank lines around the body: the comments stay HTML blocks of their own
    # and a table right after a marker still renders as a table.
    return f"{head}{start}\n\n{body.strip()}\n\n{end}{tail}"


# -- shared pieces ---------------------------------------------------------------


def _ms(seconds: float | None, digits: int = 0) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.{digits}f} ms"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _cached(level: dict[str, Any]) -> str:
    """Mean cached prompt tokens of a bench level, out of its mean prompt."""
    cached, prompt = level.get("cached_tokens_mean"), level.get("prompt_tokens_mean")
    if cached is None or prompt is None:
        return "-"
    return f"{cached:,.0f} of {prompt:,.0f}"


def _round_ratios(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Throughput ratios of the rounds the two servers ran back to back, and
    their median: a paired figure, which the machine's drift from round to
    round moves less than the ratio of the two servers' medians."""
    pairs = zip(a.get("rounds", []), b.get("rounds", []), strict=False)
    ratios = [
        ra["output_tokens_per_s"] / rb["output_tokens_per_s"]
        for ra, rb in pairs
        if ra["output_tokens_per_s"] and rb["output_tokens_per_s"]
    ]
    if len(ratios) < 2:
        return "-"
    each = ", ".join(f"{r:.2f}" for r in ratios)
    return f"{each} (median {statistics.median(ratios):.2f})"


def _medians(rounds: int) -> str:
    return f"medians of {rounds} rounds" if rounds > 1 else "one round"


def _run_line(entry: dict[str, Any], what: str) -> str:
    """Where and when a part was measured, and a warning on ``--quick`` results."""
    machine = entry["machine"]
    line = (
        f"Run of {machine['date']} at commit `{machine['commit']}`, {machine['cpu']} "
        f"({machine['cpu_count']} cores); {what}:"
    )
    if entry.get("quick"):
        line = (
            "**A `--quick` trial run: tiny durations, not a measurement "
            "(`make bench` replaces it).**\n\n" + line
        )
    return line


def _commands(commands: Sequence[str]) -> str:
    return "```sh\n" + "\n".join(commands) + "\n```"


# -- machine ---------------------------------------------------------------------


def render_machine(sections: dict[str, dict[str, Any]]) -> str:
    """The machine of the latest run, and which parts come from other runs."""
    if not sections:
        return "No results yet: `make bench` writes them."
    runs: dict[str, list[str]] = {}
    for name, entry in sections.items():
        runs.setdefault(entry["machine"]["date"], []).append(name)
    latest_date = max(runs)
    latest = next(e["machine"] for e in sections.values() if e["machine"]["date"] == latest_date)
    commit = f"`{latest['commit']}`" + (" with uncommitted changes" if latest.get("dirty") else "")
    rows = [
        ("CPU", latest["cpu"] + (f" ({latest['cpu_flags']})" if latest.get("cpu_flags") else "")),
        ("cores", f"{latest['cpu_count']} ({latest.get('usable_cores', '?')} usable)"),
        ("RAM", f"{latest.get('memory_gib', '?')} GiB"),
        ("OS", latest["platform"]),
        ("Python", latest["python"]),
        ("llama-cpp-python", latest.get("llama_cpp_python") or "-"),
        ("spigot", f"{latest['spigot']}, commit {commit}"),
        ("model", latest.get("model", "-")),
        ("date", latest["date"]),
        ("load average at start", ", ".join(str(x) for x in latest.get("load_average", []))),
        ("command", f"`{latest['invocation']}`"),
    ]
    lines = [
        "Where the latest `make bench` ran:",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
    ]
    older = [
        f"{', '.join(names)}: {date} (commit `{sections[names[0]]['machine']['commit']}`, "
        f"{sections[names[0]]['machine']['cpu']})"
        for date, names in sorted(runs.items())
        if date != latest_date
    ]
    if older:
        lines += ["", "Parts from earlier runs: " + "; ".join(older) + "."]
    return "\n".join(lines)


# -- decode ----------------------------------------------------------------------


def decode_plot(levels: list[int], bare: list[float], served: list[float], path: Path) -> Path:
    """Bars of aggregate decode tokens/s per stream count: the bare loop beside spigot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    xs = range(len(levels))
    width = 0.38
    axes.bar([x - width / 2 for x in xs], bare, width, color="C7", label="bare loop (ceiling)")
    axes.bar([x + width / 2 for x in xs], served, width, color="C0", label="spigot serve")
    for x, b, s in zip(xs, bare, served, strict=True):
        axes.annotate(f"{s / b:.0%}", (x + width / 2, s), ha="center", va="bottom", fontsize=9)
    axes.set_xticks(list(xs), [str(n) for n in levels])
    axes.set_xlabel("streams decoding together")
    axes.set_ylabel("aggregate decode tokens/s")
    axes.set_title("Decode speed against the bare llama.cpp loop")
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(loc="upper left")
    figure.savefig(path, format="png", dpi=110)
    return path


def render_decode(entry: dict[str, Any], img_dir: Path, img_link: str) -> str:
    from benchmarks.decode import BARE, SERVED, Result, table

    data = entry["data"]
    levels: list[int] = data["streams"]
    results = {}
    for name, key in ((BARE, "bare_tok_s"), (SERVED, "spigot_tok_s")):
        for n in levels:
            results[(name, n)] = Result(name, n, data[key][str(n)])
    decode_plot(
        levels,
        [results[(BARE, n)].median for n in levels],
        [results[(SERVED, n)].median for n in levels],
        img_dir / "decode.png",
    )
    what = (
        f"{data['threads']} threads, `--parallel {data['parallel']}`, {data['tokens']} tokens "
        f"per stream, {_medians(data['rounds'])}"
    )
    return "\n\n".join(
        [
            _run_line(entry, what),
            _commands(entry["commands"]),
            "\n".join(table(results, levels)),
            f"![decode speed against the bare loop]({img_link}decode.png)",
        ]
    )


# -- peers -----------------------------------------------------------------------


def render_peer(name: str, entry: dict[str, Any], img_dir: Path, img_link: str) -> str:
    from spigot.bench.plot import plot
    from spigot.bench.results import error_kinds, error_totals

    peer = entry["data"].get(name)
    if peer is None:
        return f"{name} was not part of this run."
    if not peer["ready"]:
        return (
            f"Not measured on {entry['machine']['date']}: {name} is {peer['reason']}. "
            "Build the peers with `make peers` (about 20 minutes of both cores; "
            "`python -m benchmarks.peers check` tries them), then run "
            "`make bench ARGS='--only peers'`."
        )
    results = peer["results"]
    config = results["config"]
    spigot, other = results["servers"]
    a, b = spigot["name"], other["name"]
    what = (
        f"{config['workload']} workload, streamed chat, greedy, exactly {config['max_tokens']} "
        f"output tokens per request, {per_level(config)}, levels interleaved "
        f"between the two servers, {_medians(config['rounds'])}"
    )
    lines = [
        f"| concurrency | out tok/s {a} | out tok/s {b} | {a} / {b} | per round "
        f"| TTFT p50 {a} / {b} (ms) | TTFT p99 {a} / {b} (ms) | TPOT p50 {a} / {b} (ms) "
        f"| cached prompt tokens {a} / {b} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for la, lb in zip(spigot["levels"], other["levels"], strict=True):
        ta, tb = la["output_tokens_per_s"], lb["output_tokens_per_s"]
        ratio = f"{ta / tb:.2f}" if ta and tb else "-"
        lines.append(
            f"| {la['concurrency']} | {_num(ta)} | {_num(tb)} | {ratio} | {_round_ratios(la, lb)} "
            f"| {_num(la['ttft_ms']['p50'], 0)} / {_num(lb['ttft_ms']['p50'], 0)} "
            f"| {_num(la['ttft_ms']['p99'], 0)} / {_num(lb['ttft_ms']['p99'], 0)} "
            f"| {_num(la['tpot_ms']['p50'])} / {_num(lb['tpot_ms']['p50'])} "
            f"| {_cached(la)} / {_cached(lb)} |"
        )
    failures = []
    for server, (errors, total) in error_totals(results).items():
        detail = f" ({error_kinds(results, server)})" if errors else ""
        failures.append(f"{server} {errors} of {total}{detail}")
    image = f"vs-{name}.png"
    plot(results, img_dir / image)
    return "\n\n".join(
        [
            _run_line(entry, what),
            _commands(peer["commands"]),
            "\n".join(lines),
            f"![spigot against {name}]({img_link}{image})",
            "Failed requests: " + "; ".join(failures) + ".",
        ]
    )


# -- prefix ----------------------------------------------------------------------


def render_prefix(entry: dict[str, Any]) -> str:
    data = entry["data"]
    rounds = data["rounds"]
    cold = [r["cold_s"] for r in rounds]
    warm = [r["warm_s"] for r in rounds]
    # Runs from before the host-memory tier have no restored request.
    restored = [r["restored_s"] for r in rounds if r.get("restored_s") is not None]
    what = (
        f"spigot `--parallel {data['parallel']}`, defaults otherwise; a fresh system prompt of "
        f"{data['sentences']} sentences per round; cold = its first request, warm = a second "
        "question with the same system prompt"
        + (
            ", restored = a third one after a request with another system prompt took the KV "
            "pool's cache (so it comes back from host memory)"
            if restored
            else ""
        )
        + f"; {_medians(len(rounds))}"
    )
    c, w = statistics.median(cold), statistics.median(warm)
    lines = [
        "| request | TTFT median | min | max | cached tokens |",
        "|---|---|---|---|---|",
        f"| cold | {_ms(c)} | {_ms(min(cold))} | {_ms(max(cold))} | |",
        f"| warm | {_ms(w)} | {_ms(min(warm))} | {_ms(max(warm))} | "
        f"{_span([r['cached_tokens'] for r in rounds])} |",
    ]
    summary = f"Warm / cold: **{w / c:.0%}**"
    if restored:
        r = statistics.median(restored)
        lines.append(
            f"| restored | {_ms(r)} | {_ms(min(restored))} | {_ms(max(restored))} | "
            f"{_span([x.get('restored_cached_tokens', 0) for x in rounds])} |"
        )
        summary += f"; restored / cold: **{r / c:.0%}**"
    return "\n\n".join(
        [_run_line(entry, what), _commands(entry["commands"]), "\n".join(lines), summary + "."]
    )


def _span(values: list[int]) -> str:
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}-{high}"


# -- interference ----------------------------------------------------------------


def render_interference(entry: dict[str, Any]) -> str:
    data = entry["data"]
    what = (
        f"`--parallel {data['parallel']}` (so the long prompt does not wait for a slot), "
        f"{data['streams']} streams of {data['tokens']} tokens, a ~{data['prompt_tokens']:,}-token "
        f"prompt, a fresh server per measurement; the streams' median gap is taken outside "
        f"the long prompt's prefill, the p99 during it; {_medians(data['rounds'])}"
    )
    lines = [
        "| prompt chunks while streams decode | streams' inter-token median "
        "| p99 during the prefill | p99 / median | long prompt TTFT |",
        "|---|---|---|---|---|",
    ]
    for setting in data["settings"]:
        runs = data["results"][setting["label"]]
        median = _median(r["gap_median_s"] for r in runs)
        p99 = _median(r["during_p99_s"] for r in runs)
        ratio = _median(
            r["during_p99_s"] / r["gap_median_s"] for r in runs if r["during_p99_s"] is not None
        )
        ttft = _median(r["long_ttft_s"] for r in runs)
        flags = " ".join(setting["flags"])
        label = f"`{flags}`" if flags else "time budget (default)"
        lines.append(
            f"| {label} | {_ms(median, 1)} | {_ms(p99, 1)} "
            f"| {'-' if ratio is None else f'{ratio:.1f}x'} "
            f"| {'-' if ttft is None else f'{ttft:.1f} s'} |"
        )
    return "\n\n".join([_run_line(entry, what), _commands(entry["commands"]), "\n".join(lines)])


def render(part: str, entry: dict[str, Any], img_dir: Path, img_link: str) -> dict[str, str]:
    """Marker name -> markdown for one part's results."""
    if part == "decode":
        return {"decode": render_decode(entry, img_dir, img_link)}
    if part == "peers":
        return {
            marker: render_peer(marker.removeprefix("peers-"), entry, img_dir, img_link)
            for marker in MARKERS["peers"]
        }
    if part == "prefix":
        return {"prefix": render_prefix(entry)}
    if part == "interference":
        return {"interference": render_interference(entry)}
    raise ValueError(f"unknown part {part!r}")
