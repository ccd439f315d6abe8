"""``llm-perf-opt``: one console entry with subcommands.

``profile`` (the default, so bare Hydra overrides keep working) runs the profiler through Hydra;
``compare`` diffs two run directories.  ``--help`` lists the subcommands; ``profile --help`` is Hydra's help
(config groups and their options).
"""

from __future__ import annotations

import sys

USAGE = """\
usage: llm-perf-opt [profile] [OVERRIDE ...]       one profiling run (Hydra overrides, key=value)
       llm-perf-opt [profile] -m OVERRIDE ...    a sweep (Hydra multirun; sweep.md in the multirun dir)
       llm-perf-opt compare RUN_A RUN_B [-o FILE]
       llm-perf-opt {profile,compare} --help

subcommands:
  profile   (default) warmup, one profiler pass, timed repeats -> tmp/stage1/<run_id>/report.md, metrics.json
            e.g.  llm-perf-opt device=cuda:0 repeats=10 infer.max_new_tokens=256
                  llm-perf-opt -m repeats=3,10 infer.max_new_tokens=64,256
            `llm-perf-opt profile --help` lists the config groups and every overridable key.
  compare   table of every metric of two runs with delta and delta %; exit 1 when something got
            significantly worse (95 % CIs apart), 2 for a directory that is not a run dir
"""

SUBCOMMANDS = ("profile", "compare")


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] not in (*SUBCOMMANDS, "-h", "--help", "help"):
        _profile(args)  # bare Hydra overrides (or none): the profiling run, as before subcommands existed
        return
    command, rest = args[0], args[1:]
    if command in ("-h", "--help", "help"):
        print(USAGE, end="")
        return
    if command == "compare":
        from llm_perf_opt.report.compare import compare_main

        sys.exit(compare_main(rest))
    _profile(rest)


def _profile(overrides: list[str]) -> None:
    """Hydra parses ``sys.argv`` itself: hand it the overrides without the subcommand word."""
    from llm_perf_opt.runners.startup import install_startup_handler, restore_handlers

    previous = install_startup_handler()  # before the slow imports: Ctrl-C while they load is one line
    try:
        from llm_perf_opt.runners.llm_profile_runner import main as profile_main

        sys.argv = [sys.argv[0], *overrides]
        profile_main()
    finally:
        restore_handlers(previous)  # a caller in this process (a test) gets its own handlers back


if __name__ == "__main__":
    main()
