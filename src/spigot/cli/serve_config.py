"""``serve --config FILE.toml`` and ``--upstream [NAME=]URL``: merged into serve's options.

Any serve option may be set in the file, named as its flag with ``_`` for
``-`` (``ctx_size = 4096``); an option given on the command line or in its
environment variable wins over the file. ``[[upstream]]`` and ``[[model]]``
tables describe gateway mode (``spigot.config_file``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

if TYPE_CHECKING:
    from spigot.config import Settings
    from spigot.models import ModelSpec
    from spigot.upstream.config import ModelRoute, UpstreamConfig

# Flags that a file sets in its own way, or that make no sense there.
NOT_IN_FILE = frozenset({"model", "upstream", "config", "verbose_llama"})


@dataclass(frozen=True, slots=True)
class Gateway:
    """What the file and ``--upstream`` add to the served models."""

    upstreams: tuple[UpstreamConfig, ...] = ()
    routes: tuple[ModelRoute, ...] = ()
    local_models: tuple[ModelSpec, ...] = ()
    discover: tuple[UpstreamConfig, ...] = ()

    @property
    def serves_models(self) -> bool:
        return bool(self.routes or self.local_models or self.discover)

    def model_names(self) -> tuple[str, ...]:
        return (*(r.name for r in self.routes), *(m.id for m in self.local_models))


def _file_keys(command: click.Command) -> dict[str, click.Option]:
    """The file's name for each settable option: its long flag, "_" for "-"."""
    keys: dict[str, click.Option] = {}
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        flag = next((o for o in param.opts if o.startswith("--")), None)
        if flag is None:
            continue
        key = flag[2:].replace("-", "_")
        if key not in NOT_IN_FILE:
            keys[key] = param
    return keys


def read_gateway(
    ctx: click.Context,
    config_path: Path | None,
    upstream_args: tuple[str, ...],
    options: dict[str, Any],
) -> Gateway:
    """Fill ``options`` from the file where the command line left them at their default."""
    from spigot.config_file import ConfigError, load_config_file, parse_upstream_arg

    try:
        discover = tuple(parse_upstream_arg(a, i) for i, a in enumerate(upstream_args))
        if config_path is None:
            return Gateway(discover=discover)
        keys = _file_keys(ctx.command)
        config = load_config_file(config_path, frozenset(keys))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    for key, value in config.options.items():
        param = keys[key]
        assert param.name is not None
        source = ctx.get_parameter_source(param.name)
        if source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            continue  # flags win
        if param.multiple and not isinstance(value, list):
            value = [value]
        if isinstance(param.type, click.Path) and isinstance(value, str):
            # A file named in the file is found next to it, as its gguf and tokenizer are.
            value = str(config_path.parent / Path(value).expanduser())
        try:
            options[param.name] = param.type_cast_value(ctx, value)
        except click.BadParameter as exc:
            raise click.ClickException(f"{config_path}: {key}: {exc.message}") from None
    names = [u.name for u in (*config.upstreams, *discover)]
    if len(set(names)) != len(names):
        raise click.ClickException(f"{config_path}: an --upstream has the name of an [[upstream]]")
    return Gateway(config.upstreams, config.routes, config.local_models, discover)


def with_gateway(settings: Settings, gateway: Gateway, model_flags: bool) -> Settings:
    """The settings with the gateway's models; the embedded model only if nothing else."""
    if not gateway.serves_models:
        return settings
    local = (*gateway.local_models, *(settings.models if model_flags else ()))
    ids = [m.id for m in local] + [r.name for r in gateway.routes]
    if len(set(ids)) != len(ids):
        raise click.UsageError(f"model names must be unique, got {ids}")
    return replace(
        settings,
        models=tuple(local),
        upstreams=gateway.upstreams,
        routes=gateway.routes,
        discover=gateway.discover,
    )
