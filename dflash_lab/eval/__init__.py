"""Evaluation: the paper's five benchmarks (benchmarks.py), the backends that produce responses
(backends.py: builtin, sglang, vllm), and the harness that measures tau (harness.py).
See docs/evaluation.md."""

from dflash_lab.eval.benchmarks import available_offline_benchmarks, load_benchmark
from dflash_lab.eval.harness import HARNESS_VERSION, evaluate, write_results

__all__ = ["HARNESS_VERSION", "available_offline_benchmarks", "evaluate", "load_benchmark", "write_results"]
