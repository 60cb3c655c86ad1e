"""``make bench``: run the standard comparison and write it into docs/benchmarks.md.

    .venv/bin/python -m benchmarks.standard [--quick] [--only PARTS] [--render-only]

The parts, run one after another (``--only`` picks some):

* ``decode``: ``spigot serve`` against the bare llama.cpp loop (``decode.py``);
* ``peers``: spigot against each built peer (``peers.py``), levels interleaved
  by ``spigot bench run --compare``'s machinery (``spigot.bench.load``);
* ``prefix``: cold against warm time to first token (``prefix.py``);
* ``interference``: a long prompt arriving while streams decode, for each
  ``--prefill-chunk-decoding`` compared (``interference.py``).

Only one thing computes at a time: on two cores, llama.cpp processes that
compute at once slow each other down tenfold. Where a comparison alternates
between two things (the bare loop and the server; spigot and a peer), both
are loaded but only the one measured works: an idle llama.cpp spends no CPU.

Results go to ``bench-results.json`` beside the markdown file (merged with the
parts of earlier runs, so ``--render-only`` can redraw every table), plots to
``img/`` beside it, and each part's markdown between its markers
(``docs.py``); the prose outside the markers is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from benchmarks import docs

PARTS = ("decode", "peers", "prefix", "interference")
RESULTS_NAME = "bench-results.json"
SCHEMA = "spigot-bench-standard/1"
CTX_SIZE = 8192  # spigot serve's default, written out so the commands say it
# The repository (this folder's parent): for the commit and for showing paths
# in the commands relative to it.
ROOT = Path(__file__).resolve().parents[1]
PROG = "python -m benchmarks.standard"
# /proc/cpuinfo flags that bear on llama.cpp's speed here (AMX: see ARCHITECTURE.md).
NOTABLE_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX-512 VNNI",
    "amx_tile": "AMX (reported, unused)",
}

Say = Callable[[str], None]


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Plan:
    """How much each part runs: ``FULL`` for the docs, ``QUICK`` to try the suite out."""

    threads: int = 2
    decode_streams: tuple[int, ...] = (1, 8)
    decode_rounds: int = 5
    decode_tokens: int = 128
    peer_concurrency: tuple[int, ...] = (1, 8, 32)
    # Requests per level, the same for both servers (about 25 s a level here).
    # Not a duration: the faster server would send more of the prompt set and
    # meet those prompts cached at the next level.
    peer_requests: tuple[int, ...] = (10, 16, 32)
    peer_rounds: int = 3
    peer_max_tokens: int = 128
    prefix_parallel: int = 32
    prefix_rounds: int = 5
    prefix_sentences: int = 62  # ~16 tokens each: a ~1,000-token system prompt
    interference_parallel: int = 16
    # (label, extra serve flags): the default time budget against fixed chunks.
    interference_settings: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("default", ()),
        ("fixed-32", ("--prefill-slowdown", "0", "--prefill-chunk-decoding", "32")),
        ("fixed-256", ("--prefill-slowdown", "0", "--prefill-chunk-decoding", "256")),
    )
    interference_rounds: int = 3
    interference_streams: int = 8
    interference_tokens: int = 400
    interference_prompt_tokens: int = 2000


FULL = Plan()
QUICK = Plan(
    decode_streams=(1, 2),
    decode_rounds=1,
    decode_tokens=16,
    peer_concurrency=(1, 2),
    peer_requests=(1, 2),
    peer_rounds=1,
    peer_max_tokens=16,
    prefix_parallel=4,
    prefix_rounds=1,
    prefix_sentences=8,
    interference_parallel=4,
    interference_rounds=1,
    interference_streams=2,
    # Enough that the streams still decode while the long prompt is prefilled.
    interference_tokens=120,
    interference_prompt_tokens=300,
)


# -- machine -----------------------------------------------------------------------


def machine_details(invocation: str) -> dict[str, Any]:
    """Where and when the numbers were measured, and with what."""
    from spigot.bench.results import machine_info
    from spigot.models import embedded_model_path

    info = machine_info()
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                break
    info["cpu_flags"] = ", ".join(label for flag, label in NOTABLE_FLAGS.items() if flag in flags)
    with contextlib.suppress(AttributeError, OSError):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    try:
        info["llama_cpp_python"] = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        info["llama_cpp_python"] = None
    info["commit"], info["dirty"] = _git_commit()
    info["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    model = embedded_model_path()
    info["model"] = f"{model.name} ({model.stat().st_size / 1e6:.0f} MB)"
    info["invocation"] = invocation
    return info


def _git_commit() -> tuple[str, bool]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return commit, dirty


# -- servers -----------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """A server to start: its name (for logs), command line and port."""

    name: str
    cmd: list[str]
    port: int

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"


def pick_port(preferred: int) -> int:
    """``preferred`` when it is free, so the written commands stay the same run to run."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise BenchError("no free port")


def spigot_command(port: int, threads: int, parallel: int, *extra: str) -> list[str]:
    # --no-metering: the engine is measured, and the user's ./spigot.db (keys!) stays out of it.
    return [
        sys.executable, "-m", "spigot", "serve", "--port", str(port), "--threads", str(threads),
        "--parallel", str(parallel), "--ctx-size", str(CTX_SIZE), *extra, "--no-metering",
        "--log-level", "warning",
    ]  # fmt: skip


@contextlib.contextmanager
def serving(launch: Launch, logs: Path, say: Say) -> Iterator[Launch]:
    """Start ``launch``, wait until it answers, and stop it (SIGINT, then kill) at the end."""
    from benchmarks import peers

    log = logs / f"{launch.name}-{launch.port}.log"
    say(f"starting {launch.name}: {shown(launch.cmd)}")
    with log.open("ab") as out:
        process = subprocess.Popen(launch.cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            try:
                peers.wait_ready(process, launch.root_url)
            except peers.PeerError as exc:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                raise BenchError(
                    f"{launch.name} did not start: {exc} (log {log})\n{tail}"
                ) from None
            yield launch
        finally:
            # Whatever happened (Ctrl-C included), no server outlives its part.
            peers.stop(process)


def shown(cmd: list[str]) -> str:
    """A command line as the docs show it: paths relative to the repository, ``~`` for home."""
    text = shlex.join(cmd)
    text = text.replace(f"{ROOT}/", "")
    home = str(Path.home())
    return text.replace(f"{home}/", "~/") if home != "/" else text


# -- the parts ---------------------------------------------------------------------


def run_decode(plan: Plan, logs: Path, say: Say) -> dict[str, Any]:
    from benchmarks import decode
    from spigot.models import embedded_model_path

    levels = list(plan.decode_streams)
    parallel = max(levels)
    port = pick_port(8790)
    server = Launch("spigot", spigot_command(port, plan.threads, parallel), port)
    measure = [
        sys.executable, "-m", "benchmarks.decode", "--url", server.base_url,
        "--rounds", str(plan.decode_rounds), "--tokens", str(plan.decode_tokens),
        "--streams", ",".join(map(str, levels)), "--threads", str(plan.threads),
    ]  # fmt: skip
    with serving(server, logs, say):
        results = decode.measure(
            server.base_url,
            embedded_model_path(),
            levels,
            plan.decode_rounds,
            plan.decode_tokens,
            plan.threads,
            log=say,
        )
    return {
        "commands": [f"{shown(server.cmd)} &", shown(measure)],
        "data": {
            "streams": levels,
            "rounds": plan.decode_rounds,
            "tokens": plan.decode_tokens,
            "threads": plan.threads,
            "parallel": parallel,
            "bare_tok_s": {str(n): results[(decode.BARE, n)].tok_s for n in levels},
            "spigot_tok_s": {str(n): results[(decode.SERVED, n)].tok_s for n in levels},
        },
    }


def run_peers(plan: Plan, logs: Path, say: Say) -> dict[str, Any]:
    from benchmarks import peers
    from spigot.bench.load import BenchConfig, Target, run_bench
    from spigot.bench.progress import Progress
    from spigot.models import embedded_model_path

    parallel = max(plan.peer_concurrency)
    data: dict[str, Any] = {}
    for name in peers.PEERS:
        reason = peers.not_ready(name)
        if reason:
            say(f"peers: skipping {name}: {reason} (`make peers` builds it)")
            data[name] = {"ready": False, "reason": reason}
            continue
        port, peer_port = pick_port(8790), pick_port(8791)
        spigot = Launch("spigot", spigot_command(port, plan.threads, parallel), port)
        peer_cmd = peers.peer_command(
            name, embedded_model_path(), peer_port, plan.threads, parallel, CTX_SIZE
        )
        peer = Launch(name, peer_cmd, peer_port)
        config = BenchConfig(
            targets=(Target("spigot", spigot.base_url), Target(name, peer.base_url)),
            concurrency=plan.peer_concurrency,
            requests=plan.peer_requests,
            rounds=plan.peer_rounds,
            max_tokens=plan.peer_max_tokens,
        )
        compare = [
            sys.executable, "-m", "spigot", "bench", "run",
            "--url", spigot.base_url, "--name", "spigot",
            "--compare", peer.base_url, "--compare-name", name,
            "-c", ",".join(map(str, config.concurrency)),
            "-n", ",".join(map(str, plan.peer_requests)),
            "--rounds", str(plan.peer_rounds), "--max-tokens", str(plan.peer_max_tokens),
        ]  # fmt: skip
        commands = [f"{shown(spigot.cmd)} &", f"{shown(peer.cmd)} &", shown(compare)]
        try:
            with serving(spigot, logs, say), serving(peer, logs, say):
                results = asyncio.run(run_bench(config, Progress()))
        except BenchError as exc:
            # One peer that will not start should not cost the other its turn.
            say(f"peers: {exc}")
            data[name] = {"ready": False, "reason": f"failing to start ({exc})".splitlines()[0]}
            continue
        data[name] = {"ready": True, "commands": commands, "results": results}
    return {"commands": [], "data": data}


def run_prefix(plan: Plan, logs: Path, say: Say) -> dict[str, Any]:
    from benchmarks import prefix
    from spigot.models import EMBEDDED_MODEL_ID

    port = pick_port(8790)
    server = Launch("spigot", spigot_command(port, plan.threads, plan.prefix_parallel), port)
    measure = [
        sys.executable, "-m", "benchmarks.prefix", "--url", server.base_url,
        "--rounds", str(plan.prefix_rounds), "--sentences", str(plan.prefix_sentences),
    ]  # fmt: skip
    with serving(server, logs, say):
        rounds = prefix.measure(
            server.base_url, EMBEDDED_MODEL_ID, plan.prefix_rounds, plan.prefix_sentences, say
        )
    return {
        "commands": [f"{shown(server.cmd)} &", shown(measure)],
        "data": {
            "parallel": plan.prefix_parallel,
            "sentences": plan.prefix_sentences,
            "rounds": [asdict(r) for r in rounds],
        },
    }


def run_interference(plan: Plan, logs: Path, say: Say) -> dict[str, Any]:
    from benchmarks import interference
    from spigot.models import EMBEDDED_MODEL_ID

    port = pick_port(8790)
    launches = {
        label: Launch(
            f"spigot-{label}",
            spigot_command(port, plan.threads, plan.interference_parallel, *flags),
            port,
        )
        for label, flags in plan.interference_settings
    }
    commands = []
    for launch in launches.values():
        measure = [
            sys.executable, "-m", "benchmarks.interference", "--url", launch.base_url,
            "--streams", str(plan.interference_streams),
            "--tokens", str(plan.interference_tokens),
            "--prompt-tokens", str(plan.interference_prompt_tokens),
        ]  # fmt: skip
        commands += [f"{shown(launch.cmd)} &", shown(measure), "kill %1"]
    if plan.interference_rounds > 1:
        commands.insert(0, f"# {plan.interference_rounds} rounds, the order flipping every round")
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in launches}
    for round_no in range(plan.interference_rounds):
        # A fresh server each time: the prefix cache would otherwise serve the
        # long prompt from an earlier round. The order flips every round.
        labels = list(launches) if round_no % 2 == 0 else list(launches)[::-1]
        for label in labels:
            with serving(launches[label], logs, say) as launch:
                result = asyncio.run(
                    interference.measure(
                        launch.base_url,
                        EMBEDDED_MODEL_ID,
                        plan.interference_streams,
                        plan.interference_tokens,
                        plan.interference_prompt_tokens,
                    )
                )
            results[label].append(asdict(result))
            ratio = result.p99_over_median
            say(
                f"round {round_no + 1} {label}: TTFT {result.long_ttft_s:.1f} s, "
                f"gap median {result.gap_median_s * 1000:.1f} ms, p99 during prefill "
                + ("-" if ratio is None else f"{ratio:.1f}x the median")
            )
    return {
        "commands": commands,
        "data": {
            "parallel": plan.interference_parallel,
            "streams": plan.interference_streams,
            "tokens": plan.interference_tokens,
            "prompt_tokens": plan.interference_prompt_tokens,
            "rounds": plan.interference_rounds,
            "settings": [
                {"label": label, "flags": list(flags)}
                for label, flags in plan.interference_settings
            ],
            "results": results,
        },
    }


RUNNERS: dict[str, Callable[[Plan, Path, Say], dict[str, Any]]] = {
    "decode": run_decode,
    "peers": run_peers,
    "prefix": run_prefix,
    "interference": run_interference,
}


# -- results and docs --------------------------------------------------------------


def load_results(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"schema": SCHEMA, "sections": {}}
    results = json.loads(path.read_text())
    if results.get("schema") != SCHEMA:
        raise BenchError(f"{path} is not a {SCHEMA} results file")
    return results


def save_results(path: Path, results: dict[str, Any]) -> None:
    # Write beside and rename: an interrupted run never leaves half a file.
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(results, indent=2) + "\n")
    partial.replace(path)


def render_doc(text: str, results: dict[str, Any], parts: list[str], out: Path) -> str:
    """``text`` with the machine section and each of ``parts`` that has results redrawn."""
    sections = results["sections"]
    img_dir = out.parent / "img"
    img_dir.mkdir(exist_ok=True)
    text = docs.replace_section(text, "machine", docs.render_machine(sections))
    for part in parts:
        if part in sections:
            for marker, body in docs.render(part, sections[part], img_dir, "img/").items():
                text = docs.replace_section(text, marker, body)
    return text


def parse_parts(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str]:
    if not value:
        return list(PARTS)
    asked = [p.strip() for p in value.split(",") if p.strip()]
    if unknown := [p for p in asked if p not in PARTS]:
        raise click.BadParameter(f"unknown part {unknown[0]!r}; known: {', '.join(PARTS)}")
    # The suite's own order, each part once.
    return [p for p in PARTS if p in asked]


def run_standard(
    out: Path,
    parts: list[str],
    quick: bool,
    render_only: bool,
    invocation: str,
    say: Say,
) -> list[str]:
    """Run ``parts`` (unless ``render_only``) and redraw their sections of ``out``.

    Returns the parts that were drawn. The results file is written after every
    part, so a failure keeps what was measured before it.
    """
    import httpx

    text = out.read_text()
    needed = ["machine", *(m for p in parts for m in docs.MARKERS[p])]
    if bad := docs.missing_markers(text, needed):
        raise BenchError(
            f"{out} lacks the markers of {', '.join(bad)}: each section needs one "
            f"{docs.start_marker('NAME')} and one {docs.end_marker('NAME')} after it"
        )
    results_path = out.parent / RESULTS_NAME
    results = load_results(results_path)
    failure: Exception | None = None
    if not render_only:
        plan = QUICK if quick else FULL
        machine = machine_details(invocation)
        logs = Path(tempfile.mkdtemp(prefix="spigot-bench-"))
        say(f"server logs: {logs}")
        for part in parts:
            say(f"== {part}")
            started = time.perf_counter()
            try:
                entry = RUNNERS[part](plan, logs, say)
            except (BenchError, OSError, ValueError, httpx.HTTPError) as exc:
                # Stop, but still draw the parts measured so far.
                failure = exc
                break
            entry.update(
                machine=machine, quick=quick, elapsed_s=round(time.perf_counter() - started, 1)
            )
            results["sections"][part] = entry
            save_results(results_path, results)
            say(f"== {part}: {entry['elapsed_s']:.0f} s")
    drawn = [p for p in parts if p in results["sections"]]
    if drawn:
        out.write_text(render_doc(text, results, drawn, out))
    if failure is not None:
        done = f" ({', '.join(drawn)} written)" if drawn else ""
        name = "" if isinstance(failure, BenchError) else f"{type(failure).__name__}: "
        raise BenchError(f"{name}{failure}{done}")
    return drawn


@click.command("standard")
@click.option("--quick", is_flag=True, help="Tiny durations and rounds: to try the suite out.")
@click.option(
    "--only",
    "parts",
    default=None,
    callback=parse_parts,
    metavar="PARTS",
    help=f"Comma-separated parts to run: {','.join(PARTS)}. Default: all.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("docs/benchmarks.md"),
    show_default=True,
    help=f"The markdown file whose marked sections are rewritten; {RESULTS_NAME} and img/ "
    "go beside it.",
)
@click.option(
    "--render-only",
    is_flag=True,
    help=f"Measure nothing: redraw the sections and plots from {RESULTS_NAME}.",
)
def standard(quick: bool, parts: list[str], out: Path, render_only: bool) -> None:
    """Run the standard comparison and write it into docs/benchmarks.md.

    Parts, one at a time: decode (spigot against the bare llama.cpp loop), peers
    (spigot against llama-server and llama-cpp-python's server, if `make peers`
    built them), prefix (cold against warm TTFT) and interference (a long prompt
    arriving while streams decode). Each writes its tables, plots and exact
    commands between its <!-- bench:NAME:start/end --> markers; prose outside
    the markers is kept. The full suite takes about 45 minutes on 2 cores, the
    peers part about 25.
    """
    if not out.is_file():
        raise click.UsageError(f"{out} does not exist (run from the repository, or give --out)")
    words = PROG.split()
    words += ["--quick"] if quick else []
    words += ["--only", ",".join(parts)] if parts != list(PARTS) else []
    words += ["--out", str(out)] if out != Path("docs/benchmarks.md") else []
    words += ["--render-only"] if render_only else []

    def say(message: str) -> None:
        click.echo(message, err=True)

    try:
        drawn = run_standard(out, parts, quick, render_only, shlex.join(words), say)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        raise click.ClickException(
            f"interrupted; finished parts are in {out.parent / RESULTS_NAME} "
            "(--render-only draws them)"
        ) from None
    if not drawn:
        raise click.ClickException(f"no results for {', '.join(parts)} in {RESULTS_NAME}")
    click.echo(f"wrote {', '.join(drawn)} into {out}")


if __name__ == "__main__":
    standard(prog_name=PROG)
