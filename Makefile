# make run · make test · make bench · make wheel — each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The browser tests drive Debian's Chromium: Playwright's own browser download cannot work
# here (no network beyond the package registries), so `make test` installs it when missing.
CHROMIUM := /usr/bin/chromium
# The scale-out tests (tests/test_scale_out.py) start real Redis servers: Debian's.
REDIS := /usr/bin/redis-server
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint bench wheel fuzz soak clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench,broker]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/speechcast serve --log-format console

$(CHROMIUM):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium

$(REDIS):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server

test: $(STAMP) $(CHROMIUM) $(REDIS) lint
	$(BIN)/python -m pytest -q

# Static types: mypy --strict on pipeline/ and actors/ (settings in setup.cfg).
lint: $(STAMP)
	$(BIN)/python -m mypy

bench: $(STAMP) $(REDIS)
	$(BIN)/python -m bench

# The product: dist/speechcast-<version>-py3-none-any.whl, what deploy/ installs (the web
# client inside it as package data). `build` comes with the test extra.
wheel: $(STAMP)
	rm -rf build dist/speechcast-*.whl
	$(BIN)/python -m build --wheel --outdir dist

# Long fuzzing of everything a client can send: the hypothesis fuzz tests with many more
# examples, then atheris on the parsers for FUZZ_SECONDS (crash inputs land in fuzz/crashes/).
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	$(BIN)/python -c 'import atheris' 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[test,fuzz]'
	SPEECHCAST_FUZZ=long $(BIN)/python -m pytest -q tests/test_fuzz_client_input.py
	mkdir -p fuzz/crashes
	PYTHONPATH=. $(BIN)/python fuzz/atheris_protocol.py -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=fuzz/crashes/

# Ten minutes of random load and provider faults against one daemon (docs/soak.md);
# not part of `make bench`. Options: `$(BIN)/python -m bench.soak --help`.
soak: $(STAMP)
	$(BIN)/python -m bench.soak

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache build dist
