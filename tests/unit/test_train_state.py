"""Checkpoint listing, best/epoch selection, pruning, and the optimizer/RNG state round trip."""

import json
import random

import numpy as np
import pytest
import torch

from dflash_lab.errors import DFlashLabError
from dflash_lab.models.draft import DFlashDraftModel, DraftConfig
from dflash_lab.train import state as S
from dflash_lab.train.checkpointer import CheckpointConfig, Checkpointer, DraftState, RngState, save_checkpoint
from dflash_lab.train.distributed import DistInfo


def _draft():
    cfg = DraftConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=8, vocab_size=40, num_target_layers=4, mask_token_id=39,
                      target_layer_ids=[2], block_size=4)
    return DFlashDraftModel(cfg).init_weights(0)


def _resume(path, draft, optimizer):
    """What a run's Checkpointer restores from checkpoint `path`: weights, optimizer and RNG."""
    components = {"draft": DraftState(draft, optimizer), "rng": RngState()}
    Checkpointer(CheckpointConfig(out_dir=path.parent.parent), DistInfo(), components).load(path)


def test_save_and_restore_state(tmp_path):
    draft = _draft()
    opt = torch.optim.AdamW(draft.parameters(), lr=1e-3)
    draft(torch.randn(1, 4, 16), torch.arange(4)[None], torch.randn(1, 3, 16), torch.arange(3)[None]).sum().backward()
    opt.step()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    path = save_checkpoint(tmp_path / "checkpoints" / "step-1", draft, opt,
                             {"step": 1, "epoch": 1, "epoch_end": False, "metrics": {"heldout_tau": 1.5}})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temp leftovers
    draft2 = _draft()
    opt2 = torch.optim.AdamW(draft2.parameters(), lr=5.0)
    _resume(path, draft2, opt2)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for k in a["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["state"][k][key], b["state"][k][key])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def _servable(ckpt):
    """What vLLM and SGLang load: every top-level *.safetensors is the draft's weights file."""
    return sorted(p.name for p in ckpt.glob("*.safetensors")) == ["model.safetensors"]


def _to_old_layout(ckpt):
    """A checkpoint as dflash-lab wrote it before issue 21: training files beside the weights."""
    for file in (ckpt / S.TRAINING_STATE_DIR).iterdir():
        file.rename(ckpt / file.name)
    (ckpt / S.TRAINING_STATE_DIR).rmdir()


@pytest.mark.parametrize("layout", ["new", "old"])
def test_training_state_sits_apart_and_old_checkpoints_still_load(tmp_path, layout):
    draft = _draft()
    opt = torch.optim.AdamW(draft.parameters(), lr=1e-3)
    draft(torch.randn(1, 4, 16), torch.arange(4)[None], torch.randn(1, 3, 16), torch.arange(3)[None]).sum().backward()
    opt.step()
    torch.manual_seed(7)
    path = save_checkpoint(tmp_path / "checkpoints" / "step-1", draft, opt, {"step": 1}, dtype=torch.bfloat16)
    expected = torch.rand(1)
    assert _servable(path)
    assert {p.name for p in (path / S.TRAINING_STATE_DIR).iterdir()} == {
        "optimizer.safetensors", "optimizer.json", "rng.json", "rng.safetensors", "master.safetensors"}
    if layout == "old":
        _to_old_layout(path)
        assert not _servable(path) and S.state_dir(path) == path
    S.verify_checkpoint(path)
    draft2 = _draft()
    opt2 = torch.optim.AdamW(draft2.parameters(), lr=5.0)
    _resume(path, draft2, opt2)
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    master = S.master_weights(path)
    assert all(torch.equal(master[name], t) for name, t in draft.state_dict().items())
    assert all(torch.equal(draft2.state_dict()[name], t) for name, t in draft.state_dict().items())  # fp32, not bf16
    assert torch.equal(torch.rand(1), expected)
    # a truncated training file is named with where it sits
    rng = S.state_dir(path) / "rng.safetensors"
    rng.write_bytes(rng.read_bytes()[:10])
    with pytest.raises(DFlashLabError, match=("training_state/" if layout == "new" else "") + "rng.safetensors"):
        S.verify_checkpoint(path)


def _fake(run, name, step, tau, epoch=1, epoch_end=False):
    d = run / "checkpoints" / name
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x")
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "epoch": epoch, "epoch_end": epoch_end,
                                                      "metrics": {} if tau is None else {"heldout_tau": tau}}))


def test_best_epoch_and_prune(tmp_path):
    _fake(tmp_path, "step-10", 10, 1.4)
    _fake(tmp_path, "step-20", 20, 1.9, epoch=1, epoch_end=True)
    _fake(tmp_path, "step-30", 30, 1.7, epoch=2)
    _fake(tmp_path, "step-40", 40, 1.9, epoch=2, epoch_end=True)
    _fake(tmp_path, "final", 50, 1.6, epoch=3, epoch_end=True)
    assert S.best_checkpoint(tmp_path).name == "step-40"  # ties: the later step
    assert S.epoch_checkpoint(tmp_path, 1).name == "step-20"
    assert S.resolve_init(f"epoch-2:{tmp_path}").name == "step-40"
    assert S.resolve_init(f"best:{tmp_path}").name == "step-40"
    assert S.resolve_init("scratch") is None
    with pytest.raises(DFlashLabError, match="end of epoch 7"):
        S.epoch_checkpoint(tmp_path, 7)
    S.prune_checkpoints(tmp_path, 1, protect=tmp_path / "checkpoints" / "step-30")
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # step-10 goes; step-20 and step-40 end an epoch (a later stage's `epoch-E:` may name them)
    assert left == ["final", "step-20", "step-30", "step-40"]
    _fake(tmp_path, "step-45", 45, 1.0, epoch=3)
    S.prune_checkpoints(tmp_path, 1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["final", "step-20", "step-40", "step-45"]
    assert S.latest_checkpoint(tmp_path).name == "final"
    S.prune_checkpoints(tmp_path, 1, keep_epoch_ends=False)  # epoch ends pruned like the rest
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["final", "step-45"]


def test_checkpoint_in_target_dtype_keeps_fp32_master(tmp_path):
    """The served weights take the target's dtype (config says so); training resumes from fp32."""
    from dflash_lab.models.checkpoint import read_draft_config, read_tensors

    draft = _draft()
    opt = torch.optim.AdamW(draft.parameters(), lr=1e-3)
    path = save_checkpoint(tmp_path / "final", draft, opt, {"step": 1}, dtype=torch.bfloat16)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    served = read_tensors(path, read_draft_config(path))
    master = S.master_weights(path)
    for name, tensor in draft.state_dict().items():
        assert served[name].dtype == torch.bfloat16 and torch.equal(served[name], tensor.to(torch.bfloat16))
        assert master[name].dtype == torch.float32 and torch.equal(master[name], tensor)
    fp32 = save_checkpoint(tmp_path / "fp32", draft, opt, {"step": 1}, dtype=torch.float32)
    assert S.master_weights(fp32) is None  # no duplicate when the served copy is already fp32


def test_checkpoint_never_records_a_held_out_tau_of_earlier_weights():
    """A checkpoint reuses the last log's held-out tau only when that log measured the same step;
    otherwise it measures its own (a stale tau would let `best` pick by another step's score)."""
    from types import SimpleNamespace

    from dflash_lab.train.trainer import Trainer

    measured, saved = [], []

    class Evaluator:
        def evaluate(self):
            measured.append(fake.progress.step)
            return {"heldout_tau": 1.0 + fake.progress.step}

    fake = SimpleNamespace(
        last_metrics={"loss": 1.0, "heldout_tau": 3.0}, tau_step=2, progress=SimpleNamespace(step=2),
        evaluator=Evaluator(),
        checkpointer=SimpleNamespace(save=lambda name, metrics, epoch_end: saved.append((name, metrics)) or name),
        metrics=SimpleNamespace(write_event=lambda step, row: None))
    Trainer.checkpoint(fake, "step-2", False)  # the log at step 2 measured these weights: reused
    fake.progress.step = 5
    Trainer.checkpoint(fake, "step-5", False)  # the last tau is step 2's: measured anew
    assert measured == [5]
    assert saved == [("step-2", {"loss": 1.0, "heldout_tau": 3.0}), ("step-5", {"loss": 1.0, "heldout_tau": 6.0})]
    assert fake.tau_step == 5


class _Box:
    """A component whose state is a plain dict."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = state


def test_one_checkpointer_saves_and_loads_every_component_by_name(tmp_path):
    """The Checkpointer is given {name: component} once; state.py puts each state in its file:
    trainer_state.json keeps the keys and order the trainer has always written, and a load gives
    every component its own state back."""
    draft = _draft()
    opt = torch.optim.AdamW(draft.parameters(), lr=1e-3)

    def components(progress, position):
        return {"draft": DraftState(draft, opt), "progress": _Box(progress), "loader": _Box(position),
                "metrics": _Box({}), "rng": RngState()}

    saved = components({"step": 3, "total_steps": 9, "budget_fixed": True}, {"epoch": 1, "step_in_epoch": 2})
    cfg = CheckpointConfig(out_dir=tmp_path, seed=11)
    path = Checkpointer(cfg, DistInfo(), saved).save("step-3", {"loss": 1.0, "heldout_tau": 2.5}, epoch_end=False)
    state = json.loads((path / S.STATE_NAME).read_text())
    assert list(state) == ["step", "total_steps", "budget_fixed", "best_heldout_tau", "epoch", "epoch_end",
                           "data_position", "metrics", "seed", "metrics_window"]
    assert state["epoch"] == 2 and state["seed"] == 11 and state["metrics"] == {"loss": 1.0, "heldout_tau": 2.5}
    loaded = components({"step": 0}, {})
    checkpointer = Checkpointer(cfg, DistInfo(), loaded)
    checkpointer.load(path)
    assert loaded["progress"].state["step"] == 3 and loaded["loader"].state == {"epoch": 1, "step_in_epoch": 2}
    assert loaded["metrics"].state == {} and checkpointer.best_tau == 2.5
    state["data_position"] = "lost"  # a component that cannot take its state names the checkpoint
    (path / S.STATE_NAME).write_text(json.dumps(state))
    loaded["loader"] = _Box({})
    loaded["loader"].load_state_dict = lambda position: position["epoch"]  # as TrainLoader reads it
    with pytest.raises(DFlashLabError, match="step-3 is broken: the loader state does not load"):
        Checkpointer(cfg, DistInfo(), loaded).load(path)
