"""The DFlash draft model (SPEC section 1), in plain PyTorch.

A stack of Qwen3 decoder layers that predicts a block of B tokens in one forward pass:

    c       = hidden_norm(fc(concat(target features of target_layer_ids)))     one vector per context token
    x       = embed([anchor, MASK, ..., MASK])                                the block, B tokens
    layer:  h = input_layernorm(x)
            q = q_norm(q_proj(h))                                            queries: block only
            k = k_norm(k_proj([c ; h])),  v = v_proj([c ; h])                keys/values: context + block
            x = x + o_proj(attention(q, k, v));  x = x + mlp(post_attention_layernorm(x))
    out     = norm(x) -> the target's lm_head                                slot k predicts position p + k

Context key/values depend on c only (not on the layer's input), so in decoding each layer caches
them and only newly committed tokens are projected.

Sliding-window layers (`sliding_window: W`, `layer_types`): a query at position t sees the context
keys at positions j with t - j < W (Hugging Face's convention, which counts the query's own position:
W - 1 context tokens for the anchor slot, one fewer per later slot), and every key of its own block
(bidirectional, as in full layers; W >= block_size). This is the rule of z-lab's reference model
with `is_causal: false` and of vLLM's per-layer window; the decoding cache of such a layer keeps
only the W - 1 context positions the next block can still see. Embedding and lm_head belong to the target:
this module holds neither, so its state dict is exactly the checkpoint of SPEC section 2.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dflash_lab.errors import DFlashLabError


@dataclass
class DraftConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    num_target_layers: int
    mask_token_id: int
    target_layer_ids: list[int]
    block_size: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    """W: sliding-window layers see context positions j > t - W for a query at t (null = full attention)."""
    layer_types: list[str] | None = None
    """Per layer "sliding_attention" | "full_attention"; null with a sliding_window = every layer slides."""
    # keys of a loaded config.json that this class does not model (kept so a re-save round-trips)
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        problems = []
        if self.block_size < 2:
            problems.append(f"block_size must be >= 2, got {self.block_size}")
        if self.num_hidden_layers < 1:
            problems.append(f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}")
        if not self.target_layer_ids:
            problems.append("target_layer_ids is empty")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        problems += self._window_problems()
        if problems:
            raise DFlashLabError("invalid draft config: " + "; ".join(problems))

    def _window_problems(self) -> list[str]:
        if self.sliding_window is not None and self.layer_types is None:
            self.layer_types = [SLIDING] * self.num_hidden_layers
        if self.layer_types is None:
            return []
        self.layer_types = list(self.layer_types)
        problems = []
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        unknown = sorted(set(self.layer_types) - {SLIDING, FULL})
        if unknown:
            problems.append(f"layer_types {unknown}: use {SLIDING!r} or {FULL!r}")
        if SLIDING in self.layer_types:
            if self.sliding_window is None:
                problems.append("layer_types has sliding_attention layers but sliding_window is not set")
            elif self.sliding_window < self.block_size:
                problems.append(f"sliding_window {self.sliding_window} < block_size {self.block_size}: "
                                "a block must see all of itself")
        return problems

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer (None = full attention)."""
        if self.layer_types is None or self.layer_types[layer] != SLIDING:
            return None
        return self.sliding_window

    @property
    def has_sliding_layers(self) -> bool:
        return self.layer_types is not None and SLIDING in self.layer_types

    # -- the config.json of SPEC section 2 ---------------------------------------------------------
    def to_json_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        mask_token_id = d.pop("mask_token_id")
        target_layer_ids = d.pop("target_layer_ids")
        sliding = self.has_sliding_layers
        window_keys = _window_json(self) if sliding else {}
        for key in ("sliding_window", "layer_types"):
            d.pop(key)
        out = dict(extra)
        out.update(
            {
                "architectures": ["DFlashDraftModel"],
                "model_type": "qwen3",
                **d,
                "rope_scaling": None,
                "tie_word_embeddings": False,
                "use_sliding_window": False,
                "attention_dropout": 0.0,
                "dflash_config": {"mask_token_id": mask_token_id, "target_layer_ids": list(target_layer_ids)},
            }
        )
        if sliding:
            out.update(window_keys)
            out["dflash_config"]["causal"] = False
        return out

    @classmethod
    def from_json_dict(cls, raw: dict, *, source: str = "config.json") -> "DraftConfig":
        raw = dict(raw)
        dflash = dict(raw.pop("dflash_config", None) or {})
        for key in ("mask_token_id", "target_layer_ids", "block_size"):
            if key in dflash and key not in raw:
                raw[key] = dflash.pop(key)
        if "rope_theta" not in raw and isinstance(raw.get("rope_parameters"), dict):
            raw["rope_theta"] = raw["rope_parameters"].get("rope_theta", 1_000_000.0)
        if raw.get("head_dim") is None and raw.get("hidden_size") and raw.get("num_attention_heads"):
            raw["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
        if "num_target_layers" not in raw and raw.get("target_layer_ids"):
            raise DFlashLabError(f"{source}: missing num_target_layers")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        missing = sorted(k for k in known if k not in raw and cls.__dataclass_fields__[k].default is MISSING)
        if missing:
            raise DFlashLabError(f"{source}: missing DFlash draft fields {missing}; is this a DFlash draft checkpoint?")
        unused_window = _read_window_json(raw, dflash, source)
        kwargs = {k: raw.pop(k) for k in list(raw) if k in known}
        if unused_window is not None:
            raw["sliding_window"] = unused_window  # with use_sliding_window false: kept, never applied
        for key in ("architectures", "model_type", "rope_scaling", "tie_word_embeddings",
                    "use_sliding_window", "attention_dropout"):
            raw.pop(key, None)
        if dflash:
            raw["dflash_config"] = dflash  # unknown dflash_config keys, kept verbatim
        return cls(**kwargs, extra=raw)


SLIDING, FULL = "sliding_attention", "full_attention"


# What the serving stacks read (checked in their sources, mid-2026):
# - z-lab `dflash/model.py` (reference): per layer `layer_types[i]`; a sliding layer uses
#   `sliding_window` with Hugging Face's rule (query t sees keys j with t - j < W) and is CAUSAL unless
#   the top-level `is_causal` says otherwise.
# - vLLM `qwen3_dflash.py`: `layer_types` + `sliding_window` (or `dflash_config.swa_window_size` /
#   `use_swa`); sliding layers are causal unless `is_causal` or `dflash_config.causal` is false.
# - SGLang `models/dflash.py` + `speculative/dflash_utils.py`: `layer_types` + `sliding_window`
#   (window_left = sliding_window - 1); a sliding layer is built as a DECODER (causal) attention and
#   the version read has no override, so SGLang would run our bidirectional sliding layers causally
#   (still lossless, lower acceptance): serve sliding-window drafts with vLLM, or full attention.
# - Hugging Face's Qwen3Config drops `sliding_window` when `use_sliding_window` is false, so a
#   config with sliding layers must say `use_sliding_window: true`.
# Our drafts keep the block bidirectional in every layer, so we write `is_causal: false` and
# `dflash_config.causal: false` next to the window.
def _window_json(cfg: "DraftConfig") -> dict:
    return {"sliding_window": cfg.sliding_window, "layer_types": list(cfg.layer_types),
            "use_sliding_window": True, "max_window_layers": cfg.num_hidden_layers, "is_causal": False}


def _read_window_json(raw: dict, dflash: dict, source: str) -> int | None:
    """Resolve the window keys of a loaded config.json in place (as the serving stacks do); returns
    a `sliding_window` value that is present but not in effect."""
    window = raw.pop("sliding_window", None)
    use = bool(raw.pop("use_sliding_window", False))
    max_window_layers = raw.pop("max_window_layers", None)
    layer_types = raw.pop("layer_types", None)
    is_causal = raw.pop("is_causal", None)
    causal = dflash.pop("causal", None)
    if is_causal is None:
        is_causal = causal
    if layer_types is None and use and window is not None:
        # Qwen3Config's own rule: layers from max_window_layers on slide
        first = raw.get("num_hidden_layers", 0) if max_window_layers is None else max_window_layers
        layer_types = [SLIDING if i >= first else FULL for i in range(raw.get("num_hidden_layers", 0))]
        layer_types = layer_types if SLIDING in layer_types else None
    sliding = layer_types is not None and SLIDING in layer_types
    if is_causal or (sliding and is_causal is None):
        raise DFlashLabError(
            f"{source}: this draft has causal attention layers (sliding_attention layers are causal unless "
            "is_causal is false); dflash-lab runs bidirectional blocks only, so it cannot decode this draft")
    if layer_types is not None:
        raw["layer_types"] = layer_types
        if sliding:
            raw["sliding_window"] = window
            return None
    return window


class RMSNorm(nn.Module):
    """Qwen3's RMSNorm: normalise in fp32, scale in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape [N, L, head_dim] for integer positions [N, L] (default RoPE, fp32 math)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, L, d]; cos/sin [N, L, d]."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# attention(q [N,h,Q,d], k_ctx [N,kv,S,d], v_ctx, k_blk [N,kv,Q,d], v_blk, scale) -> [N,h,Q,d]
AttentionFn = Callable[..., torch.Tensor]


def select_columns(x: torch.Tensor, columns: torch.Tensor, block_size: int) -> torch.Tensor:
    """[N, A*B, ...] -> [N, A*K, ...]: slots `columns` (K of them) of every block, block-major."""
    n, q = x.shape[:2]
    return x.view(n, q // block_size, block_size, *x.shape[2:])[:, :, columns].reshape(n, -1, *x.shape[2:])


def full_attention(q, k_ctx, v_ctx, k_blk, v_blk, scale):
    """Decoding: the block sees the whole (cached) context and all of itself."""
    k = torch.cat([k_ctx, k_blk], dim=2)
    v = torch.cat([v_ctx, v_blk], dim=2)
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def windowed_attention(q, k_ctx, v_ctx, k_blk, v_blk, scale, *, query_positions, context_positions, window=None):
    """Decoding with a sliding window: the query at position t sees the context key at position j
    iff t - j < window, and all of its own block. query_positions [N, Q], context_positions [N, S]."""
    if window is None:
        return full_attention(q, k_ctx, v_ctx, k_blk, v_blk, scale)
    n, qlen = query_positions.shape
    seen = (query_positions[:, :, None] - context_positions[:, None, :]) < window  # [N, Q, S]
    own = torch.ones(n, qlen, qlen, dtype=torch.bool, device=q.device)
    mask = torch.cat([seen.expand(n, qlen, k_ctx.shape[2]), own], dim=-1)[:, None]
    k = torch.cat([k_ctx, k_blk], dim=2)
    v = torch.cat([v_ctx, v_blk], dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


class DraftAttention(nn.Module):
    window: int | None = None  # set per layer by DFlashDraftModel (cfg.layer_window)

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.block_size = cfg.block_size
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def _heads(self, x, heads):  # [N, L, heads*d] -> [N, heads, L, d]
        return x.view(*x.shape[:2], heads, self.head_dim).transpose(1, 2)

    def key_value(self, x, cos, sin):
        k = self.k_norm(self._heads(self.k_proj(x), self.num_kv_heads))
        return apply_rope(k, cos, sin), self._heads(self.v_proj(x), self.num_kv_heads)

    def forward(self, h, cos, sin, k_ctx, v_ctx, attention: AttentionFn, query_columns: torch.Tensor | None = None):
        """Keys/values from every block slot; queries (and the output) only for the slots
        `query_columns` of each block when given, else for all."""
        hq, cq, sq = h, cos, sin
        if query_columns is not None:
            hq, cq, sq = (select_columns(t, query_columns, self.block_size) for t in (h, cos, sin))
        q = apply_rope(self.q_norm(self._heads(self.q_proj(hq), self.num_heads)), cq, sq)
        k_blk, v_blk = self.key_value(h, cos, sin)
        if self.window is None:
            out = attention(q, k_ctx, v_ctx, k_blk, v_blk, self.head_dim**-0.5)
        else:  # attention functions that support windows take it as a keyword
            out = attention(q, k_ctx, v_ctx, k_blk, v_blk, self.head_dim**-0.5, window=self.window)
        return self.o_proj(out.transpose(1, 2).reshape(*hq.shape[:2], -1))


class DraftMLP(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DraftAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DraftMLP(cfg)

    def forward(self, x, cos, sin, k_ctx, v_ctx, attention, query_columns: torch.Tensor | None = None):
        h = self.input_layernorm(x)
        if query_columns is not None:  # the residual stream continues only for the queried slots
            x = select_columns(x, query_columns, self.self_attn.block_size)
        x = x + self.self_attn(h, cos, sin, k_ctx, v_ctx, attention, query_columns)
        return x + self.mlp(self.post_attention_layernorm(x))


class DraftCache:
    """Per-layer context keys/values (after k_norm and RoPE) for decoding. The block's own keys are
    never cached, so nothing has to be cropped after a verify. A sliding-window layer keeps only the
    positions a block can still see (`keep_from`): later blocks sit at later positions."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.positions: list[torch.Tensor | None] = [None] * num_layers  # [N, S] per layer

    @property
    def length(self) -> int:
        """Context positions seen so far (a windowed layer may hold fewer)."""
        if self.positions[0] is None or self.positions[0].shape[1] == 0:
            return 0 if self.keys[0] is None else self.keys[0].shape[2]
        return int(self.positions[0][0, -1]) + 1

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None,
               keep_from: int | None = None):
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
            if positions is not None:
                positions = torch.cat([self.positions[layer], positions], dim=1)
        if keep_from is not None and positions is not None:
            keep = int((positions[0] < keep_from).sum())  # positions ascend
            k, v, positions = k[:, :, keep:], v[:, :, keep:], positions[:, keep:]
        self.keys[layer], self.values[layer], self.positions[layer] = k, v, positions
        return k, v


def init_backbone(model: nn.Module, seed: int | None, std: float, skip=lambda name: False) -> None:
    """Unit norms, zero biases, N(0, std) for every other parameter, drawn in `named_parameters`
    order from one generator seeded by `seed`; parameters whose name `skip` accepts are left alone
    and draw nothing (so a DFlash2 draft's backbone gets exactly the v1 draft's values)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0 if seed is None else seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if skip(name):
                continue
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)


class DFlashDraftModel(nn.Module):
    layer_class: type[nn.Module] = DraftLayer  # DFlash2 swaps in its conv layer; the rest is shared
    activation_checkpointing: bool = False
    """Training: recompute each layer (its context K/V and the layer itself) in backward instead of
    keeping its activations. Only with grad enabled; decoding never checkpoints."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.config = cfg
        n_features = len(cfg.target_layer_ids)
        self.fc = nn.Linear(n_features * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(self.layer_class(cfg) for _ in range(cfg.num_hidden_layers))
        for i, layer in enumerate(self.layers):
            layer.self_attn.window = cfg.layer_window(i)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def target_layer_ids(self) -> list[int]:
        return self.config.target_layer_ids

    def init_weights(self, seed: int | None = None, std: float = 0.02) -> "DFlashDraftModel":
        """Fresh initialisation (normal(0, std) linears, unit norms), reproducible from `seed`."""
        init_backbone(self, seed, std)
        return self

    def fuse_context(self, features: torch.Tensor) -> torch.Tensor:
        """[N, S, n*H] target features -> c [N, S, H]."""
        return self.hidden_norm(self.fc(features))

    def forward(
        self,
        noise_embedding: torch.Tensor,  # [N, Q, H] embeddings of [anchor, MASK...] blocks
        positions: torch.Tensor,  # [N, Q] RoPE positions of the block slots
        context_features: torch.Tensor | None,  # [N, S, n*H] raw target features (new ones only, with a cache)
        context_positions: torch.Tensor | None,  # [N, S]
        *,
        cache: DraftCache | None = None,
        attention: AttentionFn = full_attention,
        output_slots: torch.Tensor | None = None,  # bool [N, Q]: the only slots whose output is needed
    ) -> torch.Tensor:
        """Hidden states of the block slots after the final norm: [N, Q, H].

        With `output_slots`, [M, H] for its True entries in row-major order (= full[output_slots]):
        the last layer still takes keys and values from every slot, but computes its query,
        attention output, o_proj, MLP and the final norm only for the slots (columns of a block)
        that some block needs; training passes the scored slots (valid, <= loss.max_slot)."""
        cfg = self.config
        columns = needed = None
        if output_slots is not None:
            n, q = output_slots.shape
            needed = output_slots.view(n, q // cfg.block_size, cfg.block_size)
            columns = needed.any(dim=1).any(dim=0).nonzero().flatten()  # slots some block scores
            if columns.numel() == 0 or self.layers[-1].self_attn.window is not None:
                # a windowed last layer needs every slot as a query: the slot gives its position
                columns = torch.arange(cfg.block_size, device=output_slots.device)
        x = self.norm(self._run_layers(noise_embedding, positions, context_features, context_positions,
                                       cache, attention, last_layer_columns=columns))
        if needed is None:
            return x
        return x.view(*needed.shape[:2], columns.numel(), x.shape[-1])[needed[:, :, columns]]

    def _run_layers(self, x, positions, context_features, context_positions, cache, attention,
                    last_layer_columns=None):
        """Every layer on the block slots x [N, Q, H] (before the final norm). Each layer's window
        applies here: training attention takes it as a keyword (blocks rule 4); decoding (plain
        attention, with or without a cache) masks context positions by the query positions."""
        cfg = self.config
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        if context_features is not None and context_features.shape[1] > 0:
            c = self.fuse_context(context_features.to(self.fc.weight.dtype))
            ccos, csin = rope_cos_sin(context_positions, cfg.head_dim, cfg.rope_theta, c.dtype)
        else:
            c = ccos = csin = None
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for i in range(len(self.layers)):
            cols = last_layer_columns if i == len(self.layers) - 1 else None
            if recompute:
                x = checkpoint(self._layer_step, i, x, c, ccos, csin, cos, sin, None, attention, cols,
                               positions, context_positions, use_reentrant=False)
            else:
                x = self._layer_step(i, x, c, ccos, csin, cos, sin, cache, attention, cols, positions, context_positions)
        return x

    def _layer_step(self, i, x, c, ccos, csin, cos, sin, cache, attention, query_columns, positions, context_positions):
        """Layer i: its keys/values over the context (or none), then the layer on the block. A
        sliding-window layer's cache keeps only what its window can still see."""
        cfg = self.config
        layer = self.layers[i]
        if c is not None:
            k_ctx, v_ctx = layer.self_attn.key_value(c, ccos, csin)
            ctx_pos = context_positions
        else:
            empty = x.new_zeros(x.shape[0], cfg.num_key_value_heads, 0, cfg.head_dim)
            k_ctx, v_ctx = empty, empty
            ctx_pos = positions.new_zeros(positions.shape[0], 0)
        window = layer.self_attn.window
        if cache is not None:
            keep_from = int(positions.min()) - window + 1 if window is not None else None
            k_ctx, v_ctx = cache.extend(i, k_ctx, v_ctx, ctx_pos, keep_from)
            ctx_pos = cache.positions[i]
        layer_attention = attention
        if window is not None and attention is full_attention:  # decoding: mask by positions
            layer_attention = partial(windowed_attention, query_positions=positions,
                                      context_positions=ctx_pos.expand(positions.shape[0], -1))
        return layer(x, cos, sin, k_ctx, v_ctx, layer_attention, query_columns=query_columns)


def build_draft_config(
    target,
    *,
    num_layers: int,
    block_size: int = 16,
    mask_token_id: int | None = None,
    target_layer_ids: list[int] | None = None,
    intermediate_size: int | None = None,
    rope_theta: float | None = None,
    sliding_window: int | None = None,
    layer_types: list[str] | None = None,
) -> DraftConfig:
    """A draft config shaped like the target's own layers (hidden size, heads, MLP width)."""
    from dflash_lab.models.target import attention_attr, default_target_layer_ids, rope_theta_of

    tc = target.config
    heads = int(attention_attr(tc, "num_attention_heads"))
    head_dim = int(attention_attr(tc, "head_dim") or tc.hidden_size // heads)
    if rope_theta is None:
        rope_theta = rope_theta_of(tc)
    cfg = DraftConfig(
        hidden_size=target.hidden_size,
        intermediate_size=int(intermediate_size or tc.intermediate_size),
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(attention_attr(tc, "num_key_value_heads") or heads),
        head_dim=head_dim,
        vocab_size=target.vocab_size,
        num_target_layers=target.num_layers,
        mask_token_id=target.default_mask_token_id() if mask_token_id is None else mask_token_id,
        target_layer_ids=target_layer_ids or default_target_layer_ids(target.num_layers, num_layers),
        block_size=block_size,
        rms_norm_eps=float(getattr(tc, "rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        max_position_embeddings=int(getattr(tc, "max_position_embeddings", 40960)),
        sliding_window=sliding_window,
        layer_types=layer_types,
    )
    validate_against_target(cfg, target)
    return cfg


def validate_against_target(cfg: DraftConfig, target, *, source: str = "draft") -> None:
    """Stop with a message naming both values when a draft does not fit a target."""
    problems = []
    if cfg.hidden_size != target.hidden_size:
        problems.append(f"hidden_size: draft {cfg.hidden_size} != target {target.hidden_size}")
    if cfg.vocab_size != target.vocab_size:
        problems.append(f"vocab_size: draft {cfg.vocab_size} != target embedding rows {target.vocab_size}")
    if cfg.num_target_layers != target.num_layers:
        problems.append(f"num_target_layers: draft {cfg.num_target_layers} != target {target.num_layers}")
    bad = [i for i in cfg.target_layer_ids if not 0 <= i < target.num_layers]
    if bad:
        problems.append(
            f"target_layer_ids {cfg.target_layer_ids}: {bad} outside the target's layers 0..{target.num_layers - 1}"
        )
    if not 0 <= cfg.mask_token_id < target.vocab_size:
        problems.append(
            f"mask_token_id {cfg.mask_token_id} outside the target's embedding table (0..{target.vocab_size - 1})"
        )
    if cfg.block_size < 2:
        problems.append(f"block_size {cfg.block_size} < 2")
    if problems:
        raise DFlashLabError(
            f"{source} does not match target {target.name}: " + "; ".join(problems)
            + ". Use a draft made for this target (dflash-lab draft init --target ...)."
        )
