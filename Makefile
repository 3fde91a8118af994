# The two commands a release engineer needs: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: test demo soak venv lint unit clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python setup.py
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: venv
	$(BIN)/buildbot-ec2-hybrid demo $(DEMO_ARGS)

# the chaos soak: a few hundred builds while faults are injected (SOAK_ARGS="--builds 300")
soak: venv
	$(BIN)/python -m buildbot_ec2_hybrid.sandbox.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
