"""llama.cpp (xllamacpp, in-process, loopback) serves our DFlash2 drafts (issue 16, item 4).

- the serving gate: a DFlash2 draft (block 8) trained with the real CLI until it memorises a few
  records, exported, served with `--spec-draft-n-max 7`: >= 90% of drafted tokens accepted on those
  prompts, text identical without the draft;
- parity: on the F32 GGUF target, llama.cpp's accepted count per response equals our builtin loop's
  (`DFlash2Drafter`: the selector's greedy walk) on 4 prompts, for a draft whose conv and selector
  matter (checked: its walk leaves the unary argmax on many slots, its conv is off identity); the
  same check FAILS on files written with the conv base's side/tap axes swapped, the conv
  projection's rows group-major, or the two codebooks swapped - the three layouts that load and run
  in llama.cpp with the right shapes and wrong numbers (`ExportFault`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dflash_lab.cli import main
from dflash_lab.decoding.dflash2_drafter import DFlash2Drafter
from dflash_lab.decoding.drafters import make_drafter
from dflash_lab.decoding.speculative import greedy_generate, speculative_generate
from dflash_lab.eval import llamacpp as L
from dflash_lab.labels.serve import gguf_draft_block_size
from dflash_lab.models import embedded
from dflash_lab.models.checkpoint import load_draft
from dflash_lab.models.gguf_export import ExportFault, export_draft_gguf
from dflash_lab.testing import write_jsonl

TARGET = "smollm2-135m-instruct"
GATE_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]
OTHER_PROMPTS = ["Name three colours of the rainbow.", "How many legs does a spider have?"]
PARITY_PROMPTS = GATE_PROMPTS + OTHER_PROMPTS
MAX_NEW = 40
GATE_MAX_NEW = 16  # the memorised answers: short, so a few minutes of training memorise them

# The v1 gate recipe (tests/integration/test_llamacpp.py) with a DFlash2 draft: block 8, the
# selector CE beside the base CE (selector_alpha 1.0), 40 steps of 2 sequences. The records are
# repeated GATE_STEPS times in ONE epoch rather than trained for 40 epochs: every epoch end keeps a
# checkpoint (never pruned), and a DFlash2 checkpoint with its two [49152, 256] codebooks and their
# AdamW state is 350 MB (40 epochs wrote 14 GB). Random order: length-grouped batches would pair
# copies of the same record (measured: loss 2.0, tau 1.8 after 40 steps, against 0.56 and 5.5).
# The trained conv and selector are off identity / zero: the walk leaves the unary argmax on 273
# of 597 drafted slots of the parity prompts (2026-12-02).
GATE_RECIPE = """\
target: {name: smollm2-135m-instruct, dtype: float32}
draft: {arch: dflash2, num_layers: 1, block_size: 8, mask_token_id: 16, init: scratch, init_from_target_layers: true}
data: {max_length: 64, num_anchors: 32, heldout: 0, group_by_length: false}
loss: {name: ce, chunk_slots: 8192, selector_alpha: 1.0}
train: {lr: 2.0e-3, epochs: 1, micro_batch: 2, global_batch: 2, warmup_ratio: 0.0, seed: 0, device: cpu,
        cpu_threads: 1, save_every: 0, eval_interval: 0, keep_last: 1}
"""
GATE_STEPS = 40  # optimizer steps of 2 sequences

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def target():
    from dflash_lab.models.target import load_target

    return load_target(TARGET)


@pytest.fixture(scope="module")
def f32():
    return embedded.gguf_path(TARGET, "f32")


def _prompt_ids(target, text):
    return target.encode_prompt([{"role": "user", "content": text}])


@pytest.fixture(scope="module")
def gate_draft(tmp_path_factory, target):
    """Train a DFlash2 draft with the real CLI on the target's own greedy answers until memorised."""
    root = tmp_path_factory.mktemp("gate2")
    rows = []
    for i, text in enumerate(GATE_PROMPTS):
        messages = [{"role": "user", "content": text}]
        result = greedy_generate(target, _prompt_ids(target, text), GATE_MAX_NEW, target.stop_token_ids)
        answer = {"role": "assistant", "content": target.decode(result.output_ids)}
        rows += [{"id": f"g{i}-{r}", "category": "chat", "source": "gate", "finish_reason": result.finish_reason,
                  "messages": messages + [answer]} for r in range(GATE_STEPS)]
    write_jsonl(root / "labels" / "shard-00000.jsonl", rows)
    (root / "labels" / "meta.json").write_text('{"kind": "labels"}')
    recipe = root / "gate.yaml"
    recipe.write_text(GATE_RECIPE)
    assert main(["train", "--config", str(recipe), "--data", str(root / "labels"), "--out", str(root / "run"),
                 "--no-progress"]) == 0
    return root / "run" / "checkpoints" / "final"


def _serve(f32, draft_gguf, prompts, target, max_new):
    """Every prompt through one llama.cpp server with the draft; n_max from the file (block - 1),
    as `serve-cmd` prints it."""
    n_max = gguf_draft_block_size(draft_gguf) - 1
    assert n_max == 7
    with L.LlamaServer(L.EngineConfig(model=f32, draft=draft_gguf, speculative="dflash", draft_n_max=n_max)) as url:
        return [L.post_completion(url, _prompt_ids(target, t), max_new) for t in prompts]


@pytest.fixture(scope="module")
def builtin(gate_draft, target):
    """Our loop on PARITY_PROMPTS (computed once: every parity check compares against it), and how
    often the selector's walk left the unary argmax (the top-1 candidate) on the drafted slots."""
    draft = load_draft(gate_draft, target)
    drafter = make_drafter("dflash", target=target, draft=draft)
    assert isinstance(drafter, DFlash2Drafter)
    walk, counts = draft.greedy_walk, {"off_argmax": 0, "slots": 0}

    def counting_walk(hidden, anchors, lm_head):
        tokens, ids, rows = walk(hidden, anchors, lm_head)
        counts["off_argmax"] += int((tokens != ids[..., 0]).sum())
        counts["slots"] += tokens.numel()
        return tokens, ids, rows

    draft.greedy_walk = counting_walk
    results = {}
    for text in PARITY_PROMPTS:
        result = speculative_generate(target, drafter, _prompt_ids(target, text), MAX_NEW, target.stop_token_ids)
        results[text] = (result, sum(c - 1 for c in result.cycle_acceptance))
    return results, counts, draft


def parity_mismatches(builtin, target, draft_dir, f32, out: Path, prompts=PARITY_PROMPTS,
                      fault=ExportFault.NONE) -> list[str]:
    """Per prompt, llama.cpp's accepted count vs our builtin loop's; returns the mismatches.

    One accounting difference is not a mismatch (as for v1): when a response ends on a stop token
    that the DRAFT proposed, llama.cpp counts that token as accepted, our loop counts it as its
    cycle's own token (ours: one more cycle and one fewer accepted, the same tokens in total)."""
    ours_by_prompt = builtin[0]
    gguf = export_draft_gguf(draft_dir, f32, out, fault=fault)
    bad = []
    for text, theirs in zip(prompts, _serve(f32, gguf, prompts, target, MAX_NEW)):
        ours, accepted = ours_by_prompt[text]
        if theirs["output_ids"] != ours.output_ids:
            bad.append(f"{text!r}: different text")
            continue
        stop_in_draft = (ours.finish_reason == "stop" and theirs["draft_n_accepted"] == accepted + 1
                         and theirs["cycles"] == len(ours.cycle_acceptance) - 1)
        if theirs["draft_n_accepted"] != accepted and not stop_in_draft:
            bad.append(f"{text!r}: llama.cpp accepted {theirs['draft_n_accepted']}, ours {accepted}")
    return bad


def test_serving_gate_memorised_dflash2_draft(gate_draft, target, f32, tmp_path):
    gguf = export_draft_gguf(gate_draft, f32, tmp_path / "gate.gguf")
    drafted = _serve(f32, gguf, GATE_PROMPTS, target, GATE_MAX_NEW)
    with L.LlamaServer(L.EngineConfig(model=f32)) as url:
        plain = [L.post_completion(url, _prompt_ids(target, t), GATE_MAX_NEW) for t in GATE_PROMPTS]
    n_draft = sum(r["draft_n"] for r in drafted)
    n_ok = sum(r["draft_n_accepted"] for r in drafted)
    # drafted tokens past the end of the answer cannot be accepted: count those the answer had room
    # for (every token after the first, but the last verify step's own token)
    room = sum(min(r["draft_n"], r["completion_tokens"] - 2) for r in drafted)
    assert room > 0 and n_ok >= 0.9 * room, f"{n_ok} of {room} drafted tokens accepted ({n_draft} drafted in all)"
    assert [r["output_ids"] for r in drafted] == [r["output_ids"] for r in plain]  # lossless
    assert all(p["draft_n"] == 0 for p in plain)


def test_parity_draft_exercises_conv_and_selector(builtin):
    """The parity check below can only catch a wrong conv or selector layout if they change the
    drafted tokens: the trained walk must leave the unary argmax, and the conv must be off identity."""
    _, counts, draft = builtin
    assert counts["slots"] > 0 and counts["off_argmax"] >= 0.1 * counts["slots"], counts
    assert draft.candidate_selector.successor_codebook.abs().max() > 0.01
    for layer in draft.layers:
        for conv in (layer.attention_conv, layer.mlp_conv):
            identity = torch.zeros_like(conv.base_kernel)
            identity[:, 0] = 1.0
            assert (conv.base_kernel - identity).abs().max() > 0.01
            assert conv.kernel_projection.weight.abs().max() > 0.01


def test_parity_with_builtin_loop(builtin, gate_draft, target, f32, tmp_path):
    assert len(PARITY_PROMPTS) >= 4
    assert parity_mismatches(builtin, target, gate_draft, f32, tmp_path / "ok.gguf") == []


@pytest.mark.parametrize("fault", [ExportFault.CONV_BASE_SIDE_TAP_SWAPPED, ExportFault.CONV_PROJ_GROUP_MAJOR,
                                   ExportFault.SELECTOR_CODEBOOKS_SWAPPED])
def test_parity_catches_a_wrong_dflash2_export(builtin, gate_draft, target, f32, tmp_path, fault):
    # the memorised prompts, where the right file's counts are high: measured, each fault loses
    # accepted tokens on both (2026-12-02, 40 new tokens: right 7 / 21; side/tap 5 / 14,
    # group-major 1 / 0, codebooks swapped 5 / 14)
    bad = parity_mismatches(builtin, target, gate_draft, f32, tmp_path / f"{fault.value}.gguf",
                            prompts=GATE_PROMPTS, fault=fault)
    assert bad, f"the parity check did not catch a DFlash2 export with {fault.value}"
