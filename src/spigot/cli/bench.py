"""``spigot bench``: streamed load against any OpenAI-compatible server, and its report.

The load generator is ``spigot.bench``, imported when a command runs. The
repository's own benchmark suite (``make bench``) is not part of the package:
it lives in the repository's ``benchmarks/`` folder.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


@click.group("bench")
def bench() -> None:
    """Benchmark OpenAI-compatible streaming servers (spigot, vLLM, llama.cpp, ...)."""


def _positive_ints(value: str, expected: str) -> tuple[int, ...]:
    """Comma-separated positive integers, or a usage error saying ``expected``."""
    try:
        numbers = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        numbers = ()
    if not numbers or min(numbers) < 1:
        raise click.BadParameter(expected)
    return numbers


def _levels(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    levels = _positive_ints(value, "expected positive integers such as 1,2,4,8")
    return tuple(dict.fromkeys(levels))  # each level once, in the order given


def _request_counts(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> int | tuple[int, ...] | None:
    if value is None:
        return None
    counts = _positive_ints(value, "expected a positive integer, or one per level such as 10,16")
    return counts[0] if len(counts) == 1 else counts


def _url_name(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc or url


def _plotter() -> Callable[[dict[str, Any], Path], Path]:
    """The PNG plot's drawing function; matplotlib is needed for ``--plot`` only."""
    try:
        from spigot.bench.plot import plot
    except ImportError as exc:
        raise click.ClickException(
            f"--plot needs matplotlib ({exc}); install it, e.g. pip install 'spigot[plots]'"
        ) from None
    return plot


@bench.command("run")
@click.option(
    "--url",
    default=None,
    metavar="URL",
    help="The server's OpenAI base URL. Default: $SPIGOT_BASE_URL, $OPENAI_BASE_URL or "
    "http://127.0.0.1:8000/v1.",
)
@click.option("--model", default=None, help="Model to request. Default: the first one listed.")
@click.option("--api-key", default=None, envvar=["SPIGOT_API_KEY", "OPENAI_API_KEY"])
@click.option("--name", default=None, help="The server's name in tables. Default: host:port.")
@click.option(
    "--concurrency",
    "-c",
    default="1,2,4,8",
    show_default=True,
    callback=_levels,
    help="Comma-separated levels: that many workers send requests back to back.",
)
@click.option(
    "--requests",
    "-n",
    default=None,
    callback=_request_counts,
    help="Requests per level: one count, or one per level (-c 1,8 -n 10,16). "
    "Default: 4 per worker (unless --duration).",
)
@click.option(
    "--duration",
    "-d",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds per level instead of a request count; requests started in time finish.",
)
@click.option(
    "--workload",
    type=click.Choice(["mixed", "long", "shared-prefix"]),
    default="mixed",
    show_default=True,
    help="mixed: the shipped prompt set (short questions to multi-paragraph tasks); "
    "long: synthetic 1,000-2,000-token reports; shared-prefix: one ~1,000-token system "
    "prompt and short questions.",
)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A JSON prompt set ([{id, prompt, system?}] or {prompts: [...]}) instead of --workload.",
)
@click.option("--max-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option(
    "--exact-tokens/--no-exact-tokens",
    default=True,
    show_default=True,
    help="Send ignore_eos and min_tokens = max_tokens so every request generates max_tokens "
    "(spigot, vLLM and llama.cpp honour them; OpenAI itself rejects them).",
)
@click.option(
    "--unique-prompts/--repeat-prompts",
    default=False,
    show_default=True,
    help="Open each request's first message with its own tag, so that no server answers a "
    "prompt of the set from a cache of its earlier use (the set repeats every few dozen "
    "requests). Not for --workload shared-prefix.",
)
@click.option(
    "--endpoint",
    type=click.Choice(["chat", "completions"]),
    default="chat",
    show_default=True,
    help="/chat/completions or /completions (the prompt then is system + user text).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="Seconds one request may take from send to [DONE]; later ones count as timeouts.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Shuffles the prompt order.")
@click.option(
    "--rounds",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Repeat every level; throughputs are the median of the rounds.",
)
@click.option(
    "--warmup",
    type=click.IntRange(0),
    default=1,
    show_default=True,
    help="Untimed requests sent to each server first.",
)
@click.option(
    "--compare",
    "compare_url",
    default=None,
    metavar="URL",
    help="A second server, run interleaved level by level with the first.",
)
@click.option("--compare-name", default=None, help="The second server's name. Default: host:port.")
@click.option("--compare-model", default=None, help="Default: the second server's first model.")
@click.option("--compare-api-key", default=None, help="Default: --api-key.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the results as JSON here.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a PNG: throughput and TTFT against concurrency, one line per server.",
)
@click.option("--raw", is_flag=True, help="Also keep every request's timings in the JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def bench_run(
    url: str | None,
    model: str | None,
    api_key: str | None,
    name: str | None,
    concurrency: tuple[int, ...],
    requests: int | tuple[int, ...] | None,
    duration: float | None,
    workload: str,
    prompts_file: Path | None,
    max_tokens: int,
    exact_tokens: bool,
    unique_prompts: bool,
    endpoint: str,
    timeout: float,
    seed: int,
    rounds: int,
    warmup: int,
    compare_url: str | None,
    compare_name: str | None,
    compare_model: str | None,
    compare_api_key: str | None,
    out: Path | None,
    plot_path: Path | None,
    raw: bool,
    quiet: bool,
) -> None:
    """Stream load at each concurrency level and report TTFT, ITL, TPOT and throughput.

    Every request streams (with include_usage), greedy. Per level: TTFT
    p50/p90/p99, inter-token latency p50/p99, time per output token,
    end-to-end latency, output tokens/s and requests/s over the level's wall
    time, and errors by kind (HTTP status, in-band error event, timeout,
    connection, protocol). A markdown table is printed at the end; --out and
    --plot write JSON and PNG.

    \b
      spigot bench run -c 1,2,4,8 -n 32 --out results.json --plot results.png
      spigot bench run --workload long -d 60 --compare http://127.0.0.1:8080/v1

    Exit status: 0 when every request succeeded, 1 when any failed (the
    results are still printed and written).
    """
    import asyncio
    import json

    from spigot.bench.load import BenchConfig, Target, run_bench
    from spigot.bench.progress import Progress
    from spigot.bench.report import markdown
    from spigot.bench.results import error_kinds, error_totals
    from spigot.client import default_base_url

    if requests is not None and duration is not None:
        raise click.UsageError("give --requests or --duration, not both")
    if isinstance(requests, tuple) and len(requests) != len(concurrency):
        raise click.UsageError(
            f"--requests gives {len(requests)} counts for {len(concurrency)} levels"
        )
    if compare_url is None and (compare_name or compare_model or compare_api_key):
        raise click.UsageError("--compare-name/--compare-model/--compare-api-key need --compare")
    url = url or default_base_url()
    targets = [Target(name or _url_name(url), url, model, api_key)]
    if compare_url:
        other = compare_name or _url_name(compare_url)
        if other == targets[0].name:
            raise click.UsageError("the two servers need different names (--name, --compare-name)")
        targets.append(Target(other, compare_url, compare_model, compare_api_key or api_key))
    plot = _plotter() if plot_path else None  # before any request: matplotlib is optional
    config = BenchConfig(
        targets=tuple(targets),
        concurrency=concurrency,
        requests=requests,
        duration=duration,
        workload=workload,
        prompts_file=prompts_file,
        max_tokens=max_tokens,
        endpoint=endpoint,  # type: ignore[arg-type]
        timeout=timeout,
        seed=seed,
        rounds=rounds,
        warmup=warmup,
        exact_tokens=exact_tokens,
        unique_prompts=unique_prompts,
        raw=raw,
    )
    try:
        results = asyncio.run(run_bench(config, Progress(enabled=not quiet)))
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; no results written") from None
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if out:
        out.write_text(json.dumps(results, indent=2) + "\n")
    if plot and plot_path:
        plot(results, plot_path)
    click.echo(markdown(results))
    failed = False
    for server, (errors, total) in error_totals(results).items():
        if errors:
            failed = True
            kinds = error_kinds(results, server)
            click.echo(f"{server}: {errors} of {total} requests failed ({kinds})", err=True)
    if failed:
        sys.exit(1)


@bench.command("report")
@click.argument("results_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also draw the PNG plot.",
)
def bench_report(results_file: Path, plot_path: Path | None) -> None:
    """Print the markdown tables of a results JSON written by `bench run --out`."""
    import json

    from spigot.bench.report import markdown

    results = json.loads(results_file.read_text())
    if plot_path:
        _plotter()(results, plot_path)
    click.echo(markdown(results))
