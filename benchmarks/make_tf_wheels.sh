#!/usr/bin/env bash
# Wheels of a newer transformers (and the hub / tokenizers it needs) for the GPU machine's Python 3.12, into
# .whl-tf/, for gpu_run.sh's v1v2 stage (the baseline column: transformers' native DeepSeek-OCR-2 class).
#
#   bash benchmarks/make_tf_wheels.sh [VERSION]     # default 5.24.0; needs pip with PyPI access
#
# The device call carries at most 64 MiB with the working tree, so the transformers wheel is trimmed to the two
# model folders this project uses (models/auto, models/deepseek_ocr2): 13 MB -> ~2 MB.  Packages the device's
# image already has in a compatible version (numpy, torch, pyyaml...) are left out.  Carry it: carry=[".whl",
# ".whl-tf", ".source-rev"].
set -euo pipefail
VERSION=${1:-5.24.0}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/.whl-tf
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
PLAT=(--only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux_2_28_x86_64)
python3 -m pip download -q "${PLAT[@]}" -d "$TMP/all" "transformers==$VERSION"
mkdir -p "$TMP/tf" && (cd "$TMP/tf" && python3 -m zipfile -e "$TMP/all/transformers-$VERSION-py3-none-any.whl" .)
for d in "$TMP"/tf/transformers/models/*/; do
  case $(basename "$d") in auto|deepseek_ocr2|__pycache__) ;; *) rm -rf "$d" ;; esac
done
python3 - "$TMP/tf" "$VERSION" <<'EOF'
import pathlib, sys
root, version = pathlib.Path(sys.argv[1]), sys.argv[2]
record = root / f"transformers-{version}.dist-info" / "RECORD"
keep = ("transformers/models/auto/", "transformers/models/deepseek_ocr2/", "transformers/models/__init__")
lines = [l for l in record.read_text().splitlines(True) if not l.startswith("transformers/models/") or l.startswith(keep)]
record.write_text("".join(lines))
EOF
rm -rf "$OUT" && mkdir -p "$OUT"
(cd "$TMP/tf" && python3 -m zipfile -c "$OUT/transformers-$VERSION-py3-none-any.whl" transformers "transformers-$VERSION.dist-info")
for pkg in huggingface_hub tokenizers safetensors regex httpx2 httpcore2 h11 anyio idna truststore filelock fsspec \
           typing_extensions packaging tqdm click; do
  cp "$TMP"/all/"$pkg"-*.whl "$OUT"/ 2>/dev/null || echo "note: no $pkg wheel among transformers $VERSION's dependencies"
done
du -sh "$OUT"
