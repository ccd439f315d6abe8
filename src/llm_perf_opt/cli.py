"""``llm-perf-opt``: the profiling run (Hydra overrides) and ``llm-perf-opt compare RUN_A RUN_B``."""

from __future__ import annotations

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "compare":
        from llm_perf_opt.report.compare import compare_main

        sys.exit(compare_main(sys.argv[2:]))
    from llm_perf_opt.runners.llm_profile_runner import main as profile_main

    profile_main()


if __name__ == "__main__":
    main()
