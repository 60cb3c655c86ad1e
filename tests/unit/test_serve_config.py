"""``serve --config``: the file's options fill what the command line left at default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest

from spigot.cli.serve import build_settings, serve
from spigot.cli.serve_config import read_gateway, with_gateway
from spigot.models import EMBEDDED_MODEL_ID

POLICY = '[[rule]]\nid = "r"\nkind = "phrase"\nphrases = ["x"]\naction = "redact"\n'


def options_for(args: list[str]) -> tuple[click.Context, dict[str, Any]]:
    ctx = serve.make_context("serve", args)
    return ctx, dict(ctx.params)


def settings_for(args: list[str]) -> Any:
    ctx, options = options_for(args)
    config = options.pop("config_path")
    upstreams = options.pop("upstream_args")
    options.pop("verbose_llama")
    gateway = read_gateway(ctx, config, upstreams, options)
    settings = build_settings(**options, gateway_models=gateway.model_names())
    return with_gateway(settings, gateway, model_flags=bool(options["model_args"]))


def test_file_options_apply_flags_and_environment_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "policy.toml").write_text(POLICY, encoding="utf-8")
    config = tmp_path / "spigot.toml"
    config.write_text(
        'port = 9001\nctx_size = 4096\nguard = "policy.toml"\nalias = ["gpt-*=smollm2"]\n'
        'max_body_size = 2\n\n[[model]]\nname = "smollm2"\ngguf = "embedded"\n',
        encoding="utf-8",
    )
    settings = settings_for(["--config", str(config)])
    assert settings.port == 9001 and settings.engine.n_ctx == 4096
    assert settings.guard is not None  # found next to the file, not in the working directory
    assert settings.aliases == (("gpt-*", "smollm2"),)
    assert [m.id for m in settings.models] == ["smollm2"]  # not the embedded default too
    assert settings.max_body_bytes == 2 * 2**20
    assert settings_for(["--config", str(config), "--port", "9002"]).port == 9002
    monkeypatch.setenv("SPIGOT_CTX_SIZE", "2048")
    assert settings_for(["--config", str(config)]).engine.n_ctx == 2048


def test_a_bad_value_in_the_file_names_it(tmp_path: Path) -> None:
    config = tmp_path / "spigot.toml"
    config.write_text('port = "eighty"\n', encoding="utf-8")
    with pytest.raises(click.ClickException, match=r"spigot\.toml: port: "):
        settings_for(["--config", str(config)])


def test_upstream_models_only_serve_no_local_model(tmp_path: Path) -> None:
    config = tmp_path / "spigot.toml"
    config.write_text(
        '[[upstream]]\nname = "u"\nbase_url = "http://127.0.0.1:9/v1"\n\n'
        '[[model]]\nname = "remote"\ntargets = ["u:m"]\n',
        encoding="utf-8",
    )
    settings = settings_for(["--config", str(config)])
    assert settings.models == () and [r.name for r in settings.routes] == ["remote"]
    # With --model, that model is served beside them.
    both = settings_for(["--config", str(config), "--model", f"x={_embedded()}"])
    assert [m.id for m in both.models] == ["x"]
    # Nothing configured: the embedded model, as always.
    assert [m.id for m in settings_for([]).models] == [EMBEDDED_MODEL_ID]


def _embedded() -> str:
    from spigot.models import embedded_model_path

    return str(embedded_model_path())
