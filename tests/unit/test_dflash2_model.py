"""The DFlash2 draft: conv and selector against brute-force loops, identity init equals v1 exactly,
and the published checkpoint format (SPEC section 10)."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dflash_lab.errors import DFlashLabError
from dflash_lab.models.checkpoint import load_draft, read_draft_config, save_draft
from dflash_lab.models.dflash2 import (
    DFlash2Config,
    gguf_dflash2_extras,
    DFlash2DraftModel,
    DynamicDepthwiseConv,
    build_dflash2_config,
)
from dflash_lab.models.draft import DFlashDraftModel, build_draft_config
from dflash_lab.models.target import wrap_target
from dflash_lab.testing import tiny_model
from dflash_lab.train import blocks as B


def tiny_target(vocab=64, seed=1):
    return wrap_target(tiny_model("qwen3", seed=seed, vocab_size=vocab), mask_token_id=3)


def randomise(model: DFlash2DraftModel, seed=0, scale=0.3):
    """Every DFlash2 tensor non-trivial (identity conv and zero codebook would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".attention_conv." in name or ".mlp_conv." in name or name.startswith("candidate_selector."):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


# -- the conv --------------------------------------------------------------------------------------
def loop_conv(x, base, dyn, side, group, block):
    """conv_s(x)[n, i, c] = sum_t (base[s,t,c] + dyn[n,i,s,t,c//group]) * x[n,i-t,c], taps inside the block."""
    n_, q_, h_ = x.shape
    taps = base.shape[1]
    out = torch.zeros_like(x)
    for n in range(n_):
        for i in range(q_):
            for c in range(h_):
                total = 0.0
                for t in range(taps):
                    if i % block - t < 0:  # before the start of i's block: reads zero
                        continue
                    total += (base[side, t, c] + dyn[n, i, side, t, c // group]) * x[n, i - t, c]
                out[n, i, c] = total
    return out


@pytest.mark.parametrize("taps,q_len", [(2, 12), (3, 12), (3, 3)])  # 3 blocks of 4; one short block
def test_conv_matches_loop_over_channels_and_taps_with_block_boundaries(taps, q_len):
    torch.manual_seed(0)
    hidden, group, block = 16, 4, 4
    conv = DynamicDepthwiseConv(hidden, taps, group, block).double()
    with torch.no_grad():
        conv.base_kernel.normal_()
        conv.kernel_projection.weight.normal_()
    h = torch.randn(2, q_len, hidden, dtype=torch.float64)
    sub_out = torch.randn(2, q_len, hidden, dtype=torch.float64)
    dyn = conv.kernel_projection(h).view(2, q_len, 2, taps, hidden // group)  # [N, Q, side, tap, group]
    side0, side1_taps = conv.prepare(h)
    torch.testing.assert_close(side0, loop_conv(h, conv.base_kernel, dyn, 0, group, block), rtol=1e-12, atol=1e-12)
    # side 1 runs on the sublayer's OUTPUT with taps computed from its INPUT
    side1 = conv.finish(sub_out, side1_taps)
    torch.testing.assert_close(side1, loop_conv(sub_out, conv.base_kernel, dyn, 1, group, block), rtol=1e-12, atol=1e-12)


def test_conv_never_reads_across_blocks():
    torch.manual_seed(1)
    conv = DynamicDepthwiseConv(8, 2, 4, 4)
    with torch.no_grad():
        conv.base_kernel.normal_()
        conv.kernel_projection.weight.normal_()
    x = torch.randn(1, 8, 8)
    out = conv.prepare(x)[0]
    y = x.clone()
    y[0, 3] += 100.0  # last slot of block 0: block 1 must not see it
    out2 = conv.prepare(y)[0]
    assert torch.equal(out[0, 4:], out2[0, 4:])
    assert not torch.equal(out[0, 3], out2[0, 3])


# -- the selector ----------------------------------------------------------------------------------
def test_selector_scores_and_greedy_walk_match_brute_force():
    target = tiny_target(vocab=40)
    cfg = build_dflash2_config(target, num_layers=1, conv_group_size=16, selector_rank=6, selector_top_k=5)
    model = randomise(DFlash2DraftModel(cfg).init_weights(seed=2).double(), seed=3, scale=1.0)
    lm_head = target.lm_head.double()
    sel = model.candidate_selector
    torch.manual_seed(4)
    hidden = torch.randn(3, 7, cfg.hidden_size, dtype=torch.float64)  # 3 blocks, slots 1..7
    anchors = torch.tensor([5, 17, 30])
    tokens, ids, rows = model.greedy_walk(hidden, anchors, lm_head)
    model.requires_grad_(False)
    unary = lm_head(hidden).detach()
    for n in range(3):
        prev = int(anchors[n])
        for t in range(7):
            u = unary[n, t]
            cand = sorted(range(40), key=lambda v: -float(u[v]))[:5]
            assert ids[n, t].tolist() == cand
            gate = sel.hidden_projection.weight @ hidden[n, t]
            best, best_score = None, None
            for j, b in enumerate(cand):
                score = float(u[b]) + sum(float(sel.predecessor_codebook[prev, r] * gate[r] * sel.successor_codebook[b, r])
                                          for r in range(6))
                assert abs(float(rows[n, t, j]) - score) < 1e-9
                if best_score is None or score > best_score:
                    best, best_score = b, score
            assert int(tokens[n, t]) == best
            prev = best
    # the trellis form gives the same row where the walk's predecessor is a candidate of the previous slot
    trellis = model.transition_scores(hidden, unary.gather(-1, ids), ids, anchors)  # [N, T, k, k]
    torch.testing.assert_close(trellis[:, 0, 0], rows[:, 0])
    for n in range(3):
        for t in range(1, 7):
            a = ids[n, t - 1].tolist().index(int(tokens[n, t - 1]))
            torch.testing.assert_close(trellis[n, t, a], rows[n, t])


def test_selector_walk_changes_tokens_once_the_successor_codebook_is_trained():
    """A control: with a random successor codebook the walk departs from the unary argmax."""
    target = tiny_target(vocab=40)
    cfg = build_dflash2_config(target, num_layers=1, selector_rank=6, selector_top_k=5)
    model = DFlash2DraftModel(cfg).init_weights(seed=2)
    hidden = torch.randn(4, 7, cfg.hidden_size)
    anchors = torch.tensor([1, 2, 3, 4])
    argmax = target.lm_head(hidden).argmax(-1)
    assert torch.equal(model.greedy_walk(hidden, anchors, target.lm_head)[0], argmax)  # zero successor codebook
    randomise(model, seed=5, scale=3.0)
    assert not torch.equal(model.greedy_walk(hidden, anchors, target.lm_head)[0], argmax)


# -- identity init == v1 ---------------------------------------------------------------------------
def _training_forward(model, target, seed=0):
    """All blocks of one sequence in one forward with the training attention (3 blocks of 8)."""
    torch.manual_seed(seed)
    n_ctx, bsz = 30, model.block_size
    feats = torch.randn(1, n_ctx, len(model.target_layer_ids) * model.config.hidden_size)
    ids = torch.randint(0, 60, (n_ctx,))
    anchors = torch.tensor([4, 11, 20])
    block_ids, positions, _, _ = B.build_blocks(ids, torch.ones(n_ctx), anchors, bsz, model.mask_token_id)
    attn = B.make_attention("chunked", anchors[None], bsz)
    noise = target.embed(block_ids.view(1, -1))
    return model(noise, positions.view(1, -1), feats, torch.arange(n_ctx)[None], attention=attn)


def test_fresh_dflash2_equals_v1_exactly():
    target = tiny_target()
    v1 = DFlashDraftModel(build_draft_config(target, num_layers=2, block_size=8)).init_weights(seed=7, std=0.1)
    d2 = DFlash2DraftModel(build_dflash2_config(target, num_layers=2, block_size=8)).init_weights(seed=7, std=0.1)
    v1_state = v1.state_dict()
    for name, tensor in d2.state_dict().items():  # same backbone draw as v1 from the same seed
        if name in v1_state:
            assert torch.equal(tensor, v1_state[name]), name
    h1, h2 = _training_forward(v1, target), _training_forward(d2, target)
    assert torch.equal(h1, h2)
    assert torch.equal(target.logits(h1), d2.unary_logits(h2, target.lm_head))
    # the selector's walk is the unary argmax (zero successor codebook)
    hidden = h2.view(3, 8, -1)[:, 1:]
    anchors = torch.tensor([1, 2, 3])
    assert torch.equal(d2.greedy_walk(hidden, anchors, target.lm_head)[0], target.logits(hidden).argmax(-1))


def test_from_v1_warm_start_equals_the_v1_draft():
    target = tiny_target()
    v1 = DFlashDraftModel(build_draft_config(target, num_layers=2, block_size=8)).init_weights(seed=3, std=0.2)
    d2 = DFlash2DraftModel.from_v1(v1, seed=1)
    assert isinstance(d2.config, DFlash2Config) and d2.block_size == 8
    assert torch.equal(_training_forward(v1, target, 1), _training_forward(d2, target, 1))
    # decoding path: one short block over a cached context
    feats = torch.randn(1, 9, 2 * 64)
    block = target.embed(torch.tensor([[5, 3, 3, 3, 3]]))
    pos = torch.arange(9, 14)[None]
    args = (block, pos, feats, torch.arange(9)[None])
    assert torch.equal(v1(*args), d2(*args))
    # a different block size is a config choice, not a weight
    assert DFlash2DraftModel.from_v1(v1, block_size=16).block_size == 16


# -- the checkpoint --------------------------------------------------------------------------------
# Written from SPEC section 10 (not from our code): the published config keys and tensor names.
SPEC10_LAYER_TENSORS = {
    "input_layernorm.weight": ("H",), "post_attention_layernorm.weight": ("H",),
    "self_attn.q_proj.weight": ("heads*hd", "H"), "self_attn.k_proj.weight": ("kv*hd", "H"),
    "self_attn.v_proj.weight": ("kv*hd", "H"), "self_attn.o_proj.weight": ("H", "heads*hd"),
    "self_attn.q_norm.weight": ("hd",), "self_attn.k_norm.weight": ("hd",),
    "mlp.gate_proj.weight": ("I", "H"), "mlp.up_proj.weight": ("I", "H"), "mlp.down_proj.weight": ("H", "I"),
    "attention_conv.base_kernel": (2, "K", "H"), "attention_conv.kernel_projection.weight": ("2*K*G", "H"),
    "mlp_conv.base_kernel": (2, "K", "H"), "mlp_conv.kernel_projection.weight": ("2*K*G", "H"),
}
SPEC10_TOP_TENSORS = {
    "fc.weight": ("H", "n*H"), "hidden_norm.weight": ("H",), "norm.weight": ("H",),
    "candidate_selector.predecessor_codebook": ("V", "r"), "candidate_selector.successor_codebook": ("V", "r"),
    "candidate_selector.hidden_projection.weight": ("r", "H"),
}
SPEC10_DFLASH_CONFIG = {"block_size": 8, "conv_kernel_size": 2, "conv_group_size": 16, "selector_rank": 256,
                        "selector_top_k": 16}


def _spec_shapes(dims, layers):
    def resolve(shape):
        return tuple(eval(str(d), {}, dict(dims)) if isinstance(d, str) else d for d in shape)

    out = {name: resolve(s) for name, s in SPEC10_TOP_TENSORS.items()}
    for i in range(layers):
        out.update({f"layers.{i}.{name}": resolve(s) for name, s in SPEC10_LAYER_TENSORS.items()})
    return out


def test_checkpoint_has_exactly_the_published_names_config_and_round_trips(tmp_path):
    target = tiny_target(vocab=64)
    cfg = build_dflash2_config(target, num_layers=2)  # published defaults: block 8, K 2, g 16, r 256, k 16
    model = randomise(DFlash2DraftModel(cfg).init_weights(seed=1))
    out = save_draft(model, tmp_path / "d2")
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["DFlash2DraftModel"] and raw["model_type"] == "qwen3"
    assert raw["is_causal"] is False
    assert raw["layer_types"] == ["sliding_attention"] * 2
    assert raw["sliding_window"] == 2048 and raw["use_sliding_window"] is True
    assert {k: raw["dflash_config"][k] for k in SPEC10_DFLASH_CONFIG} == SPEC10_DFLASH_CONFIG
    assert raw["dflash_config"]["mask_token_id"] == 3 and raw["dflash_config"]["target_layer_ids"] == cfg.target_layer_ids
    for key in ("input_embedding_scale", "output_multiplier", "final_logit_softcapping"):
        assert key not in raw["dflash_config"] and key not in raw  # optional, default off
    dims = dict(H=64, I=128, heads=4, kv=2, hd=16, K=2, G=64 // 16, V=64, r=256, n=2)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    assert shapes == _spec_shapes(dims, 2)
    loaded = load_draft(out, target)
    assert isinstance(loaded, DFlash2DraftModel)
    assert {**vars(loaded.config), "extra": None} == {**vars(cfg), "extra": None}  # extra holds the saved dtype
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # and a re-save writes the same config
    again = save_draft(loaded, tmp_path / "again")
    assert json.loads((again / "config.json").read_text()) == raw


def test_config_reads_dflash_config_first_then_top_level_and_optional_fields():
    target = tiny_target()
    raw = build_dflash2_config(target, num_layers=1).to_json_dict()
    raw["dflash_config"]["selector_top_k"] = 8
    raw["selector_top_k"] = 4  # dflash_config wins
    raw["dflash_config"]["output_multiplier"] = 0.5
    raw["dflash_config"]["final_logit_softcapping"] = 30.0
    cfg = DFlash2Config.from_json_dict(raw)
    assert cfg.selector_top_k == 8 and cfg.output_multiplier == 0.5 and cfg.final_logit_softcapping == 30.0
    assert cfg.to_json_dict()["dflash_config"]["output_multiplier"] == 0.5
    model = DFlash2DraftModel(cfg)
    logits = torch.tensor([[100.0, -100.0, 1.0]])
    torch.testing.assert_close(model.process_unary(logits), torch.tanh(logits * 0.5 / 30) * 30)
    top = dict(raw)
    top["dflash_config"] = {k: v for k, v in raw["dflash_config"].items() if k != "selector_rank"}
    top["selector_rank"] = 32  # a field only at the top level is read there
    assert DFlash2Config.from_json_dict(top).selector_rank == 32


def test_malformed_dflash2_checkpoints_are_refused_with_a_clear_message(tmp_path):
    target = tiny_target()
    model = DFlash2DraftModel(build_dflash2_config(target, num_layers=1, selector_rank=8)).init_weights(seed=0)
    good = save_draft(model, tmp_path / "good")
    tensors = load_file(str(good / "model.safetensors"))

    def variant(name, mutate_tensors=None, mutate_config=None):
        out = save_draft(model, tmp_path / name)
        if mutate_tensors:
            t = dict(tensors)
            mutate_tensors(t)
            save_file(t, str(out / "model.safetensors"))
        if mutate_config:
            raw = json.loads((out / "config.json").read_text())
            mutate_config(raw)
            (out / "config.json").write_text(json.dumps(raw))
        return out

    missing = variant("missing", lambda t: t.pop("candidate_selector.successor_codebook"))
    with pytest.raises(DFlashLabError, match=r"missing tensors \['candidate_selector.successor_codebook'\]"):
        load_draft(missing, target)
    no_conv = variant("noconv", lambda t: t.pop("layers.0.mlp_conv.base_kernel"))
    with pytest.raises(DFlashLabError, match="layers.0.mlp_conv.base_kernel"):
        load_draft(no_conv, target)
    shape = variant("shape", lambda t: t.__setitem__("layers.0.attention_conv.base_kernel", torch.zeros(2, 3, 64)))
    with pytest.raises(DFlashLabError, match=r"shape mismatch layers.0.attention_conv.base_kernel: file \(2, 3, 64\)"):
        load_draft(shape, target)
    no_fields = variant("nofields", mutate_config=lambda raw: raw["dflash_config"].pop("selector_rank"))
    with pytest.raises(DFlashLabError, match=r"needs dflash_config fields \['selector_rank'\]"):
        read_draft_config(no_fields)
    bad_group = variant("group", mutate_config=lambda raw: raw["dflash_config"].update(conv_group_size=24))
    with pytest.raises(DFlashLabError, match="conv_group_size 24 must divide hidden_size 64"):
        load_draft(bad_group, target)
    # a v1 checkpoint is still read as v1
    v1 = save_draft(DFlashDraftModel(build_draft_config(target, num_layers=1)).init_weights(0), tmp_path / "v1")
    assert type(load_draft(v1, target)) is DFlashDraftModel


def test_gguf_extras_have_the_llama_cpp_loader_shapes():
    """Shapes as llama.cpp's src/models/dflash.cpp `create_tensor` lists them (ggml dims, fastest first)."""
    target = tiny_target(vocab=64)
    cfg = build_dflash2_config(target, num_layers=2, selector_rank=32)
    model = DFlash2DraftModel(cfg).init_weights(seed=0)
    keys, tensors = gguf_dflash2_extras(model)
    n_embd, kernel, groups, rank, n_vocab = 64, 2, 64 // 16, 32, 64
    loader = {"selector_predecessor.weight": (rank, n_vocab), "selector_successor.weight": (rank, n_vocab),
              "selector_hidden.weight": (n_embd, rank)}
    for i in range(2):
        for kind in ("attn", "ffn"):
            loader[f"blk.{i}.{kind}_conv_base"] = (n_embd, kernel, 2)
            loader[f"blk.{i}.{kind}_conv_proj.weight"] = (n_embd, 2 * kernel * groups)
    assert {name: tuple(reversed(t.shape)) for name, t in tensors.items()} == loader
    assert keys["selector_top_k"] == 16 and keys["attention.causal"] is False
    assert keys["attention.sliding_window"] == 2048 and keys["attention.sliding_window_pattern"] == [True, True]
    assert n_embd % keys["conv_group_size"] == 0
    # side 0 / tap 0 of the identity init sits at the start of the flat (ggml) buffer
    flat = tensors["blk.0.attn_conv_base"].flatten()
    assert torch.equal(flat[:n_embd], torch.ones(n_embd)) and torch.equal(flat[n_embd:2 * n_embd], torch.zeros(n_embd))
