# Two commands a newcomer needs (each installs into .venv first, idempotently):
#   make profile [ARGS="hydra overrides"]   -> tmp/stage1/<run_id>/report.md
#   make test                               -> lint + type check + the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup profile sweep test lint format compare clean

setup:
	@./scripts/bootstrap.sh

profile: setup
	$(PY) -m llm_perf_opt.runners.llm_profile_runner $(ARGS)

sweep: setup
	$(PY) -m llm_perf_opt.runners.llm_profile_runner -m repeats=3,10 infer.max_new_tokens=64,256,1024 $(ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q $(ARGS)

format: setup
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

compare: setup
	$(PY) -m llm_perf_opt.cli compare $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
