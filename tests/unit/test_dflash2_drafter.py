"""The DFlash2 drafter: greedy lossless in the verify loop, its walk equal to the model's, the sampled
proposal's q equal to the softmax of the selector row, and the decoding sliding window."""

import pytest
import torch

from dflash_lab.decoding.dflash2_drafter import DFlash2Drafter, Proposal, drafter_for
from dflash_lab.decoding.drafters import DFlashDrafter
from dflash_lab.decoding.speculative import greedy_generate, speculative_generate
from dflash_lab.models.checkpoint import load_draft, save_draft
from dflash_lab.models.dflash2 import DFlash2DraftModel, build_dflash2_config
from dflash_lab.models.draft import windowed_attention
from dflash_lab.models.target import wrap_target
from dflash_lab.testing import tiny_model


def random_dflash2(target, seed=2, **cfg):
    cfg.setdefault("selector_rank", 8)
    cfg.setdefault("conv_group_size", 16)
    draft = DFlash2DraftModel(build_dflash2_config(target, num_layers=2, block_size=8, **cfg)).init_weights(seed, std=0.3)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a non-identity conv and a live selector
        for name, p in draft.named_parameters():
            if "_conv." in name or name.startswith("candidate_selector."):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return draft.eval()


def prompts(count, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1 + (i * 7) % 40,), generator=gen).tolist() for i in range(count)]


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_greedy_dflash2_decoding_is_lossless(kind, tmp_path):
    model = tiny_model(kind, seed=11, vocab_size=24)
    target = wrap_target(model, mask_token_id=3)
    draft = load_draft(save_draft(random_dflash2(target, selector_top_k=6), tmp_path / "d2"), target)  # the real path
    multi = 0
    for prompt in prompts(5, 24, seed=1):
        reference = greedy_generate(target, prompt, 30).output_ids
        drafter = drafter_for(draft, target)
        assert isinstance(drafter, DFlash2Drafter)
        result = speculative_generate(target, drafter, prompt, 30)
        assert result.output_ids == reference
        assert sum(result.cycle_acceptance) == 29 and max(result.cycle_acceptance) <= 8
        multi += sum(a > 1 for a in result.cycle_acceptance)
    assert multi > 0  # drafted tokens were really accepted, not only rejected


def test_drafter_walk_equals_the_model_walk_without_a_cache():
    target = wrap_target(tiny_model("qwen3", seed=3, vocab_size=48), mask_token_id=3)
    draft = random_dflash2(target)
    tokens = torch.randint(0, 48, (30,))
    _, feats = target.forward(tokens[None, :20], draft.target_layer_ids)
    drafter = DFlash2Drafter(draft, target)
    drafter.start(feats[:, :12], torch.arange(12)[None])
    drafter.propose(tokens, 12, 7)  # fills the cache with context 0..11
    drafter.commit(feats[:, 12:20], torch.arange(12, 20)[None])
    proposed = drafter.propose(tokens, 20, 7)
    block = torch.full((1, 8), 3)
    block[0, 0] = tokens[20]
    hidden = draft(target.embed(block), torch.arange(20, 28)[None], feats, torch.arange(20)[None])
    expected = draft.greedy_walk(hidden[:, 1:], tokens[20:21], target.lm_head)[0][0]
    assert torch.equal(proposed, expected)


def test_sampled_proposal_q_is_the_softmax_of_the_selector_row():
    target = wrap_target(tiny_model("qwen3", seed=3, vocab_size=48), mask_token_id=3)
    draft = random_dflash2(target)
    drafter = DFlash2Drafter(draft, target, temperature=0.7, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(5, 64)
    prop = drafter.sample_walk(hidden, 9, 0.7)
    assert isinstance(prop, Proposal) and prop.tokens.shape == (5,) and prop.q.shape == (5, 48)
    ids, unary = draft.candidates(hidden, target.lm_head)
    prev = 9
    for t in range(5):
        row = draft.selector_scores(hidden[t], unary[t], ids[t], torch.tensor([prev]))[0]
        expected = torch.zeros(48)
        expected[ids[t]] = torch.softmax(row / 0.7, -1)
        torch.testing.assert_close(prop.q[t], expected)  # zeros outside the 16 candidates
        assert int(prop.tokens[t]) in ids[t].tolist()
        prev = int(prop.tokens[t])
    # the first token's empirical distribution follows q[0] (its predecessor is fixed: the anchor)
    draws = torch.stack([drafter.sample_walk(hidden[:1], 9, 0.7).tokens[0] for _ in range(3000)])
    freq = torch.bincount(draws, minlength=48).float() / 3000
    assert 0.5 * (freq - prop.q[0]).abs().sum() < 0.05


def test_temperature_zero_is_the_greedy_walk():
    target = wrap_target(tiny_model("qwen3", seed=3, vocab_size=48), mask_token_id=3)
    draft = random_dflash2(target)
    tokens = torch.randint(0, 48, (20,))
    _, feats = target.forward(tokens[None, :12], draft.target_layer_ids)
    outs = []
    for temperature in (0.0, None):
        drafter = DFlash2Drafter(draft, target, temperature=0.0)
        drafter.start(feats, torch.arange(12)[None])
        outs.append(drafter.propose(tokens, 12, 7, temperature=temperature))
    assert torch.is_tensor(outs[0]) and torch.equal(outs[0], outs[1])


def test_windowed_decode_attention_matches_a_loop_mask_and_decoding_stays_lossless():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 5, 8)
    k_ctx, v_ctx = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    k_blk, v_blk = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    out = windowed_attention(q, k_ctx, v_ctx, k_blk, v_blk, 0.3, query_positions=torch.arange(30, 35)[None],
                             context_positions=torch.arange(30)[None], window=10)
    mask = torch.zeros(5, 35, dtype=torch.bool)
    for i in range(5):
        for j in range(35):
            mask[i, j] = (30 + i) - j < 10 if j < 30 else True
    k = torch.cat([k_ctx, k_blk], 2).repeat_interleave(2, 1)
    v = torch.cat([v_ctx, v_blk], 2).repeat_interleave(2, 1)
    scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v)
    # a window shorter than the prompt: still lossless (the verify loop guarantees it) and really used
    model = tiny_model("qwen3", seed=11, vocab_size=24)
    target = wrap_target(model, mask_token_id=3)
    windowed = random_dflash2(target, sliding_window=8)
    prompt = prompts(1, 24, seed=9)[0] * 3
    reference = greedy_generate(target, prompt, 20).output_ids
    assert speculative_generate(target, DFlash2Drafter(windowed, target), prompt, 20).output_ids == reference


def test_drafter_for_a_v1_draft_is_the_v1_drafter():
    from dflash_lab.models.draft import DFlashDraftModel, build_draft_config

    target = wrap_target(tiny_model("qwen3", seed=3, vocab_size=48), mask_token_id=3)
    v1 = DFlashDraftModel(build_draft_config(target, num_layers=1)).init_weights(0)
    assert type(drafter_for(v1, target)) is DFlashDrafter
