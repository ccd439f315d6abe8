#!/usr/bin/env bash
# The profiler's range-vs-event test (tests/gpu/test_profiler_gpu.py -k every_range) with one module setting of
# the kernels flipped before the session loads, then at the defaults: tells whether a kernel form moves the test.
#   SETTING=sam_kernels.BIAS_IN_MMA VALUE=False bash benchmarks/profiler_range_ab.sh
set -uo pipefail
run() {
  python3 - "$@" <<'PY'
import importlib, sys
import pytest
setting, value = sys.argv[1], sys.argv[2]
if setting:
    module, name = setting.rsplit(".", 1)
    mod = importlib.import_module(f"llm_perf_opt.models.deepseek_ocr.{module}")
    setattr(mod, name, {"True": True, "False": False}.get(value, value))
    print(f"{setting} = {getattr(mod, name)!r}")
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/gpu/test_profiler_gpu.py", "-k",
                      "every_range", "--tb=line"]))
PY
}
run "${SETTING:-}" "${VALUE:-}"
echo "exit $? (${SETTING:-} = ${VALUE:-})"
run "" ""
echo "exit $? (defaults)"
