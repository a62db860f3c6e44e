"""Recipe features under distribution (issue 23 item 5 and its matrix): the real `dflash-lab train`
on 2 gloo processes (torchrun, DDP; with `target.fsdp` the target's decoder layers sharded by FSDP2)
gives the same losses, held-out tau and final weights as 1 process with the same global batch.

The features, each on or off: FSDP2 target (else DDP only), draft init from the target's layers,
warm start from a checkpoint, activation checkpointing, DFlash2, a sliding window, the feature
cache, held-out evaluation at every step, and a checkpoint + `--resume` (the 2-process run stops
after step 1 and resumes). All 2^9 combinations would take an hour; `MATRIX` is a pairwise covering
array instead (every value of every pair of features appears together in some row; 7 rows,
`test_matrix_covers_every_pair` checks it), minus the combinations that cannot run or mean nothing:
FSDP with the feature cache (refused: cache hits differ between ranks), warm start with init from
the target's layers or with a sliding window (a warm start keeps its parent's weights and layout).
The row with FSDP and init from the target's layers is issue 23 item 1's test (it crashed: `aten.copy_`
got mixed torch.Tensor and DTensor). About 20-45 s a row, 3.5 min in all, on a shared 2-core CPU.
"""

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dflash_lab.cli import main
from dflash_lab.testing import tiny_target_dir, write_jsonl

FEATURES = ("fsdp", "init_target", "warm", "act_ckpt", "dflash2", "window", "cache", "heldout", "resume")
MATRIX = [
    {"dflash2", "window", "heldout", "resume"},
    {"fsdp", "warm", "act_ckpt"},
    {"init_target", "act_ckpt", "window", "cache", "heldout"},
    {"init_target", "dflash2", "cache", "resume"},
    {"fsdp", "warm", "dflash2", "heldout"},
    {"fsdp", "init_target", "window", "resume"},
    {"warm", "act_ckpt", "dflash2", "cache", "resume"},
]
EXCLUDED = [{"fsdp", "cache"}, {"warm", "init_target"}, {"warm", "window"}]
WORDS = "the quick brown fox jumps over lazy dog add return step answer boxed def sky blue".split()


def _runnable(row: set) -> bool:
    return not any(pair <= row for pair in EXCLUDED)


def test_matrix_covers_every_pair():
    """Every pair of (feature, on/off) values that some runnable combination has is in a row."""
    def pairs(row):
        values = [(f, f in row) for f in FEATURES]
        return set(itertools.combinations(values, 2))

    possible = set().union(*(pairs({f for f, on in zip(FEATURES, bits) if on})
                             for bits in itertools.product([0, 1], repeat=len(FEATURES))
                             if _runnable({f for f, on in zip(FEATURES, bits) if on})))
    assert all(_runnable(row) for row in MATRIX)
    assert possible - set().union(*map(pairs, MATRIX)) == set()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny target, 14 labelled records, the recipe, and a 1-step v1 checkpoint to warm start from."""
    root = tmp_path_factory.mktemp("matrix")
    target = tiny_target_dir(root / "target")
    rng = random.Random(0)
    rows = []
    for i in range(14):
        phrase = " ".join(rng.choice(WORDS) for _ in range(3))
        rows.append({"id": f"s{i}", "category": "chat", "source": "test",
                     "messages": [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(4))},
                                  {"role": "assistant", "content": " ".join([phrase] * 6)}],
                     "response_tokens": 20, "finish_reason": "stop"})
    data = write_jsonl(root / "labels" / "shard-00000.jsonl", rows)
    (root / "labels" / "meta.json").write_text('{"kind": "labels"}')
    recipe = root / "tiny.yaml"
    recipe.write_text(
        f"target: {{name: {target}}}\n"
        "draft: {num_layers: 2, block_size: 6}\n"
        "data: {max_length: 96, num_anchors: 8, heldout: 0}\n"
        "loss: {name: kd, gamma: 4.0, chunk_slots: 16}\n"
        "train: {lr: 1.0e-2, epochs: 1, max_steps: 2, micro_batch: 2, global_batch: 2, warmup_ratio: 0.1, seed: 3}\n"
    )
    setup = {"root": root, "data": data.parent, "recipe": recipe}
    parent = root / "parent"
    _single(setup, parent, ["train.max_steps=1"])
    setup["parent"] = parent / "checkpoints" / "final"
    return setup


def _overrides(row: set, setup, run_dir: Path) -> list[str]:
    on = lambda f: "true" if f in row else "false"  # noqa: E731
    out = [f"target.fsdp={on('fsdp')}", f"draft.init_from_target_layers={on('init_target')}",
           f"train.activation_checkpointing={on('act_ckpt')}",
           f"data.heldout={3 if 'heldout' in row else 0}", f"train.eval_interval={1 if 'heldout' in row else 0}"]
    if "warm" in row:
        out.append(f"draft.init={setup['parent']}")
    if "dflash2" in row:
        out.append("draft.arch=dflash2")
    if "window" in row:
        out.append("draft.sliding_window=8")
    if "cache" in row:
        out.append(f"data.feature_cache={run_dir}-cache")
    return out


def _single(setup, out: Path, overrides: list[str]) -> None:
    argv = ["train", "--config", str(setup["recipe"]), "--data", str(setup["data"]), "--out", str(out),
            "--no-progress", *overrides]
    assert main(argv) == 0


def _torchrun(args: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dflash_lab",
           "train", "--no-progress", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _rows(run: Path) -> list[dict]:
    """metrics.jsonl without timings: every step's losses, statistics and held-out tau, and the final
    checkpoint's event (a stopped run also has the event of its stop's checkpoint)."""
    timing = {"step_s", "sequences_per_s", "block_tokens_per_s", "time"}
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in timing} for r in rows
            if "event" not in r or r.get("name") == "final"]


def _assert_rows_close(a: list[dict], b: list[dict]) -> None:
    assert [r.get("step") for r in a] == [r.get("step") for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys(), (ra.keys() ^ rb.keys())
        for key, value in ra.items():
            if isinstance(value, float):
                assert rb[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (ra.get("step"), key)


@pytest.mark.parametrize("row", MATRIX, ids=lambda row: "+".join(f for f in FEATURES if f in row))
def test_two_processes_equal_one(setup, tmp_path, row):
    single, multi = tmp_path / "single", tmp_path / "multi"
    _single(setup, single, _overrides(row, setup, single))
    common = ["--config", str(setup["recipe"]), "--data", str(setup["data"]), "--out", str(multi),
              *_overrides(row, setup, multi), "train.micro_batch=1"]
    if "resume" in row:
        _torchrun([*common, "--stop-after", "1"])
        assert not (multi / "checkpoints" / "final").exists() and (multi / "checkpoints" / "step-1").is_dir()
        _torchrun(["--out", str(multi), "--resume"])  # recipe and data from the run
    else:
        _torchrun(common)
    run = json.loads((multi / "run.json").read_text())
    assert run["status"] == "finished" and run["schedule"]["world_size"] == 2
    assert run["recipe"]["target"]["fsdp"] is ("fsdp" in row)
    assert (run["draft"].get("sliding_window") == 8) is ("window" in row)
    rows_1, rows_2 = _rows(single), _rows(multi)
    if "heldout" in row:
        assert any("heldout_tau" in r for r in rows_1)
    _assert_rows_close(rows_1, rows_2)
    a, b = (load_file(str(r / "checkpoints" / "final" / "model.safetensors")) for r in (single, multi))
    assert a.keys() == b.keys() and any("conv" in k for k in a) is ("dflash2" in row)
    # AdamW divides by sqrt(v): float32 noise of the summation order moves the few weights whose
    # gradient is near zero by a visible fraction of lr (1e-2); tests/unit/test_train_layout.py
    # compares the gradients themselves tightly
    for name in a:
        diff = (a[name].float() - b[name].float()).abs()
        assert float(diff.max()) < 5e-4 and float((diff > 1e-5).float().mean()) < 0.01, (name, float(diff.max()))
