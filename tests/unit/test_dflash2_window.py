"""DFlash2's sliding window in training (blocks rule 4) equals the window it is served with.

The training forward (all blocks of a sequence at once, chunked or flex attention) must give each
block exactly the hidden states that decoding that block alone gives: with the whole context and a
position mask, and incrementally through the cache, which keeps only the last W - 1 positions. The
masks themselves are checked against triple loops in test_train_blocks.py; here the whole DFlash2
draft (conv and selector live) is checked end to end, and a window wider than every context must
equal the draft without one exactly."""

import pytest
import torch

from dflash_lab.models.dflash2 import DFlash2DraftModel, build_dflash2_config
from dflash_lab.models.draft import DraftCache
from dflash_lab.models.target import wrap_target
from dflash_lab.testing import tiny_model
from dflash_lab.train import blocks as B

BLOCK, CONTEXT, WINDOW = 8, 40, 11
ANCHORS = torch.tensor([[3, 17, 31]])  # 3: inside the window; 17 and 31: context leaves it


def _target():
    return wrap_target(tiny_model("qwen3", seed=5, vocab_size=64), mask_token_id=3)


def _draft(target, **window) -> DFlash2DraftModel:
    cfg = build_dflash2_config(target, num_layers=2, block_size=BLOCK, selector_rank=8, **window)
    draft = DFlash2DraftModel(cfg).init_weights(seed=1, std=0.2)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a live conv: slots mix along the block, so a wrong slot position shows
        for name, p in draft.named_parameters():
            if "_conv." in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return draft.double().eval()


def _inputs(draft, target):
    gen = torch.Generator().manual_seed(0)
    n_features = len(draft.config.target_layer_ids) * draft.config.hidden_size
    features = torch.randn(1, CONTEXT, n_features, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 60, (CONTEXT,), generator=gen)
    block_ids, positions, _, _ = B.build_blocks(ids, torch.ones(CONTEXT), ANCHORS[0], BLOCK, draft.config.mask_token_id)
    noise = target.embed(block_ids.view(1, -1)).double()
    return noise, positions.view(1, -1), features


def _training(draft, noise, positions, features, kind):
    if kind == "flex":  # the GPU path's attention, forward on CPU (uncompiled)
        attn = B.FlexBlockAttention(ANCHORS, BLOCK, compiled=False)
    else:
        attn = B.make_attention("chunked", ANCHORS, BLOCK, anchor_chunk=2)
    with torch.no_grad():
        return draft(noise, positions, features, torch.arange(CONTEXT)[None], attention=attn)


@pytest.mark.parametrize("kind", ["chunked", "flex"])
def test_training_window_equals_decoding_each_block_alone_and_through_the_cache(kind):
    target = _target()
    draft = _draft(target, sliding_window=WINDOW)
    assert [layer.self_attn.window for layer in draft.layers] == [WINDOW, WINDOW]
    noise, positions, features = _inputs(draft, target)
    trained = _training(draft, noise, positions, features, kind)
    unwindowed = _training(_draft(target, use_sliding_window=False), noise, positions, features, kind)
    assert torch.allclose(trained[:, :BLOCK], unwindowed[:, :BLOCK], atol=1e-10)  # anchor 3: all inside
    assert not torch.allclose(trained[:, BLOCK:], unwindowed[:, BLOCK:], atol=1e-3)  # the window bites
    cache, fed = DraftCache(len(draft.layers)), 0
    with torch.no_grad():
        for a, p in enumerate(ANCHORS[0].tolist()):
            sl = slice(a * BLOCK, (a + 1) * BLOCK)
            alone = draft(noise[:, sl], positions[:, sl], features[:, :p], torch.arange(p)[None])
            assert torch.allclose(trained[:, sl], alone, atol=1e-10), f"anchor {p}"
            stepped = draft(noise[:, sl], positions[:, sl], features[:, fed:p], torch.arange(fed, p)[None],
                            cache=cache)
            fed = p
            assert torch.allclose(trained[:, sl], stepped, atol=1e-10), f"anchor {p} (cache)"
            for i in range(len(draft.layers)):  # what block p can still see: positions > p - W
                assert cache.positions[i][0].tolist() == list(range(max(0, p - WINDOW + 1), p))


def test_a_window_wider_than_every_context_is_no_window():
    target = _target()
    noise, positions, features = _inputs(_draft(target), target)
    wide = _training(_draft(target, sliding_window=10_000), noise, positions, features, "chunked")
    off = _training(_draft(target, use_sliding_window=False), noise, positions, features, "chunked")
    assert torch.equal(wide, off)


def test_activation_checkpointing_keeps_the_dflash2_gradients():
    """The DFlash2 layers run through v1's layer loop, so `activation_checkpointing` recomputes them."""
    target = _target()
    noise, positions, features = _inputs(_draft(target), target)
    attn = B.make_attention("chunked", ANCHORS, BLOCK)
    grads = []
    for flag in (False, True):
        draft = _draft(target, sliding_window=WINDOW).train()
        draft.activation_checkpointing = flag
        calls = []
        draft.layers[0].mlp.register_forward_hook(lambda *_: calls.append(1))
        out = draft(noise, positions, features, torch.arange(CONTEXT)[None], attention=attn)
        out.square().sum().backward()
        assert len(calls) == (2 if flag else 1)  # checkpointed: the layer runs again in backward
        grads.append({n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("_conv." in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
