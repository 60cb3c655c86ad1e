"""Packaging: what a base install (no extras) must carry, and the lock against the ranges.

``pip install spigot`` without extras is for ``spigot.guard``, the streaming client
(``spigot.client``, ``spigot.sse_parser``) and the ``spigot`` command itself: no llama.cpp
to compile. So every third-party module those import when they load, following their
``spigot`` imports, must come from ``[project].dependencies``. Imports inside functions
(a command's heavy work) and under ``TYPE_CHECKING`` don't count; they need an extra.

Checked on the source with ``ast``; only the last test starts a Python to confirm it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
LOCK = ROOT / "requirements.lock"

# What a base install is for: every module of the guard, the client, the command.
BASE_ROOTS = ("spigot.guard", "spigot.client", "spigot.sse_parser", "spigot.cli", "spigot.__main__")
# Imported but installed by a declared requirement that pins it exactly.
PROVIDED_BY = {"pydantic-core": "pydantic"}
# Imported by a part of the package that has no extra yet: distribution -> why.
NO_EXTRA_YET: dict[str, str] = {}
# What must not load with `import spigot.cli` or the guard or the client.
HEAVY = ("llama_cpp", "numpy", "fastapi", "starlette", "pydantic", "uvicorn", "jinja2",
         "matplotlib", "psycopg", "redis")  # fmt: skip


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    return {normalize(Requirement(r).name) for r in requirements}


def module_file(src: Path, module: str) -> Path | None:
    path = src.joinpath(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _catches_import_error(node: ast.Try | ast.TryStar) -> bool:
    names = {"ImportError", "ModuleNotFoundError"}
    for handler in node.handlers:
        kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if any(isinstance(k, ast.Name) and k.id in names for k in kinds):
            return True
    return False


def imports(path: Path, module: str, *, at_load: bool = True) -> set[str]:
    """The modules ``module`` imports, made absolute.

    ``at_load``: only those it imports when it loads: module and class bodies and the
    blocks in them count, function bodies don't. Never counted: the ``TYPE_CHECKING``
    branch, and a ``try`` that catches ``ImportError`` (an optional module).
    ``from a import b`` yields ``a`` and ``a.b`` (b may be a submodule).
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
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
                found.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and at_load:
                continue
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse)
            elif isinstance(node, ast.Try | ast.TryStar) and _catches_import_error(node):
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            else:
                for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                    for child in getattr(node, field, None) or []:
                        visit(child.body if hasattr(child, "pattern") else [child])

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    found.discard("__future__")
    return found


def third_party_at_load(src: Path, roots: tuple[str, ...]) -> dict[str, set[str]]:
    """Top-level third-party module -> the first-party modules that import it at load.

    Starts from ``roots`` (a package root includes all its modules: any may be imported)
    and follows first-party imports, parents included (importing ``a.b`` runs ``a``).
    """
    first_party = {p.name for p in src.iterdir() if p.is_dir() or p.suffix == ".py"}
    queue: list[str] = []
    for root in roots:
        queue.append(root)
        file = module_file(src, root)
        if file is not None and file.name == "__init__.py":
            for sub in sorted(file.parent.rglob("*.py")):
                parts = list(sub.relative_to(src).with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts.pop()
                queue.append(".".join(parts))
    seen: set[str] = set()
    third: dict[str, set[str]] = {}
    while queue:
        module = queue.pop()
        if module in seen:
            continue
        file = module_file(src, module)
        if file is None:  # a name imported from a module, not a module
            continue
        seen.add(module)
        parts = module.split(".")
        queue += [".".join(parts[:i]) for i in range(1, len(parts))]
        for imported in imports(file, module):
            top = imported.partition(".")[0]
            if top in first_party:
                queue.append(imported)
            elif top not in sys.stdlib_module_names:
                third.setdefault(top, set()).add(module)
    return third


def distribution(top_level: str) -> str:
    dists = importlib.metadata.packages_distributions().get(top_level)
    assert dists, f"{top_level!r} is not installed here: which distribution provides it?"
    return normalize(dists[0])


def undeclared(third: dict[str, set[str]], declared: set[str]) -> list[str]:
    out = []
    for top, importers in sorted(third.items()):
        dist = distribution(top)
        if PROVIDED_BY.get(dist, dist) not in declared:
            out.append(f"{top} ({dist}), imported by {', '.join(sorted(importers))}")
    return out


BASE = requirement_names(PYPROJECT["project"]["dependencies"])
EXTRAS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]


def test_the_walker_sees_load_time_imports_only(tmp_path: Path) -> None:
    """The check can fail: a heavy import at load is seen, lazy and typing-only ones not."""
    pkg = tmp_path / "app"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from app.heavy import thing\n")
    (pkg / "heavy.py").write_text("import numpy\nthing = 1\n")
    (pkg / "light.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import fastapi\n"
        "try:\n    import uvloop\nexcept ImportError:\n    uvloop = None\n"
        "def run():\n    import llama_cpp\n"
        "with open(__file__):\n    import click\n"
        "from . import sub\n"
    )
    third = third_party_at_load(tmp_path, ("app.light",))
    assert third == {"numpy": {"app.heavy"}, "click": {"app.light"}}
    assert undeclared(third, {"click"}) == ["numpy (numpy), imported by app.heavy"]


def test_base_install_serves_the_guard_the_client_and_the_command() -> None:
    third = third_party_at_load(SRC, BASE_ROOTS)
    assert "regex" in third and "httpx" in third  # the walk reached the guard and client
    assert undeclared(third, BASE) == [], "move these to [project].dependencies, or import lazily"


def test_every_import_in_the_package_is_declared() -> None:
    """Any import in src/spigot, lazy ones too, is base or in an extra (optional ones aside)."""
    declared = BASE | set(NO_EXTRA_YET)
    declared |= requirement_names([r for name, reqs in EXTRAS.items() if name != "dev"
                                   for r in reqs])  # fmt: skip
    found: dict[str, set[str]] = {}
    for path in sorted((SRC / "spigot").rglob("*.py")):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts)
        for imported in imports(path, module, at_load=False):
            top = imported.partition(".")[0]
            if top not in sys.stdlib_module_names and top != "spigot":
                found.setdefault(top, set()).add(module)
    assert undeclared(found, declared) == []


def test_extras_are_the_documented_ones() -> None:
    assert {"serve", "postgres", "plots", "gateway", "all", "dev"} <= set(EXTRAS)
    assert not requirement_names(EXTRAS["serve"]) & BASE
    assert "llama-cpp-python" in requirement_names(EXTRAS["serve"])
    assert Requirement(EXTRAS["all"][0]).extras == {"serve", "postgres", "plots", "gateway"}
    assert "tokenizers" in requirement_names(EXTRAS["gateway"])


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version.strip(), f"not an exact pin: {line!r}"
        pins[normalize(name)] = version.strip()
    return pins


def test_the_lock_pins_every_requirement_within_its_range() -> None:
    """pyproject.toml's ranges and requirements.lock agree (else: `make lock`)."""
    pins = lock_pins()
    requirements = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    for reqs in EXTRAS.values():
        requirements += [Requirement(r) for r in reqs if normalize(Requirement(r).name) != "spigot"]
    wrong = []
    for req in requirements:
        pin = pins.get(normalize(req.name))
        if pin is None or not req.specifier.contains(pin, prereleases=True):
            wrong.append(f"{req} (lock: {pin})")
    assert wrong == [], "run `make lock`, then `make install test`"


@pytest.mark.timeout(60)
def test_importing_the_light_parts_loads_nothing_heavy() -> None:
    code = (
        "import sys, spigot.cli, spigot.guard, spigot.client, spigot.sse_parser; "
        "print(' '.join(sorted({m.partition('.')[0] for m in sys.modules})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert [m for m in HEAVY if m in loaded] == []
