"""What rolling the target cache back to the accepted prefix costs, per family (issue 22).

    python bench/bench_rollback.py [--context 256] [--block 16] [--repeats 10]
    git show c2f16e7:dflash_lab/decoding/speculative.py > /tmp/speculative_before.py
    python bench/bench_rollback.py --dense-only --before /tmp/speculative_before.py   # dense: before/after
    python bench/bench_rollback.py --crop-overhead --before /tmp/speculative_before.py  # its code change alone

Hybrid (Gated DeltaNet) and sliding-window caches cannot simply drop the rejected tail of a verified
block. Three exact ways were candidates; this times the target-side work of one verify cycle for
each, on random targets of the published layer patterns at a CPU-sized width:

- record:   transformers' past recording (what `speculative_generate` does): the verify forward
            keeps the recurrent state after every block token (its GDN layers then step through the
            block token by token) and the keys a sliding layer would drop; `crop` restores them.
- snapshot: clone the recurrent/conv states before the verify (the sliding keys are kept by
            reference), verify with the chunked kernels, then on a rejection restore and re-run
            the a + 1 accepted tokens through the whole target (full-attention layers cropped first).
- plain:    the verify forward alone, no rollback at all (not exact on these targets): the floor.

`--dense-only` times the embedded SmolLM2 target's plain greedy and speculative decoding (a random
draft, prompt-lookup), where `speculative_generate` keeps the plain crop.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from dflash_lab.decoding import speculative
from dflash_lab.decoding.speculative import _crop, start_rollback
from dflash_lab.testing import tiny_config


def build(kind: str, hidden: int, layers: int):
    torch.manual_seed(0)
    heads = hidden // 64
    config = tiny_config(kind, vocab_size=4096, hidden=hidden, layers=layers, heads=heads, kv_heads=max(1, heads // 4),
                         intermediate=hidden * 3)
    if hasattr(config, "sliding_window") and kind != "qwen3_5":
        config.sliding_window = 128
    if kind == "qwen3_5":  # published shapes: 16 value heads of 128 at 4B; scaled down with the width
        config.linear_num_key_heads, config.linear_num_value_heads = heads // 2, heads
        config.linear_key_head_dim = config.linear_value_head_dim = 64
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def prefill(model, context: int) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    ids = torch.randint(5, 4000, (1, context))
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


def snapshot(cache: DynamicCache) -> list:
    """What a verify overwrites in place: recurrent and conv states (cloned); key/value tensors are
    replaced by `update`, never written into, so a reference keeps them."""
    saved = []
    for layer in cache.layers:
        if hasattr(layer, "recurrent_states"):
            saved.append(("linear", {i: s.clone() for i, s in layer.recurrent_states.items() if s is not None},
                          {i: s.clone() for i, s in layer.conv_states.items() if s is not None},
                          layer.cumulative_length_linear.clone()))
        else:
            saved.append(("attention", layer.keys, layer.values, getattr(layer, "cumulative_length", None)))
    return saved


def restore(cache: DynamicCache, saved: list) -> None:
    for layer, state in zip(cache.layers, saved):
        if state[0] == "linear":
            for i, s in state[1].items():
                layer.recurrent_states[i].copy_(s)
            for i, s in state[2].items():
                layer.conv_states[i].copy_(s)
            layer.cumulative_length_linear.copy_(state[3])
        else:
            layer.keys, layer.values = state[1], state[2]
            if state[3] is not None:
                layer.cumulative_length = state[3]


def time_cycle(model, context: int, block: int, accepted: int, mode: str) -> float:
    """Seconds of one verify cycle's target work: the verify forward and the rollback to the
    `accepted + 1` committed tokens."""
    with torch.inference_mode():
        cache = prefill(model, context)
        recording = start_rollback(cache, block) if mode == "record" else False
        ids = torch.randint(5, 4000, (1, block))
        positions = torch.arange(context, context + block)[None]
        t0 = time.perf_counter()
        saved = snapshot(cache) if mode == "snapshot" else None
        model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True)
        keep = context + accepted + 1
        if mode == "record":
            _crop(cache, keep, recording)
        elif mode == "snapshot" and accepted + 1 < block:
            restore(cache, saved)
            model(input_ids=ids[:, :accepted + 1], position_ids=positions[:, :accepted + 1], past_key_values=cache,
                  use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0


def family_table(kind: str, args) -> dict:
    """Best of `repeats` per (mode, accepted), the modes interleaved within each repeat so that the
    shared machine's load falls on all of them alike."""
    model = build(kind, args.hidden, args.layers)
    accepted_list = (0, 3, args.block // 2, args.block - 1)
    best: dict = {}
    for _ in range(args.repeats):
        for accepted in accepted_list:
            for mode in MODES:
                seconds = time_cycle(model, args.context, args.block, accepted, mode)
                best[mode, accepted] = min(best.get((mode, accepted), seconds), seconds)
    return best


MODES = ("plain", "record", "snapshot")


def load_loop(path: str):
    """Another version of decoding/speculative.py (e.g. `git show c2f16e7:dflash_lab/decoding/speculative.py`),
    imported beside this one so both run interleaved in one process."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("speculative_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["speculative_before"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def dense_bench(new_tokens: int, prompts: int, before: str | None, repeats: int) -> None:
    from bench.bench_decode import PROMPTS, SUFFIX
    from dflash_lab.decoding.drafters import DFlashDrafter, NoDrafter, PromptLookupDrafter
    from dflash_lab.models.draft import DFlashDraftModel, build_draft_config
    from dflash_lab.models.target import load_target

    target = load_target("smollm2-135m-instruct", dtype="float32")
    draft = DFlashDraftModel(build_draft_config(target, num_layers=1, block_size=16)).init_weights(seed=0)
    loops = {"after": speculative} | ({"before": load_loop(before)} if before else {})
    makers = {"greedy": NoDrafter, "dflash": lambda: DFlashDrafter(draft, target), "lookup": lambda: PromptLookupDrafter(16)}
    best: dict = {}
    for text in PROMPTS[:prompts]:
        ids = target.encode_prompt([{"role": "user", "content": text + SUFFIX}])
        for _ in range(repeats):
            for drafter_name, make in makers.items():
                outputs = set()
                for loop_name, loop in loops.items():
                    result = loop.speculative_generate(target, make(), ids, new_tokens)
                    outputs.add(tuple(result.output_ids))
                    key = (drafter_name, loop_name, text)
                    best[key] = min(best.get(key, result.wall_s), result.wall_s)
                assert len(outputs) == 1, "before and after must decode the same tokens"
    print(f"dense target smollm2-135m-instruct fp32, {prompts} prompts x {new_tokens} new tokens, best of {repeats}, "
          f"1 thread, {platform.processor() or 'cpu'}; tokens/s:")
    for drafter_name in makers:
        row = {loop_name: prompts * new_tokens / sum(best[drafter_name, loop_name, t] for t in PROMPTS[:prompts])
               for loop_name in loops}
        print(f"  {drafter_name:7s} " + "  ".join(f"{k} {v:6.1f}" for k, v in row.items()))


def crop_overhead(before: str, calls: int = 2000) -> None:
    """The dense path's only change, timed alone: `_crop` per cycle and `start_rollback` per
    generation on the embedded target's 30-layer cache (300 cached tokens, nothing to remove)."""
    from transformers import AutoConfig

    from dflash_lab.models import embedded

    old = load_loop(before)
    cfg = AutoConfig.from_pretrained(str(embedded.cache_root() / "models" / "smollm2-135m-instruct"))

    def filled() -> DynamicCache:
        cache = DynamicCache(config=cfg)
        for i in range(len(cache.layers)):
            keys = torch.zeros(1, cfg.num_key_value_heads, 300, cfg.hidden_size // cfg.num_attention_heads)
            cache.update(keys, keys, i)
        return cache

    def per_call(fn) -> float:
        best = float("inf")
        for _ in range(5):
            cache = filled()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(cache)
            best = min(best, (time.perf_counter() - t0) / calls)
        return best * 1e6

    print(f"_crop before: {per_call(lambda c: old._crop(c, 300)):.2f} us per cycle; "
          f"after: {per_call(lambda c: _crop(c, 300, False)):.2f} us per cycle; "
          f"start_rollback: {per_call(lambda c: start_rollback(c, 16)):.2f} us per generation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--families", default="qwen3_5,gemma3,qwen3")
    parser.add_argument("--dense-only", action="store_true")
    parser.add_argument("--before", default=None, help="--dense-only: an older speculative.py to time beside this one")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--crop-overhead", action="store_true", help="with --before: the dense path's change alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.crop_overhead:
        crop_overhead(args.before)
        return
    if args.dense_only:
        dense_bench(args.new_tokens, args.prompts, args.before, max(1, args.repeats // 4))
        return
    print(f"hidden {args.hidden}, {args.layers} layers, context {args.context}, block {args.block}, fp32, 1 thread; "
          "ms per verify cycle (best of {args.repeats})".replace("{args.repeats}", str(args.repeats)))
    print(f"{'family':10s} {'committed':>9s} {'plain':>8s} {'record':>8s} {'snapshot':>9s}")
    for kind in args.families.split(","):
        best = family_table(kind, args)
        for accepted in sorted({a for _, a in best}):
            row = {mode: 1000 * best[mode, accepted] for mode in MODES}
            print(f"{kind:10s} {accepted + 1:9d} {row['plain']:8.1f} {row['record']:8.1f} {row['snapshot']:9.1f}", flush=True)


if __name__ == "__main__":
    main()
