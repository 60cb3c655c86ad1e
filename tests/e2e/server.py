"""Starting a real ``spigot serve`` process on a free port, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
LEGACY_OPENAI_DIR = ROOT / ".venv" / "openai-0.28"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def health(self) -> dict:
        return httpx.get(f"{self.root_url}/health", timeout=10).json()

    def engine_stats(self) -> dict:
        (stats,) = self.health()["models"].values()
        return stats

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """Wait until no sequence runs, waits or is in flight; return the stats."""
        deadline = time.monotonic() + timeout
        stats = self.engine_stats()
        while time.monotonic() < deadline:
            stats = self.engine_stats()
            if stats["running"] == 0 and stats["waiting"] == 0 and stats["in_flight"] == 0:
                return stats
            time.sleep(0.05)
        return stats

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(*args: str, timeout: float = 120.0) -> RunningServer:
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="spigot-e2e-", suffix=".log")[1])
    if "--db" not in args and "--no-metering" not in args:
        # Never the default ./spigot.db: each server gets a ledger of its own.
        args = (*args, "--db", str(log.with_suffix(".db")))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "spigot", "serve", "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    server = RunningServer(process, port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"spigot serve exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.root_url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"spigot serve did not become healthy:\n{server.log()}")


def spigot(*args: str) -> str:
    """``spigot ARGS`` in a subprocess; its stdout (it must succeed)."""
    done = subprocess.run(
        [sys.executable, "-m", "spigot", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, f"spigot {' '.join(args)}: {done.stderr}"
    return done.stdout
