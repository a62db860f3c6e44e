"""Issue 21 item 1: HF directories we write use the usual tied-checkpoint layout (architectures set,
the tied tensor under the embedding's name), and an old-layout embedded cache is upgraded in place
with its fingerprint kept."""

import json

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from dflash_lab.models import embedded as E
from dflash_lab.models.target import _dir_fingerprint, load_target
from dflash_lab.testing import tiny_model, tiny_target_dir


def _check_usual_layout(path):
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert E._safetensors_names(path / "model.safetensors") >= {E.EMBED_NAME}
    assert E.HEAD_NAME not in E._safetensors_names(path / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _old_layout_copy(src, dst):
    """What `models fetch` wrote before issue 21: architectures null, the tied tensor only as
    lm_head.weight (safetensors' save_model kept that name)."""
    dst.mkdir()
    for file in src.iterdir():
        if file.name not in ("config.json", "model.safetensors"):
            (dst / file.name).write_bytes(file.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = None
    (dst / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != E.EMBED_NAME}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"model.embed_tokens.weight": "lm_head.weight"})
    (dst / "dflash_lab.json").write_text(json.dumps({"name": "tiny", "mask_token_id": 3}))


def test_write_hf_weights_stores_a_tied_model_in_the_usual_layout(tmp_path):
    model = tiny_model("llama")
    config = model.config.to_dict()
    config.pop("architectures", None)  # a GGUF-loaded config has none
    E.write_hf_weights(model, config, tmp_path)
    loaded = _check_usual_layout(tmp_path)
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_old_layout_cache_is_upgraded_on_next_use_with_its_fingerprint_kept(tmp_path):
    src = tiny_target_dir(tmp_path / "src", "llama")
    old = tmp_path / "old"
    _old_layout_copy(src, old)
    assert E.needs_upgrade(old)
    before = _dir_fingerprint(old)
    reference = load_target(src, dtype="float32")
    assert E.upgrade_layout(old) is True
    assert not E.needs_upgrade(old) and E.upgrade_layout(old) is False  # once only
    loaded = _check_usual_layout(old)
    ours = load_target(old, dtype="float32")
    assert ours.fingerprint == before  # same weights: features, labels and results stay valid
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.equal(loaded(ids).logits, reference.model(ids).logits)
    assert torch.equal(ours.model(ids).logits, reference.model(ids).logits)


def test_fetch_upgrades_an_old_embedded_cache_without_downloading(tmp_path, monkeypatch):
    src = tiny_target_dir(tmp_path / "src", "llama")
    monkeypatch.setenv("DFLASH_LAB_HOME", str(tmp_path / "home"))
    cache = E.model_dir("smollm2-135m-instruct")
    cache.parent.mkdir(parents=True)
    _old_layout_copy(src, cache)
    monkeypatch.setattr(E, "_download_gguf", lambda *a: (_ for _ in ()).throw(AssertionError("downloaded")))
    assert E.fetch("smollm2-135m-instruct", quiet=True, gguf=False) == cache
    _check_usual_layout(cache)
