"""The DFlash2 draft (SPEC section 10), in plain PyTorch beside the v1 draft of `draft.py`.

The v1 backbone (fc + hidden_norm over the target features, Qwen3 layers whose K/V run over
[context ; block], final norm, the target's lm_head) with two additions:

1. A two-tap *dynamic depthwise convolution* around each sublayer of every layer. One projection
   of the sublayer's normalised input h gives both sides' dynamic taps:

       dyn          = kernel_projection(h).view(..., 2 (side), K (tap), G (group))
       conv_s(x)[i, c] = sum_{t<K} (base[s, t, c] + dyn[i, s, t, c // group]) * x[i - t, c]

   with x[i - t] = 0 where i - t falls before the start of i's block (taps never cross blocks; the
   anchor at block position 0 reads zeros). Side 0 runs on the sublayer's input, side 1 on its
   output:
       h, d = attention_conv.prepare(input_layernorm(x)); x = x + attention_conv.finish(self_attn(h), d)
       h, d = mlp_conv.prepare(post_attention_layernorm(x)); x = x + mlp_conv.finish(mlp(h), d)
   The context path (c -> K/V) has no conv.

2. A *candidate selector* over the target's lm_head. For predicted slot t with final-normed state
   h_t: U_t = lm_head(h_t) (x output_multiplier, optional softcap), candidates C_t = top-k(U_t)
   (k = 16), and the edge score of predecessor token a -> successor b in C_t is

       S_t(a, b) = U_t(b) + < A[a] * (W_h h_t), B[b] >        A, B: [V, r] codebooks, W_h: [r, H]

   The predecessor of slot 1 is the anchor; of slot t > 1 the token chosen at t - 1. Greedy
   drafting walks argmax_b S_t(prev, b).

Identity init (base[:, 0] = 1, other taps 0, kernel_projection 0) and a zero successor codebook
make a fresh DFlash2 draft compute exactly what a v1 draft with the same backbone weights
computes: the same hidden states, the same logits, and a selector walk equal to the unary argmax.
The checkpoint is the published format: `architectures: ["DFlash2DraftModel"]`, the conv/selector
settings in `dflash_config`, codebooks saved as bare tensors (no `.weight`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from dflash_lab.errors import DFlashLabError
from dflash_lab.models.draft import (
    AttentionFn,
    DFlashDraftModel,
    DraftCache,
    DraftConfig,
    DraftLayer,
    full_attention,
    init_backbone,
)

ARCHITECTURE = "DFlash2DraftModel"
# settings that live in `dflash_config` (read from there first, then from the top level)
SELECTOR_FIELDS = ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")
OPTIONAL_FIELDS = ("input_embedding_scale", "output_multiplier", "final_logit_softcapping")


@dataclass
class DFlash2Config(DraftConfig):
    """A v1 `DraftConfig` plus the DFlash2 fields. Defaults are the published ones."""

    block_size: int = 8
    conv_kernel_size: int = 2
    conv_group_size: int = 16
    selector_rank: int = 256
    selector_top_k: int = 16
    sliding_window: int | None = 2048
    use_sliding_window: bool = True
    input_embedding_scale: float | None = None
    output_multiplier: float | None = None
    final_logit_softcapping: float | None = None

    def __post_init__(self):
        if not self.use_sliding_window:  # v1's window fields then say "full attention" in every layer
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        super().__post_init__()
        problems = []
        if self.conv_kernel_size < 1:
            problems.append(f"conv_kernel_size must be >= 1, got {self.conv_kernel_size}")
        if self.conv_group_size < 1 or self.hidden_size % self.conv_group_size:
            problems.append(f"conv_group_size {self.conv_group_size} must divide hidden_size {self.hidden_size}")
        if self.selector_rank < 1:
            problems.append(f"selector_rank must be >= 1, got {self.selector_rank}")
        if not 1 <= self.selector_top_k <= self.vocab_size:
            problems.append(f"selector_top_k must be in 1..vocab_size ({self.vocab_size}), got {self.selector_top_k}")
        if self.use_sliding_window and (self.sliding_window is None or self.sliding_window < self.block_size):
            problems.append(f"sliding_window {self.sliding_window} must be >= block_size {self.block_size}")
        if problems:
            raise DFlashLabError("invalid DFlash2 draft config: " + "; ".join(problems))

    @property
    def num_groups(self) -> int:
        return self.hidden_size // self.conv_group_size

    # -- the published config.json ---------------------------------------------------------------
    def to_json_dict(self) -> dict:
        out = super().to_json_dict()
        # unknown dflash_config keys of a loaded checkpoint survive a re-save
        dflash = out["dflash_config"] = {**(self.extra.get("dflash_config") or {}), **out["dflash_config"]}
        for key in SELECTOR_FIELDS:
            dflash[key] = out.pop(key)
        for key in OPTIONAL_FIELDS:
            value = out.pop(key)
            if value is not None:
                dflash[key] = value
        dflash["block_size"] = self.block_size  # readers look here first; the top-level copy is v1's key
        out["architectures"] = [ARCHITECTURE]
        # without is_causal false the reference runs sliding-window layers causally (SPEC 10)
        out["is_causal"] = False
        kind = "sliding_attention" if self.use_sliding_window else "full_attention"
        out["layer_types"] = [kind] * self.num_hidden_layers
        out["use_sliding_window"] = self.use_sliding_window
        out["sliding_window"] = self.sliding_window if self.use_sliding_window else None
        return out

    @classmethod
    def from_json_dict(cls, raw: dict, *, source: str = "config.json") -> "DFlash2Config":
        raw = dict(raw)
        dflash = dict(raw.get("dflash_config") or {})
        missing = [k for k in SELECTOR_FIELDS if k not in dflash and k not in raw]
        if missing:
            raise DFlashLabError(
                f"{source}: a DFlash2DraftModel config needs dflash_config fields {missing} "
                f"(published: conv_kernel_size 2, conv_group_size 16, selector_rank 256, selector_top_k 16); "
                "re-export the checkpoint"
            )
        for key in (*SELECTOR_FIELDS, *OPTIONAL_FIELDS, "block_size"):
            if key in dflash:  # dflash_config wins over the top level
                raw[key] = dflash.pop(key)
        raw["dflash_config"] = dflash
        # The window is DFlash2's own pair of fields (every layer slides, or none does). v1's reader
        # resolves window keys from layer_types and drops them otherwise, which lost a saved window
        # (any value came back as 2048) and `use_sliding_window: false`; so they are read here.
        window = raw.pop("sliding_window", None)
        use_window = bool(raw.pop("use_sliding_window", window is not None)) and window is not None
        dflash.pop("causal", None)
        for key in ("is_causal", "layer_types", "max_window_layers"):
            raw.pop(key, None)  # derived from the fields when written
        cfg = super().from_json_dict(raw, source=source)
        return replace(cfg, use_sliding_window=use_window, sliding_window=window if use_window else None,
                       layer_types=None)

    @classmethod
    def from_v1(cls, v1: DraftConfig, **overrides) -> "DFlash2Config":
        """The v1 config's backbone fields, DFlash2 defaults for the rest (the block size stays v1's
        unless overridden)."""
        base = {f.name: getattr(v1, f.name) for f in fields(DraftConfig)}
        if v1.sliding_window is None:  # a full-attention v1 backbone: DFlash2's window defaults apply
            base.pop("sliding_window")
            base.pop("layer_types")
        base["extra"] = {k: v for k, v in v1.extra.items() if k not in ("dflash_config",)}
        base.update(overrides)
        return cls(**base)


# -- the dynamic depthwise convolution -------------------------------------------------------------
def shift_within_blocks(x: torch.Tensor, tap: int, block_size: int) -> torch.Tensor:
    """x[..., i - tap, :] where i - tap is in i's block (blocks of `block_size` along dim -2,
    starting at 0), zeros elsewhere. x [N, Q, H]."""
    if tap == 0:
        return x
    q = x.shape[-2]
    if tap >= min(q, block_size):
        return torch.zeros_like(x)
    shifted = F.pad(x[..., : q - tap, :], (0, 0, tap, 0))
    inside = (torch.arange(q, device=x.device) % block_size) >= tap
    return shifted * inside[:, None].to(x.dtype)


class DynamicDepthwiseConv(nn.Module):
    """Two sides (before / after a sublayer) of a K-tap depthwise conv along the block, with a
    static kernel per channel plus a per-token dynamic kernel per channel group."""

    def __init__(self, hidden_size: int, kernel_size: int, group_size: int, block_size: int):
        super().__init__()
        self.kernel_size, self.group_size, self.block_size = kernel_size, group_size, block_size
        self.num_groups = hidden_size // group_size
        self.base_kernel = nn.Parameter(torch.empty(2, kernel_size, hidden_size))  # [side, tap, channel]
        self.kernel_projection = nn.Linear(hidden_size, 2 * kernel_size * self.num_groups, bias=False)

    def reset_to_identity(self) -> None:
        with torch.no_grad():
            self.base_kernel.zero_()
            self.base_kernel[:, 0] = 1.0
            self.kernel_projection.weight.zero_()

    def dynamic_taps(self, h: torch.Tensor) -> torch.Tensor:
        """[N, Q, H] -> [N, Q, 2, K, G]."""
        return self.kernel_projection(h).unflatten(-1, (2, self.kernel_size, self.num_groups))

    def convolve(self, x: torch.Tensor, dyn: torch.Tensor, side: int) -> torch.Tensor:
        """x [N, Q, H], dyn [N, Q, K, G] -> [N, Q, H]."""
        per_channel = dyn.repeat_interleave(self.group_size, dim=-1)  # [N, Q, K, H]: channel c reads group c // g
        kernel = self.base_kernel[side].to(x.dtype) + per_channel.to(x.dtype)
        out = kernel[..., 0, :] * x
        for tap in range(1, self.kernel_size):
            out = out + kernel[..., tap, :] * shift_within_blocks(x, tap, self.block_size)
        return out

    def prepare(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Side 0 on the sublayer's input; returns (conv_0(h), the side-1 taps for `finish`)."""
        dyn = self.dynamic_taps(h)
        return self.convolve(h, dyn[..., 0, :, :], 0), dyn[..., 1, :, :]

    def finish(self, out: torch.Tensor, side1_taps: torch.Tensor) -> torch.Tensor:
        """Side 1 on the sublayer's output, with the taps computed from its input."""
        return self.convolve(out, side1_taps, 1)


class DFlash2Layer(DraftLayer):
    """A v1 layer (same modules, same names) with a conv around each sublayer."""

    def __init__(self, cfg: DFlash2Config):
        super().__init__(cfg)
        args = (cfg.hidden_size, cfg.conv_kernel_size, cfg.conv_group_size, cfg.block_size)
        self.attention_conv = DynamicDepthwiseConv(*args)
        self.mlp_conv = DynamicDepthwiseConv(*args)

    def forward(self, x, cos, sin, k_ctx, v_ctx, attention, query_columns: torch.Tensor | None = None):
        if query_columns is not None:  # the conv after each sublayer reads the previous slot's output
            raise ValueError("a DFlash2 layer runs every block slot (no query_columns)")
        h, taps = self.attention_conv.prepare(self.input_layernorm(x))
        x = x + self.attention_conv.finish(self.self_attn(h, cos, sin, k_ctx, v_ctx, attention), taps)
        h, taps = self.mlp_conv.prepare(self.post_attention_layernorm(x))
        return x + self.mlp_conv.finish(self.mlp(h), taps)


# -- the candidate selector ------------------------------------------------------------------------
class CandidateSelector(nn.Module):
    def __init__(self, hidden_size: int, vocab_size: int, rank: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        # bare tensors: the published names have no `.weight` suffix
        self.predecessor_codebook = nn.Parameter(torch.empty(vocab_size, rank))
        self.successor_codebook = nn.Parameter(torch.empty(vocab_size, rank))
        self.hidden_projection = nn.Linear(hidden_size, rank, bias=False)

    def edge_scores(self, hidden: torch.Tensor, candidate_unary: torch.Tensor, candidate_ids: torch.Tensor,
                    predecessor_ids: torch.Tensor) -> torch.Tensor:
        """S(a, b) for every predecessor a and candidate b of each slot.

        hidden [..., H] (final-normed), candidate_unary / candidate_ids [..., k], predecessor_ids
        [..., P] -> scores [..., P, k]."""
        gate = self.hidden_projection(hidden)  # [..., r]
        pred = self.predecessor_codebook[predecessor_ids]  # [..., P, r]
        succ = self.successor_codebook[candidate_ids]  # [..., k, r]
        pair = torch.matmul(pred * gate[..., None, :], succ.transpose(-1, -2))  # [..., P, k]
        return candidate_unary[..., None, :].to(pair.dtype) + pair


# -- the model -------------------------------------------------------------------------------------
class DFlash2DraftModel(DFlashDraftModel):
    """The DFlash2 draft. `forward` has v1's signature and returns the final-normed hidden states;
    `candidates`, `selector_scores` and `greedy_walk` add the selector on top."""

    layer_class = DFlash2Layer

    def __init__(self, cfg: DFlash2Config):
        if not isinstance(cfg, DFlash2Config):
            raise TypeError(f"DFlash2DraftModel needs a DFlash2Config, got {type(cfg).__name__}")
        super().__init__(cfg)  # v1's modules (same names, each layer's window), DFlash2 layers
        self.candidate_selector = CandidateSelector(cfg.hidden_size, cfg.vocab_size, cfg.selector_rank,
                                                    cfg.selector_top_k)

    @property
    def top_k(self) -> int:
        return self.config.selector_top_k

    # -- initialisation --------------------------------------------------------------------------
    def init_weights(self, seed: int | None = None, std: float = 0.02) -> "DFlash2DraftModel":
        """The backbone exactly as v1's `init_weights(seed, std)` draws it (same generator order),
        then the identity conv, N(0, std) predecessor codebook and hidden projection, and a zero
        successor codebook (SpecForge/Automodel; the fresh model then equals the v1 draft)."""
        init_backbone(self, seed, std, skip=_is_dflash2_only)
        self.reset_dflash2_parts(seed=seed, std=std)
        return self

    def reset_dflash2_parts(self, seed: int | None = None, std: float = 0.02) -> None:
        """Identity conv and a selector that leaves the unary argmax unchanged (zero successor codebook)."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(1_000_003 + (0 if seed is None else seed))
        with torch.no_grad():
            for layer in self.layers:
                layer.attention_conv.reset_to_identity()
                layer.mlp_conv.reset_to_identity()
            sel = self.candidate_selector
            for param in (sel.predecessor_codebook, sel.hidden_projection.weight):
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)
            sel.successor_codebook.zero_()

    @classmethod
    def from_v1(cls, v1: DFlashDraftModel, *, seed: int | None = None, std: float = 0.02,
                **config_overrides) -> "DFlash2DraftModel":
        """Warm start: v1's backbone weights, identity conv, zero successor codebook."""
        if isinstance(v1, DFlash2DraftModel):
            raise DFlashLabError("from_v1: the draft is already a DFlash2 draft; load it directly")
        cfg = DFlash2Config.from_v1(v1.config, **config_overrides)
        ref = next(v1.parameters())
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device=ref.device).to(ref.dtype)
        model.reset_dflash2_parts(seed=seed, std=std)
        missing, unexpected = model.load_state_dict(v1.state_dict(), strict=False)
        assert not unexpected, unexpected
        assert all(_is_dflash2_only(n) for n in missing), missing
        return model

    # -- the backbone ----------------------------------------------------------------------------
    def forward(
        self,
        noise_embedding: torch.Tensor,  # [N, Q, H]: blocks of block_size, or one (possibly shorter) block
        positions: torch.Tensor,  # [N, Q]
        context_features: torch.Tensor | None,  # [N, S, n*H] (new ones only, with a cache)
        context_positions: torch.Tensor | None,  # [N, S]
        *,
        cache: DraftCache | None = None,
        attention: AttentionFn = full_attention,
        output_slots: torch.Tensor | None = None,  # bool [N, Q]: return only these slots, [M, H]
    ) -> torch.Tensor:
        """Hidden states of the block slots after the final norm: [N, Q, H]. Q is a multiple of
        block_size (training: A blocks laid end to end) or at most one block (decoding).
        With `output_slots`, [M, H] for its True entries (row-major). Unlike v1, every slot runs
        through the last layer: the conv after each sublayer reads the previous slot's output."""
        cfg = self.config
        q_len = noise_embedding.shape[1]
        if q_len > cfg.block_size and q_len % cfg.block_size:
            raise ValueError(f"{q_len} block slots are neither one block nor whole blocks of {cfg.block_size}")
        x = noise_embedding
        if cfg.input_embedding_scale is not None:
            x = x * cfg.input_embedding_scale
        # v1's layer loop: the window (training and decoding), the cache, activation checkpointing
        out = self.norm(self._run_layers(x, positions, context_features, context_positions, cache, attention))
        return out if output_slots is None else out[output_slots]

    # -- the selector ----------------------------------------------------------------------------
    def process_unary(self, logits: torch.Tensor) -> torch.Tensor:
        """lm_head logits -> U (at least fp32): x output_multiplier, then the optional softcap."""
        cfg = self.config
        u = logits if logits.dtype == torch.float64 else logits.float()
        if cfg.output_multiplier is not None:
            u = u * cfg.output_multiplier
        if cfg.final_logit_softcapping:
            u = torch.tanh(u / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
        return u

    def unary_logits(self, hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """U over the whole vocabulary: [..., V] (fp32)."""
        return self.process_unary(lm_head(hidden.to(lm_head.weight.dtype)))

    def candidates(self, hidden: torch.Tensor, lm_head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of U per slot: (ids [..., k], U values [..., k]), sorted by U descending."""
        values, ids = torch.topk(self.unary_logits(hidden, lm_head), self.top_k, dim=-1)
        return ids, values

    def selector_scores(self, hidden, candidate_unary, candidate_ids, predecessor_ids) -> torch.Tensor:
        """S_t(a, b): [..., P, k] for predecessors [..., P] and candidates [..., k] (see CandidateSelector)."""
        return self.candidate_selector.edge_scores(hidden, candidate_unary, candidate_ids, predecessor_ids)

    def transition_scores(self, hidden, candidate_unary, candidate_ids, anchor_ids) -> torch.Tensor:
        """The whole trellis of a block: [..., T, k, k] for slots 1..T (hidden [..., T, H]): row a of
        slot 1 is the anchor (all k rows equal), of slot t > 1 the candidates of slot t - 1."""
        k = candidate_ids.shape[-1]
        first = anchor_ids[..., None, None].expand(*anchor_ids.shape, 1, k)
        preds = torch.cat([first, candidate_ids[..., :-1, :]], dim=-2)  # [..., T, k]
        return self.selector_scores(hidden, candidate_unary, candidate_ids, preds)

    @torch.no_grad()
    def greedy_walk(self, hidden: torch.Tensor, anchor_ids: torch.Tensor, lm_head: nn.Module):
        """The T = 0 draft of each block: hidden [N, T, H] of slots 1..T, anchors [N].
        Returns (tokens [N, T], candidate ids [N, T, k], scores [N, T, k] of the chosen rows)."""
        ids, unary = self.candidates(hidden, lm_head)
        prev = anchor_ids
        tokens, rows = [], []
        for t in range(hidden.shape[1]):
            row = self.selector_scores(hidden[:, t], unary[:, t], ids[:, t], prev[:, None])[:, 0]  # [N, k]
            prev = ids[:, t].gather(-1, row.argmax(-1, keepdim=True))[:, 0]
            tokens.append(prev)
            rows.append(row)
        return torch.stack(tokens, 1), ids, torch.stack(rows, 1)


def _is_dflash2_only(name: str) -> bool:
    return ".attention_conv." in name or ".mlp_conv." in name or name.startswith("candidate_selector.")


def build_dflash2_config(target, *, num_layers: int, block_size: int = 8, **kwargs) -> DFlash2Config:
    """A DFlash2 config shaped like the target (as `build_draft_config`), DFlash2 fields from kwargs:
    conv_kernel_size, conv_group_size, selector_rank, selector_top_k, sliding_window,
    use_sliding_window; the rest go to `build_draft_config`."""
    from dflash_lab.models.draft import build_draft_config

    own = {f.name for f in fields(DFlash2Config)} - {f.name for f in fields(DraftConfig)}
    dflash2 = {k: kwargs.pop(k) for k in list(kwargs) if k in own}
    v1 = build_draft_config(target, num_layers=num_layers, block_size=block_size, **kwargs)
    return DFlash2Config.from_v1(v1, **dflash2)


# GGUF names of the DFlash2-only tensors, as llama.cpp's loader (src/models/dflash.cpp) creates them.
# Torch arrays are written as they are: ggml lists dims fastest-first, so torch [2, K, H] is ggml
# {H, K, 2} (side outermost, then tap, then channel: the loader views side s at offset s * nb[2]),
# and the projection's 2*K*G output rows are read as ggml (G, K, 2): row = side*K*G + tap*G + group,
# our `unflatten(-1, (2, K, G))`. The codebooks [V, r] are ggml {r, V}: `get_rows` by token id.
GGUF_DFLASH2_LAYER_TENSORS = {
    "attention_conv.base_kernel": "attn_conv_base",  # no `.weight`: the loader's name has none
    "attention_conv.kernel_projection.weight": "attn_conv_proj.weight",  # ggml {H, 2*K*G}
    "mlp_conv.base_kernel": "ffn_conv_base",
    "mlp_conv.kernel_projection.weight": "ffn_conv_proj.weight",
}
GGUF_DFLASH2_TOP_TENSORS = {
    "candidate_selector.hidden_projection.weight": "selector_hidden.weight",  # ggml {H, r}
    "candidate_selector.predecessor_codebook": "selector_predecessor.weight",  # ggml {r, V}
    "candidate_selector.successor_codebook": "selector_successor.weight",  # ggml {r, V}
}


def gguf_dflash2_tensor_name(name: str) -> str | None:
    """Checkpoint name of a DFlash2-only tensor -> its GGUF name (None for any other tensor)."""
    if name in GGUF_DFLASH2_TOP_TENSORS:
        return GGUF_DFLASH2_TOP_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in GGUF_DFLASH2_LAYER_TENSORS:
        return f"blk.{int(parts[1])}.{GGUF_DFLASH2_LAYER_TENSORS[parts[2]]}"
    return None


def gguf_dflash2_keys(cfg: DFlash2Config) -> dict:
    """The GGUF keys (without the `dflash.` prefix) that a DFlash2 draft adds to a v1 DFlash GGUF
    (SPEC 2b): block_size, conv_kernel_size, conv_group_size, selector_rank, selector_top_k (u32),
    attention.causal (false), attention.sliding_window (u32) + attention.sliding_window_pattern
    (bool per layer) when the window is on, logit_scale / final_logit_softcapping when set
    (llama.cpp applies them to the selector's unary logits)."""
    keys: dict = {
        "block_size": cfg.block_size, "conv_kernel_size": cfg.conv_kernel_size,
        "conv_group_size": cfg.conv_group_size, "selector_rank": cfg.selector_rank,
        "selector_top_k": cfg.selector_top_k, "attention.causal": False,
    }
    if cfg.use_sliding_window:
        keys["attention.sliding_window"] = cfg.sliding_window
        keys["attention.sliding_window_pattern"] = [True] * cfg.num_hidden_layers
    if cfg.output_multiplier is not None:
        keys["logit_scale"] = cfg.output_multiplier
    if cfg.final_logit_softcapping:
        keys["final_logit_softcapping"] = cfg.final_logit_softcapping
    return keys


def gguf_dflash2_extras(model: DFlash2DraftModel) -> tuple[dict, dict]:
    """`gguf_dflash2_keys(model.config)` and the DFlash2-only tensors by GGUF name (fp32 CPU,
    torch layout: see GGUF_DFLASH2_LAYER_TENSORS for how ggml reads it)."""
    tensors = {}
    for name, t in model.state_dict().items():
        gguf_name = gguf_dflash2_tensor_name(name)
        if gguf_name is not None:
            tensors[gguf_name] = t.detach().float().contiguous().cpu()
    return gguf_dflash2_keys(model.config), tensors


def is_dflash2_config_dict(raw: dict) -> bool:
    return ARCHITECTURE in (raw.get("architectures") or [])


__all__ = [
    "ARCHITECTURE", "DFlash2Config", "DFlash2DraftModel", "DFlash2Layer", "DynamicDepthwiseConv", "CandidateSelector",
    "shift_within_blocks", "build_dflash2_config", "is_dflash2_config_dict", "gguf_dflash2_extras",
    "gguf_dflash2_keys", "gguf_dflash2_tensor_name", "GGUF_DFLASH2_LAYER_TENSORS", "GGUF_DFLASH2_TOP_TENSORS",
]
