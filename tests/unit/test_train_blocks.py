"""Anchors, block inputs, labels, and the training attention against a plain triple loop."""

import pytest
import torch

from dflash_lab.train import blocks as Bk

MASK = 99


def test_reference_mask_rules_by_hand():
    # anchors at 2 and 3, context of 5 tokens, blocks of 2: keys [c0..c4 ; b0s0 b0s1 b1s0 b1s1]
    m = Bk.reference_mask([2, 3], 5, 2)
    T, F = True, False
    assert m[0] == [T, T, F, F, F, T, T, F, F]  # context strictly below 2, own block only
    assert m[1] == [T, T, F, F, F, T, T, F, F]  # every slot of a block sees the same keys
    assert m[2] == [T, T, T, F, F, F, F, T, T]  # anchor 3: c0..c2, NOT its own position 3
    assert m[3] == m[2]


def test_blocks_and_labels():
    ids = torch.arange(100, 112)  # 12 tokens
    mask = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1])  # a gap at 10 (e.g. a template token)
    anchors = torch.tensor([3, 5, 8])
    block_ids, pos, labels, valid = Bk.build_blocks(ids, mask, anchors, 4, MASK)
    assert block_ids.tolist() == [[103, MASK, MASK, MASK], [105, MASK, MASK, MASK], [108, MASK, MASK, MASK]]
    assert pos.tolist() == [[3, 4, 5, 6], [5, 6, 7, 8], [8, 9, 10, 11]]
    for a, p in enumerate(anchors.tolist()):
        for k in range(4):
            expected_valid = k >= 1 and p + k < 12 and bool(mask[p + k])
            assert bool(valid[a, k]) == expected_valid
            if expected_valid:
                assert labels[a, k] == ids[p + k]  # same-position labels, not shifted
    # the end of the sequence
    _, _, _, valid = Bk.build_blocks(ids, mask, torch.tensor([10]), 4, MASK)
    assert valid.tolist() == [[False, True, False, False]]


def test_sample_anchors():
    mask = torch.tensor([0] * 5 + [1] * 20 + [0] * 3)
    cand = Bk.anchor_candidates(mask)
    assert cand.tolist() == list(range(5, 24))  # p and p+1 supervised: not the last prompt token (4)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a1, a2 = Bk.sample_anchors(mask, 7, g1), Bk.sample_anchors(mask, 7, g2)
    assert a1.tolist() == a2.tolist() and len(set(a1.tolist())) == 7
    assert a1.tolist() == sorted(a1.tolist()) and set(a1.tolist()) <= set(cand.tolist())
    assert Bk.sample_anchors(mask, 100, g1).tolist() == cand.tolist()  # fewer if short
    assert Bk.sample_anchors(mask, 7, torch.Generator().manual_seed(4)).tolist() != a1.tolist()


def test_anchor_candidates_against_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 30, (1,), generator=g))
        mask = (torch.rand(n, generator=g) < 0.6).long()
        expected = [p for p in range(n - 1) if mask[p] == 1 and mask[p + 1] == 1]
        assert Bk.anchor_candidates(mask).tolist() == expected
    # the last prompt token is never an anchor, even though the token after it is supervised
    prompt_then_response = torch.tensor([0, 0, 0, 1, 1, 1])
    assert Bk.anchor_candidates(prompt_then_response).tolist() == [3, 4]
    assert Bk.anchor_candidates(torch.tensor([0, 1])).tolist() == []


def _random_attention_inputs(seed=0, n=2, h=4, kv=2, d=8, s=23, block=4, anchors=((3, 7, 8, 15, 20), (5, 9, 0, 0, 0))):
    g = torch.Generator().manual_seed(seed)
    anchor_pos = torch.tensor(anchors)
    q_len = anchor_pos.shape[1] * block
    q = torch.randn(n, h, q_len, d, generator=g, dtype=torch.float64)
    k_ctx, v_ctx = (torch.randn(n, kv, s, d, generator=g, dtype=torch.float64) for _ in range(2))
    k_blk, v_blk = (torch.randn(n, kv, q_len, d, generator=g, dtype=torch.float64) for _ in range(2))
    return (q, k_ctx, v_ctx, k_blk, v_blk), anchor_pos, block


@pytest.mark.parametrize("anchor_chunk", [1, 2, 64])
def test_chunked_attention_matches_triple_loop(anchor_chunk):
    tensors, anchor_pos, block = _random_attention_inputs()
    tensors_ref = [t.clone().requires_grad_(True) for t in tensors]
    tensors_our = [t.clone().requires_grad_(True) for t in tensors]
    scale = 8 ** -0.5
    ref = Bk.dense_reference_attention(*tensors_ref, scale, anchor_pos=anchor_pos, block_size=block)
    got = Bk.chunked_block_attention(*tensors_our, scale, anchor_pos=anchor_pos, block_size=block, anchor_chunk=anchor_chunk)
    assert torch.allclose(got, ref, atol=1e-12)
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (ref * weights).sum().backward()
    (got * weights).sum().backward()
    for a, b in zip(tensors_our, tensors_ref):
        assert torch.allclose(a.grad, b.grad, atol=1e-12)


def test_attention_ignores_future_context_and_other_blocks():
    """Changing keys a query must not see leaves its output unchanged (and changing one it sees does not)."""
    tensors, anchor_pos, block = _random_attention_inputs(n=1, anchors=((6, 10),))
    q, k_ctx, v_ctx, k_blk, v_blk = tensors
    base = Bk.chunked_block_attention(*tensors, 0.3, anchor_pos=anchor_pos, block_size=block)
    v2 = v_ctx.clone()
    v2[:, :, 6:] += 5.0  # positions >= 6: invisible to anchor 6, partly visible to anchor 10
    out = Bk.chunked_block_attention(q, k_ctx, v2, k_blk, v_blk, 0.3, anchor_pos=anchor_pos, block_size=block)
    assert torch.allclose(out[:, :, :block], base[:, :, :block])
    assert not torch.allclose(out[:, :, block:], base[:, :, block:])
    vb2 = v_blk.clone()
    vb2[:, :, block:] += 5.0  # the second block's values
    out = Bk.chunked_block_attention(q, k_ctx, v_ctx, k_blk, vb2, 0.3, anchor_pos=anchor_pos, block_size=block)
    assert torch.allclose(out[:, :, :block], base[:, :, :block])


def _select_query_slots(x, anchors, block, slots):
    """[N, h, A*B, d] -> [N, h, A*len(slots), d]: the given slots of every block."""
    n, h, _, d = x.shape
    return x.view(n, h, anchors, block, d)[:, :, :, slots].reshape(n, h, -1, d)


@pytest.mark.parametrize("anchor_chunk", [1, 64])
def test_chunked_attention_with_fewer_query_slots_equals_full_rows(anchor_chunk):
    """Queries for only some slots of each block (the last layer's scored slots) give exactly the
    rows of the full computation; keys and values still come from every slot."""
    tensors, anchor_pos, block = _random_attention_inputs()
    q = tensors[0]
    full = Bk.chunked_block_attention(*tensors, 0.3, anchor_pos=anchor_pos, block_size=block, anchor_chunk=anchor_chunk)
    slots = [1, 2]
    part = Bk.chunked_block_attention(_select_query_slots(q, 5, block, slots), *tensors[1:], 0.3,
                                      anchor_pos=anchor_pos, block_size=block, anchor_chunk=anchor_chunk)
    assert torch.allclose(part, _select_query_slots(full, 5, block, slots), atol=1e-12)


def _large_layout(slots_per_block=16):
    """Enough queries and keys for several 128-blocks each way, a padding anchor (p = 0) at the end."""
    anchors = torch.tensor([[5, 40, 41, 100, 130, 131, 140, 150, 160, 170, 180, 190, 200, 210, 220, 230,
                             240, 250, 260, 261, 270, 280, 290, 299],
                            [0, 1, 2, 127, 128, 129, 140, 141, 150, 151, 152, 153, 256, 257, 258, 259,
                             260, 261, 262, 263, 0, 0, 0, 0]])
    return anchors, 16, 300, slots_per_block


@pytest.mark.parametrize("slots_per_block", [16, 3])
def test_flex_block_mask_matches_triple_loop(slots_per_block):
    """The sparse BlockMask: every visible (query, key) pair lies in a listed block, every FULL block
    is visible throughout, and the mask_mod of the partial blocks is the three rules exactly."""
    anchors, block, s, kq = _large_layout(slots_per_block)
    n, a = anchors.shape
    mask = Bk.flex_block_mask(anchors, block, s, a * kq)
    kv_len = mask.seq_lengths[1]
    assert kv_len % Bk.FLEX_BLOCK == 0 and kv_len >= s + a * block
    q_idx, kv_idx = torch.arange(a * kq)[:, None], torch.arange(kv_len)[None, :]
    bs = Bk.FLEX_BLOCK
    for b in range(n):
        ref = torch.zeros(a * kq, kv_len, dtype=torch.bool)
        loop = torch.tensor(Bk.reference_mask(anchors[b].tolist(), s, block))  # [A*B, S+A*B]
        rows = torch.arange(a)[:, None] * block + torch.arange(block)[None, :kq]  # query slots 0..kq-1
        ref[:, : s + a * block] = loop[rows.flatten()]
        got = mask.mask_mod(torch.tensor(b), torch.tensor(0), q_idx, kv_idx)
        assert torch.equal(got, ref)
        listed = torch.zeros(-(-a * kq // bs), kv_len // bs, dtype=torch.bool)
        full = torch.zeros_like(listed)
        for i in range(listed.shape[0]):
            for j in mask.kv_indices[b, 0, i, : mask.kv_num_blocks[b, 0, i]].tolist():
                listed[i, j] = True
            for j in mask.full_kv_indices[b, 0, i, : mask.full_kv_num_blocks[b, 0, i]].tolist():
                full[i, j] = True
        assert not torch.any(listed & full)
        for i in range(listed.shape[0]):
            for j in range(listed.shape[1]):
                tile = ref[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs]
                if tile.any():
                    assert listed[i, j] or full[i, j], (b, i, j)
                if full[i, j]:
                    assert tile.all(), (b, i, j)
        if kq == block:
            assert listed.sum() < listed.numel()  # sparse: early query blocks skip later keys
        if b == 0 and kq == block:
            assert full.any()  # query blocks whose anchors are all >= 128 see key block 0 whole


def _flex_inputs(slots_per_block):
    anchors, block, s, kq = _large_layout(slots_per_block)
    tensors, _, _ = _random_attention_inputs(n=2, h=4, kv=2, d=16, s=s, block=block, anchors=anchors.tolist())
    q, *rest = [t.float() for t in tensors]
    return [_select_query_slots(q, anchors.shape[1], block, list(range(kq))), *rest], anchors, block


@pytest.mark.parametrize("slots_per_block", [16, 3])
def test_flex_attention_matches_chunked_on_cpu(slots_per_block):
    """Eager flex (forward) vs the chunked path. No skip: if flex breaks, this fails."""
    tensors, anchors, block = _flex_inputs(slots_per_block)
    with torch.no_grad():
        flex = Bk.flex_block_attention(*tensors, 0.3, anchor_pos=anchors, block_size=block, compiled=False)
        chunked = Bk.chunked_block_attention(*tensors, 0.3, anchor_pos=anchors, block_size=block)
    assert torch.allclose(flex, chunked, atol=1e-5)


def test_compiled_flex_attention_matches_chunked_on_cpu():
    """torch.compile'd flex_attention (the GPU path's kernel, built by inductor for CPU) with the
    sparse BlockMask, forward only (no CPU backward in torch 2.13). No skip."""
    tensors, anchors, block = _flex_inputs(16)
    with torch.no_grad():
        flex = Bk.flex_block_attention(*tensors, 0.3, anchor_pos=anchors, block_size=block, compiled=True)
        chunked = Bk.chunked_block_attention(*tensors, 0.3, anchor_pos=anchors, block_size=block)
    assert torch.allclose(flex, chunked, atol=1e-5)


def test_draft_forward_with_training_attention_matches_per_block_decoding():
    """One training forward over many blocks == decoding each block alone with the context cut at p."""
    from dflash_lab.models.draft import DFlashDraftModel, DraftConfig

    cfg = DraftConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, vocab_size=50, num_target_layers=4, mask_token_id=49,
                      target_layer_ids=[1, 2], block_size=4)
    draft = DFlashDraftModel(cfg).init_weights(0).double()
    g = torch.Generator().manual_seed(0)
    s, anchors = 20, torch.tensor([[2, 9, 15]])
    features = torch.randn(1, s, 64, generator=g, dtype=torch.float64)
    noise = torch.randn(1, 3 * 4, 32, generator=g, dtype=torch.float64)
    positions = (anchors[0][:, None] + torch.arange(4)).view(1, -1)
    attn = Bk.make_attention("chunked", anchors, 4)
    out = draft(noise, positions, features, torch.arange(s)[None], attention=attn)
    for a, p in enumerate(anchors[0].tolist()):
        sl = slice(a * 4, a * 4 + 4)
        alone = draft(noise[:, sl], positions[:, sl], features[:, :p], torch.arange(p)[None])
        assert torch.allclose(out[:, sl], alone, atol=1e-10)


def test_flex_block_mask_is_built_once_per_micro_batch():
    """Every layer of a forward shares one BlockMask (eager flex, CPU, forward only)."""
    from dflash_lab.models.draft import DFlashDraftModel, DraftConfig

    cfg = DraftConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, vocab_size=50, num_target_layers=4, mask_token_id=49,
                      target_layer_ids=[1, 2], block_size=4)
    draft = DFlashDraftModel(cfg).init_weights(0)
    g = torch.Generator().manual_seed(0)
    s, anchors = 20, torch.tensor([[2, 9, 15], [4, 0, 0]])
    features = torch.randn(2, s, 64, generator=g)
    noise = torch.randn(2, 12, 32, generator=g)
    positions = (anchors[:, :, None] + torch.arange(4)).view(2, -1)
    flex = Bk.make_attention("flex", anchors, 4)
    with torch.no_grad():
        out = draft(noise, positions, features, torch.arange(s)[None].expand(2, s), attention=flex)
        ref = draft(noise, positions, features, torch.arange(s)[None].expand(2, s),
                    attention=Bk.make_attention("chunked", anchors, 4))
    assert flex.masks_built == 1
    assert torch.allclose(out, ref, atol=1e-5)
# -- sliding window (rule 4) ---------------------------------------------------------------------------
def test_reference_mask_window_by_hand():
    # anchor 6, context 8, blocks of 3, window 4: slot k (position 6 + k) sees context j with 6 + k - j < 4
    m = Bk.reference_mask([6], 8, 3, window=4)
    T, F = True, False
    assert m[0] == [F, F, F, T, T, T, F, F, T, T, T]  # j = 3, 4, 5: W - 1 context tokens for the anchor slot
    assert m[1] == [F, F, F, F, T, T, F, F, T, T, T]  # one fewer per later slot
    assert m[2] == [F, F, F, F, F, T, F, F, T, T, T]
    assert Bk.reference_mask([6], 8, 3, window=100) == Bk.reference_mask([6], 8, 3)


@pytest.mark.parametrize("anchor_chunk", [1, 2, 64])
@pytest.mark.parametrize("window", [4, 5, 9])
def test_chunked_attention_with_window_matches_triple_loop(anchor_chunk, window):
    tensors, anchor_pos, block = _random_attention_inputs()
    tensors_ref = [t.clone().requires_grad_(True) for t in tensors]
    tensors_our = [t.clone().requires_grad_(True) for t in tensors]
    scale = 8 ** -0.5
    ref = Bk.dense_reference_attention(*tensors_ref, scale, anchor_pos=anchor_pos, block_size=block, window=window)
    attn = Bk.make_attention("chunked", anchor_pos, block, anchor_chunk)
    got = attn(*tensors_our, scale, window=window)
    assert torch.allclose(got, ref, atol=1e-12)
    assert not torch.allclose(got, Bk.chunked_block_attention(*tensors, scale, anchor_pos=anchor_pos, block_size=block))
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (ref * weights).sum().backward()
    (got * weights).sum().backward()
    for a, b in zip(tensors_our, tensors_ref):
        assert torch.allclose(a.grad, b.grad, atol=1e-12)


def test_flex_attention_with_window_matches_triple_loop_on_cpu():
    tensors, anchor_pos, block = _random_attention_inputs(block=4)
    tensors = [t.float() for t in tensors]
    flex = Bk.flex_block_attention(*tensors, 0.3, anchor_pos=anchor_pos, block_size=block, compiled=False, window=5)
    ref = Bk.dense_reference_attention(*tensors, 0.3, anchor_pos=anchor_pos, block_size=block, window=5)
    assert torch.allclose(flex, ref, atol=1e-5)


def _window_cfg(**kw):
    from dflash_lab.models.draft import DraftConfig

    return DraftConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, vocab_size=50, num_target_layers=4, mask_token_id=49,
                       target_layer_ids=[1, 2], block_size=4, **kw)


@pytest.mark.parametrize("layer_types", [None, ["full_attention", "sliding_attention"]])
def test_windowed_draft_training_forward_matches_per_block_decoding(layer_types):
    """Training attention with a window == decoding each block alone through the cache (which keeps only
    what the window sees); a window larger than every context == the full-attention draft exactly."""
    from dflash_lab.models.draft import DFlashDraftModel, DraftCache

    g = torch.Generator().manual_seed(0)
    s, anchors = 20, torch.tensor([[2, 9, 15]])
    features = torch.randn(1, s, 64, generator=g, dtype=torch.float64)
    noise = torch.randn(1, 3 * 4, 32, generator=g, dtype=torch.float64)
    positions = (anchors[0][:, None] + torch.arange(4)).view(1, -1)
    attn = Bk.make_attention("chunked", anchors, 4)
    full = DFlashDraftModel(_window_cfg()).init_weights(0).double()
    windowed = DFlashDraftModel(_window_cfg(sliding_window=6, layer_types=layer_types)).init_weights(0).double()
    huge = DFlashDraftModel(_window_cfg(sliding_window=10_000, layer_types=layer_types)).init_weights(0).double()
    out_full = full(noise, positions, features, torch.arange(s)[None], attention=attn)
    out = windowed(noise, positions, features, torch.arange(s)[None], attention=attn)
    assert torch.equal(huge(noise, positions, features, torch.arange(s)[None], attention=attn), out_full)
    assert not torch.allclose(out[:, 8:], out_full[:, 8:])  # anchor 15 with window 6 loses context
    assert torch.allclose(out[:, :4], out_full[:, :4], atol=1e-12)  # anchor 2: everything within the window
    cache = DraftCache(2)
    fed = 0
    for a, p in enumerate(anchors[0].tolist()):
        sl = slice(a * 4, a * 4 + 4)
        alone = windowed(noise[:, sl], positions[:, sl], features[:, :p], torch.arange(p)[None])
        assert torch.allclose(out[:, sl], alone, atol=1e-10)
        # incremental decoding: only the new features go in; the sliding layer's cache keeps W - 1
        stepped = windowed(noise[:, sl], positions[:, sl], features[:, fed:p], torch.arange(fed, p)[None], cache=cache)
        fed = p
        assert torch.allclose(out[:, sl], stepped, atol=1e-10)
        sliding = [i for i in range(2) if windowed.config.layer_window(i)]
        for i in range(2):
            kept = cache.positions[i][0].tolist()
            assert kept == (list(range(max(0, p - 5), p)) if i in sliding else list(range(p)))
