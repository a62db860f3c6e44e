"""One set of target features from the labelled records, in each tool's format.

The same tokens for all three: our tokenizer path (`tokenize_records`, the chat template, the
response + end-of-turn loss mask, `max_length`), split into train / held-out exactly as our trainer
splits (`split_heldout`, the recipe's heldout settings and seed). The features come from HF
transformers on the embedded target, layer ids `layer_ids` (`hidden_states[i + 1]`):

- speculators: a `datasets` Arrow dir (`input_ids`, `loss_mask`, `seq_len`; torch format) with
  `hidden_states/hs_{i}.safetensors` = {"hidden_states": [S, n + 1, H] (the taps, then the last
  layer's output before the final norm: speculators applies the verifier's norm itself),
  "token_ids": [S]}; rows = train then held-out (its `train_data_ratio` puts the cut between them).
- SpecForge: offline `data_{i}.ckpt` = torch.save({"input_ids": [S], "loss_mask": [S],
  "hidden_states": [S, n * H]}) (their `.ckpt` format; we only write it), train rows only.
- ours: the trainer's feature cache, pre-filled by our own `FeatureSource` (so no tool pays for
  target forwards inside its measured training time).

Both peers also need an `lm_head.weight` the tied SmolLM2 checkpoint lacks: `peer_target_dir`
writes a copy of the HF dir with it (= the embedding).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

TARGET = "smollm2-135m-instruct"


@dataclass
class FeatureSet:
    layer_ids: list[int]
    max_length: int = 384
    heldout: float = 0.05
    heldout_max: int = 8
    seed: int = 0


def split_samples(target, labels: Path, fs: FeatureSet):
    """(train, held-out) samples as our trainer splits them."""
    from dflash_lab.train.data import read_records, split_heldout, tokenize_records

    samples, _ = tokenize_records(target, read_records(labels), fs.max_length)
    return split_heldout(samples, fs.heldout, fs.heldout_max, fs.seed)


@torch.no_grad()
def hf_features(hf_model, input_ids: list[int], layer_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(taps [S, n*H], last layer's output before the final norm [S, H]) in fp32."""
    captured = {}
    hook = hf_model.model.layers[-1].register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("last", out[0] if isinstance(out, tuple) else out))
    try:
        out = hf_model(torch.tensor([input_ids]), output_hidden_states=True)
    finally:
        hook.remove()
    taps = torch.cat([out.hidden_states[i + 1][0] for i in layer_ids], dim=-1)
    return taps.float().contiguous(), captured["last"][0].float().contiguous()


def peer_target_dir(src: Path, dst: Path) -> Path:
    """The HF dir with an explicit lm_head.weight (tied in SmolLM2; both peers read it by name)."""
    from safetensors.torch import load_file, save_file

    if (dst / "model.safetensors").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix in (".json", ".jinja") and f.name != "dflash_lab.json":
            shutil.copy(f, dst / f.name)
    state = load_file(str(src / "model.safetensors"))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def write_speculators(out: Path, rows: list[tuple], n_train: int) -> Path:
    from datasets import Dataset
    from safetensors.torch import save_file

    (out / "hidden_states").mkdir(parents=True, exist_ok=True)
    for i, (ids, _mask, taps, last) in enumerate(rows):
        n = taps.shape[1] // last.shape[1]
        stacked = torch.cat([taps.view(len(ids), n, -1), last.unsqueeze(1)], dim=1)
        save_file({"hidden_states": stacked.contiguous(), "token_ids": torch.tensor(ids, dtype=torch.long)},
                  str(out / "hidden_states" / f"hs_{i}.safetensors"))
    ds = Dataset.from_dict({"input_ids": [r[0] for r in rows], "loss_mask": [r[1] for r in rows],
                            "seq_len": [len(r[0]) for r in rows]})
    ds.set_format("torch")
    ds.save_to_disk(str(out / "dataset"))
    (out / "split.json").write_text(json.dumps({"train": n_train, "total": len(rows)}))
    return out


def write_specforge(out: Path, rows: list[tuple]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for i, (ids, mask, taps, _last) in enumerate(rows):
        # their offline format is a torch.save'd dict of tensors; we write it, never read one back
        torch.save({"input_ids": torch.tensor(ids, dtype=torch.long), "loss_mask": torch.tensor(mask, dtype=torch.long),
                    "hidden_states": taps.contiguous()}, out / f"data_{i:05d}.ckpt")
    return out


def fill_our_cache(target, samples, layer_ids: list[int], cache_dir: Path, dtype: str) -> None:
    from dflash_lab.train.data import FeatureCache
    from dflash_lab.train.trainer import FeatureSource

    cache = FeatureCache(cache_dir, target.fingerprint, layer_ids, dtype)
    src = FeatureSource(target, layer_ids, False, cache, torch.device("cpu"))
    for s in samples:
        src.get([s])


def build_features(work: Path, labels: Path, fs: FeatureSet) -> dict:
    """Write every tool's features under work/features (idempotent: a done.json marks it)."""
    from transformers import AutoModelForCausalLM

    from dflash_lab.models.target import load_target

    root = work / "features"
    done = root / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    target = load_target(TARGET, dtype="float32")
    train, held = split_samples(target, labels, fs)
    hf_src = _embedded_hf_dir()
    hf = AutoModelForCausalLM.from_pretrained(str(hf_src), dtype=torch.float32).eval()
    rows = [(s.input_ids, s.loss_mask, *hf_features(hf, s.input_ids, fs.layer_ids)) for s in train + held]
    info = {
        "layer_ids": fs.layer_ids, "train": len(train), "heldout": len(held),
        "train_ids": [s.id for s in train], "heldout_ids": [s.id for s in held],
        "peer_target": str(peer_target_dir(hf_src, root / "peer-target")),
        "speculators": str(write_speculators(root / "speculators", rows, len(train))),
        "specforge": str(write_specforge(root / "specforge", rows[:len(train)])),
    }
    for dtype in ("float32", "bfloat16"):
        fill_our_cache(target, train + held, fs.layer_ids, root / f"ours-cache-{dtype}", dtype)
        info[f"ours_cache_{dtype}"] = str(root / f"ours-cache-{dtype}")
    done.write_text(json.dumps(info, indent=1))
    return info


def _embedded_hf_dir() -> Path:
    from dflash_lab.models.embedded import fetch

    return Path(fetch(TARGET, quiet=True))
