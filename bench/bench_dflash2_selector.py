"""Does the DFlash2 selector learn on top of a frozen v1 backbone, and which gold policy is better?

    PYTHONPATH=. python bench/bench_dflash2_selector.py --draft RUN/checkpoints/final --data LABELS_DIR

The v1 draft is warm-started into DFlash2 (`from_v1`: identity conv, zero successor codebook), its
backbone is FROZEN, and only the selector (codebooks + hidden projection) trains with the selector
loss, once per gold policy from the same start. The backbone's hidden states and the unary top-16
are computed once (they cannot change), so a step costs only the selector. Reported on held-out
sequences: unary top-16 recall, teacher-forced selector accuracy, and the simulated tau of the
selector's own greedy walk beside the unary-argmax tau (equal at the start by construction).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dflash_lab.models.checkpoint import load_draft
from dflash_lab.models.dflash2 import DFlash2DraftModel
from dflash_lab.models.target import load_target
from dflash_lab.train import blocks as B
from dflash_lab.train.data import read_records, split_heldout, tokenize_records
from dflash_lab.train.selector_loss import (
    selector_loss,
    selector_stats,
    slot_weights,
    summarise_stats,
    teacher_forced_predecessors,
)


@torch.no_grad()
def cache_slots(draft, target, samples, num_anchors, seed):
    """Per valid slot: hidden, gold, teacher-forced predecessor, weight, candidates; plus the layout."""
    bsz = draft.block_size
    gamma = {16: 7.0, 10: 5.0, 8: 4.0}.get(bsz, 7.0)
    out = {k: [] for k in ("hidden", "gold", "pred", "weight", "ids", "valid")}
    for j, s in enumerate(samples):
        ids = torch.tensor(s.input_ids)
        mask = torch.tensor(s.loss_mask)
        anchors = B.sample_anchors(mask, num_anchors, torch.Generator().manual_seed(seed + j))
        if anchors.numel() == 0:
            continue
        block_ids, positions, labels, valid = B.build_blocks(ids, mask, anchors, bsz, draft.mask_token_id)
        _, feats = target.forward(ids[None], draft.target_layer_ids)
        attn = B.make_attention("chunked", anchors[None], bsz)
        hidden = draft(target.embed(block_ids.view(1, -1)).float(), positions.view(1, -1), feats.float(),
                       torch.arange(len(ids))[None], attention=attn).view(len(anchors), bsz, -1)
        h = hidden[valid]
        out["hidden"].append(h)
        out["gold"].append(labels[valid])
        out["pred"].append(teacher_forced_predecessors(block_ids, labels)[valid])
        out["weight"].append(slot_weights(valid, gamma))
        out["ids"].append(draft.candidates(h, target.lm_head)[0])
        out["valid"].append(valid)
    return {k: torch.cat(v) for k, v in out.items()}


def evaluate(draft, target, cache):
    res = selector_loss(draft, cache["hidden"], target.lm_head, cache["gold"], cache["pred"], cache["weight"],
                        candidate_ids=cache["ids"])
    return summarise_stats(selector_stats(res, cache["valid"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--draft", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--train", type=int, default=48)
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--anchors", type=int, default=32)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-slots", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--policies", default="replace,exclude")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    target = load_target(args.target, dtype="float32", device="cpu")
    v1 = load_draft(args.draft, target, dtype=torch.float32)
    samples, _ = tokenize_records(target, read_records(args.data), 1024)
    train_s, held_s = split_heldout(samples, args.heldout, args.heldout, args.seed)
    train_s = train_s[: args.train]
    t0 = time.perf_counter()
    base = DFlash2DraftModel.from_v1(v1, seed=args.seed).eval()
    train_c = cache_slots(base, target, train_s, args.anchors, 1000)
    held_c = cache_slots(base, target, held_s, args.anchors, 2000)
    print(f"cached {len(train_c['gold'])} train / {len(held_c['gold'])} held-out slots in {time.perf_counter() - t0:.0f}s")
    start = evaluate(base, target, held_c)
    results = {"start": start}
    print("start", json.dumps({k: round(v, 4) for k, v in start.items()}))
    for policy in args.policies.split(","):
        model = DFlash2DraftModel.from_v1(v1, seed=args.seed).eval()
        params = list(model.candidate_selector.parameters())
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=args.lr)
        gen = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        for step in range(args.steps):
            pick = torch.randint(0, len(train_c["gold"]), (args.batch_slots,), generator=gen)
            out = selector_loss(model, train_c["hidden"][pick], target.lm_head, train_c["gold"][pick],
                                train_c["pred"][pick], train_c["weight"][pick], policy, candidate_ids=train_c["ids"][pick])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        with torch.no_grad():
            res = evaluate(model, target, held_c)
            res["train_s"] = time.perf_counter() - t0
        results[policy] = res
        print(policy, json.dumps({k: round(v, 4) for k, v in res.items()}))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
