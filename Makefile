# edgeloop set-up. Two entry points, both idempotent:
#   make demo   install everything, make sure a broker is reachable, run `edgeloop demo`
#   make test   install everything, make sure Mosquitto is installed, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgeloop-installed
TORCH  := torch==2.13.0
DEMO_ARGS ?=

.PHONY: install demo test bench broker clean

install: $(STAMP)

# torch is installed first and pinned, so pip takes the CPU wheel and never a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[all]'
	touch $(STAMP)

# Installs the Mosquitto binaries if missing; starts a broker on a free port if none answers.
# Writes the address it settled on to .edgeloop/broker.env.
broker:
	bash scripts/ensure-broker.sh

demo: install broker
	. .edgeloop/broker.env && $(BIN)/edgeloop demo --mqtt "$$EDGELOOP_MQTT" $(DEMO_ARGS)

# Tests start their own private broker on a free port; they only need the binary.
test: install
	bash scripts/ensure-broker.sh --binary-only
	bash scripts/ensure-arm-toolchain.sh
	bash scripts/ensure-postgres.sh
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

bench: install broker
	@for f in bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) .edgeloop edgeloop-workspace .pytest_cache
