"""Markdown tables of a ``spigot bench`` results dict, for the terminal and for docs."""

from __future__ import annotations

from typing import Any


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def _ratio(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}x"


def per_level(config: dict[str, Any]) -> str:
    """How much each level of a run sends: a duration, or request counts."""
    requests = config.get("requests")
    if config.get("duration") is not None:
        return f"{config['duration']:g} s per level"
    if requests is None:
        return "4 requests per worker"
    if isinstance(requests, (list, tuple)):  # tuple before the JSON round trip
        counts = zip(requests, config["concurrency"], strict=True)
        return "requests per level: " + ", ".join(f"{n} at {c}" for n, c in counts)
    return f"{requests} requests per level"


def header(results: dict[str, Any]) -> str:
    config, machine = results["config"], results["machine"]
    per_level_sent = per_level(config)
    workload = config["prompts_file"] or config["workload"]
    if config.get("unique_prompts"):
        workload += " (each prompt tagged unique)"
    exact = "exactly " if config["exact_tokens"] else "up to "
    rounds = f", {config['rounds']} rounds (medians)" if config["rounds"] > 1 else ""
    return (
        f"Workload {workload}, {config['endpoint']} endpoint, {exact}{config['max_tokens']} "
        f"output tokens per request, {per_level_sent}{rounds}. Machine: {machine.get('cpu')}, "
        f"{machine.get('cpu_count')} cores."
    )


def server_table(server: dict[str, Any]) -> str:
    lines = [
        f"### {server['name']} ({server['model']} at {server['url']}; "
        f"tokens counted from {server['token_count_source'] or '-'})",
        "",
        "| concurrency | requests | errors | out tok/s | req/s | TTFT p50 | TTFT p90 | TTFT p99 "
        "| ITL p50 | ITL p99 | TPOT p50 | e2e p50 | e2e p99 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in server["levels"]:
        ttft, itl, tpot, e2e = lv["ttft_ms"], lv["itl_ms"], lv["tpot_ms"], lv["e2e_ms"]
        lines.append(
            f"| {lv['concurrency']} | {lv['requests']} | {lv['errors']['total']} "
            f"| {_num(lv['output_tokens_per_s'])} | {_num(lv['requests_per_s'], 2)} "
            f"| {_num(ttft['p50'])} | {_num(ttft['p90'])} | {_num(ttft['p99'])} "
            f"| {_num(itl['p50'])} | {_num(itl['p99'])} | {_num(tpot['p50'])} "
            f"| {_num(e2e['p50'], 0)} | {_num(e2e['p99'], 0)} |"
        )
    errors = [
        f"- c={lv['concurrency']}: {sample}"
        for lv in server["levels"]
        for sample in lv["errors"]["samples"]
    ]
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines)


def comparison_table(results: dict[str, Any]) -> str:
    a, b = (s["name"] for s in results["servers"])
    lines = [
        f"### {b} against {a} (ratio = {b} / {a})",
        "",
        f"| concurrency | tok/s {a} | tok/s {b} | ratio | TTFT p50 {a} | TTFT p50 {b} | ratio "
        f"| TTFT p99 {a} | TTFT p99 {b} | ratio | TPOT p50 {a} | TPOT p50 {b} | ratio "
        f"| errors {a} | errors {b} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["comparison"]:
        cells = [str(row["concurrency"])]
        for key in ("output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms"):
            m = row[key]
            cells += [_num(m["a"]), _num(m["b"]), _ratio(m["b_over_a"])]
        cells += [str(row["errors"]["a"]), str(row["errors"]["b"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """The whole report: a header line, one table per server, the comparison if any."""
    parts = [header(results), "Latencies in ms; TPOT = (e2e - TTFT) / (tokens - 1)."]
    parts += [server_table(s) for s in results["servers"]]
    if results.get("comparison"):
        parts.append(comparison_table(results))
    return "\n\n".join(parts) + "\n"
