"""Export a draft checkpoint to the GGUF file llama.cpp's `--spec-type draft-dflash` loads (SPEC 2b).

    dflash-lab draft export DRAFT --to gguf --target TARGET --out FILE [--dtype f32|f16]

The file is written section by section, one small function each, so that later additions
(sliding-window keys, DFlash2 keys and tensors) are one more function in `KEY_SECTIONS` /
`TENSOR_SECTIONS` plus a line in `unsupported_features` removed:

    general      general.architecture = "dflash", name, file type
    hparams      dflash.{context_length, embedding_length, block_count, feed_forward_length,
                 attention.*, rope.*} - the Qwen3 layer shape of the draft
    dflash       dflash.{block_size, target_hidden_size, vocab_size, target_layers}
    tokenizer    every `tokenizer.*` key of the target GGUF + `tokenizer.ggml.mask_token_id`
    dflash2      DFlash2 drafts only: dflash.{conv_kernel_size, conv_group_size, selector_rank,
                 selector_top_k, attention.causal, logit_scale, final_logit_softcapping}
    tensors      fc, enc.output_norm (= hidden_norm), output_norm (= norm), blk.N.*; DFlash2 adds
                 blk.N.{attn,ffn}_conv_base, blk.N.{attn,ffn}_conv_proj.weight, selector_{hidden,
                 predecessor,successor}.weight (models/dflash2.py GGUF_DFLASH2_*, docs/dflash2.md)

Facts that fail silently when wrong (each has a negative test through `ExportFault`):
- `dflash.target_layers` = our `target_layer_ids` + 1: llama.cpp taps a layer's INPUT, our id i
  is `hidden_states[i + 1]`. Without the +1 the draft loads, runs, and is worse.
- `dflash.rope.freq_base` must be written: without it llama.cpp uses 10,000.
- the mask token id must be `tokenizer.ggml.mask_token_id` (a `dflash.mask_token_id` alone makes
  llama.cpp abort the whole process).
Torch `[out, in]` weights are written as they are (GGUF reverses the shape); q/k are NOT permuted
(NeoX RoPE, as ours; llama.cpp's Llama converter permutes, this one must not).
DFlash2's silent failures (same shapes, wrong numbers; the DFlash2 parity test catches each through
`ExportFault`): the conv base's side and tap axes swapped ([2, K, H] with K = 2), the kernel
projection's rows in group-major order, the two selector codebooks swapped.
"""

from __future__ import annotations

import enum
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from dflash_lab.errors import DFlashLabError

ARCH = "dflash"
DTYPES = ("f32", "f16")


class ExportFault(enum.Enum):
    """Deliberately wrong exports, for the parity test's negative cases only (never a CLI option)."""

    NONE = "none"
    LAYER_IDS_WITHOUT_PLUS_ONE = "layer-ids-without-plus-one"
    NO_ROPE_FREQ_BASE = "no-rope-freq-base"
    # DFlash2 (each loads and runs in llama.cpp: same shapes as the right file)
    CONV_BASE_SIDE_TAP_SWAPPED = "conv-base-side-tap-swapped"  # base [2, K, H] written as [K, 2, H]
    CONV_PROJ_GROUP_MAJOR = "conv-proj-group-major"  # projection rows as (G, K, 2) instead of (2, K, G)
    SELECTOR_CODEBOOKS_SWAPPED = "selector-codebooks-swapped"  # predecessor <-> successor


@dataclass
class ExportInput:
    """Everything a section function reads."""

    cfg: object  # DraftConfig
    tensors: dict  # checkpoint name -> torch.Tensor
    target: object  # gguf.GGUFReader of the target
    dtype: str  # "f32" | "f16"
    fault: ExportFault = ExportFault.NONE
    name: str = "dflash-draft"


# -- reading the target GGUF ----------------------------------------------------------------------
def read_gguf(path: str | os.PathLike):
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise DFlashLabError(f"target GGUF {path}: no such file; pass a .gguf file or an embedded target name")
    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, KeyError) as exc:
        raise DFlashLabError(f"target GGUF {path}: not a readable GGUF file ({exc})") from exc


def is_draft_gguf(path: str | os.PathLike) -> bool:
    """A GGUF file whose general.architecture is the draft's (an earlier export), read by header only."""
    from gguf import GGUFReader

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        return target_arch(GGUFReader(str(path))) == ARCH
    except (OSError, ValueError, KeyError, IndexError):
        return False


def gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def target_arch(reader) -> str:
    return str(gguf_field(reader, "general.architecture", ""))


def resolve_target_gguf(spec: str, kind: str = "q4_1") -> Path:
    """A `.gguf` path, or an embedded target name (its GGUF file of `kind`, fetched if needed)."""
    from dflash_lab.models import embedded

    if spec in embedded.EMBEDDED_TARGETS:
        return embedded.gguf_path(spec, kind)
    path = Path(spec).expanduser()
    if path.suffix != ".gguf":
        raise DFlashLabError(f"--target {spec}: pass a .gguf file (the target llama.cpp serves) or an embedded "
                             f"target name ({', '.join(embedded.EMBEDDED_TARGETS)})")
    if not path.is_file():
        raise DFlashLabError(f"--target {spec}: no such file")
    return path


# -- what this exporter cannot represent ----------------------------------------------------------
def unsupported_features(cfg, reader) -> list[str]:
    """Reasons the draft cannot be written as a llama.cpp DFlash GGUF (empty when it can)."""
    extra = getattr(cfg, "extra", {}) or {}
    problems = dflash2_problems(cfg) if is_dflash2(cfg) else []
    if cfg.attention_bias:
        problems.append("attention_bias = true (llama.cpp's DFlash layers have no q/k/v/o biases)")
    if cfg.hidden_act != "silu":
        problems.append(f"hidden_act = {cfg.hidden_act!r} (llama.cpp's DFlash MLP is SwiGLU with silu)")
    if not is_dflash2(cfg) and (extra.get("dflash2")
                                or any("dflash2" in str(a).lower() for a in extra.get("architectures", []) or [])):
        problems.append("its config names DFlash2 but was not read as a DFlash2 draft (re-save it with this version)")
    rope_scaling = extra.get("rope_scaling")
    if rope_scaling:
        problems.append(f"rope_scaling {rope_scaling!r} (the exporter writes plain RoPE only)")
    arch = target_arch(reader)
    n_embd = gguf_field(reader, f"{arch}.embedding_length")
    n_layer = gguf_field(reader, f"{arch}.block_count")
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    if vocab is None:
        problems.append("the target GGUF has no tokenizer.ggml.tokens (llama.cpp needs the target's vocabulary)")
    if n_embd is not None and int(n_embd) != cfg.hidden_size:
        problems.append(f"the draft's hidden_size {cfg.hidden_size} differs from the target's embedding_length {n_embd}")
    if n_layer is not None and max(cfg.target_layer_ids) >= int(n_layer):
        problems.append(f"target_layer_ids {cfg.target_layer_ids} reach past the target's {n_layer} layers")
    if vocab is not None and not 0 <= cfg.mask_token_id < vocab:
        problems.append(f"mask_token_id {cfg.mask_token_id} is outside the target's vocabulary of {vocab} tokens")
    if vocab is not None and cfg.vocab_size != vocab:
        problems.append(f"the draft's vocab_size {cfg.vocab_size} differs from the target GGUF's {vocab} tokens")
    return problems


def is_dflash2(cfg) -> bool:
    from dflash_lab.models.dflash2 import DFlash2Config

    return isinstance(cfg, DFlash2Config)


def dflash2_problems(cfg) -> list[str]:
    """What llama.cpp's DFlash2 loader and graph (src/models/dflash.cpp) cannot represent."""
    problems = []
    lattice = cfg.selector_top_k * (cfg.selector_top_k + 1)
    if cfg.hidden_size < lattice:
        # the selector's lattice (top_k ids + top_k^2 scores) is packed into one hidden-size row
        problems.append(f"hidden_size {cfg.hidden_size} < selector_top_k * (selector_top_k + 1) = {lattice} "
                        "(llama.cpp's DFlash2 loader refuses it; use a smaller selector_top_k)")
    if cfg.input_embedding_scale is not None:
        problems.append(f"input_embedding_scale {cfg.input_embedding_scale} (llama.cpp's DFlash2 graph "
                        "does not scale the block embeddings)")
    return problems


# -- key sections ---------------------------------------------------------------------------------
def write_general(writer, inp: ExportInput) -> None:
    from gguf import LlamaFileType

    writer.add_name(inp.name)
    writer.add_file_type(LlamaFileType.ALL_F32 if inp.dtype == "f32" else LlamaFileType.MOSTLY_F16)


def write_hparams(writer, inp: ExportInput) -> None:
    """The shape of the draft's Qwen3 layers, as llama.cpp's hparams loader names them."""
    cfg = inp.cfg
    writer.add_uint32(f"{ARCH}.context_length", cfg.max_position_embeddings)
    writer.add_uint32(f"{ARCH}.embedding_length", cfg.hidden_size)
    writer.add_uint32(f"{ARCH}.block_count", cfg.num_hidden_layers)
    writer.add_uint32(f"{ARCH}.feed_forward_length", cfg.intermediate_size)
    writer.add_uint32(f"{ARCH}.attention.head_count", cfg.num_attention_heads)
    writer.add_uint32(f"{ARCH}.attention.head_count_kv", cfg.num_key_value_heads)
    writer.add_uint32(f"{ARCH}.attention.key_length", cfg.head_dim)
    writer.add_uint32(f"{ARCH}.attention.value_length", cfg.head_dim)
    writer.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    writer.add_uint32(f"{ARCH}.rope.dimension_count", cfg.head_dim)
    if inp.fault is not ExportFault.NO_ROPE_FREQ_BASE:
        writer.add_float32(f"{ARCH}.rope.freq_base", float(cfg.rope_theta))


def write_dflash(writer, inp: ExportInput) -> None:
    """What makes it a DFlash draft: block size, the target's width and the tapped layers."""
    from gguf import GGUFValueType

    cfg = inp.cfg
    writer.add_uint32(f"{ARCH}.block_size", cfg.block_size)
    writer.add_uint32(f"{ARCH}.target_hidden_size", cfg.hidden_size)
    writer.add_uint32(f"{ARCH}.vocab_size", cfg.vocab_size)
    shift = 0 if inp.fault is ExportFault.LAYER_IDS_WITHOUT_PLUS_ONE else 1
    layers = [int(i) + shift for i in cfg.target_layer_ids]
    writer.add_key_value(f"{ARCH}.target_layers", layers, GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)


def write_tokenizer(writer, inp: ExportInput) -> None:
    """The target's tokenizer, key for key, plus the mask token (llama.cpp reads it from here)."""
    copy_fields(inp.target, writer, lambda key: key.startswith("tokenizer."))
    writer.add_uint32("tokenizer.ggml.mask_token_id", inp.cfg.mask_token_id)


def write_sliding_window(writer, inp: ExportInput) -> None:
    """Sliding-window layers (draft `sliding_window` + `layer_types`), as llama.cpp's DFlash loader
    reads them (src/models/dflash.cpp): the window W (its rule t - j < W is ours) and one bool per
    layer, true = sliding. Nothing is written for a full-attention draft."""
    from gguf import GGUFValueType

    cfg = inp.cfg
    windows = [cfg.layer_window(i) for i in range(cfg.num_hidden_layers)] if hasattr(cfg, "layer_window") else []
    if not any(w is not None for w in windows):
        return
    writer.add_uint32(f"{ARCH}.attention.sliding_window", int(cfg.sliding_window))
    writer.add_key_value(f"{ARCH}.attention.sliding_window_pattern", [w is not None for w in windows],
                         GGUFValueType.ARRAY, sub_type=GGUFValueType.BOOL)


# written by write_dflash / write_sliding_window for every draft, so not again by write_dflash2
_DFLASH2_KEYS_WRITTEN_ELSEWHERE = ("block_size", "attention.sliding_window", "attention.sliding_window_pattern")


def write_dflash2(writer, inp: ExportInput) -> None:
    """DFlash2 drafts: the conv and selector settings (llama.cpp treats the file as DFlash2 when
    `selector_hidden.weight` is present and then needs every one of them > 0)."""
    from dflash_lab.models.dflash2 import gguf_dflash2_keys

    if not is_dflash2(inp.cfg):
        return
    for key, value in gguf_dflash2_keys(inp.cfg).items():
        if key in _DFLASH2_KEYS_WRITTEN_ELSEWHERE:
            continue
        if isinstance(value, bool):
            writer.add_bool(f"{ARCH}.{key}", value)
        elif isinstance(value, int):
            writer.add_uint32(f"{ARCH}.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"{ARCH}.{key}", value)
        else:
            raise TypeError(f"GGUF key {key}: no writer for {value!r}")


KEY_SECTIONS: list[Callable] = [write_general, write_hparams, write_dflash, write_sliding_window, write_dflash2,
                                write_tokenizer]


# -- tensor sections ------------------------------------------------------------------------------
TOP_TENSORS = {"fc.weight": "fc.weight", "hidden_norm.weight": "enc.output_norm.weight",
               "norm.weight": "output_norm.weight"}
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensor_name(name: str) -> str:
    """Checkpoint tensor name -> GGUF tensor name (SPEC 2 -> SPEC 2b; DFlash2: SPEC 10)."""
    from dflash_lab.models.dflash2 import gguf_dflash2_tensor_name

    dflash2_name = gguf_dflash2_tensor_name(name)
    if dflash2_name is not None:
        return dflash2_name
    if name in TOP_TENSORS:
        return TOP_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in LAYER_TENSORS:
        return f"blk.{int(parts[1])}.{LAYER_TENSORS[parts[2]]}"
    raise DFlashLabError(f"draft tensor {name!r} has no llama.cpp DFlash counterpart; the exporter cannot write it")


def _array(tensor, dtype: str, *, keep_f32: bool = False) -> np.ndarray:
    # norms stay f32 in an f16 file (llama.cpp's converters do the same: 1-D tensors are tiny and
    # precision-sensitive); so do DFlash2's conv base kernels (`keep_f32`: tiny, and added in the
    # graph to the f32 dynamic taps)
    arr = tensor.detach().float().cpu().numpy()
    if dtype == "f16" and arr.ndim > 1 and not keep_f32:
        return arr.astype(np.float16)
    return np.ascontiguousarray(arr, dtype=np.float32)


def _is_conv_base(name: str) -> bool:
    return name.endswith("_conv.base_kernel")


def faulted_tensor(name: str, tensor, fault: ExportFault, tensors: dict):
    """The tensor a known-wrong export writes under `name` (tests only; `tensor` when no fault applies)."""
    if fault is ExportFault.CONV_BASE_SIDE_TAP_SWAPPED and _is_conv_base(name):
        return tensor.transpose(0, 1).contiguous()  # [2, K, H] -> [K, 2, H]: same shape when K = 2
    if fault is ExportFault.CONV_PROJ_GROUP_MAJOR and name.endswith("_conv.kernel_projection.weight"):
        k = tensors[name.replace("kernel_projection.weight", "base_kernel")].shape[1]
        rows = tensor.unflatten(0, (2, k, -1))  # (side, tap, group)
        return rows.permute(2, 1, 0, 3).reshape(tensor.shape).contiguous()  # (group, tap, side)
    if fault is ExportFault.SELECTOR_CODEBOOKS_SWAPPED and name.endswith("_codebook"):
        other = "successor" if "predecessor" in name else "predecessor"
        return tensors[f"candidate_selector.{other}_codebook"]
    return tensor


def write_draft_tensors(writer, inp: ExportInput) -> None:
    for name in sorted(inp.tensors, key=_tensor_order):
        tensor = faulted_tensor(name, inp.tensors[name], inp.fault, inp.tensors)
        writer.add_tensor(gguf_tensor_name(name), _array(tensor, inp.dtype, keep_f32=_is_conv_base(name)))


def _tensor_order(name: str):
    parts = name.split(".")
    if parts[0] == "layers":
        return (1, int(parts[1]), name)
    return (2, 0, name) if parts[0] == "candidate_selector" else (0, 0, name)


TENSOR_SECTIONS: list[Callable] = [write_draft_tensors]


# -- generic GGUF helpers (also used to write the F32 target) -------------------------------------
def copy_fields(reader, writer, keep: Callable[[str], bool]) -> None:
    """Copy the reader's key/values for which `keep(key)` is true, with their GGUF types."""
    from gguf import GGUFValueType

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or not keep(key):
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), vtype)


def write_gguf_atomically(out: Path, arch: str, fill: Callable) -> Path:
    """Create a GGUFWriter for `arch` on a temp file, call `fill(writer)`, write, rename into place."""
    from gguf import GGUFWriter

    from dflash_lab.fileio import named_write_errors

    out = Path(out)
    with named_write_errors(out, "GGUF", fix="free disk space or choose another --out"):
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        try:
            writer = GGUFWriter(tmp, arch)
            fill(writer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a model file is for every user of the cache
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return out


# -- the export -----------------------------------------------------------------------------------
def export_draft_gguf(draft_dir: str | os.PathLike, target_gguf: str | os.PathLike, out: str | os.PathLike, *,
                      dtype: str = "f32", fault: ExportFault = ExportFault.NONE) -> Path:
    """Write `draft_dir` (SPEC 2 checkpoint) as a llama.cpp DFlash GGUF at `out`; return its path.

    `target_gguf` is the GGUF file the draft will be served beside (its tokenizer is copied).
    `fault` is for tests only: it writes a known-wrong file to prove the parity test catches it.
    """
    from dflash_lab.models.checkpoint import read_draft_config, read_tensors

    if dtype not in DTYPES:
        raise DFlashLabError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    draft_dir = Path(draft_dir)
    if not draft_dir.is_dir():
        raise DFlashLabError(f"draft {draft_dir}: no such directory; pass a draft checkpoint directory")
    cfg = read_draft_config(draft_dir)
    reader = read_gguf(target_gguf)
    problems = unsupported_features(cfg, reader)
    if problems:
        raise DFlashLabError(f"draft {draft_dir} cannot be exported to a llama.cpp GGUF: " + "; ".join(problems))
    tensors = read_tensors(draft_dir, cfg)
    inp = ExportInput(cfg=cfg, tensors=tensors, target=reader, dtype=dtype, fault=fault,
                      name=draft_dir.resolve().name)

    def fill(writer):
        for section in KEY_SECTIONS:
            section(writer, inp)
        for section in TENSOR_SECTIONS:
            section(writer, inp)

    return write_gguf_atomically(Path(out), ARCH, fill)
