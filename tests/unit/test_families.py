"""Every target family (issue 22): tiny random targets from each family's own transformers config
class, with Gated DeltaNet layers (qwen3_5, qwen3_next), MoE blocks and sliding windows of 8 tokens
(gpt_oss, gemma3, gemma4, mistral), decoded past the window.

Lossless is checked two ways, both against the target run without any cache (so the reference does
not share the rollback code under test):
- greedy: the output equals the cacheless greedy continuation, token for token;
- every forward of the verify loop (greedy and sampled): the logits that decided each committed token
  equal the cacheless logits at that position. With exact logits, the sampling chain rule (checked in
  distribution by test_decoding_sampling.py) makes sampled decoding lossless for that family too.
"""

import pytest
import torch

from dflash_lab.decoding.dflash2_drafter import DFlash2Drafter
from dflash_lab.decoding.drafters import DFlashDrafter, NoDrafter, PromptLookupDrafter
from dflash_lab.decoding.sampling import SamplingParams
from dflash_lab.decoding.speculative import greedy_generate, speculative_generate
from dflash_lab.models.dflash2 import DFlash2DraftModel, build_dflash2_config
from dflash_lab.models.draft import DFlashDraftModel, build_draft_config
from dflash_lab.errors import DFlashLabError
from dflash_lab.models.target import full_attention_layers, wrap_target
from dflash_lab.testing import FAMILIES, TINY_SLIDING_WINDOW, tiny_model, tiny_tokenizer
from dflash_lab.train.trainer import init_from_target_layers

VOCAB = 40
BLOCK = 6
NEW_TOKENS = 28
PROMPT = [5, 9, 13, 5, 9, 13, 21, 30, 5, 9, 13, 22, 7, 7, 31, 5, 9]  # longer than the window, with repeats


@pytest.fixture(scope="module", params=FAMILIES)
def family_target(request):
    model = tiny_model(request.param, seed=7, vocab_size=VOCAB)
    return request.param, wrap_target(model, mask_token_id=VOCAB - 1)


def cacheless_logits(target, ids: list[int]) -> torch.Tensor:
    """The target's logits over `ids`, one forward, no cache: [len(ids), V]."""
    with torch.inference_mode():
        return target.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


def cacheless_greedy(target, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(cacheless_logits(target, ids)[-1].argmax()))
    return ids[len(prompt):]


class Recorder:
    """The target as the verify loop sees it; keeps the logits of the last forward that computed
    each absolute position (the ones that decided the token after it)."""

    def __init__(self, target):
        self._target, self.logits = target, {}

    def __getattr__(self, name):
        return getattr(self._target, name)

    def forward(self, input_ids, layer_ids=None, *, position_ids=None, logits_to_keep=0, **kwargs):
        logits, features = self._target.forward(input_ids, layer_ids, position_ids=position_ids,
                                                logits_to_keep=logits_to_keep, **kwargs)
        positions = position_ids[0, -logits.shape[1]:].tolist()
        for pos, row in zip(positions, logits[0].float()):
            self.logits[pos] = row
        return logits, features


class NoisyOracle(NoDrafter):
    """Proposes the true greedy continuation with some tokens corrupted: every accept length, full
    blocks included, occurs."""

    name = "noisy-oracle"

    def __init__(self, reference: list[int], num_prompt: int, seed: int):
        self.reference, self.num_prompt, self.block_size = reference, num_prompt, BLOCK
        self.gen = torch.Generator().manual_seed(seed)

    def propose(self, tokens, start, n):
        offset = start - self.num_prompt + 1
        truth = (self.reference[offset:offset + n] + [0] * n)[:n]
        proposal = torch.tensor(truth, dtype=torch.long)
        flip = torch.rand(n, generator=self.gen) < 0.1
        proposal[flip] = (proposal[flip] + 1) % VOCAB
        return proposal


def drafters_for(target, reference):
    v1 = DFlashDraftModel(build_draft_config(target, num_layers=1, block_size=BLOCK)).init_weights(seed=2, std=0.3)
    v2 = DFlash2DraftModel(build_dflash2_config(target, num_layers=1, block_size=BLOCK)).init_weights(seed=2)
    return [DFlashDrafter(v1, target), DFlash2Drafter(v2, target), PromptLookupDrafter(block_size=BLOCK),
            NoisyOracle(reference, len(PROMPT), seed=3)]


def assert_logits_exact(family, recorder, prompt, output):
    """Every logit row that decided a committed token equals the cacheless one (to float32 rounding:
    a Gated DeltaNet layer steps token by token in decoding and in chunks without a cache, about 3e-4
    apart here; a wrong rollback moves logits by whole units)."""
    sequence = list(prompt) + list(output)
    exact = cacheless_logits(recorder._target, sequence[:-1])
    for pos in range(len(prompt) - 1, len(sequence) - 1):
        assert torch.allclose(recorder.logits[pos], exact[pos], atol=2e-3, rtol=0), (family, pos)


def test_greedy_decoding_is_lossless_past_the_window(family_target):
    family, target = family_target
    assert len(PROMPT) + NEW_TOKENS > 3 * TINY_SLIDING_WINDOW
    reference = cacheless_greedy(target, PROMPT, NEW_TOKENS)
    assert greedy_generate(target, PROMPT, NEW_TOKENS).output_ids == reference, family
    accepted, rejected = 0, 0
    for drafter in drafters_for(target, reference):
        recorder = Recorder(target)
        result = speculative_generate(recorder, drafter, PROMPT, NEW_TOKENS)
        assert result.output_ids == reference, (family, drafter.name)
        assert_logits_exact(family, recorder, PROMPT, result.output_ids)
        accepted += sum(a == BLOCK for a in result.cycle_acceptance)
        rejected += sum(a < BLOCK for a in result.cycle_acceptance[:-1])
    assert accepted and rejected, (family, accepted, rejected)  # both full blocks and rollbacks were verified


@pytest.mark.parametrize("temperature", [0.8])
def test_sampled_decoding_uses_exact_target_distributions(family_target, temperature):
    family, target = family_target
    reference = cacheless_greedy(target, PROMPT, NEW_TOKENS)
    for seed, drafter in enumerate(drafters_for(target, reference)):
        recorder = Recorder(target)
        sampling = SamplingParams(temperature, top_k=8, seed=seed)
        result = speculative_generate(recorder, drafter, PROMPT, NEW_TOKENS, sampling=sampling)
        assert len(result.output_ids) == NEW_TOKENS
        assert_logits_exact(family, recorder, PROMPT, result.output_ids)


# -- training-side facts per family -------------------------------------------------------------------
def test_features_count_every_layer_whatever_its_kind(family_target):
    family, target = family_target
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        hidden = target.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(hidden) == target.num_layers + 1 == len(getattr(target.config, "layer_types", None) or hidden[1:]) + 1
    _, features = target.forward(ids, [0, target.num_layers - 2])
    assert torch.equal(features, torch.cat([hidden[1], hidden[target.num_layers - 1]], dim=-1)), family


def test_moe_routing_is_deterministic_in_eval_mode(family_target):
    family, target = family_target
    assert not target.model.training
    ids = torch.tensor([PROMPT])
    first, second = (target.forward(ids, [1])[1] for _ in range(2))
    assert torch.equal(first, second), family


def test_init_from_target_layers_copies_the_last_full_attention_layer(family_target):
    family, target = family_target
    draft = DFlashDraftModel(build_draft_config(target, num_layers=1, block_size=4)).init_weights(0)
    last = full_attention_layers(target.config)[-1]
    source = target.model.model.layers[last]
    if family in ("qwen3_5", "qwen3_next"):  # gated queries: q_proj twice as wide as a draft layer's
        with pytest.raises(DFlashLabError, match=f"target layer {last} .*q_proj"):
            init_from_target_layers(draft, target)
        return
    copied = init_from_target_layers(draft, target)
    assert "layers.0.self_attn.k_proj.weight" in copied and "layers.0.input_layernorm.weight" in copied
    assert torch.equal(draft.layers[0].self_attn.k_proj.weight, source.self_attn.k_proj.weight)
    x = torch.randn(3, target.hidden_size)  # the draft's norm does what the target's does, zero-centred or not
    assert torch.allclose(draft.layers[0].input_layernorm(x), source.input_layernorm(x), atol=1e-5), family
    two = DFlashDraftModel(build_draft_config(target, num_layers=2, block_size=4)).init_weights(0)
    if len(full_attention_layers(target.config)) < 2:
        with pytest.raises(DFlashLabError, match="only 1 full-attention"):
            init_from_target_layers(two, target)


def test_chat_template_thinking_switch_per_family():
    from dflash_lab.testing import THINKING_FAMILIES

    for family in FAMILIES:
        target = wrap_target(tiny_model("qwen3", layers=1), tokenizer=tiny_tokenizer(kind=family))
        rendered = target.render_prompt([{"role": "user", "content": "hi"}])
        assert ("<think>\n\n</think>" in rendered) == (family in THINKING_FAMILIES), family


def _multimodal(family, text_config):
    import transformers as T

    if family == "qwen3_5":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text_config.hidden_size)
        return T.Qwen3_5ForConditionalGeneration(T.Qwen3_5Config(text_config=text_config.to_dict(), vision_config=vision))
    if family == "gemma3":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)
        return T.Gemma3ForConditionalGeneration(T.Gemma3Config(text_config=text_config.to_dict(), vision_config=vision,
                                                               mm_tokens_per_image=4))
    return T.Gemma4ForConditionalGeneration(T.Gemma4Config(text_config=text_config.to_dict(), vision_config=None,
                                                           audio_config=None))


@pytest.mark.parametrize("family", ["qwen3_5", "gemma3", "gemma4"])
def test_multimodal_checkpoint_loads_its_text_model(family, tmp_path):
    """Published Qwen3.5 and Gemma 3/4 checkpoints are `...ForConditionalGeneration`: the target is
    their text model, with the same logits, and decodes losslessly."""
    from dflash_lab.models.target import load_target
    from dflash_lab.testing import tiny_config

    tokenizer = tiny_tokenizer(kind=family)
    torch.manual_seed(0)
    config = tiny_config(family, vocab_size=len(tokenizer) + 16)
    config.initializer_range = 0.2
    full = _multimodal(family, config).eval()
    full.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    target = load_target(tmp_path)
    assert type(target.model).__name__.endswith("ForCausalLM") and target.num_layers == config.num_hidden_layers
    assert not any(p.is_meta for p in target.model.parameters())
    assert target.vocab_size == len(tokenizer) + 16 and target.default_mask_token_id() == len(tokenizer)
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        assert torch.allclose(target.forward(ids)[0], full(input_ids=ids).logits, atol=1e-5)
    reference = cacheless_greedy(target, PROMPT, 12)
    assert speculative_generate(target, PromptLookupDrafter(BLOCK), PROMPT, 12).output_ids == reference


# -- plan: MoE and hybrid targets ---------------------------------------------------------------------
def _plan_step(config):
    from dflash_lab.plan import measure_step
    from dflash_lab.plan.memory import _model_bytes
    from dflash_lab.train.recipe import parse_recipe

    recipe = parse_recipe({"target": {"name": "tiny"}, "draft": {"num_layers": 1, "block_size": 4, "mask_token_id": 5},
                           "data": {"max_length": 96, "num_anchors": 4}, "train": {"micro_batch": 1, "global_batch": 1}})
    return measure_step(recipe, 1, target_cfg=config), _model_bytes(recipe, config)


def test_plan_counts_all_experts_memory_and_active_experts_flops():
    from dflash_lab.testing import tiny_config
    from dflash_lab.plan import target_layer_kinds

    moe = tiny_config("qwen3_moe", vocab_size=VOCAB)  # 4 experts of width 32, 2 active
    dense_active = tiny_config("qwen3", vocab_size=VOCAB, intermediate=2 * moe.moe_intermediate_size)
    dense_all = tiny_config("qwen3", vocab_size=VOCAB, intermediate=4 * moe.moe_intermediate_size)
    (moe_step, moe_bytes), (active_step, _), (_, all_bytes) = (_plan_step(c) for c in (moe, dense_active, dense_all))
    router = moe_bytes["target"] - all_bytes["target"]
    assert 0 < router < 0.02 * all_bytes["target"]  # weights: every expert (plus the small router)
    assert active_step.flops_target < moe_step.flops_target < 1.05 * active_step.flops_target  # FLOPs: the active ones
    assert target_layer_kinds(moe)["experts"] == {"total": 4, "active_per_token": 2}
    gpt_oss_step, _ = _plan_step(tiny_config("gpt_oss", vocab_size=VOCAB))
    assert gpt_oss_step.flops_target > active_step.flops_target * 0.8


def test_plan_counts_the_linear_attention_layers():
    from dflash_lab.testing import tiny_config
    from dflash_lab.plan import target_layer_kinds

    hybrid = tiny_config("qwen3_5", vocab_size=VOCAB)
    step, sizes = _plan_step(hybrid)
    tokens = 96
    assert step.flops_target > 2 * tokens * (sizes["target"] // 2)  # bf16 bytes / 2 = parameters, all of them dense
    assert target_layer_kinds(hybrid) == {"linear_attention": 4, "full_attention": 2}


# -- recipes: the target they were written for --------------------------------------------------------
def test_family_recipes_name_their_target_and_plan_config_matches():
    from pathlib import Path

    from dflash_lab.models.target import check_recipe_target
    from dflash_lab.plan import target_config
    from dflash_lab.train.recipe import load_recipe

    root = Path(__file__).resolve().parents[2] / "recipes"
    expected = {"qwen3.5-4b/dflash2-b8.yaml": ("dflash2", 8), "qwen3.5-4b/v1-b16.yaml": ("dflash", 16),
                "qwen3-8b/m2.yaml": ("dflash", 16)}
    for name, (arch, block) in expected.items():
        recipe = load_recipe(root / name)
        assert (recipe.draft.arch, recipe.draft.block_size) == (arch, block), name
        config = target_config(recipe.target.name)  # built in: plan runs without the checkpoint
        check_recipe_target(config, recipe.target.family, recipe.target.num_layers, recipe.target.name)
    hybrid = target_config("Qwen/Qwen3.5-4B")
    assert hybrid.layer_types.count("full_attention") == 8 and full_attention_layers(hybrid)[-1] == 31


def test_recipe_for_another_family_or_layer_count_is_refused(tmp_path, capsys):
    from dflash_lab.cli import main
    from dflash_lab.testing import tiny_target_dir

    target = tiny_target_dir(tmp_path / "t", kind="qwen3")
    capsys.readouterr()
    for target_fields, message in [("family: qwen3_5_text", "recipe is for target.family qwen3_5_text, but this target "
                                                            "is qwen3"),
                                   ("family: qwen3, num_layers: 32", "a target of 32 layers (target.num_layers), "
                                                                     "this one has 6")]:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"target: {{name: {target}, {target_fields}}}\ndraft: {{num_layers: 1, block_size: 4}}\n"
                          "data: {max_length: 64, num_anchors: 4}\ntrain: {micro_batch: 1, global_batch: 1}\n")
        assert main(["plan", "--config", str(recipe), "--gpus", "1", "--gpu-memory", "80GB"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: target") and message in err and "Traceback" not in err, err
    data = tmp_path / "labels"
    write = data / "shard-00000.jsonl"
    data.mkdir()
    write.write_text('{"id": "a", "messages": [{"role": "user", "content": "hi"}, '
                     '{"role": "assistant", "content": "hello there"}]}\n')
    assert main(["train", "--config", str(recipe), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 2
    assert "this one has 6" in capsys.readouterr().err
