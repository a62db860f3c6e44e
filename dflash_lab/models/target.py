"""The frozen target model: loading, chat rendering, stop tokens, and the features a draft reads.

A DFlash draft is conditioned on the outputs of target layers `target_layer_ids`. In a Hugging Face
`output_hidden_states` tuple, index 0 is the embedding output, so layer `i`'s output is
`hidden_states[i + 1]` (the `+1` offset of SPEC section 1).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dflash_lab.errors import DFlashLabError
from dflash_lab.fileio import sha256_file

# Where a chat template knows a thinking switch, it is always turned off (SPEC section 6).
THINKING_KWARGS = {"enable_thinking": False}


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """SPEC section 1: `round(1 + i * (L - 4) / (n - 1))`, or `[L // 2]` for a one-layer draft."""
    if num_draft_layers < 1:
        raise DFlashLabError(f"a draft needs at least one layer, got num_layers={num_draft_layers}")
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    span = num_target_layers - 4
    # Python's round() is banker's rounding, like the reference implementations.
    return [round(1 + i * span / (num_draft_layers - 1)) for i in range(num_draft_layers)]


def full_attention_layers(config) -> list[int]:
    """Indices of the target's full-attention decoder layers (every layer counts in the numbering,
    whatever its kind: linear attention, sliding window). Without `layer_types`, all of them."""
    kinds = getattr(config, "layer_types", None)
    if not kinds:
        return list(range(int(config.num_hidden_layers)))
    return [i for i, kind in enumerate(kinds) if kind == "full_attention"]


def last_full_attention_layer(config) -> int | None:
    """Index of the target's last full-attention decoder layer, or None when it has none."""
    full = full_attention_layers(config)
    return full[-1] if full else None


def attention_attr(config, name: str, default=None):
    """An attention setting of the target (`head_dim`, `num_key_value_heads`, ...). Heterogeneous
    configs (Gemma 4: wider heads in its full-attention layers) refuse the global read; then the
    last full-attention layer's value is the one a draft layer copies and mirrors."""
    try:
        return getattr(config, name, default)
    except Exception as exc:  # transformers' AmbiguousGlobalPerLayerAttributeError
        per_layer = getattr(config, "per_layer_config", None)
        index = last_full_attention_layer(config)
        if per_layer is None or index is None:
            raise DFlashLabError(f"target config: {name} differs per layer and no full-attention layer "
                                 f"says which one a draft should use ({exc})") from None
        return getattr(per_layer[index], name, default)


def rope_theta_of(config, default: float = 1_000_000.0) -> float:
    """The full-attention layers' RoPE base: `rope_parameters` (flat, or keyed by layer type as in
    Gemma 3/4), else the legacy `rope_theta`."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else default)


def check_recipe_target(config, family: str | None, num_layers: int | None, name: str) -> None:
    """Stop when a recipe written for one target family (its `model_type`, the text model's for a
    multimodal checkpoint) or layer count is given another: its layer ids and draft shape would
    silently mean something else."""
    text = config.get_text_config()
    kinds = {getattr(config, "model_type", None), getattr(text, "model_type", None)}
    if family is not None and family not in kinds:
        found = " / ".join(sorted(k for k in kinds if k))
        raise DFlashLabError(f"target {name}: the recipe is for target.family {family}, but this target is {found}; "
                             "point target.name at a matching checkpoint or fix target.family")
    layers = int(text.num_hidden_layers)
    if num_layers is not None and num_layers != layers:
        raise DFlashLabError(f"target {name}: the recipe is for a target of {num_layers} layers "
                             f"(target.num_layers), this one has {layers}; point target.name at a matching "
                             "checkpoint or fix target.num_layers")


def select_features(hidden_states, layer_ids: list[int]) -> torch.Tensor:
    """Concatenate the outputs of `layer_ids` from an `output_hidden_states` tuple: [.., S, n*H]."""
    return torch.cat([hidden_states[i + 1] for i in layer_ids], dim=-1)


@dataclass
class TargetModel:
    """A causal LM plus everything dflash-lab needs to know about it.

    `model` is a transformers `*ForCausalLM`; `tokenizer` may be None for tiny test targets that
    work on ids only.
    """

    model: nn.Module
    tokenizer: object | None = None
    name: str = "target"
    mask_token_id: int | None = None  # the target's choice of DFlash mask row, if it has one
    extra_stop_token_ids: list[int] = field(default_factory=list)
    fingerprint: str | None = None

    # -- shape facts ----------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        head = getattr(self.model, "lm_head", None)
        return head if head is not None else self.model.get_output_embeddings()

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding table (may exceed the tokenizer's vocabulary, as in Qwen3)."""
        return int(self.embed_tokens.weight.shape[0])

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def default_mask_token_id(self) -> int:
        """The DFlash mask row: the target's recorded choice, else the first embedding row past the
        tokenizer's vocabulary (Qwen3: 151669), else an error asking for an explicit choice."""
        if self.mask_token_id is not None:
            return self.mask_token_id
        if self.tokenizer is not None and len(self.tokenizer) < self.vocab_size:
            return len(self.tokenizer)
        raise DFlashLabError(
            f"target {self.name}: every embedding row is a real token, so no mask token can be "
            "chosen automatically; pass --mask-token-id with a token that text never produces"
        )

    def text_only(self) -> "TargetModel":
        """A copy without the weights that renders, tokenises and names its end-of-turn token
        exactly as this one does. Small and picklable: the token store's worker processes get it."""
        clone = TargetModel(model=None, tokenizer=self.tokenizer, name=self.name, mask_token_id=self.mask_token_id,
                            extra_stop_token_ids=list(self.extra_stop_token_ids), fingerprint=self.fingerprint)
        clone._stop_ids = self.stop_token_ids if self.model is not None else getattr(self, "_stop_ids", None) or []
        return clone

    # -- text -----------------------------------------------------------------------------------
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise DFlashLabError(f"target {self.name} has no tokenizer; load it from a directory that has one")
        return self.tokenizer

    def template_kwargs(self) -> dict:
        """Extra chat-template arguments: `enable_thinking=False` where the template knows it."""
        template = getattr(self._need_tokenizer(), "chat_template", None) or ""
        return dict(THINKING_KWARGS) if "enable_thinking" in template else {}

    def render_prompt(self, messages: list[dict]) -> str:
        """The generation prompt exactly as a server renders it (thinking off). Labels, training
        and evaluation all call this one function so that they see the same text."""
        tokenizer = self._need_tokenizer()
        if not getattr(tokenizer, "chat_template", None):
            raise DFlashLabError(f"target {self.name}: the tokenizer has no chat template")
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **self.template_kwargs()
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of already rendered text (the template supplies the special tokens)."""
        return list(self._need_tokenizer()(text, add_special_tokens=False)["input_ids"])

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        return self.encode(self.render_prompt(messages))

    def decode(self, ids) -> str:
        return self._need_tokenizer().decode(list(ids), skip_special_tokens=True)

    @property
    def end_of_turn_token(self) -> str | None:
        """The token that closes an assistant turn (appended after a response in training)."""
        if self.tokenizer is None:
            return None
        ids = self.stop_token_ids
        return self.tokenizer.convert_ids_to_tokens(ids[0]) if ids else None

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end a response: the generation config's eos ids, the tokenizer's eos, and the
        chat end-of-turn markers the tokenizer knows (`<|im_end|>`, `<|eot_id|>`, `<|end|>`)."""
        if getattr(self, "_stop_ids", None) is None:
            self._stop_ids = self._find_stop_token_ids()  # get_vocab() copies the whole vocabulary
        return list(self._stop_ids)

    def _find_stop_token_ids(self) -> list[int]:
        ids: list[int] = []

        def add(value):
            if value is None:
                return
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if item is not None and int(item) not in ids and 0 <= int(item) < self.vocab_size:
                    ids.append(int(item))

        tokenizer = self.tokenizer
        if tokenizer is not None:
            vocab = tokenizer.get_vocab()
            for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
                add(vocab.get(marker))
        gen = getattr(self.model, "generation_config", None)
        add(getattr(gen, "eos_token_id", None))
        if tokenizer is not None:
            add(tokenizer.eos_token_id)
        add(getattr(self.config, "eos_token_id", None))
        add(self.extra_stop_token_ids)
        return ids

    # -- compute --------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        layer_ids: list[int] | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        logits_to_keep: int = 0,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the target. Returns (logits, features of `layer_ids` or None).

        `logits_to_keep=k` computes logits for the last k positions only (0 = all).
        """
        # transformers 5.2x renamed `past_key_values` to `cache`; older releases know only the former
        cache_kwarg = {self._cache_arg_name(): past_key_values} if past_key_values is not None else {}
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=past_key_values is not None,
            output_hidden_states=bool(layer_ids),
            logits_to_keep=logits_to_keep,
            **cache_kwarg,
        )
        features = select_features(out.hidden_states, layer_ids) if layer_ids else None
        return out.logits, features

    def _cache_arg_name(self) -> str:
        if not hasattr(self, "_cache_arg"):
            params = inspect.signature(self.model.forward).parameters
            self._cache_arg = "cache" if "cache" in params else "past_key_values"
        return self._cache_arg

    def describe(self) -> dict:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "model_type": getattr(self.config, "model_type", None),
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
        }


# -- loading --------------------------------------------------------------------------------------
def _pick_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise DFlashLabError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16") from None


def _dir_fingerprint(path: Path) -> str:
    """sha256 over the config and the weight files' names and sizes (cheap, stable); or the value
    pinned in dflash_lab.json (`fingerprint`) when an embedded cache was upgraded to a new file
    layout holding the same weights (models/embedded.py `upgrade_layout`)."""
    meta = path / "dflash_lab.json"
    if meta.is_file():
        pinned = json.loads(meta.read_text()).get("fingerprint")
        if pinned:
            return str(pinned)
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.suffix in (".json", ".safetensors", ".gguf", ".bin"):
            digest.update(file.name.encode())
            digest.update(str(file.stat().st_size).encode())
            if file.name == "config.json":
                digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def default_device() -> str:
    """cuda when a GPU is visible, else cpu (the `--device` default of eval, eval-run, generate, demo)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_placement(device: str | None, dtype: str | None) -> tuple[str, str]:
    """(device, dtype) from `--device`/`--dtype`: `auto`/None is cuda + bfloat16 when a GPU is
    visible, else cpu + float32; a dtype left to `auto` follows the device."""
    device = default_device() if device in (None, "auto") else str(device)
    if dtype in (None, "auto"):
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DFlashLabError(f"--device {device}: this machine has no usable CUDA GPU; use --device cpu")
    return device, str(dtype).removeprefix("torch.")


def _device_kwargs(device: str) -> dict:
    """`device_map` for a single accelerator: transformers then materialises every weight on it
    while reading the checkpoint. CPU is where from_pretrained loads anyway."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return {}
    if dev.index is None and dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    return {"device_map": {"": str(dev)}}


def hub_fingerprint(source: str, model=None, gguf_file: str | None = None, *, cache_dir=None) -> str:
    """A hub-id target's identity: the commit its revision resolved to (the snapshot directory the
    hub cache holds it in is named by the commit; else `config._commit_hash`), else the sha256 of
    its config and weight files. Two revisions of one hub id never share a feature-cache entry or
    a results key."""
    digest = hashlib.sha256(f"hub:{source}|{gguf_file or ''}".encode())
    snapshot = _hub_snapshot_dir(source, cache_dir)
    commit = snapshot.name if snapshot is not None and _is_commit(snapshot.name) else None
    if commit is None and model is not None:
        commit = getattr(model.config, "_commit_hash", None)
    if commit:
        digest.update(f"@{commit}".encode())
    elif snapshot is not None:
        for file in sorted(snapshot.iterdir()):
            if file.suffix in (".json", ".safetensors", ".gguf", ".bin"):
                digest.update(file.name.encode())
                digest.update(sha256_file(file).encode())
    elif model is not None:  # last resort (not seen in practice): the config and a sample of every weight
        digest.update(model.config.to_json_string(use_diff=False).encode())
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
            digest.update(tensor.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _is_commit(name: str) -> bool:
    return len(name) == 40 and all(c in "0123456789abcdef" for c in name)


def _hub_snapshot_dir(source: str, cache_dir=None) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True, cache_dir=cache_dir))
    except Exception:  # noqa: BLE001 - not cached, or no huggingface_hub
        return None


def load_target(
    spec: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str = "cpu",
) -> TargetModel:
    """Load a target from an embedded name (`smollm2-135m-instruct`), a local Hugging Face
    directory, a GGUF file, or a hub id (needs network or a warm hub cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dflash_lab.models import embedded

    spec = str(spec)
    torch_dtype = _pick_dtype(dtype, device)
    meta: dict = {}
    if spec in embedded.EMBEDDED_TARGETS:
        path = embedded.fetch(spec)
        return load_target(path, dtype=torch_dtype, device=device)

    path = Path(spec).expanduser()
    gguf_file = None
    if path.is_file() and path.suffix == ".gguf":
        gguf_file, path = path.name, path.parent
    elif path.exists() and not path.is_dir():
        raise DFlashLabError(f"target {spec}: not a directory or a .gguf file")

    if path.is_dir():
        if gguf_file is None and not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                gguf_file = ggufs[0].name
            else:
                raise DFlashLabError(
                    f"target {spec}: no config.json (and {len(ggufs)} .gguf files) in the directory; "
                    "point at a Hugging Face model directory or a .gguf file"
                )
        meta_file = path / "dflash_lab.json"
        if meta_file.exists():
            meta = json.loads(meta_file.read_text())
        source = str(path)
        fingerprint = sha256_file(path / gguf_file)[:16] if gguf_file else _dir_fingerprint(path)
    elif "/" in spec and not spec.startswith((".", "/", "~")):
        source, fingerprint = spec, None  # hub id
    else:
        raise DFlashLabError(
            f"target {spec}: no such directory or file, and not a hub id; "
            f"embedded targets: {', '.join(embedded.EMBEDDED_TARGETS)}"
        )

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError):
        tokenizer = None  # tiny test targets carry no tokenizer
    try:
        # straight to its device: no full CPU copy first (on 8 ranks that is 8 copies in host RAM)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **_device_kwargs(device), **kwargs)
    except OSError as exc:
        raise DFlashLabError(f"target {spec}: could not load the model ({exc})") from exc
    model = text_model_of(model, spec)
    if str(model.device) != str(torch.device(device)):  # a loader that ignored device_map
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if fingerprint is None:
        fingerprint = hub_fingerprint(source, model, kwargs.get("gguf_file"))
    return TargetModel(
        model=model,
        tokenizer=tokenizer,
        name=meta.get("name", spec),
        mask_token_id=meta.get("mask_token_id"),
        fingerprint=fingerprint,
    )


def text_model_of(model: nn.Module, spec: str = "target") -> nn.Module:
    """The causal text model inside a multimodal checkpoint (Gemma 3/4 `...ForConditionalGeneration`:
    `AutoModelForCausalLM` loads the whole image-text model there). A draft only reads the text
    decoder, its embedding table and its LM head, so they are moved into the family's own
    `...ForCausalLM` (no copy: the same modules) and the vision/audio towers are dropped. Qwen3.5's
    published `Qwen3_5ForConditionalGeneration` checkpoints already load as `Qwen3_5ForCausalLM`."""
    from transformers import AutoModelForCausalLM

    config = model.config
    text_config = config.get_text_config()
    if text_config is config:
        return model
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    head = getattr(model, "lm_head", None)
    causal_class = AutoModelForCausalLM._model_mapping.get(type(text_config), None)
    if language_model is None or head is None or causal_class is None:
        raise DFlashLabError(
            f"target {spec}: a multimodal {type(model).__name__} whose text model dflash-lab cannot find "
            f"(text config {type(text_config).__name__}); point at a text-only checkpoint of the same model"
        )
    with torch.device("meta"):
        causal = causal_class(text_config)
    causal.model = language_model
    causal.lm_head = head
    causal.generation_config = model.generation_config
    return causal


def wrap_target(model: nn.Module, tokenizer=None, name: str = "target", mask_token_id: int | None = None) -> TargetModel:
    """Wrap an already built transformers model (tests, notebooks)."""
    model.eval()
    model.requires_grad_(False)
    return TargetModel(model=model, tokenizer=tokenizer, name=name, mask_token_id=mask_token_id)
