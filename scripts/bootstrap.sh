#!/usr/bin/env bash
# Create/update .venv idempotently: the install step of `make profile` and `make test`.
# Re-runs are cheap: the install is skipped while pyproject.toml is unchanged (stamp file).
set -euo pipefail
cd "$(dirname "$0")/.."
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
STAMP="$VENV/.llm-perf-opt-installed"
WANT="$(cat pyproject.toml | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then exit 0; fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q -e ".[dev]"
echo "$WANT" > "$STAMP"
