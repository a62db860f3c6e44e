"""Decoding speed on the embedded target: plain greedy vs our speculative loop vs z-lab's loop.

    python bench/bench_decode.py [--target smollm2-135m-instruct] [--new-tokens 128] [--draft DIR]

Eight gsm8k-style prompts (written here, not taken from GSM8K), 128 new tokens each, greedy.
Without --draft a random 1-layer draft is used: it is accepted almost never, so this measures the
loop's overhead, which is what the ours / z-lab ratio is about. Ratios come from one run, with
the three methods interleaved per prompt, because this machine is noisy.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from dflash_lab.decoding.drafters import DFlashDrafter
from dflash_lab.decoding.speculative import greedy_generate, speculative_generate
from dflash_lab.models.checkpoint import load_draft, save_draft
from dflash_lab.models.draft import DFlashDraftModel, build_draft_config
from dflash_lab.models.target import load_target

SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
PROMPTS = [
    "A baker makes 24 muffins in the morning and 3 times as many in the afternoon. He sells 70 muffins. How many are left?",
    "Maria has $45. She buys 3 notebooks at $4 each and a pen for $2. How much money does she have now?",
    "A train travels 60 miles per hour for 2.5 hours, then 40 miles per hour for 1 hour. How far does it go in total?",
    "Tom reads 12 pages a day. His book has 300 pages. After 2 weeks, how many pages does he still have to read?",
    "A garden has 8 rows of 15 tomato plants. Each plant gives 6 tomatoes. How many tomatoes are there?",
    "Lena saves $5 in the first week and doubles her savings each week. How much has she saved after 5 weeks?",
    "A school has 420 students. 35% of them walk to school and the rest take the bus. How many take the bus?",
    "A rectangle is 3 times as long as it is wide. Its perimeter is 64 cm. What is its area?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--draft", default=None)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()

    from dflash.model import DFlashDraftModel as ZLabDraft
    import dflash.model as zmod

    target = load_target(args.target, dtype="float32")
    tmp = tempfile.mkdtemp()
    draft_dir = args.draft
    if draft_dir is None:
        cfg = build_draft_config(target, num_layers=1, block_size=16)
        draft_dir = save_draft(DFlashDraftModel(cfg).init_weights(seed=0), f"{tmp}/random-draft")
    ours = load_draft(draft_dir, target)
    zlab = ZLabDraft.from_pretrained(draft_dir, dtype=torch.float32).eval()
    stops = target.stop_token_ids
    totals = {"greedy": 0.0, "ours": 0.0, "zlab": 0.0}
    tokens = {"greedy": 0, "ours": 0, "zlab": 0}
    taus = []
    for text in PROMPTS[: args.prompts]:
        ids = target.encode_prompt([{"role": "user", "content": text + SUFFIX}])
        r = greedy_generate(target, ids, args.new_tokens, stops)
        totals["greedy"] += r.wall_s
        tokens["greedy"] += len(r.output_ids)
        r2 = speculative_generate(target, DFlashDrafter(ours, target), ids, args.new_tokens, stops)
        totals["ours"] += r2.wall_s
        tokens["ours"] += len(r2.output_ids)
        taus.append(r2.tau)
        assert r2.output_ids == r.output_ids, "speculative output differs from greedy"
        t0 = time.perf_counter()
        out = zmod.dflash_generate(zlab, target.model, torch.tensor([ids]), args.new_tokens, stops)
        totals["zlab"] += time.perf_counter() - t0
        tokens["zlab"] += out.shape[1] - len(ids)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'method':<28}{'wall s':>10}{'tokens':>8}{'tok/s':>9}{'vs greedy':>11}")
    for name, label in (("greedy", "plain greedy"), ("ours", "dflash-lab speculative"), ("zlab", "z-lab dflash_generate")):
        print(f"{label:<28}{totals[name]:>10.2f}{tokens[name]:>8}{tokens[name] / totals[name]:>9.2f}"
              f"{totals['greedy'] / totals[name]:>10.2f}x")
    print(f"ours / z-lab wall time: {totals['ours'] / totals['zlab']:.3f}   mean tau (ours): {sum(taus) / len(taus):.3f}")


if __name__ == "__main__":
    main()
