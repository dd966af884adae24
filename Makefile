# The two commands: `make run` and `make test`. Both install into a local virtualenv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)

.PHONY: install run test lint unit bench clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# API, worker, scheduler, a local Redis and an SMTP capture server; Ctrl-C stops them all.
run: install
	$(PY) -m notifier dev

# The whole suite against the real PostgreSQL, Redis and an in-process SMTP server, TEST_WORKERS
# pytest processes at once (pytest-xdist): most of its time is spent waiting on real processes.
TEST_WORKERS ?= 4
test: install lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

unit: install
	$(PY) -m pytest -m "not integration"

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) -m bench

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
