#!/usr/bin/env bash
# One device call for the issue-9 measurements; STAGES picks what runs (default: all), in this order:
#   tests   GPU tests (pytest -m gpu tests/gpu; TESTS_PATHS narrows, TESTS_TIMEOUT bounds it)
#   kernels benchmarks/bench_kernels.py (Triton decode kernels vs the torch ops they replace; KERNELS_ARGS=--sweep adds the block sweeps;
#           KERNELS_TIMEOUT bounds it)
#   fast    benchmarks/bench_fast.py (goals table: vendor HF, eager, fast in one process run; FAST_ARGS adds options,
#           e.g. --vision-compile-variant; FAST_TIMEOUT bounds it)
#   batched benchmarks/bench_batched.py (Base mode, batch 1/8/32/64, graph vs host decode)
#   hooks   benchmarks/hook_overhead.py on the fast path (the stage hooks' host cost per call and share of prefill)
#   cli     the profiler through the real CLI, eager and fast, full-size dummy weights, and `compare`
#   cbatch  quick check of continuous batching: its GPU tests and bench_batched static vs continuous (Base, batch 64;
#           VISION_AHEAD=N adds continuous with N pages' vision run ahead of their refills, PREFILL_AHEAD=1 with their
#           LM prefill too; PER_PAGE_PREFILL=1 adds continuous with each refill page prefilled alone (graph
#           replays per prompt length); MIXED_ROUNDS=6 pairs each with the plain run over 6 alternating rounds (sign test);
#           SPREAD=1 spreads the decode steps' routing, every expert read as on real pages; CBATCH_ARGS adds options,
#           e.g. --mode gundam; CBATCH_TIMEOUT bounds the benchmark)
#   goals18 issue 18's goals run through the real CLI: Gundam, no_repeat_ngram_size=20, mixed page sizes, log-normal
#           output lengths (median 1,000), batch 64, preprocessing included; continuous then static, and `compare`
#           (G18_MODES="continuous continuous-wide" measures the drain's narrowing: on vs infer.narrow_drain=false;
#           "continuous-batchedrefill continuous" the refills' prefill: infer.refill_prefill=batched vs the default
#           auto, page by page on the fast path on CUDA (round 29); continuous-perpage forces per_page;
#           "static-fullkeys static" what the static step's key skipping saves: infer.static_skip_keys=false vs on)
#   samattn benchmarks/bench_sam_attention.py (SAM's rel-pos attention: augmented flash vs the Triton kernel, op and
#           tower; SAMATTN_ARGS="--sweep --flex" adds the Triton launch sweep and FlexAttention)
#   v1v2    benchmarks/bench_v1_v2.py (v1 Gundam vs DeepSeek-OCR-2 per stage, transformers' native class as the
#           baseline column, native-vs-transformers logits on full-size dummy weights)
#   fastv2  benchmarks/bench_fast_v2.py (DeepSeek-OCR-2's eager vs fast path in one process: vision, LM prefill,
#           decode, its goals table; FASTV2_ARGS adds options, FASTV2_TIMEOUT bounds it)
# Then POST, a shell command of the caller's (below), before the results are packed.
# Everything is written to $RES (default /tmp/gpu-results) and packed into $OUT/results.tgz (the
# markdown reports are also copied to $OUT); $OUT defaults to ./gpu-out.  Wheels for hydra & co. in .whl/ (and transformers 4.46 for the
# vendor column in .whl-hf/) are installed into /tmp/site and /tmp/hfsite first when present; a newer transformers
# for v1v2's baseline column in .whl-tf/ (with its hub / tokenizers) goes to /tmp/tfsite, first on v1v2's path only.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
FINAL_OUT=$OUT; OUT=${RES:-/tmp/gpu-results}; mkdir -p "$OUT"
pack() { tar czf "$FINAL_OUT/results.tgz" -C "$OUT" . && cp "$OUT"/*.md "$OUT"/gpu_tests.txt "$FINAL_OUT"/ 2>/dev/null; }
trap pack EXIT
STAGES=${STAGES:-tests kernels fast batched cli v1v2}
has() { [[ " $STAGES " == *" $1 "* ]]; }
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
if [ -d .whl-tf ] && has v1v2; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tfsite .whl-tf/*.whl
fi
if [ -d .whl-hf ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hfsite .whl-hf/*.whl
fi
# the revision the tree was sent from (written beside it by `git describe --always --dirty > .source-rev`):
# the copy's own .git may name an older commit, and env.json/report.md must name what ran
[ -f .source-rev ] && export LLM_PERF_OPT_SOURCE_REV="$(cat .source-rev)"
export PYTHONPATH=/tmp/site:src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
if has tests; then
  # written to a file as it runs (not through a pipe), so a suite cut short by a caller's time limit still leaves
  # what it reported (round 11: a fresh machine's first suite took more than 250 s); TESTS_TIMEOUT bounds it here
  # TESTS_PATHS narrows the run (default: every GPU test); -v names each test as it ends, so a run cut short by its
  # limit says which ones passed (round 16: two cut runs left only dots), and --durations shows where the time went;
  # a test that leaves the CUDA context unusable (a device-side assert) stops the run, named (tests/gpu/conftest.py);
  # the files after that test's then run in a new process within what is left of TESTS_TIMEOUT (round 27: one
  # fault cost a second machine start to learn that the 61 tests after it passed)
  tests_start=$SECONDS
  timeout "${TESTS_TIMEOUT:-540}" python3 -m pytest -v -p no:cacheprovider -m gpu ${TESTS_PATHS:-tests/gpu} --tb=short --durations=25 \
    > "$OUT/gpu_tests_full.txt" 2>&1
  echo "pytest exit $?" >> "$OUT/gpu_tests_full.txt"
  faulty=$(grep -o 'Interrupted: tests/gpu/[A-Za-z0-9_]*\.py' "$OUT/gpu_tests_full.txt" | head -1 | sed 's/^Interrupted: //')
  left=$(( ${TESTS_TIMEOUT:-540} - (SECONDS - tests_start) ))
  if [ -n "$faulty" ] && [ -z "${TESTS_PATHS:-}" ] && [ "$left" -gt 30 ]; then
    rest=$(ls tests/gpu/test_*.py | sort | awk -v f="$faulty" '$0 > f')
    if [ -n "$rest" ]; then
      echo "=== the files after $faulty, in a new process ===" >> "$OUT/gpu_tests_full.txt"
      timeout "$left" python3 -m pytest -v -p no:cacheprovider -m gpu $rest --tb=short >> "$OUT/gpu_tests_full.txt" 2>&1
      echo "pytest exit $? (the files after $faulty)" >> "$OUT/gpu_tests_full.txt"
    fi
  fi
  tail -60 "$OUT/gpu_tests_full.txt" > "$OUT/gpu_tests.txt"
  tail -4 "$OUT/gpu_tests.txt"
fi
if has kernels; then
  timeout "${KERNELS_TIMEOUT:-0}" python3 benchmarks/bench_kernels.py --out "$OUT" ${KERNELS_ARGS:-} 2>&1 | tail -30
fi
if has fast; then
  VENDOR=()
  [ -f models/deepseek-ocr/modeling_deepseekocr.py ] && VENDOR=(--vendor models/deepseek-ocr --vendor-pythonpath /tmp/hfsite)
  # FAST_TIMEOUT bounds it (0: none); its report is rewritten after each stage, so a cut run keeps its rows
  timeout "${FAST_TIMEOUT:-0}" python3 benchmarks/bench_fast.py --out "$OUT" "${VENDOR[@]}" ${FAST_ARGS:-} 2>&1 \
    | grep -v '^variants:\|^fast:\|^eager:' | tail -80
fi
if has batched; then
  python3 benchmarks/bench_batched.py --out "$OUT" 2>&1 | tee "$OUT/bench_batched.log" | tail -30
fi
if has hooks; then
  python3 benchmarks/hook_overhead.py model/deepseek_ocr/arch=deepseek_ocr.dummy device=cuda:0 \
    infer.fast.enabled=true 2>&1 | grep -v '^\[' | tail -12 | tee "$OUT/hook_overhead.md"
fi
if has cli; then
  COMMON=(model/deepseek_ocr/arch=deepseek_ocr.dummy device=cuda:0 repeats=3 infer.max_new_tokens=128
          infer.ignore_eos=true 'dataset.sizes=[[1224,1584],[595,842],[800,600]]' progress=false)
  rm -rf /tmp/eager /tmp/fast  # this script's own run dirs: a run never writes into a finished one
  python3 -m llm_perf_opt.runners.llm_profile_runner "${COMMON[@]}" hydra.run.dir=/tmp/eager 2>&1 | tail -3
  python3 -m llm_perf_opt.runners.llm_profile_runner "${COMMON[@]}" infer.fast.enabled=true \
    hydra.run.dir=/tmp/fast 2>&1 | tail -3
  python3 -m llm_perf_opt.cli compare /tmp/eager /tmp/fast -o "$OUT/compare_eager_fast.md" > /dev/null
  tar czf "$OUT/runs.tgz" -C /tmp eager fast
fi
if has cbatch; then
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_continuous_gpu.py tests/gpu/test_batched_gpu.py \
    tests/gpu/test_ocr2_batched_gpu.py --tb=short 2>&1 | tail -30 > "$OUT/gpu_tests_cbatch.txt"
  tail -3 "$OUT/gpu_tests_cbatch.txt"
  # CBATCH_TIMEOUT bounds the benchmark (0: none); it prints each figure as it goes (kept in bench_batched_cbatch.log)
  # and writes its report before the mixed workload, so a run cut short keeps what it measured
  timeout "${CBATCH_TIMEOUT:-0}" python3 benchmarks/bench_batched.py --out "$OUT" --batches 64 --tokens 64 --decode graph --ngram 20 \
    --mixed-pages ${MIXED_PAGES:-128} --mixed-median ${MIXED_MEDIAN:-256} --vision-ahead ${VISION_AHEAD:-0} \
    ${PREFILL_AHEAD:+--prefill-ahead} ${PER_PAGE_PREFILL:+--per-page-prefill} --mixed-rounds ${MIXED_ROUNDS:-0} \
    ${SPREAD:+--spread-routing} ${CBATCH_ARGS:-} 2>&1 | tee "$OUT/bench_batched_cbatch.log" | tail -20
fi
if has goals18; then
  # 256 Gundam pages of six sizes (1 to 9 tiles), output lengths log-normal around 1,000 tokens (simulated eos on
  # dummy weights), the vendor's no_repeat_ngram_size=20 on the device, 64 slots, 12 preparation threads; the
  # per-page repeats over 2 pages only (the batched phase is the measurement)
  G18=(model/deepseek_ocr/arch=deepseek_ocr.dummy device=cuda:0 model/deepseek_ocr/infer=deepseek_ocr.gundam
       infer.fast.enabled=true infer.no_repeat_ngram_size=20 infer.batch_size=64 infer.preprocess_workers=12
       dataset.num_pages=${G18_PAGES:-256}
       'dataset.sizes=[[1224,1584],[1700,2200],[850,1100],[1584,1224],[2480,3508],[595,842]]'
       dataset.target_lengths=lognormal dataset.target_median_tokens=1000 infer.max_new_tokens=4096
       repeats=1 per_page_pages=2 profiling.rep_max_new_tokens=32 progress=false)
  rm -rf /tmp/goals18-continuous /tmp/goals18-static /tmp/goals18-continuous-wide /tmp/goals18-continuous-perpage \
    /tmp/goals18-continuous-batchedrefill /tmp/goals18-continuous-torchban /tmp/goals18-static-fullkeys
  # modes: continuous (the defaults: refills prefilled page by page here, infer.refill_prefill=auto), static,
  # continuous-wide (continuous without the drain's narrowing: what it saves), continuous-batchedrefill (each
  # refill's pages in one left-padded eager prefill), continuous-perpage (page by page, forced) and
  # continuous-torchban (the n-gram ban from the torch mask's ~20 kernels instead of kernels.ngram_ban),
  # static-fullkeys (static, every row's whole masked context read to the batch's end: infer.static_skip_keys=false)
  for mode in ${G18_MODES:-continuous static}; do
    MODE_ARGS=(infer.batching=${mode%-*})
    [ "$mode" = continuous-wide ] && MODE_ARGS+=(infer.narrow_drain=false)
    [ "$mode" = continuous-perpage ] && MODE_ARGS+=(infer.refill_prefill=per_page)
    [ "$mode" = continuous-batchedrefill ] && MODE_ARGS+=(infer.refill_prefill=batched)
    [ "$mode" = continuous-torchban ] && MODE_ARGS+=(infer.fast.ngram_kernel=false)
    [ "$mode" = static-fullkeys ] && MODE_ARGS+=(infer.static_skip_keys=false)
    python3 -m llm_perf_opt.runners.llm_profile_runner "${G18[@]}" "${MODE_ARGS[@]}" \
      hydra.run.dir=/tmp/goals18-$mode 2>&1 | tail -3
    cp /tmp/goals18-$mode/report.md "$OUT/goals18-$mode-report.md"
    cp /tmp/goals18-$mode/metrics.json "$OUT/goals18-$mode-metrics.json"
  done
  [ -d /tmp/goals18-static ] && [ -d /tmp/goals18-continuous ] &&
    python3 -m llm_perf_opt.cli compare /tmp/goals18-static /tmp/goals18-continuous -o "$OUT/goals18-compare.md" > /dev/null
  [ -d /tmp/goals18-continuous-wide ] && [ -d /tmp/goals18-continuous ] &&
    python3 -m llm_perf_opt.cli compare /tmp/goals18-continuous-wide /tmp/goals18-continuous \
      -o "$OUT/goals18-compare-narrowing.md" > /dev/null
  [ -d /tmp/goals18-continuous-batchedrefill ] && [ -d /tmp/goals18-continuous ] &&
    python3 -m llm_perf_opt.cli compare /tmp/goals18-continuous-batchedrefill /tmp/goals18-continuous \
      -o "$OUT/goals18-compare-refills.md" > /dev/null
  [ -d /tmp/goals18-continuous-torchban ] && [ -d /tmp/goals18-continuous ] &&
    python3 -m llm_perf_opt.cli compare /tmp/goals18-continuous-torchban /tmp/goals18-continuous \
      -o "$OUT/goals18-compare-ngram.md" > /dev/null
  [ -d /tmp/goals18-static-fullkeys ] && [ -d /tmp/goals18-static ] &&
    python3 -m llm_perf_opt.cli compare /tmp/goals18-static-fullkeys /tmp/goals18-static \
      -o "$OUT/goals18-compare-skipkeys.md" > /dev/null
  [ -d /tmp/goals18-continuous-perpage ] && [ -d /tmp/goals18-continuous ] &&
    python3 -m llm_perf_opt.cli compare /tmp/goals18-continuous /tmp/goals18-continuous-perpage \
      -o "$OUT/goals18-compare-perpage.md" > /dev/null
fi
if has samattn; then
  python3 benchmarks/bench_sam_attention.py --out "$OUT" ${SAMATTN_ARGS:-} 2>&1 | grep -v '^\[' | tail -40
fi
if has fastv2; then
  timeout "${FASTV2_TIMEOUT:-0}" python3 benchmarks/bench_fast_v2.py --out "$OUT" ${FASTV2_ARGS:-} 2>&1 | tail -40
fi
if has v1v2; then
  TF_PATH=$PYTHONPATH; [ -d /tmp/tfsite ] && TF_PATH=/tmp/tfsite:$PYTHONPATH
  PYTHONPATH=$TF_PATH python3 -c 'import transformers; print("transformers", transformers.__version__)' 2>&1 | tee "$OUT/transformers.txt"
  PYTHONPATH=$TF_PATH python3 benchmarks/bench_v1_v2.py --out "$OUT" ${V1V2_ARGS:-} 2>&1 | grep -v '^v[12] \|^Loading' | tail -60
fi
# POST: one more shell command after the stages, with $OUT (here: the results folder) and the installed wheels' path
# set, so what it writes under "$OUT" is packed with the rest (round 20 lost a table run after this script: the pack
# had already happened); e.g. POST='python3 benchmarks/bench_fusions.py --parts prompt_experts --out "$OUT"'
if [ -n "${POST:-}" ]; then
  OUT="$OUT" bash -c "$POST" 2>&1 | tail -40
fi
