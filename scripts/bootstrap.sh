#!/usr/bin/env bash
# Create/update .venv idempotently: the install step of `make profile` (main) and `make test` (dev).
#   scripts/bootstrap.sh main   the profiler's own dependencies only (no pytest/ruff/mypy/triton)
#   scripts/bootstrap.sh dev    main + the dev extra (tests, linters, Triton for the kernel tests)
# Re-runs are cheap: each install has a stamp file and is skipped while pyproject.toml (and TORCH_SPEC) are
# unchanged; a dev install also satisfies main (it is a superset).
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:-main}
case "$PROFILE" in
  main) EXTRA="" ;;
  dev) EXTRA="[dev]" ;;
  *) echo "usage: $0 [main|dev]  (got '$PROFILE')" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
# Torch: CUDA users get the default PyPI build; set TORCH_SPEC to pin another (e.g. a CPU wheel).
# On a machine without an NVIDIA driver the default is torch==2.13.0, which this project is tested with
# (on the project's CI machines it is a local CPU wheel).
if [ -z "${TORCH_SPEC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then TORCH_SPEC="torch>=2.4"; else TORCH_SPEC="torch==2.13.0"; fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required, found " + sys.version.split()[0]'
  "$PY" -m venv "$VENV"
fi
WANT="$(sha256sum pyproject.toml | cut -c1-16) $TORCH_SPEC"
stamp() { echo "$VENV/.llm-perf-opt-installed-$1"; }
fresh() { [ -f "$(stamp "$1")" ] && [ "$(cat "$(stamp "$1")")" = "$WANT" ]; }
if fresh dev || { [ "$PROFILE" = main ] && fresh main; }; then exit 0; fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q -e ".$EXTRA"
echo "$WANT" > "$(stamp "$PROFILE")"
