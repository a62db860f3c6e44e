"""Each tool's trained draft as a draft directory of ours (z-lab format: config.json + model.safetensors).

- ours: the run's `checkpoints/final` as it is.
- SpecForge: `specforge export --to hf` (its own command, in its venv) writes the z-lab format.
- speculators: exports only its own format, whose tensor names already are z-lab's (`fc`,
  `hidden_norm`, `layers.N.*`, `norm`); `speculators_to_ours` checks the decoder config against
  our draft config and rewrites config.json (weights cast to fp32, the frozen tensors dropped).
Each result is loaded by our `load_draft` against the target before it counts.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# decoder-config keys that must agree between speculators' transformer_layer_config and our config
_SAME = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
         "rms_norm_eps", "hidden_act")


def _rope_theta(cfg: dict) -> float | None:
    return cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")


def speculators_to_ours(ckpt: Path, draft_config: dict, out: Path) -> Path:
    """Convert a speculators DFlash checkpoint dir; `draft_config` is our config.json for the shape."""
    spec = json.loads((ckpt / "config.json").read_text())
    layer = spec["transformer_layer_config"]
    problems = [f"{k}: speculators {layer.get(k)} vs ours {draft_config[k]}" for k in _SAME
                if layer.get(k) != draft_config[k]]
    if _rope_theta(layer) != draft_config["rope_theta"]:
        problems.append(f"rope_theta: speculators {_rope_theta(layer)} vs ours {draft_config['rope_theta']}")
    for key, ours in (("block_size", draft_config["block_size"]), ("mask_token_id", draft_config["dflash_config"]["mask_token_id"]),
                      ("aux_hidden_state_layer_ids", draft_config["dflash_config"]["target_layer_ids"])):
        if spec.get(key) != ours:
            problems.append(f"{key}: speculators {spec.get(key)} vs ours {ours}")
    if spec.get("draft_vocab_size") not in (None, draft_config["vocab_size"]):
        problems.append("a reduced draft vocabulary (d2t/t2d) has no equivalent in our format")
    if problems:
        raise ValueError(f"{ckpt}: not convertible to the draft shape asked for: {'; '.join(problems)}")
    frozen = ("embed_tokens.", "lm_head.", "verifier_", "rotary_emb.")
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as handle:
        tensors = {n: handle.get_tensor(n).to(torch.float32).contiguous() for n in handle.keys()
                   if not n.startswith(frozen)}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(draft_config, indent=1))
    return out


def latest_speculators_checkpoint(save_path: Path) -> Path:
    """The checkpoint dir written last (the run ends with the checkpoint of its last epoch)."""
    dirs = [d for d in save_path.iterdir() if (d / "model.safetensors").exists()]
    if not dirs:
        raise FileNotFoundError(f"{save_path}: no speculators checkpoint (model.safetensors)")
    return max(dirs, key=lambda d: (d / "model.safetensors").stat().st_mtime)


def specforge_export(python: str, job_out: Path, target_dir: str) -> Path:
    """`specforge export --to hf` of the run's last checkpoint, under SpecForge's own python."""
    out_dir = job_out / "output"
    ckpts = sorted((d for d in out_dir.iterdir() if "-step" in d.name), key=lambda d: int(d.name.rsplit("step", 1)[1]))
    if not ckpts:
        raise FileNotFoundError(f"{out_dir}: no SpecForge checkpoint (*-stepN)")
    export = job_out / "export"
    cmd = [str(Path(python).with_name("specforge")), "export", "--to", "hf", "--checkpoint", str(ckpts[-1]),
           "--draft-config", str(job_out / "draft-config.json"), "--output-dir", str(export),
           "--embedding-source", target_dir]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return export
