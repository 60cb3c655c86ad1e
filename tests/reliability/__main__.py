"""``python -m tests.reliability [--full] [--only CHECK ...]``: runs the checks in order,
prints a PASS/FAIL line for each, and writes summary.json and summary.md.

Exit status: 0 when no check failed (WARN and expected failures do not count), else 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from tests.e2e.server import ROOT
from tests.reliability.clients import check_clients
from tests.reliability.fuzz import check_fuzz
from tests.reliability.harness import FULL, SHORT, Profile, Result, Server, Workdir
from tests.reliability.hostile import check_hostile
from tests.reliability.overload import check_overload
from tests.reliability.resume import check_resume
from tests.reliability.shutdown import check_sigkill, check_sigterm
from tests.reliability.soak import check_soak

Check = Callable[[Workdir, Profile, argparse.Namespace], Result]

# In order; the soak last (it is the longest, and wants a warm, quiet machine).
CHECKS: dict[str, Check] = {
    "fuzz": lambda w, p, a: check_fuzz(w, p),
    "hostile": lambda w, p, a: check_hostile(w, p, a.stall_limit),
    "overload": lambda w, p, a: check_overload(w, p, a.stall_limit),
    "clients": lambda w, p, a: check_clients(w, p, a.stall_limit),
    "sigterm": lambda w, p, a: check_sigterm(w, p),
    "sigkill": lambda w, p, a: check_sigkill(w, p),
    "sigterm-postgres": lambda w, p, a: check_sigterm(w, p, "postgres"),
    "sigkill-postgres": lambda w, p, a: check_sigkill(w, p, "postgres"),
    "resume": lambda w, p, a: check_resume(w, p),
    "resume-replicas": lambda w, p, a: check_resume(w, p, "redis"),
    "soak": lambda w, p, a: check_soak(w, p, a.soak_seconds),
}
FULL_ONLY = {"sigterm-postgres", "sigkill-postgres", "resume-replicas"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability", description=__doc__)
    parser.add_argument("--full", action="store_true", help="the release form (about 30 min)")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), help="run only these checks")
    parser.add_argument("--skip", nargs="+", choices=list(CHECKS), default=[], help="skip these")
    parser.add_argument(
        "--expect-fail",
        nargs="+",
        choices=list(CHECKS),
        default=[],
        help="known failures: reported as XFAIL and not failing the run (XPASS if they pass)",
    )
    parser.add_argument(
        "--stall-limit",
        type=float,
        default=1.0,
        help="seconds /health may take while a hostile request is processed (default 1)",
    )
    parser.add_argument("--soak-seconds", type=int, default=None, help="override the soak length")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "build" / "reliability",
        help="where summary.json and summary.md go (default build/reliability)",
    )
    return parser.parse_args(argv)


def run_check(name: str, work: Workdir, profile: Profile, args: argparse.Namespace) -> Result:
    print(f"== {name}", flush=True)
    started = time.monotonic()
    try:
        result = CHECKS[name](work, profile, args)
    except Exception as exc:  # a crashed check is a failed check; the others still run
        traceback.print_exc()
        result = Result(name, "FAIL", f"the check itself crashed: {exc!r}", failures=[repr(exc)])
    result.seconds = time.monotonic() - started
    if name in args.expect_fail:
        result.status = "XFAIL" if result.status == "FAIL" else "XPASS"
    print(result.line(), flush=True)
    return result


def git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout.strip()
        return f"{head}{' (with uncommitted changes)' if dirty else ''}"
    except OSError:
        return "unknown"


def markdown(results: list[Result], meta: dict[str, str]) -> str:
    lines = [
        f"# Reliability run ({meta['profile']})",
        "",
        f"- command: `{meta['command']}`",
        f"- when: {meta['when']}; revision {meta['revision']}",
        f"- machine: {meta['machine']}",
        f"- took: {meta['took']}",
        "",
        "| check | status | result | time |",
        "|---|---|---|---|",
    ]
    for r in results:
        summary = r.summary.replace("|", "\\|")
        lines.append(f"| {r.check} | {r.status} | {summary} | {r.seconds:.0f} s |")
    for r in results:
        if r.failures or r.notes:
            lines += ["", f"## {r.check}: {r.status}", ""]
            lines += [f"- FAIL: {f}" for f in r.failures[:40]]
            if len(r.failures) > 40:
                lines.append(f"- ... and {len(r.failures) - 40} more (summary.json)")
            lines += [f"- note: {n}" for n in r.notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    profile = FULL if args.full else SHORT
    names = args.only or [name for name in CHECKS if args.full or name not in FULL_ONLY]
    names = [name for name in names if name not in args.skip]
    args.out.mkdir(parents=True, exist_ok=True)
    work = Workdir()
    print(
        f"reliability ({profile.name}): {', '.join(names)}; work files in {work.path}", flush=True
    )
    started = time.monotonic()
    # SIGTERM (a CI timeout, a kill) unwinds like Ctrl-C, so no server is left running.
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        results = [run_check(name, work, profile, args) for name in names]
    finally:
        Server.stop_all()
    took = time.monotonic() - started
    meta = {
        "profile": profile.name,
        "command": shlex.join(["python", "-m", "tests.reliability", *argv]),
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "revision": git_revision(),
        "machine": f"{platform.machine()}, {_cpus()} CPUs, Python {platform.python_version()}",
        "took": f"{took / 60:.1f} min",
    }
    (args.out / "summary.json").write_text(
        json.dumps(
            {
                **meta,
                "results": [
                    {
                        "check": r.check,
                        "status": r.status,
                        "summary": r.summary,
                        "seconds": round(r.seconds, 1),
                        "failures": r.failures,
                        "notes": r.notes,
                        "numbers": r.numbers,
                    }
                    for r in results
                ],
            },
            indent=2,
            default=str,
        )
    )
    (args.out / "summary.md").write_text(markdown(results, meta))
    failed = sum(1 for r in results if r.status == "FAIL")
    passed = sum(1 for r in results if r.status in ("PASS", "XPASS", "WARN"))
    print(f"\nsummary: {args.out / 'summary.md'}")
    for r in results:
        print(f"  {r.line()}")
    if failed:
        print(f"databases and reports kept for a look in {work.path}")
    else:
        shutil.rmtree(work.path, ignore_errors=True)
    print(f"reliability: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
