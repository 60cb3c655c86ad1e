"""The repository's benchmark tooling; not part of the installed ``spigot`` package.

Run from the repository root with the project's virtual environment, e.g.
``.venv/bin/python -m benchmarks.standard`` (``make bench``) or
``.venv/bin/python -m benchmarks.peers setup`` (``make peers``). Among them:

* ``standard``: the standard suite that rewrites the generated sections of
  docs/benchmarks.md (``docs`` renders them), comparing spigot with the peers
  that ``peers`` builds outside the repository;
* ``decode``, ``prefix``, ``interference``, ``guard``: the measurements behind
  the suite's parts and docs/benchmarks.md's sections;
* ``cpu_split``, ``step_cost``, ``engine_vs_bare``, ``omp_teams``: where one
  stream's CPU, one step's time and the engine's share go, and what a second
  OpenMP team costs.

The load generator they drive, ``spigot bench run``, is the package's
(``spigot.bench``): it needs nothing from here, and nothing in ``spigot``
imports this folder (tests/unit/test_bench_layout.py checks it).
"""
