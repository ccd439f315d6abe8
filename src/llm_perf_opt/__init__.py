"""llm-perf-opt: a profiler for vision-language models, starting with DeepSeek-OCR."""

__version__ = "0.1.0"
