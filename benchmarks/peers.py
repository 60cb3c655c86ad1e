"""The peers spigot is benchmarked against, built reproducibly outside the repository.

* ``llama-server``: llama.cpp's own server, built with cmake from the llama.cpp
  sources vendored in the pinned llama-cpp-python sdist, so both peers and
  spigot run the same llama.cpp.
* ``llama-cpp-python``: llama-cpp-python's server (``python -m llama_cpp.server``)
  in a venv of its own.

Everything goes under ``$SPIGOT_PEERS_DIR`` (default ``~/.cache/spigot-peers``);
nothing built is ever written into the repository.

The AMX workaround, as spigot applies it (``use_extra_bufts = False``), per peer:
ggml's AMX path crashes on these machines, so ``llama-server`` always runs
with ``--no-repack`` (``-nr``), and llama-cpp-python, whose server has no switch
for extra buffer types, is compiled without AMX (``GGML_NATIVE=OFF`` plus the
vector extensions this CPU has, see ``no_amx_cmake_args``); ``setup`` checks the result.

    python -m benchmarks.peers setup              # build both (skips what is built)
    python -m benchmarks.peers command llama-server
    python -m benchmarks.peers check              # one streamed chat per peer
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the pin in pyproject.toml
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"

LLAMA_SERVER = "llama-server"
LLAMA_CPP_PYTHON = "llama-cpp-python"
PEERS = (LLAMA_SERVER, LLAMA_CPP_PYTHON)

# llama-server, as MEASURED.md builds it; the AMX workaround is -nr at run time.
LLAMA_SERVER_CMAKE_ARGS = (
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
)
# llama-cpp-python's server: no AMX compiled in at all, and no extension the CPU lacks
# (an AVX-512 build dies with SIGILL on a CPU without it).
BASE_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
AVX512_CMAKE_ARGS = (  # (cpuinfo flag, ggml option)
    ("avx512f", "-DGGML_AVX512=ON"),
    ("avx512_vnni", "-DGGML_AVX512_VNNI=ON"),
    ("avx512_bf16", "-DGGML_AVX512_BF16=ON"),
)


def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def no_amx_cmake_args(flags: frozenset[str] | None = None) -> str:
    flags = cpu_flags() if flags is None else flags
    extra = [option for flag, option in AVX512_CMAKE_ARGS if flag in flags]
    return " ".join([BASE_CMAKE_ARGS, *extra])


BUILD_JOBS = 2
NICE = ("nice", "-n", "10")

# spigot serve's defaults, so the commands match it when nothing is given.
DEFAULT_THREADS = 2
DEFAULT_PARALLEL = 8
DEFAULT_CTX_SIZE = 8192
DEFAULT_PORT = 8001

STAMP = "spigot-peers.json"
# x86 AMX code (tile registers, tile config): none may be in the llama-cpp-python peer.
AMX_MARKERS = ("%tmm", "ldtilecfg")
# ggml features that no_amx_cmake_args leaves off but -march=native may turn on.
NATIVE_ONLY_FEATURES = frozenset({"AMX_INT8", "AVX_VNNI", "AVX512_VBMI"})


class PeerError(RuntimeError):
    pass


# -- where things go ---------------------------------------------------------


def peers_dir() -> Path:
    """The cache directory: ``$SPIGOT_PEERS_DIR`` or ``~/.cache/spigot-peers``."""
    value = os.environ.get("SPIGOT_PEERS_DIR")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "spigot-peers"


def sdist_dir() -> Path:
    return peers_dir() / "src" / SDIST_NAME


def llama_cpp_source_dir() -> Path:
    return sdist_dir() / "vendor" / "llama.cpp"


def llama_server_build_dir() -> Path:
    return peers_dir() / "llama-server-build"


def llama_server_path() -> Path:
    return llama_server_build_dir() / "bin" / "llama-server"


def llama_cpp_python_venv() -> Path:
    return peers_dir() / "llama-cpp-python-server"


def llama_cpp_python_path() -> Path:
    return llama_cpp_python_venv() / "bin" / "python"


def logs_dir() -> Path:
    return peers_dir() / "logs"


# -- commands ----------------------------------------------------------------


def peer_command(
    name: str,
    model_path: Path | str,
    port: int,
    threads: int = DEFAULT_THREADS,
    parallel: int = DEFAULT_PARALLEL,
    ctx_size: int = DEFAULT_CTX_SIZE,
) -> list[str]:
    """The command line that serves ``model_path`` on 127.0.0.1:``port`` as spigot would.

    llama-server gets ``-kvu`` (one KV pool shared by all slots, like spigot's
    ``--ctx-size``; without it each of the ``-np`` slots gets ``ctx_size / parallel``)
    and ``-nr`` (the AMX workaround). llama-cpp-python's server decodes one
    request at a time, so ``parallel`` does not apply to it; ``--interrupt_requests
    False`` keeps it from cutting a running stream off when another request arrives.
    """
    model, p, t = str(model_path), str(port), str(threads)
    if name == LLAMA_SERVER:
        return [
            str(llama_server_path()),
            "-m", model,
            "--host", "127.0.0.1",
            "--port", p,
            "-t", t,
            "-np", str(parallel),
            "-c", str(ctx_size),
            "-kvu",
            "-nr",
        ]  # fmt: skip
    if name == LLAMA_CPP_PYTHON:
        return [
            str(llama_cpp_python_path()),
            "-m", "llama_cpp.server",
            "--model", model,
            "--host", "127.0.0.1",
            "--port", p,
            "--n_threads", t,
            "--n_threads_batch", t,
            "--n_ctx", str(ctx_size),
            "--interrupt_requests", "False",
        ]  # fmt: skip
    raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")


# -- building ----------------------------------------------------------------


def _read_stamp(path: Path) -> dict[str, object] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _run_logged(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` with its output appended to ``log``; on failure show the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(list(cmd), stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise PeerError(f"{shlex.join(cmd)} failed with exit status {rc}; see {log}\n{tail}")


def ensure_sdist() -> Path:
    """The pinned llama-cpp-python sdist, downloaded and extracted (idempotent)."""
    target = sdist_dir()
    if (target / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return target
    src = target.parent
    src.mkdir(parents=True, exist_ok=True)
    archive = src / f"{SDIST_NAME}.tar.gz"
    if not archive.is_file():
        print(f"downloading the llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist to {src}")
        _run_logged(
            [
                sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                "--dest", str(src), f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
            ],
            logs_dir() / "sdist.log",
        )  # fmt: skip
    partial = src / f"{SDIST_NAME}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(partial, filter="data")
    shutil.rmtree(target, ignore_errors=True)
    (partial / SDIST_NAME).rename(target)
    partial.rmdir()
    return target


def _llama_server_works(binary: Path) -> bool:
    try:
        result = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _llama_server_stamp() -> dict[str, object]:
    return {"version": LLAMA_CPP_PYTHON_VERSION, "cmake_args": list(LLAMA_SERVER_CMAKE_ARGS)}


def ensure_llama_server() -> Path:
    """Build llama.cpp's ``llama-server`` from the vendored sources unless it is built."""
    binary, build = llama_server_path(), llama_server_build_dir()
    want = _llama_server_stamp()
    if _read_stamp(build / STAMP) == want and _llama_server_works(binary):
        print(f"llama-server: already built at {binary}")
        return binary
    source = ensure_sdist() / "vendor" / "llama.cpp"
    log = logs_dir() / "llama-server-build.log"
    log.unlink(missing_ok=True)
    print(f"llama-server: building in {build} (a few minutes; log: {log})", flush=True)
    start = time.monotonic()
    (build / STAMP).unlink(missing_ok=True)
    _run_logged(
        [*NICE, "cmake", "-S", str(source), "-B", str(build), *LLAMA_SERVER_CMAKE_ARGS], log
    )
    _run_logged(
        [*NICE, "cmake", "--build", str(build), f"-j{BUILD_JOBS}", "--target", "llama-server"],
        log,
    )
    if not _llama_server_works(binary):
        raise PeerError(f"{binary} was built but does not run; see {log}")
    (build / STAMP).write_text(json.dumps(want, indent=2) + "\n")
    print(f"llama-server: built in {time.monotonic() - start:.0f} s at {binary}")
    return binary


def amx_report(python: Path) -> dict[str, object]:
    """What the ``llama_cpp`` installed for ``python`` was compiled for.

    ``features``: the ISA features ggml reports as compiled in (``AMX_INT8`` among
    them when AMX is); ``amx_instructions``: lines of AMX tile code found in its
    ggml libraries (-1 when objdump is missing).
    """
    code = (
        "import json, pathlib, llama_cpp;"
        "lib = pathlib.Path(llama_cpp.__file__).parent / 'lib';"
        "print(json.dumps({'system_info': llama_cpp.llama_print_system_info().decode(),"
        " 'libs': sorted(str(p) for p in lib.glob('libggml*.so'))}))"
    )
    result = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    info = json.loads(result.stdout.strip().splitlines()[-1])
    count = -1
    if shutil.which("objdump"):
        count = 0
        for lib in info["libs"]:
            dump = subprocess.run(
                ["objdump", "-d", "--no-show-raw-insn", lib], capture_output=True, text=True
            ).stdout
            count += sum(1 for line in dump.splitlines() if any(m in line for m in AMX_MARKERS))
    return {
        "system_info": info["system_info"].strip(),
        "features": compiled_features(info["system_info"]),
        "amx_instructions": count,
    }


def compiled_features(system_info: str) -> set[str]:
    """``{"AVX2", ...}`` from ggml's ``CPU : SSE3 = 1 | AVX2 = 1 | ...`` line."""
    features = set()
    for item in system_info.replace("\n", "|").split("|"):
        key, _, value = item.rpartition("=")
        if value.strip() == "1":
            features.add(key.strip().removeprefix("CPU :").strip())
    return features


def _check_no_amx(python: Path) -> dict[str, object]:
    """Fail unless the llama-cpp-python peer is the ``no_amx_cmake_args`` build.

    No AMX compiled in, and none of the ISA extensions that only a ``-march=native``
    build (pip's cached default wheel, say) would turn on, so the check also tells
    the two builds apart on machines without AMX.
    """
    report = amx_report(python)
    unexpected = report["features"] & NATIVE_ONLY_FEATURES  # type: ignore[operator]
    if unexpected or int(report["amx_instructions"]) > 0:  # type: ignore[call-overload]
        raise PeerError(
            f"the llama-cpp-python peer at {python} is not the no-AMX build "
            f"(a cached default wheel?): {sorted(unexpected)} compiled in, "
            f"{report['amx_instructions']} lines of AMX code; {report['system_info']}"
        )
    return report


def _llama_cpp_python_works(python: Path) -> bool:
    try:
        result = subprocess.run(
            [
                str(python),
                "-c",
                "import llama_cpp, llama_cpp.server.app; print(llama_cpp.__version__)",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and result.stdout.strip() == LLAMA_CPP_PYTHON_VERSION


def _llama_cpp_python_stamp() -> dict[str, object]:
    return {"version": LLAMA_CPP_PYTHON_VERSION, "CMAKE_ARGS": no_amx_cmake_args()}


def ensure_llama_cpp_python_server() -> Path:
    """A venv with ``llama-cpp-python[server]`` built without AMX; returns its python."""
    venv, python = llama_cpp_python_venv(), llama_cpp_python_path()
    want = _llama_cpp_python_stamp()
    if _read_stamp(venv / STAMP) == want and _llama_cpp_python_works(python):
        _check_no_amx(python)
        print(f"llama-cpp-python server: already built at {python}")
        return python
    log = logs_dir() / "llama-cpp-python-build.log"
    log.unlink(missing_ok=True)
    print(f"llama-cpp-python server: building into {venv} (a few minutes; log: {log})", flush=True)
    start = time.monotonic()
    shutil.rmtree(venv, ignore_errors=True)
    _run_logged([sys.executable, "-m", "venv", str(venv)], log)
    env = {
        **os.environ,
        "CMAKE_ARGS": no_amx_cmake_args(),
        "CMAKE_BUILD_PARALLEL_LEVEL": str(BUILD_JOBS),
    }
    # --no-binary forces a build from the sdist; --no-cache-dir keeps pip from
    # reusing the default (AMX) wheel that spigot's own install left in its cache.
    _run_logged(
        [
            *NICE, str(python), "-m", "pip", "install", "--no-cache-dir", "--verbose",
            "--no-binary", "llama-cpp-python",
            f"llama-cpp-python[server]=={LLAMA_CPP_PYTHON_VERSION}",
        ],
        log,
        env=env,
    )  # fmt: skip
    if not _llama_cpp_python_works(python):
        raise PeerError(f"llama_cpp.server does not import in {venv}; see {log}")
    report = _check_no_amx(python)
    (venv / STAMP).write_text(json.dumps(want, indent=2) + "\n")
    print(f"llama-cpp-python server: built in {time.monotonic() - start:.0f} s at {python}")
    print(f"  no AMX: {report['system_info']}")
    return python


def not_ready(name: str) -> str | None:
    """Why peer ``name`` cannot be started as ``setup`` leaves it; None when it can.

    Looks only: never builds (``setup`` takes minutes of every core).
    """
    if name == LLAMA_SERVER:
        binary, build = llama_server_path(), llama_server_build_dir()
        if not binary.is_file():
            return f"not built ({binary} does not exist)"
        if _read_stamp(build / STAMP) != _llama_server_stamp():
            return f"built with other settings than these ({build / STAMP})"
        return None if _llama_server_works(binary) else f"{binary} --version fails"
    if name == LLAMA_CPP_PYTHON:
        venv, python = llama_cpp_python_venv(), llama_cpp_python_path()
        if not python.is_file():
            return f"not built ({python} does not exist)"
        if _read_stamp(venv / STAMP) != _llama_cpp_python_stamp():
            return f"built with other settings than these ({venv / STAMP})"
        if not _llama_cpp_python_works(python):
            return f"llama_cpp.server {LLAMA_CPP_PYTHON_VERSION} does not import in {venv}"
        try:
            _check_no_amx(python)
        except (PeerError, OSError, ValueError, subprocess.SubprocessError) as exc:
            return str(exc)
        return None
    raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")


# -- checking ----------------------------------------------------------------


def wait_ready(process: subprocess.Popen[bytes], base: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PeerError(f"exited with status {process.returncode} before it was ready")
        try:
            if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                # llama-server answers /v1/models while loading; /health is 200 when ready.
                health = httpx.get(f"{base}/health", timeout=2)
                if health.status_code in (200, 404):
                    return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise PeerError(f"not ready after {timeout:.0f} s")


def stream_chat(base: str, prompt: str, max_tokens: int = 32) -> dict[str, object]:
    """One streamed chat completion; the text, chunk count and timings."""
    payload = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    text: list[str] = []
    chunks = 0
    done = False
    first = None
    start = time.perf_counter()
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=payload, timeout=120) as r:
        r.raise_for_status()
        content_type = r.headers.get("content-type", "")
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            chunks += 1
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
    end = time.perf_counter()
    return {
        "content_type": content_type,
        "chunks": chunks,
        "done": done,
        "text": "".join(text),
        "ttft_s": (first - start) if first else None,
        "total_s": end - start,
    }


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def check_peer(name: str, model_path: Path, port: int, threads: int) -> bool:
    """Start ``name``, stream one chat completion from it, stop it; True when it streamed."""
    cmd = peer_command(name, model_path, port, threads, DEFAULT_PARALLEL, DEFAULT_CTX_SIZE)
    log = logs_dir() / f"check-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n== {name}\n$ {shlex.join(cmd)}\n  (output: {log})", flush=True)
    base = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            started = time.monotonic()
            wait_ready(process, base)
            print(f"  ready after {time.monotonic() - started:.1f} s")
            result = stream_chat(base, "What's 1+1? Answer in one word.")
        except (PeerError, httpx.HTTPError, ValueError) as exc:
            print(f"  FAILED: {exc}")
            stop(process)
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print("  " + "\n  ".join(tail))
            return False
        finally:
            stop(process)
    ok = bool(result["done"]) and int(result["chunks"]) > 1 and bool(result["text"])  # type: ignore[call-overload]
    print(
        f"  {result['content_type']}: {result['chunks']} chunks, [DONE]={result['done']}, "
        f"TTFT {result['ttft_s'] or 0:.3f} s, total {result['total_s']:.2f} s"
    )
    print(f"  text: {result['text']!r}")
    print(f"  {'streamed OK' if ok else 'FAILED: no proper stream'}")
    return ok


# -- command line ------------------------------------------------------------


def _model_path(value: str | None) -> Path:
    if value:
        return Path(value)
    from spigot.models import embedded_model_path

    return embedded_model_path()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("setup", help="build both peers (skips what is already built)")
    sub.add_parser(
        "llama-server", help="build llama-server only (the gateway tests' upstream; CI builds it)"
    )
    command = sub.add_parser("command", help="print the command line that starts a peer")
    command.add_argument("name", choices=PEERS)
    check = sub.add_parser("check", help="start each peer and stream one chat completion")
    check.add_argument(
        "names", nargs="*", metavar="NAME", help=f"peers (default: {' '.join(PEERS)})"
    )
    for p in (command, check):
        p.add_argument("--model", default=None, help="GGUF file (default: the embedded model)")
        p.add_argument("--port", type=int, default=DEFAULT_PORT)
        p.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    command.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL)
    command.add_argument("--ctx-size", type=int, default=DEFAULT_CTX_SIZE)
    args = parser.parse_args(argv)

    try:
        if args.action == "setup":
            print(f"peers directory: {peers_dir()}")
            server = ensure_llama_server()
            python = ensure_llama_cpp_python_server()
            print(f"\nllama-server:            {server}\nllama-cpp-python server: {python}")
            return 0
        if args.action == "llama-server":
            print(ensure_llama_server())
            return 0
        if args.action == "command":
            cmd = peer_command(
                args.name,
                _model_path(args.model),
                args.port,
                args.threads,
                args.parallel,
                args.ctx_size,
            )
            print(shlex.join(cmd))
            return 0
        # check: one peer at a time (two llama.cpp processes on 2 cores slow each other).
        model = _model_path(args.model)
        ensure = {
            LLAMA_SERVER: ensure_llama_server,
            LLAMA_CPP_PYTHON: ensure_llama_cpp_python_server,
        }
        results = {}
        names = list(dict.fromkeys(args.names or PEERS))
        if unknown := [n for n in names if n not in PEERS]:
            parser.error(f"unknown peer {unknown[0]!r}; known: {', '.join(PEERS)}")
        for name in names:
            ensure[name]()
            results[name] = check_peer(name, model, args.port, args.threads)
        print()
        for name, ok in results.items():
            print(f"{name}: {'streamed OK' if ok else 'FAILED'}")
        return 0 if all(results.values()) else 1
    except PeerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
