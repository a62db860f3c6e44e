"""Training-step cost of DFlash2 against v1 at the embedded target's shapes (SmolLM2-135M: hidden 576,
vocabulary 49152), random weights, CPU:

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/bench_dflash2_overhead.py

Times forward + backward of (a) v1 + CE, (b) DFlash2 + CE (the conv), (c) DFlash2 + CE + the
selector loss with its own pass over the vocabulary for the top-16, (d) the same with the top-16
taken from the CE's logits (what the trainer does since 2026-12-02), on the same blocks,
interleaved, and prints the medians and the ratios to (a).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dflash_lab.models.dflash2 import DFlash2Config, DFlash2DraftModel
from dflash_lab.models.draft import DFlashDraftModel, DraftConfig
from dflash_lab.train import blocks as B
from dflash_lab.train.losses import slot_statistics
from dflash_lab.train.selector_loss import selector_loss, slot_weights, teacher_forced_predecessors


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--anchors", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    shape = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers, num_attention_heads=9,
                 num_key_value_heads=3, head_dim=64, vocab_size=49152, num_target_layers=30, mask_token_id=16,
                 target_layer_ids=[15], block_size=args.block, rope_theta=100000.0)
    v1 = DFlashDraftModel(DraftConfig(**shape)).init_weights(0)
    d2 = DFlash2DraftModel(DFlash2Config(**shape)).init_weights(0)
    lm_head = torch.nn.Linear(576, 49152, bias=False).requires_grad_(False)
    embed = torch.nn.Embedding(49152, 576).requires_grad_(False)
    ids = torch.randint(0, 49152, (args.seq,))
    mask = torch.ones(args.seq)
    anchors = B.sample_anchors(mask, args.anchors, torch.Generator().manual_seed(0))
    block_ids, positions, labels, valid = B.build_blocks(ids, mask, anchors, args.block, 16)
    feats = torch.randn(1, args.seq, 576)
    attn = B.make_attention("chunked", anchors[None], args.block)
    noise = embed(block_ids.view(1, -1))

    def step(model, selector):
        model.zero_grad(set_to_none=True)
        hidden = model(noise, positions.view(1, -1), feats, torch.arange(args.seq)[None], attention=attn)
        h = hidden.view(len(anchors), args.block, -1)[valid]
        stats = slot_statistics(h, labels[valid], lm_head, top_k=16 if selector == "shared" else 0)
        loss = stats[0].mean()
        if selector:
            top = stats[4] if selector == "shared" else None
            given = {} if top is None else {"candidate_ids": top.ids, "candidate_mass": top.draft_mass}
            pred = teacher_forced_predecessors(block_ids, labels)[valid]
            loss = loss + selector_loss(model, h, lm_head, labels[valid], pred, slot_weights(valid, 4.0), **given).loss
        loss.backward()

    runs = {"v1+ce": (v1, None), "dflash2+ce": (d2, None), "dflash2+ce+selector (own top-16)": (d2, "own"),
            "dflash2+ce+selector (shared)": (d2, "shared")}
    times = {k: [] for k in runs}
    for name, (model, sel) in runs.items():
        step(model, sel)  # warm-up
    for _ in range(args.repeats):
        for name, (model, sel) in runs.items():
            t0 = time.perf_counter()
            step(model, sel)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["v1+ce"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:34s} median {med * 1000:8.1f} ms  ratio {med / base:5.2f}")


if __name__ == "__main__":
    main()
