"""``spigot bench``: streamed load against any OpenAI-compatible server, reported as medians.

Only what ``spigot bench run`` and ``spigot bench report`` need lives here. The
repository's benchmark suite (``make bench``, peers, micro-benchmarks) is in
the repository's ``benchmarks/`` folder, which this package never imports.
"""
