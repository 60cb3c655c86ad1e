"""The ``spigot`` command: serve, complete, chat, guard, keys, usage, bench.

Each command lives in a module of its own; this one holds the group. Modules
import only click and light parts of spigot at the top: llama.cpp, FastAPI and
uvicorn load inside the commands that need them.
"""

from __future__ import annotations

import click

from spigot import __version__
from spigot.cli import bench, clients, guard, serve
from spigot.cli.admin import keys, usage


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="spigot")
def main() -> None:
    """OpenAI-compatible streaming completions from local models and other engines."""


main.add_command(serve.serve)
main.add_command(keys)
main.add_command(usage)
main.add_command(guard.guard)
main.add_command(clients.complete)
main.add_command(clients.chat)
main.add_command(bench.bench)
