"""Serving engines that live in environments of their own (`dflash-lab engines install ENGINE`).

vLLM pins its own torch and pulls a stack that conflicts with ours, so it never goes into the
project's environment: it gets a managed virtual environment (`vllm_env.py`) that `eval --backend
vllm` starts as a subprocess (`dflash_lab/eval/vllm_engine.py`). docs/serving-vllm.md says why.
"""
