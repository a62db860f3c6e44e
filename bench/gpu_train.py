"""GPU training step benchmark at Qwen3-4B scale (prepared for one H100; not a test).

    python bench/gpu_train.py                     # all four losses, micro-batch 1
    python bench/gpu_train.py --micro-batch 8 --losses kd,survival-eal --steps 6

A Qwen3-4B-shaped target with random bf16 weights (Qwen3Config: 36 layers, hidden 2560, MLP 9728,
vocab 151936, 32 heads, 8 KV heads, head_dim 128; no download) and the real-size 5-layer draft
(target layers [1, 9, 17, 25, 33]), sequences of 3072 tokens (the first 256 a "prompt", the rest
supervised), 512 anchors, block 16, bf16 autocast, flex_attention with a BlockMask. For each loss
it times full optimizer steps of the real trainer code (`forward_batch`: online target features,
draft forward/backward, chunked vocabulary loss) and reports step time, sequences/s, block
tokens/s, the target's share, peak memory, and the MFU of the draft's part (draft layers, fc,
context K/V and the lm_head over valid slots, x3 for forward+backward) against a measured bf16
matmul rate. Runs on torch >= 2.5 (tested for 2.11), transformers 5.x, Python 3.12.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dflash_lab.models.draft import DFlashDraftModel, build_draft_config  # noqa: E402
from dflash_lab.models.target import wrap_target  # noqa: E402
from dflash_lab.train import losses as L  # noqa: E402
from dflash_lab.train.data import Sample  # noqa: E402
from dflash_lab.train.trainer import FeatureSource, forward_batch  # noqa: E402


def matmul_tflops(n: int = 8192, iters: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128)
SMOKE = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def build_target(shape: dict, device: str, dtype, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**shape, max_position_embeddings=40960, rope_theta=1_000_000.0, tie_word_embeddings=True,
                      rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(dtype)
    return wrap_target(model, name="qwen3-4b-random", mask_token_id=shape["vocab_size"] - 1)


def draft_flops(cfg, n_seq: int, seq_len: int, anchors: int, valid_slots: float) -> float:
    """Forward+backward FLOPs (x3 of forward) of the draft's trainable part, per step."""
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    q_tokens = anchors * cfg.block_size
    per_block_token = 2 * (h * q_dim + 2 * h * kv_dim + q_dim * h + 3 * h * inter)
    per_ctx_token = 2 * (2 * h * kv_dim) * layers + 2 * len(cfg.target_layer_ids) * h * h  # K/V + fc
    # attention: each query sees on average half the context (anchors spread over the sequence) + its block
    attn = 2 * 2 * q_tokens * (seq_len / 2 + cfg.block_size) * q_dim * layers
    lm_head = 2 * h * cfg.vocab_size * valid_slots / n_seq
    fwd = per_block_token * layers * q_tokens + per_ctx_token * seq_len + attn + lm_head
    return 3 * fwd * n_seq


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--losses", default="ce,kd,eal,survival-eal")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=3072)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--anchors", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--chunk-slots", type=int, default=1024)
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: check that the script runs")
    args = ap.parse_args()
    if args.smoke:
        device, shape, dtype, attention, autocast = torch.device("cpu"), SMOKE, torch.float32, "chunked", None
        args.seq_len, args.prompt_len, args.anchors = 96, 16, 16
        peak = float("nan")
        sync = lambda: None  # noqa: E731
    else:
        assert torch.cuda.is_available(), "needs a GPU (or --smoke)"
        device, shape, dtype, attention, autocast = torch.device("cuda"), QWEN3_4B, torch.bfloat16, "flex", torch.bfloat16
        peak = matmul_tflops()
        sync = torch.cuda.synchronize
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, measured bf16 matmul {peak:.0f} TFLOP/s", flush=True)
    target = build_target(shape, device.type, dtype)
    cfg = build_draft_config(target, num_layers=5, block_size=16, mask_token_id=target.mask_token_id, rope_theta=1_000_000.0)
    print(f"draft target_layer_ids {cfg.target_layer_ids}", flush=True)
    gen = torch.Generator().manual_seed(0)
    samples = [Sample(id=f"s{i}", category="", input_ids=torch.randint(0, shape["vocab_size"] - 1, (args.seq_len,), generator=gen).tolist(),
                      loss_mask=[0] * args.prompt_len + [1] * (args.seq_len - args.prompt_len)) for i in range(args.micro_batch)]
    source = FeatureSource(target, cfg.target_layer_ids, True, None, device)
    results = []
    for name in args.losses.split(","):
        draft = DFlashDraftModel(cfg).init_weights(0).to(device=device, dtype=torch.float32).train()
        opt = torch.optim.AdamW(draft.parameters(), lr=6e-4, betas=(0.9, 0.95))
        loss_cfg = L.LossConfig(name=name, gamma=7.0 if name in ("ce", "kd") else None)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, target_times, valid = [], [], 0.0
        for step in range(args.warmup + args.steps):
            sync()
            t0 = time.perf_counter()
            feats = source.get(samples)
            sync()
            t1 = time.perf_counter()
            loss, st = forward_batch(draft, cfg, target, feats, samples, [step * 1000 + i for i in range(len(samples))],
                                     num_anchors=args.anchors, loss_cfg=loss_cfg, attention=attention,
                                     chunk_slots=args.chunk_slots, device=device, autocast_dtype=autocast)
            (loss / len(samples)).backward()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            t2 = time.perf_counter()
            if step >= args.warmup:
                times.append(t2 - t0)
                target_times.append(t1 - t0)
                valid = st["valid_slots"]
        step_s = sum(times) / len(times)
        flops = draft_flops(cfg, len(samples), args.seq_len, args.anchors, valid)
        draft_s = step_s - sum(target_times) / len(target_times)
        row = {
            "loss": name, "micro_batch": len(samples), "step_s": step_s, "target_s": sum(target_times) / len(target_times),
            "sequences_per_s": len(samples) / step_s, "block_tokens_per_s": len(samples) * args.anchors * cfg.block_size / step_s,
            "draft_tflops": flops / draft_s / 1e12, "mfu_draft": flops / draft_s / 1e12 / peak,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"), "loss_value": float(loss) / len(samples),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
        del draft, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("| loss | micro | s/step | target s | seq/s | block tok/s | draft TFLOP/s | MFU (draft) | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['loss']} | {r['micro_batch']} | {r['step_s']:.3f} | {r['target_s']:.3f} | {r['sequences_per_s']:.2f} | "
              f"{r['block_tokens_per_s']:.0f} | {r['draft_tflops']:.0f} | {100 * r['mfu_draft']:.1f}% | {r['peak_mem_gib']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_tflops": peak, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
