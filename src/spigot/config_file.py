"""``spigot serve --config FILE.toml``: upstreams, models, and any serve option.

    port = 8080                      # any serve option, named as its flag with "_"
    db = "postgresql://..."          # for "-" (flags given on the command line win)

    [[upstream]]
    name = "vllm-a"
    base_url = "http://10.0.0.5:8000/v1"
    api_key_env = "VLLM_A_KEY"        # optional: the key is read from this variable
    max_in_flight = 256               # optional
    connect_timeout = 5               # seconds, optional; also first_event_timeout, idle_timeout

    [[model]]
    name = "llama-8b"                 # what clients ask for
    targets = ["vllm-a:meta-llama/Llama-3.1-8B-Instruct"]
    max_context = 131072              # optional; else what the upstream says, else 32768
    tokenizer = "tokenizer.json"      # optional: counts prompts and usage-less streams

    [[model]]
    name = "smollm2"
    gguf = "embedded"                 # or a path: a local llama.cpp model in the same server

Everything is checked when the file is read; a mistake stops ``serve`` with
the file, the entry and the reason (``ConfigError``). Relative paths (gguf,
tokenizer, and options such as ``guard``) are relative to the file.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from spigot.models import ModelNotFound, ModelSpec, embedded_model_path
from spigot.upstream.config import ModelRoute, Target, UpstreamConfig

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
EMBEDDED = "embedded"


class ConfigError(ValueError):
    """A config file that cannot be served: says where and why."""


@dataclass(frozen=True, slots=True)
class ConfigFile:
    path: Path
    options: Mapping[str, Any]  # serve options by flag name ("ctx_size")
    upstreams: tuple[UpstreamConfig, ...]
    routes: tuple[ModelRoute, ...]  # models on upstreams
    local_models: tuple[ModelSpec, ...]  # gguf models, in this process


def load_config_file(path: Path, option_names: frozenset[str]) -> ConfigFile:
    """Read and check ``path``; ``option_names``: serve's flags settable in a file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    upstream_tables = data.pop("upstream", [])
    model_tables = data.pop("model", [])
    for key in data:
        if key not in option_names:
            known = ", ".join(sorted(option_names))
            raise ConfigError(f"{path}: unknown setting '{key}' (serve options: {known})")
    where = _Where(path)
    upstreams = _upstreams(where, upstream_tables)
    routes, local_models = _models(where, model_tables, {u.name for u in upstreams})
    return ConfigFile(path, dict(data), upstreams, routes, local_models)


class _Where:
    """Builds the "file: entry: field: reason" of an error."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, entry: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.path}: {entry}: {reason}")


def _tables(where: _Where, value: object, kind: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise where.error(kind, f"must be written as [[{kind}]] tables")
    return value


def _entry_name(where: _Where, table: dict[str, Any], kind: str, index: int) -> str:
    name = table.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise where.error(
            f"[[{kind}]] #{index + 1}",
            "'name' is required: letters, digits, '.', '_' or '-', at most 64 characters",
        )
    return name


def _check_keys(where: _Where, entry: str, table: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise where.error(
            entry, f"unknown key '{unknown[0]}' (known: {', '.join(sorted(allowed))})"
        )


def _number(where: _Where, entry: str, table: dict[str, Any], key: str, default: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise where.error(entry, f"'{key}' must be a number of seconds")
    if not math.isfinite(value) or not 0 < value <= 3600:
        raise where.error(entry, f"'{key}' must be more than 0 and at most 3600 seconds")
    return float(value)


def _positive_int(
    where: _Where, entry: str, table: dict[str, Any], key: str, default: int | None
) -> int | None:
    value = table.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10**7:
        raise where.error(entry, f"'{key}' must be a whole number from 1 to 10000000")
    return value


UPSTREAM_KEYS = {
    "name",
    "base_url",
    "api_key_env",
    "max_in_flight",
    "connect_timeout",
    "first_event_timeout",
    "idle_timeout",
}


def _upstreams(where: _Where, value: object) -> tuple[UpstreamConfig, ...]:
    out: list[UpstreamConfig] = []
    for i, table in enumerate(_tables(where, value, "upstream")):
        name = _entry_name(where, table, "upstream", i)
        entry = f"[[upstream]] '{name}'"
        _check_keys(where, entry, table, UPSTREAM_KEYS)
        if any(u.name == name for u in out):
            raise where.error(entry, "another [[upstream]] has this name")
        base_url = table.get("base_url")
        if not isinstance(base_url, str) or not is_http_url(base_url):
            raise where.error(entry, "'base_url' must be an http:// or https:// URL")
        api_key = None
        if "api_key_env" in table:
            variable = table["api_key_env"]
            if not isinstance(variable, str) or not variable:
                raise where.error(entry, "'api_key_env' must name an environment variable")
            api_key = os.environ.get(variable)
            if not api_key:
                # Sending no key where one was meant would fail every request later.
                raise where.error(entry, f"the environment variable {variable} is not set")
        max_in_flight = _positive_int(where, entry, table, "max_in_flight", 256)
        assert max_in_flight is not None
        out.append(
            UpstreamConfig(
                name=name,
                base_url=base_url.rstrip("/"),
                api_key=api_key,
                max_in_flight=max_in_flight,
                connect_timeout=_number(where, entry, table, "connect_timeout", 5.0),
                first_event_timeout=_number(where, entry, table, "first_event_timeout", 30.0),
                idle_timeout=_number(where, entry, table, "idle_timeout", 60.0),
            )
        )
    return tuple(out)


MODEL_KEYS = {"name", "targets", "gguf", "max_context", "tokenizer"}


def _models(
    where: _Where, value: object, upstreams: set[str]
) -> tuple[tuple[ModelRoute, ...], tuple[ModelSpec, ...]]:
    routes: list[ModelRoute] = []
    local: list[ModelSpec] = []
    names: set[str] = set()
    for i, table in enumerate(_tables(where, value, "model")):
        name = _entry_name(where, table, "model", i)
        entry = f"[[model]] '{name}'"
        _check_keys(where, entry, table, MODEL_KEYS)
        if name in names:
            raise where.error(entry, "another [[model]] has this name")
        names.add(name)
        if ("targets" in table) == ("gguf" in table):
            raise where.error(entry, "needs exactly one of 'targets' (upstreams) or 'gguf'")
        max_context = _positive_int(where, entry, table, "max_context", None)
        tokenizer = None
        if "tokenizer" in table:
            tokenizer = _file(where, entry, table["tokenizer"], "tokenizer")
        if "gguf" in table:
            if tokenizer is not None or max_context is not None:
                raise where.error(entry, "a gguf model has its own tokenizer and context")
            gguf = table["gguf"]
            if gguf == EMBEDDED:
                try:
                    path = embedded_model_path()
                except ModelNotFound as exc:
                    raise where.error(entry, str(exc)) from None
            else:
                path = _file(where, entry, gguf, "gguf")
            local.append(ModelSpec(name, path))
            continue
        targets = table["targets"]
        if not isinstance(targets, list) or not targets:
            raise where.error(entry, "'targets' must be a non-empty list of \"UPSTREAM:MODEL\"")
        parsed: list[Target] = []
        for target in targets:
            upstream, sep, remote = str(target).partition(":")
            if not isinstance(target, str) or not sep or not remote:
                raise where.error(entry, f'target {target!r} is not "UPSTREAM:MODEL"')
            if upstream not in upstreams:
                raise where.error(entry, f"target {target!r} names no [[upstream]] '{upstream}'")
            if Target(upstream, remote) in parsed:
                raise where.error(entry, f"target {target!r} is listed twice")
            parsed.append(Target(upstream, remote))
        routes.append(ModelRoute(name, tuple(parsed), max_context=max_context, tokenizer=tokenizer))
    return tuple(routes), tuple(local)


def _file(where: _Where, entry: str, value: object, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise where.error(entry, f"'{key}' must be a file path")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = where.path.parent / path
    if not path.is_file():
        raise where.error(entry, f"'{key}': no such file: {path}")
    return path


def is_http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def parse_upstream_arg(value: str, index: int) -> UpstreamConfig:
    """``--upstream [NAME=]URL``: NAME defaults to ``upstreamN``."""
    name, sep, url = value.partition("=")
    if not sep or "://" in name:
        name, url = f"upstream{index + 1}", value
    if not NAME.fullmatch(name):
        raise ConfigError(f"--upstream {value!r}: the name must be letters, digits, '.', '_', '-'")
    if not is_http_url(url):
        raise ConfigError(f"--upstream {value!r}: expected [NAME=]http(s)://HOST[:PORT]/v1")
    return UpstreamConfig(name=name, base_url=url.rstrip("/"))
