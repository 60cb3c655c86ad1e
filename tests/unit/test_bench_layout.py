"""The installed package stands alone: no repository tooling, no repository paths.

``benchmarks/`` (the standard suite, peers, micro-benchmarks) and ``tests/`` are
the repository's; ``spigot`` is what a wheel installs, where neither exists.
So nothing under src/spigot may import them, run them (``-m benchmarks.x``),
climb from ``__file__`` out of the package, or name a repository path such as
``docs/benchmarks.md``. Checked on the source with ``ast``, like
test_layering.py. Also: the bench and CLI modules stay under 500 lines, the
CLI imports nothing heavy at module level, every ``spigot serve`` option
reaches ``build_settings``, and ``spigot bench`` needs matplotlib only to plot.
"""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
PACKAGE = SRC / "spigot"
# Top-level parts of the repository that an installed package cannot rely on.
REPO_PACKAGES = ("benchmarks", "tests")
REPO_DIRS = ("benchmarks", "build", "docs", "src", "tests", ".git", ".venv", ".ci")
REPO_FILES = ("Makefile", "pyproject.toml", "README.md", "ARCHITECTURE.md", "CHANGELOG.md")
MAX_LINES = 500
SIZE_CHECKED = ("cli", "bench")  # the packages under src/spigot held to MAX_LINES here
HEAVY = ("llama_cpp", "fastapi", "starlette", "uvicorn", "numpy", "matplotlib", "pydantic")


def sources() -> dict[Path, str]:
    return {path: path.read_text(encoding="utf-8") for path in sorted(PACKAGE.rglob("*.py"))}


def _names_repo_package(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in REPO_PACKAGES)


def repo_imports(source: str) -> list[str]:
    """Imports of ``benchmarks``/``tests``, and strings naming them as modules (``-m``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _names_repo_package(a.name)]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            if _names_repo_package(node.module or ""):
                found.append(node.module or "")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _names_repo_package(node.value)
        ):
            found.append(repr(node.value))
    return found


def _climbs(node: ast.AST) -> int | None:
    """Directories climbed from ``__file__`` by ``node``, or None if it is no such path.

    ``Path(__file__)`` is 0 (the file itself); ``.parent`` and ``os.path.dirname``
    add 1, ``.parents[k]`` adds k + 1; ``.resolve()``/``.absolute()`` add nothing.
    """
    if isinstance(node, ast.Name) and node.id == "__file__":
        return 0
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in ("resolve", "absolute"):
            return _climbs(func.value)
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("Path", "PurePath", "abspath", "realpath") and len(node.args) == 1:
            return _climbs(node.args[0])
        if name == "dirname" and len(node.args) == 1:
            inner = _climbs(node.args[0])
            return None if inner is None else inner + 1
        return None
    if isinstance(node, ast.Attribute) and node.attr == "parent":
        inner = _climbs(node.value)
        return None if inner is None else inner + 1
    if (
        isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "parents"
    ):
        inner = _climbs(node.value.value)
        index = node.slice
        if inner is None:
            return None
        if isinstance(index, ast.Constant) and isinstance(index.value, int):
            return inner + index.value + 1
        return 99  # a computed index: assume the worst
    return None


def escapes_package(source: str, depth: int) -> list[str]:
    """Paths built from ``__file__`` that leave the package.

    ``depth`` is how deep the file lies in it (1 for spigot/x.py, 2 for
    spigot/cli/x.py): climbing more than that many directories leaves it.
    ``parents`` iterated or sliced has no bound, so it counts as leaving.
    """
    tree = ast.parse(source)
    indexed = {
        id(n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Subscript) and not isinstance(n.slice, ast.Slice)
    }
    found = []
    for node in ast.walk(tree):
        climbs = _climbs(node)
        unbounded = (
            isinstance(node, ast.Attribute)
            and node.attr == "parents"
            and id(node) not in indexed
            and _climbs(node.value) is not None
        )
        if unbounded or (climbs is not None and climbs > depth):
            found.append(ast.unparse(node))
    return found


def repo_paths(source: str) -> list[str]:
    """String constants that are repository paths: ``docs/benchmarks.md``, ``Makefile``.

    A path is a string without whitespace; prose that mentions a document
    (``help="... (see docs/guard.md)."``) points a reader to it and is allowed.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        text = node.value.removeprefix("./")
        if not text or any(c.isspace() for c in text):
            continue
        if text in REPO_FILES or any(text.startswith(d + "/") for d in REPO_DIRS):
            found.append(repr(node.value))
    return found


def depth(path: Path) -> int:
    return len(path.relative_to(PACKAGE).parts)


def test_the_walker_sees_the_package() -> None:
    paths = {p.relative_to(PACKAGE).as_posix() for p in sources()}
    assert {"cli/__init__.py", "cli/serve.py", "bench/load.py"} <= paths


def test_the_package_imports_no_repository_tooling() -> None:
    found = [f"{p.relative_to(SRC)}: {i}" for p, s in sources().items() for i in repo_imports(s)]
    assert found == []


def test_the_package_does_not_climb_out_of_itself() -> None:
    found = [
        f"{p.relative_to(SRC)}: {e}"
        for p, s in sources().items()
        for e in escapes_package(s, depth(p))
    ]
    assert found == []


def test_the_package_names_no_repository_path() -> None:
    found = [f"{p.relative_to(SRC)}: {r}" for p, s in sources().items() for r in repo_paths(s)]
    assert found == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from benchmarks import docs\n", ["benchmarks"]),
        ("import benchmarks.peers as p\n", ["benchmarks.peers"]),
        ("def f():\n    from tests.e2e.server import ROOT\n", ["tests.e2e.server"]),
        ('cmd = [sys.executable, "-m", "benchmarks.decode"]\n', ["'benchmarks.decode'"]),
        ("from . import tests\nimport spigot.bench.load\n", []),
        ('help = "benchmarks: see the repository"\n', []),
    ],
)
def test_repository_imports_are_caught(source: str, expected: list[str]) -> None:
    assert repo_imports(source) == expected


@pytest.mark.parametrize(
    ("source", "depth", "caught"),
    [
        ("ROOT = Path(__file__).resolve().parents[3]\n", 2, True),
        ("ROOT = Path(__file__).parents[1]\n", 1, True),
        ("ROOT = Path(__file__).parent.parent.parent\n", 2, True),
        ("ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))\n", 1, True),
        ("ROOT = Path(__file__).parents[i]\n", 2, True),
        ("ROOTS = list(Path(__file__).parents)\n", 2, True),
        ("HERE = Path(__file__).parent / 'prompts'\n", 2, False),
        ("PKG = Path(__file__).resolve().parents[1]\n", 2, False),
        ("PKG = Path(__file__).parent\n", 1, False),
    ],
)
def test_climbing_out_is_caught(source: str, depth: int, caught: bool) -> None:
    assert bool(escapes_package(source, depth)) is caught


@pytest.mark.parametrize(
    ("source", "caught"),
    [
        ('out = Path("docs/benchmarks.md")\n', True),
        ('logs = "build/reliability"\n', True),
        ('pin = Path("./pyproject.toml").read_text()\n', True),
        ("name = f\"{x}\" + 'tests/e2e'\n", True),
        ('help = "Guardrail policy (see docs/guard.md)."\n', False),
        ('db = "spigot.db"\n', False),
        ('prompts = "prompts/mixed.json"\n', False),
    ],
)
def test_repository_paths_are_caught(source: str, caught: bool) -> None:
    assert bool(repo_paths(source)) is caught


@pytest.mark.parametrize("package", SIZE_CHECKED)
def test_modules_stay_under_the_line_limit(package: str) -> None:
    paths = sorted((PACKAGE / package).rglob("*.py"))
    assert paths
    long = {
        str(p.relative_to(SRC)): n
        for p in paths
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_cli_imports_nothing_heavy() -> None:
    """``spigot --help`` and ``spigot guard`` must not load llama.cpp or the server."""
    code = "import json, sys, spigot.cli; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    loaded = set(json.loads(done.stdout))
    heavy = [m for m in loaded if m.split(".")[0] in HEAVY]
    server = [
        m
        for m in loaded
        if m.startswith(("spigot.server", "spigot.api", "spigot.engine", "spigot.bench"))
    ]
    assert heavy == [] and server == []


def test_every_serve_option_reaches_build_settings() -> None:
    from spigot.cli.serve import build_settings, serve

    options = {p.name for p in serve.params}
    accepted = set(inspect.signature(build_settings).parameters)
    # --config and --upstream add models (cli/serve_config.py), named to build_settings
    # only so that aliases may route to them.
    gateway = {"config_path", "upstream_args"}
    assert options - {"verbose_llama"} - gateway == accepted - {"gateway_models"}


# Runs `spigot bench` with matplotlib unimportable (an install without spigot[plots]).
NO_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None
from spigot.cli import main
main(sys.argv[1:], prog_name="spigot")
"""


def bench_without_matplotlib(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", NO_MATPLOTLIB, "bench", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bench_run_needs_matplotlib_only_to_plot(tmp_path: Path) -> None:
    # Port 9 (discard): nobody listens, so every request fails fast, counted.
    args = ["run", "--url", "http://127.0.0.1:9/v1", "--model", "m", "-c", "1", "-n", "1"]
    args += ["--warmup", "0", "-q"]
    unplotted = bench_without_matplotlib(*args, "--out", str(tmp_path / "r.json"))
    assert unplotted.returncode == 1, unplotted.stderr
    assert "1 of 1 requests failed" in unplotted.stderr
    assert "matplotlib" not in unplotted.stderr

    plotted = bench_without_matplotlib(*args, "--plot", str(tmp_path / "r.png"))
    assert plotted.returncode == 1
    assert "--plot needs matplotlib" in plotted.stderr
    assert "requests failed" not in plotted.stderr  # refused before sending any

    report = bench_without_matplotlib("report", str(tmp_path / "r.json"))
    assert report.returncode == 0, report.stderr
    assert "| 1 | 1 | 1 |" in report.stdout  # concurrency 1: one request, one error
