"""Import rules between layers, checked on the source with ``ast`` (nothing is imported).

* the engine knows nothing of HTTP: no spigot.api/cli/server, fastapi, starlette, pydantic;
* only spigot/engine/llamacpp/model.py talks to llama_cpp;
* only spigot/api uses fastapi or starlette (spigot/server.py may name fastapi's app type).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "spigot"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, name: str, is_package: bool = False) -> set[str]:
    """Every module an import statement anywhere in module ``name`` names, made absolute.

    ``from a.b import c`` yields both ``a.b`` and ``a.b.c`` (c may be a submodule).
    """
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def names(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


MODULES: dict[str, set[str]] = {
    module_name(path): imported_modules(
        path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py"
    )
    for path in sorted(PACKAGE.rglob("*.py"))
}


def violations(allowed: set[str] | None, forbidden: tuple[str, ...], scope: str = "") -> list[str]:
    """``module imports target`` for each forbidden import outside ``allowed`` modules."""
    out = []
    for module, imports in MODULES.items():
        if scope and not names(module, scope):
            continue
        if allowed is not None and module in allowed:
            continue
        out += [f"{module} imports {i}" for i in imports if any(names(i, f) for f in forbidden)]
    return sorted(out)


def test_the_walker_sees_the_package() -> None:
    assert {"spigot", "spigot.engine.llamacpp.scheduler", "spigot.api.app", "spigot.server"} <= set(
        MODULES
    )
    # Top-level and function-level imports are both seen.
    assert "llama_cpp" in MODULES["spigot.engine.llamacpp.model"]
    assert "fastapi" in MODULES["spigot.api.app"]
    assert "spigot.server" in MODULES["spigot.cli.serve"]  # imported inside a function


def test_relative_imports_are_resolved() -> None:
    source = "from . import types\nfrom ..api import sse\nfrom .core import EngineCore\n"
    found = imported_modules(source, "spigot.engine.x")
    assert {"spigot.engine.types", "spigot.api.sse", "spigot.engine.core"} <= found
    assert "spigot.api" in imported_modules("from .. import api\n", "spigot.engine", True)


@pytest.mark.parametrize(
    "forbidden", ["spigot.api", "spigot.cli", "spigot.server", "fastapi", "starlette", "pydantic"]
)
def test_engine_does_not_import_upper_layers(forbidden: str) -> None:
    assert violations(None, (forbidden,), scope="spigot.engine") == []


def test_only_the_llamacpp_module_imports_llama_cpp() -> None:
    assert violations({"spigot.engine.llamacpp.model"}, ("llama_cpp",)) == []


def test_only_the_api_imports_starlette() -> None:
    api = {m for m in MODULES if names(m, "spigot.api")}
    assert violations(api, ("starlette",)) == []


def test_only_the_api_and_server_import_fastapi() -> None:
    api = {m for m in MODULES if names(m, "spigot.api")}
    assert violations({*api, "spigot.server"}, ("fastapi",)) == []


def test_rules_catch_a_violation() -> None:
    # The checker itself must be able to fail.
    MODULES["spigot.engine._probe"] = {"fastapi", "llama_cpp"}
    try:
        assert violations(None, ("fastapi",), scope="spigot.engine") == [
            "spigot.engine._probe imports fastapi"
        ]
        assert violations({"spigot.engine.llamacpp.model"}, ("llama_cpp",)) == [
            "spigot.engine._probe imports llama_cpp"
        ]
    finally:
        del MODULES["spigot.engine._probe"]


def test_the_guard_stands_alone() -> None:
    """spigot.guard wraps streams from any server, so it needs nothing else of spigot."""
    assert any(names(m, "spigot.guard") for m in MODULES)
    assert (
        violations(
            None,
            ("spigot.api", "spigot.engine", "spigot.server", "spigot.cli", "spigot.bench"),
            scope="spigot.guard",
        )
        == []
    )
    assert violations(None, ("fastapi", "starlette", "llama_cpp"), scope="spigot.guard") == []


def test_the_api_knows_engines_only_through_the_protocol_and_types() -> None:
    """api/ may import spigot.engine.protocol and spigot.engine.types, nothing else of an
    engine (not llamacpp, not upstream): any engine that implements the protocol fits."""
    allowed = ("spigot.engine.protocol", "spigot.engine.types")
    found = []
    for module, imports in MODULES.items():
        if not names(module, "spigot.api"):
            continue
        for target in imports:
            engine_part = names(target, "spigot.engine") and target != "spigot.engine"
            if names(target, "spigot.upstream") or (
                engine_part and not any(names(target, a) for a in allowed)
            ):
                found.append(f"{module} imports {target}")
    assert found == []


def test_only_the_server_builds_engines() -> None:
    engines = ("LlamaCppEngine", "UpstreamEngine")
    builders = [
        m
        for m, imports in MODULES.items()
        if not names(m, "spigot.engine") and not names(m, "spigot.upstream")
        if any(i.rpartition(".")[2] in engines for i in imports)
    ]
    assert builders == ["spigot.server"]


def test_no_source_module_is_over_500_lines() -> None:
    """Small modules with one idea each: a module past 500 lines has more than one."""
    long = {
        module_name(path): lines
        for path in PACKAGE.rglob("*.py")
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > 500
    }
    assert long == {}
