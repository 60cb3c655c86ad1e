"""`spigot guard check` validates a policy without running its plug-ins' code."""

from __future__ import annotations

import sys
from pathlib import Path

from click.testing import CliRunner

from spigot.cli import main

PLUGIN_MODULE = "spigot_check_probe_plugin"


def write_policy(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "imported"
    (tmp_path / f"{PLUGIN_MODULE}.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "class Finder:\n"
        "    def find(self, text):\n"
        "        return []\n"
        "def make_finder(**options):\n"
        "    return Finder()\n",
        encoding="utf-8",
    )
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f"""
        [[rule]]
        id = "probe"
        kind = "plugin"
        plugin = "{PLUGIN_MODULE}:make_finder"
        max_len = 4
        action = "flag"
        """,
        encoding="utf-8",
    )
    return policy, marker


def test_check_names_plugins_without_importing_them(tmp_path: Path, monkeypatch) -> None:
    policy, marker = write_policy(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = CliRunner().invoke(main, ["guard", "check", str(policy)])
    assert result.exit_code == 0, result.output
    assert "probe\tplugin" in result.output
    assert "not imported" in result.output
    assert not marker.exists(), "checking a policy ran the plug-in's code"
    assert PLUGIN_MODULE not in sys.modules


def test_check_imports_plugins_only_when_asked(tmp_path: Path, monkeypatch) -> None:
    policy, marker = write_policy(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = CliRunner().invoke(main, ["guard", "check", "--import-plugins", str(policy)])
    sys.modules.pop(PLUGIN_MODULE, None)
    assert result.exit_code == 0, result.output
    assert marker.exists()


def test_check_still_refuses_an_invalid_policy(tmp_path: Path) -> None:
    policy = tmp_path / "bad.toml"
    policy.write_text('[[rule]]\nid = "x"\nkind = "plugin"\naction = "flag"\n', encoding="utf-8")
    result = CliRunner().invoke(main, ["guard", "check", str(policy)])
    assert result.exit_code == 1
    assert "exactly one of 'plugin'" in result.output
