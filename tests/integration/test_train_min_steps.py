"""`train.min_steps`: a time budget never cuts the schedule below the floor (issue 13 item 7: the
quick demo on a busy machine takes longer instead of training nothing)."""

import json

import torch

from dflash_lab.cli import main
from dflash_lab.testing import tiny_target_dir, write_jsonl


def test_time_budget_never_cuts_below_min_steps(tmp_path):
    torch.set_num_threads(1)
    target = tiny_target_dir(tmp_path / "target")
    rows = [{"id": f"s{i}", "category": "chat", "source": "test",
             "messages": [{"role": "user", "content": f"count {i}"},
                          {"role": "assistant", "content": " ".join(["one two three"] * 5)}],
             "response_tokens": 15, "finish_reason": "stop"} for i in range(6)]
    data = write_jsonl(tmp_path / "labels" / "shard-00000.jsonl", rows).parent
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"target: {{name: {target}}}\n"
        "draft: {num_layers: 1, block_size: 4}\n"
        "data: {max_length: 64, num_anchors: 4, heldout: 0}\n"
        "loss: {name: kd}\n"
        # a budget far below one step: without the floor the schedule would stop at step 4
        "train: {lr: 1.0e-3, epochs: 1000, micro_batch: 2, global_batch: 2, time_budget_s: 0.001, min_steps: 9}\n"
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(recipe), "--data", str(data), "--out", str(out), "--no-progress"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["schedule"]["total_steps"] == 9
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"event"' not in x]
    assert steps[-1] == 9
