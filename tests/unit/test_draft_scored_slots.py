"""`DFlashDraftModel.forward(output_slots=...)`: only the scored slots go through the last layer's
query, attention output, o_proj, MLP and final norm; the result (values and every gradient) equals
the rows of the full computation."""

import pytest
import torch

from dflash_lab.models.draft import DFlashDraftModel, DraftConfig
from dflash_lab.train import blocks as Bk


def _setup(layers, seed=0):
    cfg = DraftConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, vocab_size=50, num_target_layers=4, mask_token_id=49,
                      target_layer_ids=[1, 2], block_size=5)
    draft = DFlashDraftModel(cfg).init_weights(seed).double()
    g = torch.Generator().manual_seed(seed)
    s, anchors = 24, torch.tensor([[2, 9, 15, 20], [4, 11, 0, 0]])  # the second sequence has 2 padding anchors
    n, a = anchors.shape
    features = torch.randn(n, s, 64, generator=g, dtype=torch.float64)
    noise = torch.randn(n, a * 5, 32, generator=g, dtype=torch.float64)
    positions = (anchors[:, :, None] + torch.arange(5)).view(n, -1)
    # scored: slots 1..3 where valid; block 1 of sequence 1 cut at slot 2; padding blocks none
    scored = torch.zeros(n, a, 5, dtype=torch.bool)
    scored[:, :, 1:4] = True
    scored[1, 1, 2:] = False
    scored[1, 2:] = False
    return draft, anchors, features, noise, positions, scored.view(n, a * 5), torch.arange(s)[None].expand(n, s)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("anchor_chunk", [1, 64])
def test_scored_slots_equal_rows_of_the_full_output_values_and_gradients(layers, anchor_chunk):
    draft, anchors, features, noise, positions, scored, ctx_pos = _setup(layers)
    attn = Bk.make_attention("chunked", anchors, 5, anchor_chunk)
    weights = torch.randn(int(scored.sum()), 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    results = []
    for mode in ("full", "scored"):
        draft.zero_grad()
        f, nz = features.clone().requires_grad_(True), noise.clone().requires_grad_(True)
        if mode == "full":
            out = draft(nz, positions, f, ctx_pos, attention=attn)[scored]
        else:
            out = draft(nz, positions, f, ctx_pos, attention=attn, output_slots=scored)
        (out * weights).sum().backward()
        grads = {k: p.grad.clone() for k, p in draft.named_parameters()}
        results.append((out.detach(), grads, f.grad, nz.grad))
    (full, g_full, f_full, n_full), (part, g_part, f_part, n_part) = results
    assert part.shape == (int(scored.sum()), 32)
    assert torch.allclose(part, full, atol=1e-12)
    for k in g_full:
        assert torch.allclose(g_part[k], g_full[k], atol=1e-12), k
    assert torch.allclose(f_part, f_full, atol=1e-12) and torch.allclose(n_part, n_full, atol=1e-12)
    # unscored slots still feed keys and values: their inputs get gradient through the last layer
    assert n_part.view(2, 4, 5, 32)[0, :, 4].abs().sum() > 0


def test_scored_slots_with_flex_forward_and_no_scored_slot():
    draft, anchors, features, noise, positions, scored, ctx_pos = _setup(2)
    draft = draft.float()
    features, noise = features.float(), noise.float()
    flex = Bk.make_attention("flex", anchors, 5)
    with torch.no_grad():
        full = draft(noise, positions, features, ctx_pos, attention=Bk.make_attention("chunked", anchors, 5))
        part = draft(noise, positions, features, ctx_pos, attention=flex, output_slots=scored)
        none = draft(noise, positions, features, ctx_pos, attention=flex, output_slots=torch.zeros_like(scored))
    assert torch.allclose(part, full[scored], atol=1e-5)
    assert flex.masks_built == 2  # all slots (layer 1) and the scored slots (last layer), each once
    assert none.shape == (0, 32)
