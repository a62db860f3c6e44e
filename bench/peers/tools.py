"""Per tool: the trainer's command line for a setting, and the export of its draft to our format.

Settings (same draft shape in both: 1 layer, block 16, target layer 15, mask token 16; batches of
about 2 sequences; one thread):
- `method`: the same loss (CE on the target's tokens, slots 1-15, decay gamma 7), 96 anchor blocks
  per optimizer step, fp32 compute, AdamW lr 2e-3,
  weight decay 0, warmup 4% then cosine to 0, clip 1.0, random init of the draft's layers.
- `defaults`: each tool's own loss / optimizer / lr / anchors / schedule / init (ours: the demo's
  stage 1 levers: kd, slots 1-4, init from the target's last layer, bf16 feature cache). The batch
  stays about 2 sequences for all (a size, not a method lever: speculators' default 8192-token packs
  would make about 5 steps of the 167 training records per epoch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

LAYER_ID, BLOCK, MASK, ANCHORS, MICRO, MAX_LEN = 15, 16, 16, 48, 2, 384
SETTINGS = ("method", "defaults")
TOOLS = ("ours", "speculators", "specforge")


@dataclass
class Job:
    tool: str
    setting: str
    steps: int
    out: Path
    feats: dict
    labels: Path


# -- ours ------------------------------------------------------------------------------------------
def ours_recipe(job: Job) -> dict:
    from dflash_lab.demo import PRESETS, demo_recipe

    r = demo_recipe(PRESETS["default"], "stage1-kd", job.out)
    r["train"].update(max_steps=job.steps, time_budget_s=None, min_steps=None, save_every=0, eval_interval=0,
                      keep_last=None, cpu_threads=1, epochs=1000)
    r["data"].update(feature_cache=job.feats["ours_cache_bfloat16"], heldout_max=8)
    if job.setting == "method":
        r["draft"].update(init_from_target_layers=False)
        r["loss"].update(name="ce", gamma=7.0, max_slot=None)
        r["data"].update(feature_cache=job.feats["ours_cache_float32"], feature_cache_dtype="float32")
        r["train"].update(lr=2e-3, warmup_ratio=0.04, clip=1.0, weight_decay=0.0)
    return r


def ours_cmd(job: Job) -> list[str]:
    job.out.mkdir(parents=True, exist_ok=True)
    cfg = job.out / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(ours_recipe(job), sort_keys=False))
    return ["train", "--config", str(cfg), "--data", str(job.labels), "--out", str(job.out / "run")]


def ours_export(job: Job) -> Path:
    return job.out / "run" / "checkpoints" / "final"


# -- speculators -------------------------------------------------------------------------------------
def speculators_cmd(job: Job) -> list[str]:
    spec = Path(job.feats["speculators"])
    split = json.loads((spec / "split.json").read_text())
    args = ["--speculator-type", "dflash", "--verifier-name-or-path", job.feats["peer_target"],
            "--data-path", str(spec / "dataset"), "--hidden-states-path", str(spec / "hidden_states"),
            "--train-data-ratio", str((split["train"] + 0.5) / split["total"]),
            "--num-layers", "1", "--block-size", str(BLOCK), "--target-layer-ids", str(LAYER_ID),
            "--mask-token-id", str(MASK), "--draft-attn-impl", "sdpa", "--loss-implementation", "eager",
            "--total-seq-len", str(MICRO * MAX_LEN), "--num-workers", "0", "--prefetch-factor", "2",
            "--epochs", "1000", "--max-steps", str(job.steps), "--save-path", str(job.out / "ckpt"),
            "--log-dir", str(job.out / "logs"), "--seed", "0"]
    if job.setting == "method":
        # max_anchors counts per packed batch (about MICRO sequences), our num_anchors per sequence
        args += ["--max-anchors", str(MICRO * ANCHORS),"--full-attention-indices", "0", "--hidden-states-dtype", "float32",
                 "--loss-fn", "ce", "--dflash-decay-gamma", "7", "--per-position-loss-weight", "fixed-exp-decay",
                 "--optimizer", "adamw", "--weight-decay", "0", "--lr", "2e-3",
                 "--scheduler-type", "cosine", "--scheduler-warmup-ratio", "0.04"]
    return args


# -- SpecForge ---------------------------------------------------------------------------------------
def draft_config_json(target_dir: Path) -> dict:
    """Our draft's config.json (z-lab format), the shape all three tools train."""
    cfg = json.loads((target_dir / "config.json").read_text())
    return {"architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": cfg["hidden_size"],
            "intermediate_size": cfg["intermediate_size"], "num_hidden_layers": 1,
            "num_attention_heads": cfg["num_attention_heads"], "num_key_value_heads": cfg["num_key_value_heads"],
            "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"], "vocab_size": cfg["vocab_size"],
            "num_target_layers": cfg["num_hidden_layers"], "block_size": BLOCK, "rms_norm_eps": cfg["rms_norm_eps"],
            "rope_theta": cfg.get("rope_theta", 100000.0), "max_position_embeddings": cfg["max_position_embeddings"],
            "attention_bias": False, "hidden_act": "silu", "rope_scaling": None, "tie_word_embeddings": False,
            "use_sliding_window": False, "sliding_window": None, "layer_types": ["full_attention"],
            "max_window_layers": 1, "attention_dropout": 0.0, "dtype": "float32",
            "dflash_config": {"mask_token_id": MASK, "target_layer_ids": [LAYER_ID]}}


def specforge_config(job: Job) -> dict:
    target = Path(job.feats["peer_target"])
    draft_cfg = job.out / "draft-config.json"
    draft_cfg.write_text(json.dumps(draft_config_json(target), indent=1))
    training = {"strategy": "dflash", "num_epochs": 1000, "max_steps": job.steps, "batch_size": MICRO,
                "attention_backend": "sdpa", "fsdp_sharding": "NO_SHARD", "save_interval": 0, "log_interval": 1, "seed": 0}
    if job.setting == "method":
        training.update(learning_rate=2e-3, warmup_ratio=0.04, max_grad_norm=1.0, num_anchors=ANCHORS,
                        loss_decay_gamma=7.0, lr_scheduler="cosine")
    return {"model": {"target_model_path": str(target), "draft_model_config": str(draft_cfg),
                      "torch_dtype": "float32", "mask_token_id": MASK},
            "data": {"hidden_states_path": job.feats["specforge"], "max_length": MAX_LEN,
                     "dataloader_num_workers": 0, "cache_dir": str(job.out / "cache")},
            "training": training, "run_id": f"peers-{job.setting}", "output_dir": str(job.out / "output")}


def specforge_cmd(job: Job) -> list[str]:
    job.out.mkdir(parents=True, exist_ok=True)
    cfg = job.out / "specforge.yaml"
    cfg.write_text(yaml.safe_dump(specforge_config(job), sort_keys=False))
    return ["train", "-c", str(cfg)]


COMMANDS = {"ours": ours_cmd, "speculators": speculators_cmd, "specforge": specforge_cmd}
