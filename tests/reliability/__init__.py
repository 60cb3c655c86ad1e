"""The reliability suite: ``make reliability`` (full) and ``make reliability-short`` (CI).

Each check starts its own ``spigot serve`` processes (the embedded model, temporary
databases) and drives them from outside, as a client and an operator would: fuzzing
from /openapi.json, a hostile corpus, overload, slow and vanishing clients, SIGTERM and
SIGKILL under load with ledger checks, resuming a stream after a reconnect, and a soak.
See docs/reliability.md. Run with ``python -m tests.reliability --help``.

Not collected by pytest (no ``test_*`` modules): it runs for minutes and prints its own
PASS/FAIL lines and summary.
"""
