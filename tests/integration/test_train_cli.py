"""The real `dflash-lab train` entry point on CPU with a tiny target: checkpoint layout (loadable
by z-lab's DFlashDraftModel), a falling loss, exact resume, warm start, and 2-process gloo DDP
equal to one process with the same global batch."""

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
from dflash_lab.train.state import best_checkpoint

WORDS = "the quick brown fox jumps over lazy dog add return step answer boxed def sky blue".split()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread avoids spinning threads on a shared, loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    target = tiny_target_dir(root / "target")
    rng = random.Random(0)
    rows = []
    for i in range(14):
        # a repetitive response: learnable within a few steps
        phrase = " ".join(rng.choice(WORDS) for _ in range(3))
        rows.append({"id": f"s{i}", "category": "chat", "source": "test",
                     "messages": [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(4))},
                                  {"role": "assistant", "content": " ".join([phrase] * 6)}],
                     "response_tokens": 20, "finish_reason": "stop"})
    rows.append({"id": "tiny", "category": "chat", "source": "test",
                 "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]})
    data = write_jsonl(root / "labels" / "shard-00000.jsonl", rows)
    (root / "labels" / "meta.json").write_text('{"kind": "labels"}')
    recipe = root / "tiny.yaml"
    recipe.write_text(
        f"target: {{name: {target}}}\n"
        "draft: {num_layers: 2, block_size: 6}\n"
        "data: {max_length: 96, num_anchors: 8, heldout: 2}\n"
        "loss: {name: kd, gamma: 4.0, chunk_slots: 16}\n"
        "train: {lr: 1.0e-2, epochs: 2, micro_batch: 2, global_batch: 4, warmup_ratio: 0.1, seed: 3, eval_interval: 3}\n"
    )
    return {"root": root, "target": target, "data": data.parent, "recipe": recipe}


def _train(setup, out, *extra):
    argv = ["train", "--config", str(setup["recipe"]), "--data", str(setup["data"]), "--out", str(out), "--no-progress", *extra]
    assert main(argv) == 0


def _weights(ckpt):
    return load_file(str(Path(ckpt) / "model.safetensors"))


@pytest.fixture(scope="module")
def full_run(setup):
    out = setup["root"] / "run-full"
    _train(setup, out, "--save-every", "2")
    return out


def test_layout_metrics_and_zlab_loading(setup, full_run):
    ckpts = full_run / "checkpoints"
    # 12 usable train sequences / global batch 4 = 3 steps per epoch, 2 epochs; epoch end at step 3
    assert sorted(p.name for p in ckpts.iterdir()) == ["final", "step-2", "step-3", "step-4"]
    for ckpt in ckpts.iterdir():
        names = {p.name for p in ckpt.iterdir()}
        assert {"config.json", "model.safetensors", "trainer_state.json", "training_state"} <= names
        # servable as it is (issue 21): vLLM and SGLang load every top-level *.safetensors
        assert sorted(p.name for p in ckpt.glob("*.safetensors")) == ["model.safetensors"]
        assert {"optimizer.safetensors", "rng.safetensors"} <= {p.name for p in (ckpt / "training_state").iterdir()}
    state = json.loads((ckpts / "step-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["epoch"] == 1 and state["epoch_end"] and "heldout_tau" in state["metrics"]
    run = json.loads((full_run / "run.json").read_text())
    assert run["status"] == "finished" and run["parent"] is None and run["run_dir"] == str(full_run)
    assert run["data"]["manifest_sha256"] and run["data"]["tokenize"]["skipped_few_supervised"] == 1
    assert run["schedule"]["total_steps"] == 6 and run["target"]["num_layers"] == 6
    # one TensorBoard events file per run: the final checkpoint's event goes into it before it closes
    assert (full_run / "config.yaml").is_file() and len(list((full_run / "tb").glob("events.out.tfevents*"))) == 1
    rows = [json.loads(x) for x in (full_run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "event" not in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "acc_per_slot", "train_tau", "block_tokens_per_s"} <= set(train_rows[0])
    assert any("heldout_tau" in r for r in train_rows)
    # the best checkpoint is the one with the highest held-out tau (ties: the later step, final last)
    order = {"final": 10**9}
    scored = [(json.loads((c / "trainer_state.json").read_text())["metrics"]["heldout_tau"],
               order.get(c.name, int(c.name.split("-")[-1]) if c.name.startswith("step-") else 0), c)
              for c in ckpts.iterdir()]
    assert best_checkpoint(full_run) == max(scored, key=lambda t: t[:2])[2]

    from dflash_lab.models.checkpoint import load_draft
    from dflash_lab.models.target import load_target

    target = load_target(setup["target"])
    ours = load_draft(ckpts / "final", target)
    from dflash.model import DFlashDraftModel

    zlab = DFlashDraftModel.from_pretrained(str(ckpts / "final"))
    theirs = zlab.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(theirs[name].float(), tensor.float()), name


def test_loss_falls(setup, tmp_path):
    out = tmp_path / "run"
    _train(setup, out, "train.epochs=4", "train.eval_interval=0", "loss.name=ce")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"event"' not in x]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses


def test_resume_is_bit_identical(setup, full_run, tmp_path):
    out = tmp_path / "run"
    _train(setup, out, "--save-every", "2", "--stop-after", "5")  # "killed" after step 5 (past step-4)
    assert not (out / "checkpoints" / "final").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "stopped"  # a final status (issue 24)
    # what a kill would leave: delete the checkpoint of the stop, resume from step-4
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-5")
    # the same run as a version before issue 21 left it: training files beside the weights
    old = tmp_path / "run-old-layout"
    shutil.copytree(out, old)
    for ckpt in (old / "checkpoints").iterdir():
        for file in (ckpt / "training_state").iterdir():
            file.rename(ckpt / file.name)
        (ckpt / "training_state").rmdir()
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0  # recipe and data from the run
    a, b = _weights(full_run / "checkpoints" / "final"), _weights(out / "checkpoints" / "final")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"event"' not in x]
    assert steps == [1, 2, 3, 4, 5, 6]  # rows after the checkpoint were dropped and recomputed
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert main(["train", "--out", str(old), "--resume", "--no-progress"]) == 0
    c = _weights(old / "checkpoints" / "final")
    assert all(torch.equal(a[name], c[name]) for name in a)
    assert (old / "checkpoints" / "final" / "training_state").is_dir()  # new checkpoints: the new layout


def test_resume_mid_log_interval_logs_the_whole_interval(setup, tmp_path):
    """With log_every 2, a run stopped at step 5 keeps step 5's statistics in its checkpoint
    (Metrics.state_dict): the resumed run's row at step 6 equals the uninterrupted run's."""
    full, part = tmp_path / "full", tmp_path / "part"
    _train(setup, full, "train.log_every=2")
    _train(setup, part, "train.log_every=2", "--stop-after", "5")
    assert json.loads((part / "checkpoints" / "step-5" / "trainer_state.json").read_text())["metrics_window"]["steps"] == 1
    assert main(["train", "--out", str(part), "--resume", "--no-progress"]) == 0

    def rows(run):
        timing = {"step_s", "sequences_per_s", "block_tokens_per_s"}
        return {r["step"]: {k: v for k, v in r.items() if k not in timing}
                for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "event" not in r}

    a, b = rows(full), rows(part)
    assert 5 not in a and 6 in a and sorted(a) == sorted(b)
    assert a[6] == b[6] and a == b


def test_warm_start_records_parent(setup, full_run, tmp_path):
    out = tmp_path / "warm"
    parent = full_run / "checkpoints" / "step-3"
    _train(setup, out, f"draft.init={parent}", "train.max_steps=1", "loss.name=survival-eal")
    run = json.loads((out / "run.json").read_text())
    assert run["parent"] == str(parent.resolve())
    # the first step started from the parent's weights (a fresh optimizer: AdamW's first step moves
    # every weight by about lr)
    a, b = _weights(parent), _weights(out / "checkpoints" / "final")
    diff = max(float((a[n] - b[n]).abs().max()) for n in a)
    assert 0 < diff < 0.05
    out2 = tmp_path / "warm-best"
    _train(setup, out2, f"draft.init=best:{full_run}", "train.max_steps=1")
    assert json.loads((out2 / "run.json").read_text())["parent"] == str(best_checkpoint(full_run).resolve())


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "ddp+fsdp-target"])
def test_two_process_gloo_equals_one_process(setup, tmp_path, fsdp):
    """DDP over 2 gloo processes; with `target.fsdp` the target's decoder layers are also sharded
    (FSDP2 on a CPU mesh; embedding, final norm and lm_head whole on each rank)."""
    common = ["train.epochs=1", "train.max_steps=2", "train.eval_interval=0", "data.heldout=0", "train.global_batch=2",
              f"target.fsdp={'true' if fsdp else 'false'}"]
    single = tmp_path / "single"
    _train(setup, single, *common, "train.micro_batch=2")
    ddp = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dflash_lab",
           "train", "--config", str(setup["recipe"]), "--data", str(setup["data"]), "--out", str(ddp), "--no-progress",
           *common, "train.micro_batch=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((ddp / "run.json").read_text())
    assert run["schedule"]["world_size"] == 2 and run["schedule"]["grad_accum"] == 1
    assert run["recipe"]["target"]["fsdp"] is fsdp
    a, b = _weights(single / "checkpoints" / "final"), _weights(ddp / "checkpoints" / "final")
    # AdamW divides by sqrt(v): on the few weights whose gradient is near zero, float32 noise of the
    # summation order moves the update by a visible fraction of lr (1e-2). The gradients themselves
    # are compared tightly in tests/unit/test_train_layout.py.
    for name in a:
        diff = (a[name] - b[name]).abs()
        assert float(diff.max()) < 5e-4 and float((diff > 1e-5).float().mean()) < 0.01, (name, float(diff.max()))
    losses = [[json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"event"' not in x]
              for run in (single, ddp)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_feature_cache_is_reused(setup, tmp_path):
    out = tmp_path / "cached"
    cache = tmp_path / "cache"
    _train(setup, out, f"data.feature_cache={cache}", "train.eval_interval=0", "data.heldout=0")
    run = json.loads((out / "run.json").read_text())
    # 14 usable sequences -> 3 steps x 4 per epoch, 2 epochs: the second epoch reads the cache
    assert run["feature_cache"]["hits"] >= 10 and run["feature_cache"]["misses"] <= 14
    assert len(list(cache.rglob("*.safetensors"))) >= 12


def test_time_budget_sizes_the_schedule_and_resume_keeps_it(setup, tmp_path):
    # 1000 epochs would take minutes; a 5-second budget must cut the schedule after step 4 (5 s, not
    # less: the resumed half below stops at step 6, so the decided length must exceed 6 steps even
    # when a loaded machine takes 0.5 s a step)
    common = ["train.epochs=1000", "train.eval_interval=0", "train.time_budget_s=5", "--save-every", "2"]
    out = tmp_path / "budget"
    _train(setup, out, *common)
    run = json.loads((out / "run.json").read_text())
    total = run["schedule"]["total_steps"]
    assert run["schedule"]["time_budget_s"] == 5 and 4 <= total < 3 * 1000
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"event"' not in x]
    assert steps[-1] == total
    # interrupted and resumed: the decided length is kept, not measured again
    out2 = tmp_path / "budget-resumed"
    _train(setup, out2, *common, "--stop-after", "6")
    state = json.loads((out2 / "checkpoints" / "step-6" / "trainer_state.json").read_text())
    decided = state["total_steps"]
    assert state["budget_fixed"] and decided < 3 * 1000
    assert main(["train", "--out", str(out2), "--resume", "--no-progress"]) == 0
    steps2 = [json.loads(x)["step"] for x in (out2 / "metrics.jsonl").read_text().splitlines() if '"event"' not in x]
    assert steps2[-1] == decided


def test_dpace_with_kd_term_and_accumulation(setup, tmp_path):
    """dpace + its survival-weighted KD term with 2 accumulation micro-steps (the no-grad pre-pass
    for the draft-dependent denominators) trains and logs a finite loss."""
    out = tmp_path / "dpace"
    _train(setup, out, "loss.name=dpace", "loss.kl_weight=0.5", "loss.dpace_alpha=0.5", "train.max_steps=2",
           "train.eval_interval=0")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"event"' not in x]
    assert len(rows) == 2 and all(r["loss"] == r["loss"] and r["loss"] > 0 and r["kl"] > 0 for r in rows)
    run = json.loads((out / "run.json").read_text())
    assert run["loss"]["name"] == "dpace" and run["loss"]["normalize"] == "anchors" and run["schedule"]["grad_accum"] == 2


def test_bf16_target_checkpoints_resume_from_fp32_master(setup, tmp_path):
    """With a bf16 target the served weights are bf16 (config says so) and training state stays
    fp32: a run interrupted after step 2 and resumed ends bit-identical to an uninterrupted one,
    which it would not if it resumed from the rounded bf16 weights."""
    common = ["target.dtype=bfloat16", "train.bf16=true", "train.max_steps=3", "train.eval_interval=0",
              "data.heldout=0", "loss.name=ce"]
    full = tmp_path / "full"
    _train(setup, full, *common)
    cut = tmp_path / "cut"
    _train(setup, cut, *common, "--stop-after", "2")
    assert main(["train", "--out", str(cut), "--resume", "--no-progress"]) == 0
    final = cut / "checkpoints" / "final"
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in _weights(final).values())
    a = load_file(str(full / "checkpoints" / "final" / "training_state" / "master.safetensors"))
    b = load_file(str(final / "training_state" / "master.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal(b[n].to(torch.bfloat16), t) for n, t in _weights(final).items())


def test_bf16_target_turns_autocast_on_or_is_refused_without_it(setup, tmp_path, capsys):
    """A bf16 target's head cannot meet the fp32 draft's hidden states without autocast: with
    train.bf16 unset the trainer turns autocast on by itself (a CPU run used to crash in the
    vocabulary stage with a raw dtype error); train.bf16=false is refused naming the fix."""
    common = ["target.dtype=bfloat16", "train.max_steps=1", "train.eval_interval=0", "data.heldout=0"]
    _train(setup, tmp_path / "auto", *common)
    assert (tmp_path / "auto" / "checkpoints" / "final" / "model.safetensors").exists()
    argv = ["train", "--config", str(setup["recipe"]), "--data", str(setup["data"]), "--out", str(tmp_path / "off"),
            "--no-progress", *common, "train.bf16=false"]
    assert main(argv) == 2
    assert "train.bf16=true" in capsys.readouterr().err
