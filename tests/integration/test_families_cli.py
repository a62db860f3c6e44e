"""Every target family through the real CLI (issue 22): a tiny random target of each family's own
config class, saved with a tokenizer and chat template like a published checkpoint, then
`train` (two steps, the draft copied from the target's last full-attention layer where it fits), `eval` with the
trained draft and with prompt-lookup, greedy (the lossless check against plain greedy on) and
sampled, past the 8-token sliding window, then the checkpoint (the HF layout SGLang and vLLM load)
reloaded and exported as the GGUF draft file beside a target GGUF of the family's architecture."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from dflash_lab.cli import main
from dflash_lab.models.checkpoint import load_draft
from dflash_lab.models.target import last_full_attention_layer, load_target
from dflash_lab.testing import FAMILIES, THINKING_FAMILIES, TINY_SLIDING_WINDOW, tiny_target_dir, write_jsonl

WORDS = "the quick brown fox jumps over lazy dog add return step answer boxed def sky blue".split()
NEW_TOKENS = 24
# `general.architecture` of each family's target GGUF, as llama.cpp's converter names them
GGUF_ARCH = {"qwen3": "qwen3", "llama": "llama", "qwen3_5": "qwen35", "qwen3_next": "qwen3next", "qwen3_moe": "qwen3moe",
             "gpt_oss": "gpt-oss", "gemma3": "gemma3", "gemma4": "gemma4", "mistral": "llama"}
GATED_QUERY_FAMILIES = ("qwen3_5", "qwen3_next")


@pytest.fixture(scope="module")
def data_and_bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    rng = random.Random(0)
    rows = []
    for i in range(10):
        phrase = " ".join(rng.choice(WORDS) for _ in range(3))
        rows.append({"id": f"s{i}", "category": "chat", "source": "test",
                     "messages": [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(4))},
                                  {"role": "assistant", "content": " ".join([phrase] * 4)}],
                     "response_tokens": 16, "finish_reason": "stop"})
    data = write_jsonl(root / "labels" / "shard-00000.jsonl", rows).parent
    (data / "meta.json").write_text('{"kind": "labels"}')
    bench = root / "bench"
    write_jsonl(bench / "gsm8k.test.jsonl", [{"question": f"Natalia sold {i} clips in April. How many in May?"}
                                            for i in range(3)])
    return root, data, bench


def _target_gguf(path, arch: str, target):
    """A target GGUF with the keys `draft export` reads (no weights: the draft file never needs them)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.embedding_length", target.hidden_size)
    writer.add_uint32(f"{arch}.block_count", target.num_layers)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(target.vocab_size)])
    writer.add_token_types([1] * target.vocab_size)
    writer.add_eos_token_id(target.stop_token_ids[0])
    writer.add_chat_template(target.tokenizer.chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_evaluates_losslessly_and_exports(family, data_and_bench, tmp_path, capsys):
    root, data, bench = data_and_bench
    target_dir = tiny_target_dir(tmp_path / f"target-{family}", kind=family, seed=1)
    target = load_target(target_dir)
    assert target.describe()["model_type"] == target.config.model_type
    prompt = target.render_prompt([{"role": "user", "content": "Natalia sold 1 clips in April. How many in May?"}])
    assert len(target.encode(prompt)) > 2 * TINY_SLIDING_WINDOW
    assert ("<think>\n\n</think>" in prompt) == (family in THINKING_FAMILIES)  # the thinking switch, off

    recipe = tmp_path / "recipe.yaml"
    copy_layer = "false" if family in GATED_QUERY_FAMILIES else "true"  # refused there, test_families.py
    recipe.write_text(
        f"target: {{name: {target_dir}}}\n"
        f"draft: {{num_layers: 1, block_size: 6, init_from_target_layers: {copy_layer}}}\n"
        "data: {max_length: 64, num_anchors: 4, heldout: 0}\n"
        "loss: {name: kd, gamma: 4.0, chunk_slots: 64}\n"
        "train: {lr: 1.0e-3, epochs: 1, micro_batch: 2, global_batch: 2, warmup_ratio: 0, seed: 3, max_steps: 2, "
        "device: cpu}\n"
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(recipe), "--data", str(data), "--out", str(run), "--no-progress"]) == 0
    final = run / "checkpoints" / "final"
    state = json.loads((final / "trainer_state.json").read_text()) if (final / "trainer_state.json").exists() else {}
    assert state.get("step", 2) == 2
    capsys.readouterr()

    # export: the checkpoint is the HF layout; it reloads onto the target with the same weights
    draft = load_draft(final, target)
    saved = load_file(str(final / "model.safetensors"))
    assert all(torch.equal(saved[k].float(), v.float()) for k, v in draft.state_dict().items() if k in saved)
    config = json.loads((final / "config.json").read_text())
    assert config["dflash_config"]["target_layer_ids"] == [target.num_layers // 2]

    # GGUF: the draft file for a target GGUF of this family (a stub with the keys the exporter reads)
    from gguf import GGUFReader

    from dflash_lab.models.gguf_export import gguf_field

    stub = _target_gguf(tmp_path / "target.gguf", GGUF_ARCH[family], target)
    assert main(["draft", "export", str(final), "--to", "gguf", "--target", str(stub),
                 "--out", str(tmp_path / "draft.gguf")]) == 0, family
    reader = GGUFReader(str(tmp_path / "draft.gguf"))
    assert gguf_field(reader, "dflash.target_hidden_size") == target.hidden_size
    assert list(gguf_field(reader, "dflash.target_layers")) == [target.num_layers // 2 + 1]

    base = ["eval", "--target", str(target_dir), "--benchmarks", "gsm8k", "--bench-dir", str(bench),
            "--limit", "2", "--selection", "first", "--max-new-tokens", str(NEW_TOKENS), "--no-db", "--quiet",
            "--no-hub", "--no-pypi", "--device", "cpu"]
    for name, extra in [("draft", ["--draft", str(final)]),
                        ("lookup", ["--drafter", "prompt-lookup", "--block-size", "6"])]:
        out = tmp_path / f"{name}.json"
        assert main(base + extra + ["--out", str(out)]) == 0, (family, name)
        bench_result = json.loads(out.read_text())["benchmarks"]["gsm8k"]
        assert bench_result["lossless"] is True, (family, name)
        assert all(r["num_prompt_tokens"] + len(r["output_ids"]) > 2 * TINY_SLIDING_WINDOW
                   for r in bench_result["responses"])
        sampled = tmp_path / f"{name}-sampled.json"
        assert main(base + extra + ["--out", str(sampled), "--temperature", "0.8", "--seed", "1"]) == 0, family
        assert json.loads(sampled.read_text())["benchmarks"]["gsm8k"]["generated_tokens"] > 0
    assert last_full_attention_layer(target.config) is not None


@pytest.mark.parametrize("family", ["qwen3_next", "gemma4"])
def test_plan_through_the_cli_for_hybrid_moe_and_heterogeneous_targets(family, tmp_path, capsys):
    """`plan` on a hybrid MoE target (Gated DeltaNet + experts) and on Gemma 4 (per-layer head widths)."""
    target_dir = tiny_target_dir(tmp_path / family, kind=family, seed=1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"target: {{name: {target_dir}, family: {load_target(target_dir).config.model_type}, "
                      "num_layers: 6}\ndraft: {num_layers: 1, block_size: 4}\n"
                      "data: {max_length: 64, num_anchors: 4}\ntrain: {micro_batch: 1, global_batch: 8}\n")
    capsys.readouterr()
    assert main(["plan", "--config", str(recipe), "--gpus", "8", "--gpu-memory", "80GB", "--no-search", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["flops_target_per_micro"] > 0
    notes = " ".join(plan["notes"])
    if family == "qwen3_next":
        assert "4 linear_attention, 2 full_attention" in notes and "all 4 experts" in notes and "2 active" in notes
