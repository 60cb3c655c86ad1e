"""The pure parts of benchmarks.peers: where things go and the peer command lines.

Nothing is built or started here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import peers

MODEL = Path("/models/m.gguf")


@pytest.fixture(autouse=True)
def peers_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SPIGOT_PEERS_DIR", str(tmp_path / "peers"))
    return tmp_path / "peers"


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_peers_dir_honours_env(peers_dir: Path) -> None:
    assert peers.peers_dir() == peers_dir
    assert peers.llama_server_path().is_relative_to(peers_dir)
    assert peers.llama_cpp_python_path().is_relative_to(peers_dir)
    assert peers.logs_dir().is_relative_to(peers_dir)


def test_peers_dir_default_is_outside_the_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPIGOT_PEERS_DIR")
    assert peers.peers_dir() == Path.home() / ".cache" / "spigot-peers"


def test_peers_dir_expands_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIGOT_PEERS_DIR", "~/elsewhere")
    assert peers.peers_dir() == Path.home() / "elsewhere"


def test_llama_server_command() -> None:
    cmd = peers.peer_command("llama-server", MODEL, 8123, threads=3, parallel=4, ctx_size=4096)
    assert cmd[0] == str(peers.llama_server_path())
    assert flag(cmd, "-m") == str(MODEL)
    assert flag(cmd, "--host") == "127.0.0.1"
    assert flag(cmd, "--port") == "8123"
    assert flag(cmd, "-t") == "3"
    assert flag(cmd, "-np") == "4"
    assert flag(cmd, "-c") == "4096"
    assert "-nr" in cmd  # the AMX workaround: no weight repacking (extra buffer types)
    assert "-kvu" in cmd  # one KV pool shared by all slots, like spigot's --ctx-size


def test_llama_cpp_python_command() -> None:
    cmd = peers.peer_command("llama-cpp-python", MODEL, 8124, threads=3, parallel=4, ctx_size=4096)
    assert cmd[:3] == [str(peers.llama_cpp_python_path()), "-m", "llama_cpp.server"]
    assert flag(cmd, "--model") == str(MODEL)
    assert flag(cmd, "--host") == "127.0.0.1"
    assert flag(cmd, "--port") == "8124"
    assert flag(cmd, "--n_threads") == "3"
    assert flag(cmd, "--n_threads_batch") == "3"
    assert flag(cmd, "--n_ctx") == "4096"
    assert flag(cmd, "--interrupt_requests") == "False"


def test_commands_are_strings_and_default_to_spigot_settings() -> None:
    for name in peers.PEERS:
        cmd = peers.peer_command(name, MODEL, 8000)
        assert all(isinstance(part, str) for part in cmd)
    server = peers.peer_command("llama-server", MODEL, 8000)
    assert (flag(server, "-t"), flag(server, "-np"), flag(server, "-c")) == ("2", "8", "8192")


def test_unknown_peer_raises() -> None:
    with pytest.raises(ValueError, match="unknown peer"):
        peers.peer_command("vllm", MODEL, 8000, 2, 8, 8192)


def test_command_cli_prints_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert peers.main(["command", "llama-server", "--model", str(MODEL), "--port", "9001"]) == 0
    out = capsys.readouterr().out.split()
    assert out == peers.peer_command("llama-server", MODEL, 9001)


def test_compiled_features() -> None:
    info = "CPU : SSE3 = 1 | AVX2 = 1 | BMI2 = 0 | AMX_INT8 = 1 | REPACK = 1 |"
    assert peers.compiled_features(info) == {"SSE3", "AVX2", "AMX_INT8", "REPACK"}


def test_the_no_amx_build_asks_only_for_extensions_the_cpu_has() -> None:
    from benchmarks.peers import no_amx_cmake_args

    plain = no_amx_cmake_args(frozenset({"avx2", "fma", "f16c"}))
    assert "AVX512" not in plain and "AMX" not in plain
    assert "-DGGML_NATIVE=OFF" in plain
    full = no_amx_cmake_args(
        frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8"})
    )
    assert "-DGGML_AVX512=ON" in full and "-DGGML_AVX512_BF16=ON" in full
    assert "AMX" not in full
