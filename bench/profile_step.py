"""Where one training step of the demo's draft spends its time (torch.profiler, CPU).

    python bench/profile_step.py --labels DEMO_OUT/labels --max-slot 4 --threads 1

One forward + backward of a 1-layer draft on the embedded target over two labelled sequences
(48 anchors each), as `forward_batch` runs it in the trainer; prints the wall time of two warm
steps and the profiler's table grouped by op and input shape.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--labels", required=True)
    parser.add_argument("--max-slot", type=int, default=None)
    parser.add_argument("--loss", default="kd")
    parser.add_argument("--anchors", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile

    from dflash_lab.models.draft import DFlashDraftModel, build_draft_config
    from dflash_lab.models.target import load_target
    from dflash_lab.train import losses as L
    from dflash_lab.train.data import read_records, tokenize_records
    from dflash_lab.train.trainer import FeatureSource, forward_batch

    target = load_target("smollm2-135m-instruct", dtype="float32")
    samples, _ = tokenize_records(target, read_records(args.labels), 384, 2)
    cfg = build_draft_config(target, num_layers=1, block_size=16, mask_token_id=16)
    draft = DFlashDraftModel(cfg).init_weights(0)
    batch = samples[:2]
    feats = FeatureSource(target, cfg.target_layer_ids, True, None, torch.device("cpu")).get(batch)
    kw = dict(num_anchors=args.anchors, loss_cfg=L.LossConfig(name=args.loss, gamma=7.0), chunk_slots=8192,
              max_slot=args.max_slot)
    for i in range(2):
        t = time.perf_counter()
        loss, stats = forward_batch(draft, cfg, target, feats, batch, [i, i + 100], **kw)
        loss.backward()
        print(f"step {i}: {time.perf_counter() - t:.2f} s, {stats['valid_slots']:.0f} scored slots")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss, _ = forward_batch(draft, cfg, target, feats, batch, [5, 105], **kw)
        loss.backward()
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=16,
                                                            max_name_column_width=24, max_shapes_column_width=60))


if __name__ == "__main__":
    main()
