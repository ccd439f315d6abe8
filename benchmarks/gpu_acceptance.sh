#!/usr/bin/env bash
# One device call: GPU tests, the issue-5 acceptance run (full-size dummy bf16, 3 pages, 3 repeats,
# 128 tokens) eager and with the fast path, their comparison, and the hook-overhead benchmark.
# Results go to $OUT (or ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
COMMON=(model/deepseek_ocr/arch=deepseek_ocr.dummy device=cuda:0 repeats=3 infer.max_new_tokens=128
        infer.ignore_eos=true 'dataset.sizes=[[1224,1584],[595,842],[800,600]]' progress=false)
python3 -m llm_perf_opt.runners.llm_profile_runner "${COMMON[@]}" hydra.run.dir=/tmp/h100-eager 2>&1 | tail -3
python3 -m llm_perf_opt.runners.llm_profile_runner "${COMMON[@]}" infer.fast.enabled=true hydra.run.dir=/tmp/h100-fast 2>&1 | tail -3
python3 -m llm_perf_opt.cli compare /tmp/h100-eager /tmp/h100-fast -o "$OUT/compare_eager_fast.md" > /dev/null
tar czf "$OUT/runs.tgz" -C /tmp h100-eager h100-fast
python3 benchmarks/hook_overhead.py model/deepseek_ocr/arch=deepseek_ocr.dummy device=cuda:0 2>&1 | tail -8 | tee "$OUT/hook_overhead.md"
