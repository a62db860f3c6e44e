"""Anchors, training blocks, labels and the training attention (SPEC section 3).

For a sequence `tok` with loss mask `m`, an anchor is a position p with `m[p] == 1` and
`m[p+1] == 1`: a response token (like the bonus token at inference, which the target itself
produced; the last prompt token is never an anchor) that leaves room for at least one label.
Each anchor p gives one block:

    block input ids   [tok[p], MASK, ..., MASK]           B tokens
    positions         p, p+1, ..., p+B-1
    label of slot k   tok[p+k]      valid iff k >= 1 and p+k < len and m[p+k] == 1

All blocks of a sequence go through the draft in one forward. The attention rules, for a query in
the block of anchor p:
    1. a context key (target feature of token j) is visible iff j < p   (STRICTLY below p)
    2. every key of its own block is visible (bidirectional, no causal mask inside a block)
    3. no key of any other block is visible
    4. sliding-window layers (window W): the query of slot k (position p + k) sees context key j only
       if (p + k) - j < W, i.e. j >= p + k - W + 1. W counts the query's own position, as Hugging
       Face's sliding window does and as z-lab's reference model, vLLM and SGLang apply it at
       inference: the anchor slot sees the W - 1 context tokens before it, each later slot one fewer.
       The block itself stays fully visible (W >= B).
Padding anchors (in a batch of sequences with fewer anchors) use p = 0: they see no context,
only their own block, and none of their slots are valid.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


# -- anchors and blocks ----------------------------------------------------------------------------
def anchor_candidates(loss_mask: torch.Tensor) -> torch.Tensor:
    """Positions p that are supervised and whose next position is supervised too: [C] (int64).
    The last prompt token (m[p] == 0, m[p+1] == 1) is excluded: at inference the bonus token that
    starts a block is always a token of the response."""
    m = loss_mask.bool()
    return torch.nonzero(m[:-1] & m[1:], as_tuple=False).flatten()


def sample_anchors(loss_mask: torch.Tensor, num_anchors: int, generator: torch.Generator) -> torch.Tensor:
    """`num_anchors` distinct anchor positions (fewer if the sequence has fewer), sorted: [A]."""
    candidates = anchor_candidates(loss_mask)
    if candidates.numel() <= num_anchors:
        return candidates
    pick = torch.randperm(candidates.numel(), generator=generator)[:num_anchors]
    return candidates[pick].sort().values


def build_blocks(input_ids: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor, block_size: int, mask_token_id: int):
    """Block inputs for one sequence.

    Returns block_ids [A, B], positions [A, B], labels [A, B], valid [A, B] (bool; slot 0 never).
    """
    n = input_ids.shape[0]
    offsets = torch.arange(block_size, device=anchors.device)
    positions = anchors[:, None] + offsets[None, :]  # [A, B]
    in_range = positions < n
    safe = positions.clamp(max=n - 1)
    labels = torch.where(in_range, input_ids[safe], torch.zeros_like(safe))
    valid = in_range & loss_mask.bool()[safe]
    valid[:, 0] = False
    block_ids = torch.full_like(positions, mask_token_id)
    block_ids[:, 0] = input_ids[anchors]
    return block_ids, positions, labels, valid


# -- attention -------------------------------------------------------------------------------------
def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _chunk_attention(q, k_ctx, v_ctx, k_blk, v_blk, anchor_pos, scale, block_size, window=None, key_offset=0):
    """One chunk of anchors. q [N, h, a*Kq, d] (Kq query slots per anchor: all B, or fewer);
    k_blk/v_blk [N, h, a*B, d]; k_ctx/v_ctx [N, h, S', d] (the context keys from position
    `key_offset` on); anchor_pos [N, a]; `window`: rule 4 (None = full attention; needs Kq = B).

    The context part [N, h, a*Kq, S'] and the block-diagonal part [N, h, a, Kq, B] share one softmax
    (concatenated along the key axis), which is the exact log-sum-exp merge of the two. The block
    part always has keys, so no row is fully masked."""
    n, h, qlen, d = q.shape
    a = anchor_pos.shape[1]
    kq = qlen // a
    s = k_ctx.shape[2]
    ctx_scores = torch.matmul(q, k_ctx.transpose(-1, -2)) * scale  # [N, h, a*Kq, S']
    key_pos = torch.arange(key_offset, key_offset + s, device=q.device)
    visible = key_pos[None, None, :] < anchor_pos[:, :, None]  # [N, a, S']
    visible = visible.repeat_interleave(kq, dim=1)  # [N, a*Kq, S']
    if window is not None:
        if kq != block_size:
            raise ValueError("a sliding window needs every block slot as a query (the slot gives the position)")
        query_pos = anchor_pos.repeat_interleave(block_size, dim=1) + torch.arange(block_size, device=q.device).repeat(a)
        visible = visible & (query_pos[:, :, None] - key_pos[None, None, :] < window)
    visible = visible[:, None]  # [N, 1, a*Kq, S']
    ctx_scores = ctx_scores.masked_fill(~visible, float("-inf"))
    qb = q.view(n, h, a, kq, d)
    kb = k_blk.view(n, h, a, block_size, d)
    vb = v_blk.view(n, h, a, block_size, d)
    blk_scores = torch.matmul(qb, kb.transpose(-1, -2)) * scale  # [N, h, a, Kq, B]
    scores = torch.cat([ctx_scores, blk_scores.reshape(n, h, qlen, block_size)], dim=-1)
    probs = torch.softmax(scores if scores.dtype == torch.float64 else scores.float(), dim=-1).to(q.dtype)
    p_ctx, p_blk = probs[..., :s], probs[..., s:]
    out = torch.matmul(p_ctx, v_ctx)
    out = out + torch.matmul(p_blk.reshape(n, h, a, kq, block_size), vb).reshape(n, h, qlen, d)
    return out


def chunked_block_attention(q, k_ctx, v_ctx, k_blk, v_blk, scale, *, anchor_pos: torch.Tensor, block_size: int,
                            anchor_chunk: int = 64, recompute: bool | None = None, window: int | None = None):
    """CPU training attention. q [N, h, A*Kq, d] (Kq = B, or fewer query slots per anchor);
    k_ctx/v_ctx [N, kv, S, d]; k_blk/v_blk [N, kv, A*B, d]; anchor_pos [N, A] sorted per sequence.
    Memory is bounded by the anchor chunk: a chunk only reads the context keys below its largest
    anchor (and, with a `window`, above its smallest anchor minus the window), and with several
    chunks each is recomputed in backward (activation checkpointing)."""
    n, h, qlen, d = q.shape
    a_total = anchor_pos.shape[1]
    kq = qlen // a_total
    k_ctx, v_ctx = _expand_kv(k_ctx, h), _expand_kv(v_ctx, h)
    k_blk, v_blk = _expand_kv(k_blk, h), _expand_kv(v_blk, h)
    chunks = range(0, a_total, anchor_chunk)
    if recompute is None:
        recompute = len(chunks) > 1 and torch.is_grad_enabled()
    outs = []
    for start in chunks:
        stop = min(start + anchor_chunk, a_total)
        pos = anchor_pos[:, start:stop]
        s_max = int(pos.max()) if pos.numel() else 0  # keys at >= max anchor are never visible
        # with a window, keys below (min anchor) - W + 1 are never visible either
        s_min = max(0, min(int(pos.min()) - window + 1, s_max)) if (window is not None and pos.numel()) else 0
        qs, ks = slice(start * kq, stop * kq), slice(start * block_size, stop * block_size)
        args = (q[:, :, qs], k_ctx[:, :, s_min:s_max], v_ctx[:, :, s_min:s_max], k_blk[:, :, ks], v_blk[:, :, ks], pos)
        if recompute:
            outs.append(checkpoint(_chunk_attention, *args, scale, block_size, window, s_min, use_reentrant=False))
        else:
            outs.append(_chunk_attention(*args, scale, block_size, window, s_min))
    return torch.cat(outs, dim=2)


FLEX_BLOCK = 128  # flex_attention's default sparse block size (queries and keys)


def _ceil_to(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _as_block_indices(flags: torch.Tensor):
    """[N, nQ, nK] bool -> (counts [N, 1, nQ], the listed key blocks first [N, 1, nQ, nK]), int32."""
    counts = flags.sum(-1, dtype=torch.int32)
    order = torch.argsort((~flags).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[:, None].contiguous(), order[:, None].contiguous()


def flex_block_mask(anchor_pos: torch.Tensor, block_size: int, context_len: int, num_queries: int,
                    window: int | None = None):
    """The BlockMask of the three rules over keys [context S ; blocks A*B ; zero padding], built
    sparsely from the anchors: no [Q, K] mask is ever materialised, only [N, Q/128, K/128] block
    flags. Queries are A groups of num_queries/A slots (all B slots, or the scored slots of the last
    layer); query i belongs to anchor i // (num_queries/A). The key length is padded to a multiple of
    the 128-key block (the padded keys are never visible).

    Block (query block i, key block j) is listed when any of its queries may see any of its keys:
    context keys below the block's largest anchor, or the own-block keys of its anchors. It is
    FULL (no mask_mod evaluated) when it is pure context below the block's smallest anchor."""
    from torch.nn.attention.flex_attention import BlockMask

    n, a = anchor_pos.shape
    kq = num_queries // a
    s, dev = context_len, anchor_pos.device
    q_pad, kv_len = _ceil_to(num_queries, FLEX_BLOCK), _ceil_to(s + a * block_size, FLEX_BLOCK)
    n_qb, n_kb = q_pad // FLEX_BLOCK, kv_len // FLEX_BLOCK
    anchor_of_query = anchor_pos.repeat_interleave(kq, dim=1)  # [N, Q]
    # padded queries copy the last real one: indices stay in range, min/max per block unchanged
    anchor_of_query = torch.cat([anchor_of_query, anchor_of_query[:, -1:].expand(n, q_pad - num_queries)], dim=1)
    per_block = anchor_of_query.view(n, n_qb, FLEX_BLOCK)
    p_min, p_max = per_block.min(-1).values, per_block.max(-1).values  # [N, nQ]
    kb_start = torch.arange(n_kb, device=dev) * FLEX_BLOCK  # [nK]
    kb_end = kb_start + FLEX_BLOCK
    qb = torch.arange(n_qb, device=dev)
    first_anchor = qb * FLEX_BLOCK // kq
    last_anchor = (torch.clamp((qb + 1) * FLEX_BLOCK, max=num_queries) - 1) // kq
    own_lo, own_hi = s + first_anchor * block_size, s + (last_anchor + 1) * block_size  # [nQ] keys [lo, hi)
    context = kb_start[None, None, :] < torch.clamp(p_max, max=s)[:, :, None]  # [N, nQ, nK]
    own = (kb_start[None, :] < own_hi[:, None]) & (kb_end[None, :] > own_lo[:, None])  # [nQ, nK]
    full = kb_end[None, None, :] <= torch.clamp(p_min, max=s)[:, :, None]
    if window is not None:  # full only when every key is inside every query's window (rule 4)
        if kq != block_size:
            raise ValueError("a sliding window needs every block slot as a query (the slot gives the position)")
        full = full & (kb_start[None, None, :] >= (p_max + block_size - window)[:, :, None])
    partial = (context | own[None]) & ~full

    def mask_mod(b, h, q_idx, kv_idx):
        ctx = (kv_idx < s) & (kv_idx < anchor_of_query[b, q_idx])
        if window is not None:  # rule 4: query position = anchor + slot (every slot is a query here)
            ctx = ctx & (anchor_of_query[b, q_idx] + q_idx % block_size - kv_idx < window)
        own_block = (kv_idx >= s) & ((kv_idx - s) // block_size == q_idx // kq)
        return ctx | own_block

    kv_num, kv_idx = _as_block_indices(partial)
    full_num, full_idx = _as_block_indices(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(num_queries, kv_len))


class FlexBlockAttention:
    """The training attention with flex_attention (GPU path; forward also runs on CPU).

    One object per micro-batch: its BlockMask is built on the first layer's call and reused by
    every later layer (one mask per query layout: all slots, and the scored slots of the last
    layer when the draft computes only those). Same signature as the other attention callables."""

    def __init__(self, anchor_pos: torch.Tensor, block_size: int, compiled: bool = True):
        self.anchor_pos, self.block_size, self.compiled = anchor_pos, block_size, compiled
        self._masks: dict[tuple[int, int], object] = {}
        self.masks_built = 0

    def block_mask(self, context_len: int, num_queries: int, window: int | None = None):
        key = (context_len, num_queries, window)
        if key not in self._masks:
            self._masks[key] = flex_block_mask(self.anchor_pos, self.block_size, context_len, num_queries, window)
            self.masks_built += 1
        return self._masks[key]

    def __call__(self, q, k_ctx, v_ctx, k_blk, v_blk, scale, window: int | None = None):
        from torch.nn.attention.flex_attention import flex_attention

        s, num_queries = k_ctx.shape[2], q.shape[2]
        mask = self.block_mask(s, num_queries, window)
        # under autocast q/k (RoPE'd in fp32) and v (a bf16 linear) can differ: use v's dtype for all
        out_dtype, dt = q.dtype, v_ctx.dtype
        pad = mask.seq_lengths[1] - s - k_blk.shape[2]
        zeros = k_blk.new_zeros(*k_blk.shape[:2], pad, k_blk.shape[3])
        k = torch.cat([k_ctx, k_blk, zeros], dim=2).to(dt)
        v = torch.cat([v_ctx, v_blk, zeros.to(v_blk.dtype)], dim=2).to(dt)
        args = (q.to(dt), k, v)
        kwargs = dict(block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        out = _guarded_compiled_flex(*args, **kwargs) if self.compiled else flex_attention(*args, **kwargs)
        return out.to(out_dtype)


def flex_block_attention(q, k_ctx, v_ctx, k_blk, v_blk, scale, *, anchor_pos: torch.Tensor, block_size: int,
                         compiled: bool = True, window: int | None = None):
    """One call of the flex path (tests; the trainer keeps one FlexBlockAttention per micro-batch)."""
    return FlexBlockAttention(anchor_pos, block_size, compiled)(q, k_ctx, v_ctx, k_blk, v_blk, scale, window=window)


# How the flex path is compiled, per device type. CUDA: dynamic shapes (context and anchor counts
# change every micro-batch) and one whole graph (a graph break would run flex eagerly: unfused).
# CPU: static, where inductor's C++ flex kernel with dynamic shapes does not compile in torch 2.13
# (tests run it on CPU, forward only; tests/unit/test_flex_compile.py swaps in the CUDA options with
# the aot_eager backend to count the graphs of the trainer's call sequence).
FLEX_COMPILE_OPTIONS: dict[str, dict] = {"cuda": {"dynamic": True, "fullgraph": True}, "cpu": {"dynamic": False}}
FLEX_RECOMPILE_LIMIT = 16
"""Graphs the compiled flex may make before the run stops (torch._dynamo's recompile limit for it).
The trainer's call sequence makes 5 (all slots and the last layer's scored slots, with grad and for
the held-out evaluation without, and one recompile when the query blocks first vary); past dynamo's
limit flex would fall back, with only a warning, to the unfused path (~47 GB of scores at
micro-batch 4 on the qwen3-4b recipe), so the guard raises instead."""
compile_flex_on_cpu = False
"""`make_attention("flex")` on CPU tensors compiles too (tests of the compiled call sequence)."""

_FLEX: dict[str, object] = {}


def _compiled_flex(device_type: str):
    """torch.compile'd flex_attention with `FLEX_COMPILE_OPTIONS` of the device type (built once)."""
    if device_type not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX[device_type] = torch.compile(flex_attention, **FLEX_COMPILE_OPTIONS[device_type])
    return _FLEX[device_type]


def _guarded_compiled_flex(q, k, v, **kwargs):
    """The compiled flex call that never falls back silently to unfused attention: past
    `FLEX_RECOMPILE_LIMIT` graphs dynamo raises (instead of running flex eagerly, which materialises
    every [Q, K] score) and the run stops with the fix."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    fn = _compiled_flex(q.device.type)
    try:
        with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            return fn(q, k, v, **kwargs)
    except FailOnRecompileLimitHit as exc:
        from dflash_lab.errors import DFlashLabError

        raise DFlashLabError(
            f"flex attention: torch.compile made more than {FLEX_RECOMPILE_LIMIT} graphs (q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, grad {torch.is_grad_enabled()}); past that limit flex would run unfused and "
            "materialise every attention score (tens of GB). Set train.attention=chunked to train now, and report "
            "the shapes (blocks.FLEX_RECOMPILE_LIMIT bounds the graphs)") from exc


def make_attention(kind: str, anchor_pos: torch.Tensor, block_size: int, anchor_chunk: int = 64):
    """The attention callable the draft's forward takes, bound to this batch's anchors. Queries may
    be all A*B slots or A groups of fewer slots (the scored slots of the last layer)."""
    if kind == "auto":
        kind = "flex" if anchor_pos.is_cuda else "chunked"
    if kind == "flex":
        return FlexBlockAttention(anchor_pos, block_size, compiled=anchor_pos.is_cuda or compile_flex_on_cpu)
    return lambda q, kc, vc, kb, vb, scale, window=None: chunked_block_attention(
        q, kc, vc, kb, vb, scale, anchor_pos=anchor_pos, block_size=block_size, anchor_chunk=anchor_chunk,
        window=window)


# -- the reference (tests) -------------------------------------------------------------------------
def reference_mask(anchor_pos: list[int], context_len: int, block_size: int,
                   window: int | None = None) -> list[list[bool]]:
    """The rules as a plain Python triple loop: mask[query][key] over keys [context ; blocks]."""
    num_q = len(anchor_pos) * block_size
    mask = [[False] * (context_len + num_q) for _ in range(num_q)]
    for a, p in enumerate(anchor_pos):
        for k in range(block_size):
            qi = a * block_size + k
            for j in range(context_len + num_q):
                if j < context_len:
                    mask[qi][j] = j < p  # rule 1: strictly below the anchor
                    if window is not None:
                        mask[qi][j] = mask[qi][j] and (p + k) - j < window  # rule 4
                else:
                    mask[qi][j] = (j - context_len) // block_size == a  # rules 2 and 3
    return mask


def dense_reference_attention(q, k_ctx, v_ctx, k_blk, v_blk, scale, *, anchor_pos: torch.Tensor, block_size: int,
                              window: int | None = None):
    """Dense attention with the triple-loop mask (tests only: O(Q x (S+Q)) memory)."""
    n, h = q.shape[:2]
    k = torch.cat([_expand_kv(k_ctx, h), _expand_kv(k_blk, h)], dim=2)
    v = torch.cat([_expand_kv(v_ctx, h), _expand_kv(v_blk, h)], dim=2)
    masks = torch.stack([torch.tensor(reference_mask(anchor_pos[b].tolist(), k_ctx.shape[2], block_size, window))
                         for b in range(n)])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~masks[:, None], float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def collate_blocks(items: list[dict], pad_id: int = 0):
    """Pad per-sequence blocks to one batch. Each item: input_ids [S_i], anchors [A_i], block_ids,
    positions, labels, valid [A_i, B]. Padding anchors sit at p = 0 with every slot invalid."""
    n = len(items)
    a_max = max(int(it["anchors"].shape[0]) for it in items)
    b = items[0]["block_ids"].shape[1]
    out = {
        "anchors": torch.zeros(n, a_max, dtype=torch.long),
        "block_ids": torch.full((n, a_max, b), pad_id, dtype=torch.long),
        "positions": torch.arange(b).repeat(n, a_max, 1),
        "labels": torch.zeros(n, a_max, b, dtype=torch.long),
        "valid": torch.zeros(n, a_max, b, dtype=torch.bool),
    }
    for i, it in enumerate(items):
        a = it["anchors"].shape[0]
        out["anchors"][i, :a] = it["anchors"]
        for key in ("block_ids", "positions", "labels", "valid"):
            out[key][i, :a] = it[key]
    return out


def pad_sequences(seqs: list[torch.Tensor], value: float = 0) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)


__all__ = [
    "anchor_candidates", "sample_anchors", "build_blocks", "chunked_block_attention", "flex_block_attention",
    "FlexBlockAttention", "flex_block_mask",
    "make_attention", "reference_mask", "dense_reference_attention", "collate_blocks", "pad_sequences",
]
