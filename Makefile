# Two commands a newcomer needs (each installs into .venv first, idempotently):
#   make profile [ARGS="hydra overrides"]   -> tmp/stage1/<run_id>/report.md   (installs the main job's deps only)
#   make test                               -> lint + type check + import contracts + the test suite (dev extra)
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup setup-dev profile sweep test lint format compare clean

setup:
	@./scripts/bootstrap.sh main

setup-dev:
	@./scripts/bootstrap.sh dev

profile: setup
	$(PY) -m llm_perf_opt.runners.llm_profile_runner $(ARGS)

sweep: setup
	$(PY) -m llm_perf_opt.runners.llm_profile_runner -m repeats=3,10 infer.max_new_tokens=64,256,1024 $(ARGS)

lint: setup-dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint
	$(VENV)/bin/pytest -q $(ARGS)

format: setup-dev
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

# GNU make turns any failing recipe into exit 2, which would hide compare's "1 = regression" from a CI gate.
# In question mode (-q) make exits with the status of the '+' recipe lines it still runs: 0, 1 or 2 as compare
# returned them (the setup step runs as a '+' line too).
ifeq ($(firstword $(MAKECMDGOALS)),compare)
MAKEFLAGS += --question
endif
compare:
	+@./scripts/bootstrap.sh main
	+@$(PY) -m llm_perf_opt.cli compare $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache build dist
