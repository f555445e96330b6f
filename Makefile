# Taskfleet: the two commands of the README are `make demo` and `make test`.
# Both install what they need on a Debian box (run as root): Debian packages, the venv,
# and the lab's base images. Every command is printed as it runs.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
LAB := $(PY) -m deploy.lab
# Debian packages the tests and the lab need on the controller.
DEBS := make redis-server systemd-container debootstrap iptables iproute2 openssh-client \
        tcpdump chromium
LAB_ENV := TASKFLEET_ENV_FILE=inventory/lab/taskfleet.env

.PHONY: help test test-fast test-integration test-lab lint venv system-deps demo demo-down \
        lab-up lab-down lab-status bench clean

help:
	@echo "make demo       boot the lab, deploy Taskfleet to it, submit tasks from several nodes"
	@echo "make demo-down  remove the lab"
	@echo "make test       the full suite: lint, unit, integration (real Redis), lab (real hosts)"
	@echo "make test-fast  lint and unit tests only (seconds, no root)"
	@echo "make bench      benchmark the lab cluster against the plain setup"

# --no-compile: Python compiles what it imports on first use; compiling every file of
# ansible-core, matplotlib & co. up front costs a third of the install time.
$(VENV)/.stamp: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile --disable-pip-version-check -r requirements-dev.txt
	touch $@

venv: $(VENV)/.stamp

system-deps:
	@missing=$$(for p in $(DEBS); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "+ apt-get install -y" $$missing; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/ansible-lint

test-fast: lint
	$(BIN)/pytest -q tests/unit

test-integration: venv system-deps
	$(BIN)/pytest -q -m integration

test-lab: venv system-deps
	$(BIN)/pytest -q -m lab

# `make test` runs the suite as three pytest sessions side by side: the modules of the shared lab
# (one lab, deployed once, changed by each module in turn), and beside them two sessions of what
# shares nothing with it: unit, integration (loopback Redis) and the lab modules that boot a
# small lab of their own, split so that neither outlasts the shared lab's. The suite's wall time
# is the longest of the three, not their sum. Each lab has its own name, subnet and locks.
SIDE_TESTS := tests/unit tests/integration tests/lab/test_lab.py tests/lab/test_holding.py
TIER_TESTS := tests/lab/test_ha.py tests/lab/test_monitoring.py
OWN_LAB_TESTS := $(filter tests/lab/%,$(SIDE_TESTS) $(TIER_TESTS))

# The lab's base images (about a minute, cold) build while the fast linters run; the slow
# one (ansible-lint, ~30 s of CPU) runs beside the tests and is reported after them, as is
# the pytest sessions beside the shared lab's. Any failure fails the target.
test: venv system-deps
	@mkdir -p .cache
	@if [ "$$(id -u)" = 0 ]; then \
	  echo "+ $(LAB) images  # in the background: .cache/lab-images.log"; \
	  $(LAB) images > .cache/lab-images.log 2>&1 & pid=$$!; \
	fi; \
	echo "+ $(BIN)/ruff check . && $(BIN)/mypy"; $(BIN)/ruff check . && $(BIN)/mypy; lint=$$?; \
	images=0; if [ -n "$$pid" ]; then wait $$pid; images=$$?; cat .cache/lab-images.log; fi; \
	[ $$lint -eq 0 ] && [ $$images -eq 0 ]
	@echo "+ $(BIN)/ansible-lint  # in the background: .cache/ansible-lint.log"; \
	$(BIN)/ansible-lint > .cache/ansible-lint.log 2>&1 & alint=$$!; \
	export TASKFLEET_TEST_RUN="$$(date -u '+%Y-%m-%d %H:%M:%S UTC')"; \
	echo "+ $(BIN)/pytest -p no:cacheprovider $(SIDE_TESTS)  # in the background: .cache/side-tests.log"; \
	$(BIN)/pytest -p no:cacheprovider $(SIDE_TESTS) > .cache/side-tests.log 2>&1 & side=$$!; \
	echo "+ $(BIN)/pytest -p no:cacheprovider $(TIER_TESTS)  # in the background: .cache/tier-tests.log"; \
	$(BIN)/pytest -p no:cacheprovider $(TIER_TESTS) > .cache/tier-tests.log 2>&1 & tier=$$!; \
	echo "+ $(BIN)/pytest tests/lab $(addprefix --ignore=,$(OWN_LAB_TESTS))"; \
	$(BIN)/pytest tests/lab $(addprefix --ignore=,$(OWN_LAB_TESTS)); tests=$$?; \
	wait $$side; side_rc=$$?; echo "+ pytest $(SIDE_TESTS) (exit $$side_rc)"; cat .cache/side-tests.log; \
	wait $$tier; tier_rc=$$?; echo "+ pytest $(TIER_TESTS) (exit $$tier_rc)"; cat .cache/tier-tests.log; \
	wait $$alint; alint_rc=$$?; echo "+ ansible-lint (exit $$alint_rc)"; cat .cache/ansible-lint.log; \
	[ $$tests -eq 0 ] && [ $$side_rc -eq 0 ] && [ $$tier_rc -eq 0 ] && [ $$alint_rc -eq 0 ]

demo: venv system-deps
	$(LAB) up --redis 1 --workers 2 --clients 1
	$(BIN)/ansible-playbook -i inventory/lab deploy.yml
	$(LAB_ENV) $(PY) -m app submit add 10 20 --wait
	$(LAB_ENV) $(PY) -m app submit whoami --count 30 --wait
	$(LAB) ssh client1 taskfleet submit whoami --count 30 --wait
	$(LAB) ssh worker1 taskfleet submit whoami --count 30 --wait
	$(LAB) ssh redis1 taskfleet submit add 10 20 --wait
	$(LAB_ENV) $(PY) -m app status

demo-down lab-down: venv
	$(LAB) down

lab-up: venv system-deps
	$(LAB) up --redis 1 --workers 2 --clients 1

lab-status: venv
	$(LAB) status

bench: venv system-deps
	$(LAB) up --redis 1 --workers 3 --clients 1
	$(BIN)/ansible-playbook -i inventory/lab deploy.yml
	$(LAB_ENV) $(PY) -m bench --inventory inventory/lab --out docs/bench

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache .mypy_cache
