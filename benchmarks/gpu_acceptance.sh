#!/usr/bin/env bash
# One device call: GPU tests, the issue-5 acceptance run (full-size dummy bf16, 3 pages, 3 repeats,
# 128 tokens) and the hook-overhead benchmark. Results go to $OUT (or ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
python3 -m llm_perf_opt.runners.llm_profile_runner model/deepseek_ocr/arch=deepseek_ocr.dummy device=cuda:0 \
  repeats=3 infer.max_new_tokens=128 infer.ignore_eos=true 'dataset.sizes=[[1224,1584],[595,842],[800,600]]' \
  hydra.run.dir=/tmp/acc progress=false 2>&1 | tail -5
tar czf "$OUT/acceptance_run.tgz" -C /tmp acc
python3 benchmarks/hook_overhead.py model/deepseek_ocr/arch=deepseek_ocr.dummy device=cuda:0 2>&1 | tail -8 | tee "$OUT/hook_overhead.md"
