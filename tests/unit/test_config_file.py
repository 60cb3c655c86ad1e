"""``serve --config``: every mistake names the file, the entry and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from spigot.config_file import ConfigError, load_config_file, parse_upstream_arg
from spigot.models import embedded_model_path
from spigot.upstream.config import ModelRoute, Target, UpstreamConfig

OPTIONS = frozenset({"port", "db", "ctx_size", "alias"})

GOOD = """
port = 9000

[[upstream]]
name = "vllm-a"
base_url = "http://10.0.0.5:8000/v1/"
api_key_env = "TEST_VLLM_KEY"
max_in_flight = 16
connect_timeout = 2
first_event_timeout = 7.5

[[upstream]]
name = "vllm-b"
base_url = "https://vllm-b.internal/v1"

[[model]]
name = "llama-8b"
targets = ["vllm-a:meta-llama/Llama-3.1-8B-Instruct", "vllm-b:meta-llama/Llama-3.1-8B-Instruct"]
max_context = 8192

[[model]]
name = "smollm2"
gguf = "embedded"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spigot.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_full_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_VLLM_KEY", "sk-upstream")
    config = load_config_file(write(tmp_path, GOOD), OPTIONS)
    assert config.options == {"port": 9000}
    assert config.upstreams == (
        UpstreamConfig(
            "vllm-a",
            "http://10.0.0.5:8000/v1",
            api_key="sk-upstream",
            max_in_flight=16,
            connect_timeout=2.0,
            first_event_timeout=7.5,
        ),
        UpstreamConfig("vllm-b", "https://vllm-b.internal/v1"),
    )
    assert config.routes == (
        ModelRoute(
            "llama-8b",
            (
                Target("vllm-a", "meta-llama/Llama-3.1-8B-Instruct"),
                Target("vllm-b", "meta-llama/Llama-3.1-8B-Instruct"),
            ),
            max_context=8192,
        ),
    )
    ((local),) = config.local_models
    assert local.id == "smollm2" and local.path == embedded_model_path()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("port = 9000", "prot = 9000"), "unknown setting 'prot'"),
        (('name = "vllm-b"\n', ""), "[[upstream]] #2: 'name' is required"),
        (('name = "vllm-b"', 'name = "vllm-a"'), "[[upstream]] 'vllm-a': another [[upstream]]"),
        (('"https://vllm-b.internal/v1"', '"ftp://x"'), "'vllm-b': 'base_url' must be an http"),
        (("max_in_flight = 16", "max_in_flight = 0"), "'vllm-a': 'max_in_flight' must be"),
        (("connect_timeout = 2", "connect_timeout = -1"), "'connect_timeout' must be more"),
        (("connect_timeout = 2", 'connect_timeout = "2"'), "'connect_timeout' must be a number"),
        (("connect_timeout = 2", "retries = 2"), "'vllm-a': unknown key 'retries'"),
        (('"vllm-a:meta', '"vllm-c:meta'), "[[model]] 'llama-8b': target 'vllm-c:meta"),
        (("targets = [", "targets = []\nx = ["), "unknown key 'x'"),
        (('gguf = "embedded"', 'gguf = "missing.gguf"'), "'smollm2': 'gguf': no such file"),
        (('gguf = "embedded"', ""), "'smollm2': needs exactly one of 'targets'"),
        (('name = "smollm2"', 'name = "llama-8b"'), "another [[model]] has this name"),
        (("max_context = 8192", "max_context = 8192.5"), "'max_context' must be a whole"),
        (('[[model]]\nname = "smollm2"', 'model = 3\n[[x]]\nname = "smollm2"'), None),
    ],
)
def test_mistakes_name_the_file_entry_and_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: tuple[str, str], message: str | None
) -> None:
    monkeypatch.setenv("TEST_VLLM_KEY", "sk-upstream")
    old, new = change
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as caught:
        load_config_file(path, OPTIONS)
    if message is not None:
        assert message in str(caught.value), str(caught.value)
    assert str(caught.value).startswith(f"{path}: ")


def test_a_missing_key_variable_stops_the_server(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TEST_UNSET_KEY is not set"):
        load_config_file(write(tmp_path, GOOD.replace("TEST_VLLM_KEY", "TEST_UNSET_KEY")), OPTIONS)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config_file(tmp_path / "absent.toml", OPTIONS)
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config_file(write(tmp_path, "port = "), OPTIONS)


def test_upstream_shortcut() -> None:
    assert parse_upstream_arg("http://h:8000/v1/", 0) == UpstreamConfig(
        "upstream1", "http://h:8000/v1"
    )
    assert parse_upstream_arg("a=https://h/v1", 3).name == "a"
    with pytest.raises(ConfigError, match="expected"):
        parse_upstream_arg("a=h:8000", 0)
