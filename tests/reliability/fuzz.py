"""Fuzzing: schemathesis against the server's own /openapi.json.

Every operation gets generated valid and invalid requests (its examples, the boundary
cases of each field, then random ones); every answer must not be a 5xx, must have a
documented status and media type, and must match the documented body (an OpenAI error
object for every 4xx). The server runs with an admin key, so /admin is reached too.

The schema is fetched from the server and then narrowed for the run only, so that a
generated request finishes in seconds: ``model`` is one of a few names (the served one,
an OpenAI alias, an unknown one) instead of random text that would stop at 404, and
``max_tokens``, ``n`` and ``min_tokens`` are small. Huge and negative numbers are the
hostile corpus's business (hostile.py).
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.reliability.harness import (
    MODEL,
    Findings,
    Profile,
    Result,
    Workdir,
    create_key,
    server,
)

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)
# Admin operations change the key the fuzzer itself uses (rename, revoke, limits): they
# run after the others, in a second pass.
ADMIN = "^/admin"

# The keys /admin/keys/{id_or_name} may name: two decoys (by name and id) and unknown ones,
# never the fuzzer's own admin key (id 1), which a generated DELETE or PATCH would take away.
DECOYS = ("decoy-a", "decoy-b")
KEY_REFS = [*DECOYS, "2", "3", "no-such-key", "99999999999999999999"]

SMALL = {"max_tokens": 4, "max_completion_tokens": 4, "min_tokens": 2, "n": 2, "best_of": 2}


def narrowed(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of the schema whose valid requests run for a moment, not a minute."""
    schema = json.loads(json.dumps(schema))
    bodies = schema["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest", "TokenizeRequest"):
        props = bodies.get(name, {}).get("properties", {})
        if "model" in props:
            props["model"] = {"enum": [MODEL, "gpt-4o-mini", "no-such-model"]}
        for field, cap in SMALL.items():
            if field in props:
                _cap(props[field], cap)
    if "DetokenizeRequest" in bodies:
        props = bodies["DetokenizeRequest"]["properties"]
        props["model"] = {"enum": [MODEL, "no-such-model"]}
    for path, item in schema["paths"].items():
        if "{id_or_name}" not in path:
            continue
        for operation in item.values():
            for param in operation.get("parameters", []):
                if param.get("name") == "id_or_name":
                    param["schema"] = {"enum": KEY_REFS}
    return schema


def _cap(node: dict[str, Any], maximum: int) -> None:
    for branch in node.get("anyOf", [node]):
        if branch.get("type") == "integer":
            branch["maximum"] = min(branch.get("maximum", maximum), maximum)


def run_schemathesis(
    schema_path: Path,
    url: str,
    secret: str,
    report_dir: Path,
    *,
    examples: int,
    seconds: int,
    include: str | None = None,
    exclude: str | None = None,
    phases: str = "examples,coverage,fuzzing,stateful",
) -> tuple[int, Path | None, str]:
    """Runs the schemathesis CLI; its exit code, NDJSON report and output's tail."""
    report_dir.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        str(schema_path),
        "--url",
        url,
        "-H",
        f"Authorization: Bearer {secret}",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        str(examples),
        "--workers",
        "2",
        "--request-timeout",
        "60",
        "--seed",
        "20260",
        "--generation-database",
        "none",
        "--suppress-health-check",
        "all",
        "--report",
        "ndjson",
        "--report-dir",
        str(report_dir),
        "--no-color",
        "--max-time",
        str(seconds),
        "--phases",
        phases,
    ]
    if include:
        args += ["--include-path-regex", include]
    if exclude:
        args += ["--exclude-path-regex", exclude]
    try:
        # In the report's folder: schemathesis keeps a crash cache in its working directory.
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=seconds + 120, cwd=report_dir
        )
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        code, output = -1, f"schemathesis did not finish: {exc}"
    reports = sorted(report_dir.glob("*.ndjson"))
    return code, (reports[-1] if reports else None), output[-4000:]


def read_report(path: Path) -> dict[str, Any]:
    """Requests, statuses and failed checks from a schemathesis NDJSON report."""
    statuses: collections.Counter[int] = collections.Counter()
    failures: dict[str, tuple[int, str]] = {}  # (operation: check) -> (cases, an example)
    no_answer = 0
    errors: list[str] = []
    network: list[str] = []
    for line in path.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if finished is None:
            error = event.get("NonFatalError") or event.get("FatalError")
            if error is not None:
                kind = str(error.get("value", {}).get("type", ""))
                text = f"{error.get('label', '')}: {kind}: {error.get('value', {}).get('message')}"
                # Timeouts and refused connections are the server's; the rest is schemathesis'.
                if any(word in kind for word in ("Timeout", "Connection", "Protocol")):
                    network.append(text[:300])
                else:
                    errors.append(text[:300])
            continue
        recorder = finished.get("recorder", {})
        for interaction in recorder.get("interactions", {}).values():
            response = interaction.get("response")
            if response is None:
                no_answer += 1
            else:
                statuses[int(response["status_code"])] += 1
        for case_id, checks in recorder.get("checks", {}).items():
            for check in checks:
                if check.get("status") == "failure":
                    case = recorder.get("cases", {}).get(case_id, {}).get("value", {})
                    where = case.get("path_parameters") or case.get("query") or ""
                    name = f"{recorder.get('label')}: {check['name']}"
                    example = (
                        f"{json.dumps(where)[:80] if where else ''} "
                        f"body={json.dumps(case.get('body'))[:160]}"
                    )
                    count, first = failures.get(name, (0, example))
                    failures[name] = (count + 1, first)
    return {
        "requests": sum(statuses.values()) + no_answer,
        "statuses": dict(sorted(statuses.items())),
        "no_answer": no_answer,
        "failures": [
            f"{name} in {count} case(s), e.g. {example}"
            for name, (count, example) in sorted(failures.items())
        ],
        "network": network,
        "errors": errors,
    }


def check_fuzz(work: Workdir, profile: Profile) -> Result:
    found = Findings("fuzz")
    db = work.db("fuzz")
    secret = create_key(db, "fuzz-admin", "--admin")
    for decoy in DECOYS:
        create_key(db, decoy)
    with server("--parallel", "4", "--ctx-size", "256", "--prices", str(work.prices), db=db) as srv:
        raw = httpx.get(f"{srv.url}/openapi.json", timeout=10).json()
        bodies = [
            (path, method)
            for path, item in raw.get("paths", {}).items()
            for method, op in item.items()
            if method in ("post", "patch") and "requestBody" in op
        ]
        found.numbers["operations"] = sum(len(item) for item in raw.get("paths", {}).values())
        found.numbers["operations_with_body"] = len(bodies)
        found.expect(
            ("/v1/chat/completions", "post") in bodies,
            "/openapi.json describes no request bodies (install_openapi missing)",
        )
        schema_path = work.path / "openapi-fuzz.json"
        schema_path.write_text(json.dumps(narrowed(raw)))
        totals: collections.Counter[int] = collections.Counter()
        requests = 0
        started = time.monotonic()
        # Stateful runs follow links from listings, which name the fuzzer's own key.
        passes = (
            ("api", None, ADMIN, profile.fuzz_seconds, "examples,coverage,fuzzing,stateful"),
            ("admin", ADMIN, None, max(20, profile.fuzz_seconds // 3), "examples,coverage,fuzzing"),
        )
        for label, include, exclude, seconds, phases in passes:
            code, report, tail = run_schemathesis(
                schema_path,
                srv.url,
                secret,
                work.path / f"schemathesis-{label}",
                examples=profile.fuzz_examples,
                seconds=seconds,
                include=include,
                exclude=exclude,
                phases=phases,
            )
            if report is None:
                found.expect(False, f"schemathesis ({label}) wrote no report: {tail[-500:]}")
                continue
            stats = read_report(report)
            requests += stats["requests"]
            totals.update(stats["statuses"])
            for failure in stats["failures"][:20]:
                found.expect(False, failure)
            for failure in stats["network"][:10]:
                found.expect(False, f"no answer: {failure}")
            for error in stats["errors"][:5]:
                found.note(f"schemathesis ({label}) error of its own, not the server's: {error}")
            if code not in (0, 1):  # 1: checks failed or errors, listed above
                found.expect(False, f"schemathesis ({label}) exited {code}: {tail[-500:]}")
            found.expect(srv.healthy(10), f"/health does not answer after the {label} pass")
        found.numbers["requests"] = requests
        found.numbers["statuses"] = dict(sorted(totals.items()))
        found.numbers["seconds"] = round(time.monotonic() - started, 1)
        server_errors = sum(n for status, n in totals.items() if status >= 500)
        found.numbers["5xx"] = server_errors
        found.expect(server_errors == 0, f"{server_errors} answer(s) were 5xx")
        found.expect(srv.alive(), "the server process died")
        idle_stats = srv.wait_idle(60)
        found.expect(
            idle_stats.get("running") == 0 and idle_stats.get("in_flight") == 0,
            f"engine not idle after fuzzing: {idle_stats}",
        )
        tracebacks = srv.tracebacks()
        found.numbers["log_errors"] = len(tracebacks)
        found.expect(not tracebacks, f"server logged errors: {tracebacks[:3]}")
    codes = ", ".join(f"{status}: {n}" for status, n in sorted(totals.items()))
    return found.result(
        f"{requests} requests over {found.numbers['operations']} operations, "
        f"{found.numbers['5xx']} 5xx, {len(found.failures)} failure(s) [{codes}]"
    )
