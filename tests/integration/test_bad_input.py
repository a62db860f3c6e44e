"""Issue 12, as a matrix: every bad input of the issue gives exit 2, one `error:` line naming the
input, no traceback; the data-loss cases also leave every existing file byte-identical.

Commands run in-process through `dflash_lab.cli.main` (the real parser and handlers). Checks that
come before any model loads need no target; the rest use a tiny random target built once.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dflash_lab.cli import main
from dflash_lab.errors import DFlashLabError
from dflash_lab.outputs import check_not_input, check_output_dir, check_output_file
from dflash_lab.testing import tiny_target_dir, write_jsonl

GOOD_RECIPE = ("draft: {num_layers: 1, block_size: 4}\n"
               "data: {max_length: 64, num_anchors: 4, heldout: 0}\n"
               "train: {lr: 1.0e-3, epochs: 1, micro_batch: 2, global_batch: 2, device: cpu}\n")
NOT_UTF8 = b"train: {lr: 1.0e-3}\n# caf\xe9 \xff\xfe\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    target = tiny_target_dir(root / "target")
    recipe = root / "tiny.yaml"
    recipe.write_text(f"target: {{name: {target}}}\n" + GOOD_RECIPE)
    labels = root / "labels"
    write_jsonl(labels / "shard-00000.jsonl", [
        {"id": f"s{i}", "category": "chat", "source": "t",
         "messages": [{"role": "user", "content": f"add {i} and {i}"},
                      {"role": "assistant", "content": f"the answer is {2 * i}"}]} for i in range(4)])
    (labels / "meta.json").write_text('{"format": "dflash-lab-labels/1"}')
    prompts = write_jsonl(root / "prompts.jsonl", [
        {"id": f"p{i}", "messages": [{"role": "user", "content": f"say {i}"}]} for i in range(3)])
    return {"root": root, "target": target, "recipe": recipe, "labels": labels, "prompts": prompts}


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return code, out, err


def refused(capsys, needle, *argv) -> str:
    """Exit 2, one `error:` line that names `needle` (the input), no traceback."""
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]  # after any progress bar of a model load
    assert last.startswith("error: ") and err.count("error: ") == 1, err
    assert str(needle) in last, err
    return last


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (or the file itself) -> its bytes, to prove nothing changed."""
    path = Path(path)
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def fake_run(root: Path, with_run_json: bool = True) -> Path:
    """A training run directory as `train` leaves it: run.json, metrics, tensorboard, checkpoints."""
    run_dir = root
    (run_dir / "checkpoints" / "final").mkdir(parents=True)
    (run_dir / "checkpoints" / "final" / "model.safetensors").write_bytes(b"weights that took hours")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    (run_dir / "tb").mkdir()
    (run_dir / "tb" / "events.out").write_bytes(b"\x00\x01tensorboard")
    if with_run_json:
        (run_dir / "run.json").write_text('{"status": "finished"}\n')
    return run_dir


# -- data loss ------------------------------------------------------------------------------------
def test_draft_init_refuses_an_existing_run_directory(env, tmp_path, capsys):
    run_dir = fake_run(tmp_path / "run")
    before = snapshot(run_dir)
    refused(capsys, run_dir, "draft", "init", "--target", env["target"], "--num-layers", 1, "--out", run_dir)
    assert snapshot(run_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no .run.old, no temp folder


def test_draft_init_refuses_a_file(env, tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("my notes\n")
    refused(capsys, file, "draft", "init", "--target", env["target"], "--num-layers", 1, "--out", file)
    assert file.read_text() == "my notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no hidden .notes.txt.old


def test_draft_init_force_replaces_and_new_folder_works(env, tmp_path, capsys):
    out = tmp_path / "draft"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, stdout, _ = run(capsys, "draft", "init", "--target", env["target"], "--num-layers", 1, "--out", out,
                          "--force")
    assert code == 0 and not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    code, _, _ = run(capsys, "draft", "init", "--target", env["target"], "--num-layers", 1, "--out", tmp_path / "new")
    assert code == 0 and (tmp_path / "new" / "config.json").is_file()


def test_save_draft_never_swaps_away_a_folder(env, tmp_path):
    from dflash_lab.models.checkpoint import save_draft
    from dflash_lab.models.draft import DFlashDraftModel, build_draft_config
    from dflash_lab.models.target import load_target

    draft = DFlashDraftModel(build_draft_config(load_target(str(env["target"])), num_layers=1, block_size=4))
    run_dir = fake_run(tmp_path / "run")
    before = snapshot(run_dir)
    with pytest.raises(DFlashLabError, match="already exists"):
        save_draft(draft, run_dir)
    assert snapshot(run_dir) == before


def test_eval_out_directory_is_refused_before_the_evaluation(env, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.json").write_text("{}")
    refused(capsys, out, "eval", "--target", env["target"], "--drafter", "none", "--out", out, "--no-db",
            "--bench-dir", tmp_path)
    assert snapshot(out) == {"keep.json": b"{}"}


def test_eval_out_foreign_file_is_refused(env, tmp_path, capsys):
    out = tmp_path / "paper.json"
    out.write_text('{"mine": 1}')
    refused(capsys, out, "eval", "--target", env["target"], "--drafter", "none", "--out", out, "--no-db",
            "--bench-dir", tmp_path)
    assert out.read_text() == '{"mine": 1}'


def test_train_out_with_checkpoints_but_no_run_json(env, tmp_path, capsys):
    run_dir = fake_run(tmp_path / "copied", with_run_json=False)
    before = snapshot(run_dir)
    err = refused(capsys, run_dir, "train", "--config", env["recipe"], "--data", env["labels"], "--out", run_dir)
    assert "--resume" in err
    assert snapshot(run_dir) == before


def test_prompts_build_refuses_to_overwrite_its_own_input(tmp_path, capsys):
    out = tmp_path / "set"
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"question number {i} about apples"}]}
            for i in range(10)]
    source = write_jsonl(out / "prompts.jsonl", rows)
    (out / "manifest.json").write_text("{}")  # even inside a prompt set folder of its own
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(f"name: t\nsources:\n  - {{name: s, path: {source}, category: chat, messages_field: messages}}\n")
    before = snapshot(out)
    refused(capsys, source, "prompts", "build", "--config", recipe, "--out", out)
    refused(capsys, source, "prompts", "build", "--config", recipe, "--out", out, "--force")
    assert snapshot(out) == before


def test_prompts_build_refuses_a_foreign_folder(tmp_path, capsys):
    source = write_jsonl(tmp_path / "src.jsonl", [{"id": "a", "messages": [{"role": "user", "content": "hello there"}]}])
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(f"name: t\nsources:\n  - {{name: s, path: {source}, category: chat, messages_field: messages}}\n")
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("chapter 1")
    refused(capsys, out, "prompts", "build", "--config", recipe, "--out", out)
    assert snapshot(out) == {"thesis.tex": b"chapter 1"}


# -- tracebacks that must be `error:` lines -------------------------------------------------------
def test_not_utf8_training_recipe(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    bad.write_bytes(NOT_UTF8)
    err = refused(capsys, bad, "train", "--config", bad, "--out", tmp_path / "o", "--dry-run")
    assert "UTF-8" in err


def test_not_utf8_mix_recipe(tmp_path, capsys):
    bad = tmp_path / "mix.yaml"
    bad.write_bytes(b"name: caf\xe9\nsources: []\n")
    refused(capsys, bad, "prompts", "build", "--config", bad, "--dry-run")


def test_not_utf8_labelled_dataset(env, tmp_path, capsys):
    data = tmp_path / "labels"
    data.mkdir()
    (data / "shard-00000.jsonl").write_bytes(b'{"id": "a", "messages": [{"role": "user", "content": "\xff"}]}\n')
    refused(capsys, data / "shard-00000.jsonl", "train", "--config", env["recipe"], "--data", data,
            "--out", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_not_utf8_in_a_later_line_is_named_by_read_records(tmp_path):
    from dflash_lab.train.data import read_records

    file = tmp_path / "d.jsonl"
    file.write_bytes(b'{"id": "a"}\n{"id": "b\xff"}\n')
    with pytest.raises(DFlashLabError, match=r"d\.jsonl:2: not UTF-8"):
        read_records(file)


def test_not_utf8_label_prompts_file(env, tmp_path, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_bytes(b'{"messages": [{"role": "user", "content": "ok"}]}\n{"messages": [{"role": "user", "content": "\xe9"}]}\n')
    refused(capsys, bad, "label", "--prompts", bad, "--target", env["target"], "--out", tmp_path / "o",
            "--no-progress", "--max-new-tokens", 2)


def test_override_that_is_not_yaml(env, tmp_path, capsys):
    refused(capsys, "train.lr=[1,", "train", "--config", env["recipe"], "--out", tmp_path / "o", "--dry-run",
            "train.lr=[1,")


def test_train_device_is_validated_by_the_recipe(env, tmp_path, capsys):
    err = refused(capsys, "train.device", "train", "--config", env["recipe"], "--out", tmp_path / "o", "--dry-run",
                  "train.device=tpu")
    assert "cuda" in err


def test_record_without_role_is_counted_not_fatal(env):
    from dflash_lab.models.target import load_target
    from dflash_lab.train.data import tokenize_records

    target = load_target(str(env["target"]))
    good = {"id": "g", "messages": [{"role": "user", "content": "add one and two"},
                                    {"role": "assistant", "content": "three, said the model"}]}
    bad = {"id": "b", "messages": [{"content": "no role here"}, {"role": "assistant", "content": "x y z"}]}
    samples, stats = tokenize_records(target, [good, bad], max_length=64)
    assert [s.id for s in samples] == ["g"]
    assert stats.skipped_bad_record == 1 and stats.reasons[0].startswith("record b:")


def fake_checkpoints(run_dir: Path, config: Path, data: Path, steps=(2, 4), layout: str = "old") -> Path:
    """A run with real (tiny) safetensors/JSON checkpoint files, as resume reads them: `layout`
    "new" keeps the training files in training_state/ (issue 21), "old" beside the weights."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config.read_text())
    (run_dir / "run.json").write_text(json.dumps({"status": "running", "data": {"path": str(data)}}))
    for step in steps:
        ckpt = run_dir / "checkpoints" / f"step-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "config.json").write_text('{"architectures": ["DFlashDraftModel"]}')
        save_file({"w": torch.zeros(4)}, str(ckpt / "model.safetensors"))
        training = ckpt / "training_state" if layout == "new" else ckpt
        training.mkdir(exist_ok=True)
        save_file({"state.0.exp_avg": torch.zeros(64)}, str(training / "optimizer.safetensors"))
        save_file({"torch": torch.zeros(64, dtype=torch.uint8)}, str(training / "rng.safetensors"))
        (training / "optimizer.json").write_text('{"param_groups": [], "layout": {}}')
        (training / "rng.json").write_text("{}")
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "data_position": {"epoch": 0, "step_in_epoch": step}}))
    return run_dir


@pytest.mark.parametrize("layout", ["old", "new"])
@pytest.mark.parametrize("broken", ["optimizer.safetensors", "rng.safetensors", "trainer_state.json"])
def test_corrupt_resume_state_names_the_checkpoint_and_the_one_before(env, tmp_path, capsys, broken, layout):
    run_dir = fake_checkpoints(tmp_path / "run", env["recipe"], env["labels"], layout=layout)
    file = run_dir / "checkpoints" / "step-4" / broken
    if layout == "new" and broken != "trainer_state.json":
        file = file.parent / "training_state" / broken
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    before = snapshot(run_dir)
    err = refused(capsys, run_dir / "checkpoints" / "step-4", "train", "--out", run_dir, "--resume")
    assert broken in err and "step-2" in err and "--resume" in err
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("layout", ["old", "new"])
def test_resume_previous_sets_the_broken_checkpoint_aside(env, tmp_path, layout):
    from dflash_lab.train.commands import _verify_resume_point
    from dflash_lab.train.state import latest_checkpoint, state_dir

    run_dir = fake_checkpoints(tmp_path / "run", env["recipe"], env["labels"], layout=layout)
    (state_dir(run_dir / "checkpoints" / "step-4") / "rng.safetensors").write_bytes(b"\x00")
    _verify_resume_point(run_dir, resume_previous=True)
    assert latest_checkpoint(run_dir).name == "step-2"
    assert (run_dir / "checkpoints" / ".broken-step-4" / "model.safetensors").is_file()  # kept, not deleted


@pytest.mark.parametrize("command", ["train", "label"])
def test_out_that_is_a_file(env, tmp_path, capsys, command):
    file = tmp_path / "out.txt"
    file.write_text("keep")
    if command == "train":
        argv = ["train", "--config", env["recipe"], "--data", env["labels"], "--out", file]
    else:
        argv = ["label", "--prompts", env["prompts"], "--target", env["target"], "--out", file]
    err = refused(capsys, file, *argv)
    assert "is a file" in err and file.read_text() == "keep"


def test_corrupt_label_meta(env, tmp_path, capsys):
    out = tmp_path / "labels"
    out.mkdir()
    (out / "meta.json").write_text('{"format": "dflash-lab-lab')
    before = snapshot(out)
    refused(capsys, out / "meta.json", "label", "--prompts", env["prompts"], "--target", env["target"], "--out", out)
    refused(capsys, out / "meta.json", "labels", "audit", out)
    assert snapshot(out) == before


@pytest.mark.parametrize("edit,needle", [
    (lambda cfg: [cfg], "top level must be a JSON object"),
    (lambda cfg: {**cfg, "num_key_value_heads": 0}, "num_key_value_heads must be >= 1"),
    (lambda cfg: {**cfg, "hidden_size": str(cfg["hidden_size"])}, "hidden_size must be an integer"),
])
def test_bad_draft_config(env, tmp_path, capsys, edit, needle):
    draft = tmp_path / "draft"
    assert main(["draft", "init", "--target", str(env["target"]), "--num-layers", "1", "--out", str(draft)]) == 0
    cfg = json.loads((draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps(edit(cfg)))
    err = refused(capsys, draft / "config.json", "generate", "--target", env["target"], "--draft", draft,
                  "--prompt", "hi", "--max-new-tokens", 2)
    assert needle in err


class _ListModels(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = b'[{"id": "tiny"}]'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_models_endpoint_answering_a_list(env, tmp_path, capsys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ListModels)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        err = refused(capsys, url, "label", "--backend", "openai", "--server", url, "--target", env["target"],
                      "--prompts", env["prompts"], "--out", tmp_path / "o", "--no-progress")
    finally:
        server.shutdown()
    assert "/v1/models" in err


def test_corrupt_parquet_source(tmp_path, capsys):
    bad = tmp_path / "src.parquet"
    bad.write_bytes(b"PAR1 this is not parquet at all")
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(f"name: t\nsources:\n  - {{name: s, path: {bad}, category: chat, prompt_field: text}}\n")
    refused(capsys, bad, "prompts", "build", "--config", recipe, "--out", tmp_path / "set")


def test_draft_init_layer_ids_not_numbers(env, tmp_path, capsys):
    refused(capsys, "--target-layer-ids 'a,b'", "draft", "init", "--target", env["target"], "--num-layers", 1,
            "--out", tmp_path / "d", "--target-layer-ids", "a,b")
    assert not (tmp_path / "d").exists()


# -- wrong or silent answers ----------------------------------------------------------------------
def test_every_record_without_a_response_suggests_label(env, tmp_path, capsys):
    err = refused(capsys, env["prompts"], "train", "--config", env["recipe"], "--data", env["prompts"],
                  "--out", tmp_path / "run")
    assert "assistant response" in err and "dflash-lab label" in err and "global_batch" not in err


def test_label_exits_non_zero_when_nothing_was_labelled(env, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "p.jsonl", [{"id": f"x{i}", "messages": [{"role": "assistant", "content": "hi"}]}
                                             for i in range(3)])
    err = refused(capsys, tmp_path / "o", "label", "--prompts", bad, "--target", env["target"], "--out", tmp_path / "o",
                  "--no-progress", "--max-new-tokens", 2)
    assert "all 3 prompts failed" in err and "bad input" in err


def test_label_max_new_tokens_above_context_is_refused_up_front(env, tmp_path, capsys):
    refused(capsys, "--max-new-tokens 5000", "label", "--prompts", env["prompts"], "--target", env["target"],
            "--out", tmp_path / "o", "--max-new-tokens", 5000)
    assert not (tmp_path / "o").exists()  # not locked to that setting


def test_written_files_follow_the_umask(env, tmp_path):
    from dflash_lab.data.records import atomic_write_text as data_write
    from dflash_lab.eval.harness import write_results
    from dflash_lab.fileio import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        data_write(tmp_path / "b.jsonl", "")
        write_results({"x": 1}, tmp_path / "c.json")
        assert main(["draft", "init", "--target", str(env["target"]), "--num-layers", "1",
                     "--out", str(tmp_path / "draft")]) == 0
    finally:
        os.umask(old)
    for name in ("a.json", "b.jsonl", "c.json", "draft/config.json", "draft/model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert (tmp_path / "draft").stat().st_mode & 0o777 == 0o755


def test_eval_bench_dir_that_does_not_exist(env, tmp_path, capsys):
    refused(capsys, tmp_path / "nope", "eval", "--target", env["target"], "--drafter", "none",
            "--out", tmp_path / "r.json", "--no-db", "--bench-dir", tmp_path / "nope")


@pytest.mark.parametrize("size", ["0", "-1"])
def test_block_size_is_validated(env, tmp_path, capsys, size):
    refused(capsys, "--block-size", "draft", "init", "--target", env["target"], "--num-layers", 1,
            "--out", tmp_path / "d", "--block-size", size)
    refused(capsys, "--block-size", "eval", "--target", env["target"], "--drafter", "prompt-lookup",
            "--out", tmp_path / "r.json", "--no-db", "--bench-dir", tmp_path, "--block-size", size)
    assert not (tmp_path / "d").exists() and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("command", [["train", "--out", "o", "--dry-run"], ["prompts", "build", "--dry-run"]])
def test_recipe_that_is_a_directory(tmp_path, capsys, command):
    err = refused(capsys, tmp_path, *command, "--config", tmp_path)
    assert "is a directory" in err


def test_os_errors_name_the_path(tmp_path, capsys, monkeypatch):
    import dflash_lab.labels.audit as audit

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "labels" / "audit.json"))

    monkeypatch.setattr(audit, "audit_labels", denied)
    refused(capsys, tmp_path / "labels" / "audit.json", "labels", "audit", tmp_path / "labels")


def test_empty_recipe_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    refused(capsys, empty, "train", "--config", empty, "--out", tmp_path / "o", "--dry-run")


def test_global_batch_message_is_the_fact_and_the_fix(env, tmp_path, capsys):
    err = refused(capsys, "train.global_batch 10", "train", "--config", env["recipe"], "--out", tmp_path / "o",
                  "--dry-run", "train.micro_batch=4", "train.global_batch=10")
    assert "multiple of 4" in err and len(err) < 300, err


def test_overrides_between_options(env, tmp_path, capsys):
    code, out, _ = run(capsys, "train", "train.lr=0.5", "--config", env["recipe"], "train.epochs=3",
                       "--out", tmp_path / "o", "--dry-run")
    assert code == 0
    resolved = json.loads(out)
    assert resolved["train"]["lr"] == 0.5 and resolved["train"]["epochs"] == 3


def test_interrupted_train_marks_run_json(env, tmp_path, capsys, monkeypatch):
    import dflash_lab.train.trainer as trainer

    def fake_train(recipe, data, out, **kwargs):  # the real trainer writes run.json, then Ctrl-C arrives
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "run.json").write_text(json.dumps({"status": "running"}))
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", fake_train)
    code, _, err = run(capsys, "train", "--config", env["recipe"], "--data", env["labels"], "--out", tmp_path / "run")
    assert code == 130 and "--resume" in err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "interrupted"


def test_interrupted_label_says_a_rerun_resumes(env, tmp_path, capsys, monkeypatch):
    import dflash_lab.labels.runner as runner

    def fake_run_labels(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_labels", fake_run_labels)
    code, _, err = run(capsys, "label", "--prompts", env["prompts"], "--target", env["target"], "--out", tmp_path / "o")
    assert code == 130 and "rerun the same command to resume" in err


# -- the rule lives in one place: a new command gets it by calling it ----------------------------
def _export_command(out: Path, force: bool = False) -> None:
    """A command that did not exist when the rule was written: it only calls the shared check."""
    check_output_dir(out, command="export", force=force)
    out.mkdir(parents=True, exist_ok=True)
    (out / "export.bin").write_bytes(b"new")


def test_a_new_command_gets_the_same_rule(tmp_path):
    run_dir = fake_run(tmp_path / "run")
    before = snapshot(run_dir)
    with pytest.raises(DFlashLabError, match=r"--out .*run already holds .*checkpoints/.*--force"):
        _export_command(run_dir)
    assert snapshot(run_dir) == before
    file = tmp_path / "f"
    file.write_text("x")
    with pytest.raises(DFlashLabError, match="is a file"):
        _export_command(file, force=True)  # force never turns a file into a folder
    with pytest.raises(DFlashLabError, match="is a file, not a folder"):
        _export_command(file / "sub")
    _export_command(tmp_path / "fresh")  # new: fine
    (tmp_path / "empty").mkdir()
    _export_command(tmp_path / "empty")  # empty: fine
    _export_command(run_dir, force=True)  # asked for: fine
    assert (run_dir / "export.bin").read_bytes() == b"new"


def test_file_outputs_and_inputs_share_the_rule(tmp_path):
    folder = tmp_path / "dir"
    folder.mkdir()
    with pytest.raises(DFlashLabError, match="is a directory"):
        check_output_file(folder, command="export", force=True)
    theirs = tmp_path / "theirs.json"
    theirs.write_text("{}")
    with pytest.raises(DFlashLabError, match="already holds a file"):
        check_output_file(theirs, command="export")
    assert check_output_file(theirs, command="export", owned=lambda p: True) == theirs
    inp = tmp_path / "in.jsonl"
    inp.write_text("x")
    link = tmp_path / "link.jsonl"
    link.symlink_to(inp)
    with pytest.raises(DFlashLabError, match="is also an input"):
        check_not_input([link], [inp])
    check_not_input([tmp_path / "other.jsonl"], [inp])


def test_a_new_reader_gets_the_same_unreadable_file_rule(tmp_path):
    """Any reader of a user's text file calls read_user_text: not UTF-8, a folder, a missing file
    all become one message naming what it is and where."""
    from dflash_lab.fileio import read_user_text

    bad = tmp_path / "glossary.txt"
    bad.write_bytes(b"ok\nna\xefve\n")
    with pytest.raises(DFlashLabError, match=r"glossary .*glossary\.txt: not UTF-8 text \(invalid byte 0xef on line 2\)"):
        read_user_text(bad, "glossary")
    with pytest.raises(DFlashLabError, match="is a directory"):
        read_user_text(tmp_path, "glossary")
    with pytest.raises(DFlashLabError, match="no such file"):
        read_user_text(tmp_path / "nope.txt", "glossary")


def test_eval_run_with_a_damaged_run_json(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text('{"name": "x", ')
    refused(capsys, run_dir / "run.json", "eval-run", run_dir, "--no-db", "--db", tmp_path / "r.db")


def test_benchmark_file_not_utf8(tmp_path, capsys):
    from dflash_lab.eval.benchmarks import BENCHMARKS, load_benchmark

    name = next(iter(BENCHMARKS))
    (tmp_path / BENCHMARKS[name].file).write_bytes(b'{"question": "caf\xe9"}\n')
    with pytest.raises(DFlashLabError, match="not UTF-8 text"):
        load_benchmark(name, tmp_path, allow_pypi=False, allow_hub=False)


# -- issue 24: one writer per run directory -------------------------------------------------------
def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _unstarted_run(run_dir: Path, env) -> Path:
    """A run another `train` has just started: run.json, config, no checkpoint yet."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(env["recipe"].read_text())
    (run_dir / "run.json").write_text('{"status": "running"}\n')
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    return run_dir


def test_second_train_writer_is_refused_with_the_holders_pid_and_host(env, tmp_path, capsys):
    import socket
    import subprocess
    import sys

    run_dir = _unstarted_run(tmp_path / "run", env)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / ".writer.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                          "command": "train", "started": "2026-12-07T20:00:00+00:00"}))
        before = snapshot(run_dir)
        err = refused(capsys, run_dir, "train", "--config", env["recipe"], "--data", env["labels"], "--out", run_dir)
        assert f"pid {holder.pid}" in err and socket.gethostname() in err and "being written" in err
        assert snapshot(run_dir) == before  # metrics.jsonl not interleaved, lock untouched
    finally:
        holder.kill()
        holder.wait()


def test_stale_run_lock_is_taken_over_with_a_note(env, tmp_path, capsys, monkeypatch):
    import socket

    import dflash_lab.train.trainer as trainer

    run_dir = _unstarted_run(tmp_path / "run", env)
    (run_dir / ".writer.lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    seen = {}

    def fake_train(recipe, data, out, **kwargs):  # the lock is ours while the run writes
        seen["holder"] = json.loads((Path(out) / ".writer.lock").read_text())
        return Path(out) / "checkpoints" / "final"

    monkeypatch.setattr(trainer, "train", fake_train)
    code, _, err = run(capsys, "train", "--config", env["recipe"], "--data", env["labels"], "--out", run_dir)
    assert code == 0, err
    assert "is gone; taking the run directory over" in err
    assert seen["holder"]["pid"] == os.getpid()
    assert not (run_dir / ".writer.lock").exists()  # released at the end


def test_run_lock_two_writers_and_ranks(tmp_path):
    from dflash_lab.runlock import RunDirLock

    first = RunDirLock(tmp_path / "run").acquire()
    with pytest.raises(DFlashLabError, match=f"pid {os.getpid()}"):
        RunDirLock(tmp_path / "run").acquire()
    RunDirLock(tmp_path / "run", rank=1).acquire()  # another rank of the same torchrun job takes nothing
    first.release()
    with RunDirLock(tmp_path / "run"):
        assert (tmp_path / "run" / ".writer.lock").is_file()
    assert not (tmp_path / "run" / ".writer.lock").exists()


# -- issue 23 item 2: --resume-previous under torchrun ------------------------------------------------
def _resume_rank(run_dir: str, rank: int, results) -> None:
    from dflash_lab.train import state as S
    from dflash_lab.train.commands import _verify_resume_point

    calls = []
    set_aside = S.set_aside_broken
    S.set_aside_broken = lambda ckpt: calls.append(ckpt) or set_aside(ckpt)  # this forked rank's renames
    try:
        latest = _verify_resume_point(Path(run_dir), resume_previous=True, rank=rank, wait_s=60)
        results.put((rank, (latest.name, len(calls))))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put((rank, (f"{type(exc).__name__}: {exc}", len(calls))))


def test_resume_previous_with_forked_ranks_sets_aside_once(env, tmp_path):
    """Before any process group exists, only rank 0 renames; the other ranks (started first here,
    as a slow rank 0 would leave them) wait for it and resume from the same checkpoint."""
    import multiprocessing as mp
    import time

    ctx = mp.get_context("fork")
    run_dir = fake_checkpoints(tmp_path / "run", env["recipe"], env["labels"], steps=(2, 4, 6))
    for step in (4, 6):  # the two latest are broken
        (run_dir / "checkpoints" / f"step-{step}" / "rng.safetensors").write_bytes(b"\x00")
    results = ctx.Queue()
    procs = {rank: ctx.Process(target=_resume_rank, args=(str(run_dir), rank, results)) for rank in range(6)}
    for rank in range(1, 6):
        procs[rank].start()
    time.sleep(1.0)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
    procs[0].start()
    got = dict(results.get(timeout=120) for _ in procs)
    for p in procs.values():
        p.join(timeout=60)
    assert got == {0: ("step-2", 2), **{rank: ("step-2", 0) for rank in range(1, 6)}}, got
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == [".broken-step-4", ".broken-step-6", "step-2"], names  # each set aside once, kept


# -- issue 24: verified files --------------------------------------------------------------------
def test_truncated_token_store_file_is_an_error_line(env, tmp_path, capsys):
    from dflash_lab.models.target import load_target
    from dflash_lab.train.store import TokenStore

    root = tmp_path / "stores"
    store = TokenStore.open_or_build(env["labels"], load_target(str(env["target"])), 64, 2, root=root, progress=False)
    tokens = store.path / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-4])
    err = refused(capsys, tokens.name, "train", "--config", env["recipe"], "--data", env["labels"],
                  "--out", tmp_path / "run", f"data.token_store={root}")
    assert str(store.path) in err and "rebuilds" in err and "mmap" not in err


# -- issue 24: draft export data loss, and disk full ----------------------------------------------
@pytest.fixture(scope="module")
def export_files(env, tmp_path_factory):
    """A target GGUF with the keys the exporter reads, a draft for it, and one earlier export."""
    from gguf import GGUFWriter

    from dflash_lab.models.checkpoint import save_draft
    from dflash_lab.models.draft import DFlashDraftModel, DraftConfig
    from dflash_lab.models.gguf_export import export_draft_gguf

    root = tmp_path_factory.mktemp("export")
    target = root / "target.gguf"
    writer = GGUFWriter(str(target), "llama")
    writer.add_uint32("llama.embedding_length", 64)
    writer.add_uint32("llama.block_count", 6)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(40)])
    writer.add_token_types([1] * 40)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cfg = DraftConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=40, num_target_layers=6, mask_token_id=5,
                      target_layer_ids=[1, 4], block_size=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=512)
    draft = save_draft(DFlashDraftModel(cfg).init_weights(seed=0), root / "draft")
    earlier = export_draft_gguf(draft, target, root / "exports" / "draft.gguf")
    return {"target": target, "draft": draft, "earlier": earlier}


def test_draft_export_refuses_a_foreign_file_and_the_target(export_files, tmp_path, capsys):
    victim = tmp_path / "data" / "victim.jsonl"
    victim.parent.mkdir()
    victim.write_text('{"id": 1}\n')
    target = export_files["target"]
    before = target.read_bytes()
    refused(capsys, victim, "draft", "export", export_files["draft"], "--to", "gguf", "--target", target,
            "--out", victim)
    assert victim.read_text() == '{"id": 1}\n'
    err = refused(capsys, target, "draft", "export", export_files["draft"], "--to", "gguf", "--target", target,
                  "--out", target)
    assert "input" in err and target.read_bytes() == before
    # an earlier export of the draft is replaced by a rerun (this command wrote it)
    code, _, err = run(capsys, "draft", "export", export_files["draft"], "--to", "gguf", "--target", target,
                       "--out", export_files["earlier"])
    assert code == 0, err


def _no_temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_disk_full_during_draft_export(export_files, capsys, monkeypatch):
    import errno

    from gguf import GGUFWriter

    out = export_files["earlier"]
    before = out.read_bytes()

    def full(self, *args, **kwargs):
        self.fout[0].write(b"\x00" * 100)  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(GGUFWriter, "write_tensors_to_file", full)
    err = refused(capsys, out, "draft", "export", export_files["draft"], "--to", "gguf",
                  "--target", export_files["target"], "--out", out)
    assert "No space left" in err
    assert out.read_bytes() == before and _no_temp_files(out.parent) == []


def test_disk_full_during_draft_init(env, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    import dflash_lab.models.checkpoint as checkpoint

    out = tmp_path / "draft"
    code, _, err = run(capsys, "draft", "init", "--target", env["target"], "--num-layers", 1, "--out", out)
    assert code == 0, err
    before = snapshot(out)

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 10)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(checkpoint, "save_file", full)
    err = refused(capsys, out, "draft", "init", "--target", env["target"], "--num-layers", 1, "--out", out, "--force")
    assert "No space left" in err
    assert snapshot(out) == before and _no_temp_files(tmp_path) == []


def test_disk_full_during_a_checkpoint(env, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from dflash_lab.models.draft import DFlashDraftModel, build_draft_config
    from dflash_lab.models.target import load_target
    from dflash_lab.train import state as S
    from dflash_lab.train.checkpointer import save_checkpoint

    draft = DFlashDraftModel(build_draft_config(load_target(str(env["target"])), num_layers=1, block_size=4))
    optimizer = torch.optim.AdamW(draft.parameters())
    ckpts = tmp_path / "checkpoints"
    save_checkpoint(ckpts / "step-2", draft, optimizer, {"step": 2})
    before = snapshot(ckpts)

    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(S, "save_file", full)
    with pytest.raises(DFlashLabError, match="step-2.*No space left on device.*--resume"):
        save_checkpoint(ckpts / "step-2", draft, optimizer, {"step": 2})
    assert snapshot(ckpts) == before and _no_temp_files(ckpts) == []


# -- issue 24: what --dry-run can validate, it validates -----------------------------------------------
@pytest.mark.parametrize("overrides,needle", [
    (["draft.block_size=16", "draft.sliding_window=4"], "draft.sliding_window 4"),
    (["draft.num_layers=2", "draft.layer_types=[sliding_attention]", "draft.sliding_window=64"], "draft.layer_types"),
    (["draft.layer_types=[sliding_attention]"], "draft.sliding_window is not set"),
    (["draft.init=RUN/checkpoints/final", "draft.sliding_window=64"], "draft.sliding_window with draft.init"),
])
def test_dry_run_validates_the_draft_window(env, tmp_path, capsys, overrides, needle):
    refused(capsys, needle, "train", "--config", env["recipe"], "--out", tmp_path / "o", "--dry-run", *overrides)
    assert not (tmp_path / "o").exists()


# -- issue 24: device names, backend options, server URLs and numbers ---------------------------
def _bench_dir(root: Path) -> Path:
    write_jsonl(root / "bench" / "gsm8k.test.jsonl", [{"question": f"Natalia sold {i} clips. How many?"}
                                                      for i in range(2)])
    return root / "bench"


@pytest.mark.parametrize("command", ["eval", "generate", "label"])
def test_device_name_is_validated(env, tmp_path, capsys, command):
    argv = {"eval": ["eval", "--target", env["target"], "--drafter", "none", "--out", tmp_path / "r.json"],
            "generate": ["generate", "--target", env["target"], "--prompt", "hi"],
            "label": ["label", "--prompts", env["prompts"], "--target", env["target"], "--out", tmp_path / "l"]}[command]
    err = refused(capsys, "tpu", *argv, "--device", "tpu")
    assert "cuda" in err and not (tmp_path / "l").exists()


def test_llamacpp_threads_zero_is_refused_before_llamacpp(env, tmp_path, capsys, monkeypatch):
    import dflash_lab.eval.harness as harness

    monkeypatch.setattr(harness, "evaluate", lambda *a, **k: pytest.fail("the evaluation started"))
    refused(capsys, "--threads", "eval", "--backend", "llamacpp", "--target", env["target"], "--drafter", "none",
            "--threads", 0, "--out", tmp_path / "r.json")


def test_llamacpp_with_device_and_dtype_is_refused(env, tmp_path, capsys):
    err = refused(capsys, "--device cuda", "eval", "--backend", "llamacpp", "--target", env["target"],
                  "--drafter", "none", "--device", "cuda", "--dtype", "bfloat16", "--out", tmp_path / "r.json")
    assert "--dtype bfloat16" in err and not (tmp_path / "r.json").exists()


def test_server_url_without_scheme(env, tmp_path, capsys):
    err = refused(capsys, "127.0.0.1:30000", "eval", "--backend", "sglang", "--server", "127.0.0.1:30000",
                  "--target", env["target"], "--drafter", "none", "--out", tmp_path / "r.json")
    assert "http://127.0.0.1:30000" in err and "start it first" not in err


class _Answer(http.server.BaseHTTPRequestHandler):
    """Answers every request with the class's `body` (bytes) and `content_type`."""
    body = b"{}"
    content_type = "application/json"

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


def _serve(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_llamacpp_server_accepting_more_than_it_drafted(env, tmp_path, capsys):
    class Impossible(_Answer):
        body = json.dumps({"content": "four", "tokens": [5, 6, 7, 8, 9, 10, 11, 12], "stop_type": "eos",
                           "timings": {"predicted_n": 8, "draft_n": 10, "draft_n_accepted": 50}}).encode()

    server, url = _serve(Impossible)
    try:
        err = refused(capsys, url, "eval", "--backend", "llamacpp", "--server", url, "--target", env["target"],
                      "--drafter", "none", "--bench-dir", _bench_dir(tmp_path), "--benchmarks", "gsm8k",
                      "--limit", 1, "--no-lossless-check", "--no-db", "--quiet", "--out", tmp_path / "r.json")
    finally:
        server.shutdown()
    assert "50 accepted of 10" in err and not (tmp_path / "r.json").exists()


def test_server_counts_are_sanity_checked():
    from dflash_lab.eval import backends
    from dflash_lab.eval.llamacpp import parse_completion

    with pytest.raises(DFlashLabError, match="http://s:1 reported timings.draft_n = -3"):
        parse_completion({"timings": {"predicted_n": 8, "draft_n": -3}}, "http://s:1")
    with pytest.raises(DFlashLabError, match="http://s:2 reported 9 accepted of 4"):
        backends.parse_sglang_response({"meta_info": {"completion_tokens": 4, "spec_verify_ct": 9}}, "http://s:2")
    with pytest.raises(DFlashLabError, match="went down"):
        backends.check_vllm_counters({"accepted": -5.0, "drafts": 3.0, "per_pos": {}}, ["http://s:3"])


def test_a_plain_web_server_page_is_not_printed(env, tmp_path, capsys):
    class Page(_Answer):
        content_type = "text/html"
        body = (b"<!DOCTYPE html>\n<html><head><title>Directory listing for /</title></head>\n<body>\n"
                + b"<li><a href='x'>x</a></li>\n" * 200 + b"</body></html>\n")

    server, url = _serve(Page)
    try:
        err = refused(capsys, url, "eval", "--backend", "sglang", "--server", url, "--target", env["target"],
                      "--drafter", "none", "--bench-dir", _bench_dir(tmp_path), "--benchmarks", "gsm8k",
                      "--limit", 1, "--no-lossless-check", "--no-db", "--quiet", "--out", tmp_path / "r.json")
    finally:
        server.shutdown()
    # the server check (before the target loads) names what answered, by its title, not the whole page
    assert "not an SGLang server" in err and "HTML page" in err and "Directory listing" in err
    assert "<li>" not in err and len(err) < 600


# -- issue 24: wrong or silent answers ----------------------------------------------------------
def test_plan_no_search_does_not_claim_a_largest_micro_batch(env, capsys):
    code, out, err = run(capsys, "plan", "--config", env["recipe"], "--no-search")
    assert code == 0, err
    line = next(x for x in out.splitlines() if "largest micro-batch" in x)
    assert "not searched" in line, line


def test_labels_of_another_target_warn(env, tmp_path, capsys, monkeypatch):
    import shutil

    import dflash_lab.train.trainer as trainer

    labels = tmp_path / "labels"
    shutil.copytree(env["labels"], labels)
    (labels / "meta.json").write_text(json.dumps({"format": "dflash-lab-labels/1",
                                                  "target": {"name": "Qwen/Qwen3-8B", "fingerprint": "0123abcd"}}))
    monkeypatch.setattr(trainer, "train", lambda *a, **k: Path(a[2]) / "checkpoints" / "final")
    code, _, err = run(capsys, "train", "--config", env["recipe"], "--data", labels, "--out", tmp_path / "run")
    assert code == 0, err
    assert "warning:" in err and "Qwen/Qwen3-8B" in err and str(labels) in err
    # labels of this very target: no warning
    (labels / "meta.json").write_text(json.dumps({"target": {"name": "t", "fingerprint": _fingerprint(env)}}))
    code, _, err = run(capsys, "train", "--config", env["recipe"], "--data", labels, "--out", tmp_path / "run2")
    assert code == 0 and "warning:" not in err, err


def _fingerprint(env) -> str:
    from dflash_lab.models.target import _dir_fingerprint

    return _dir_fingerprint(Path(env["target"]))


def test_stop_after_leaves_run_json_stopped(env, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--config", env["recipe"], "--data", env["labels"], "--out", run_dir,
                       "--stop-after", 1, "--no-progress", "train.eval_interval=0")
    assert code == 0, err
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "stopped" and meta["stopped_at"] == "step-1", meta["status"]
    assert not (run_dir / ".writer.lock").exists()


def test_serve_cmd_checks_its_inputs(env, tmp_path, capsys):
    gguf = tmp_path / "target.gguf"
    gguf.write_bytes(b"GGUF")
    data = write_jsonl(tmp_path / "data.jsonl", [{"id": 1}])
    refused(capsys, "--target", "serve-cmd", "--engine", "sglang", "--target", tmp_path / "no-such-model")
    refused(capsys, "--target", "serve-cmd", "--engine", "llamacpp", "--target", tmp_path / "missing.gguf")
    for port in ("70000", "-5"):
        refused(capsys, f"--port {port}", "serve-cmd", "--engine", "vllm", "--target", env["target"], "--port", port)
    err = refused(capsys, "--draft", "serve-cmd", "--engine", "llamacpp", "--target", gguf,
                  "--draft", tmp_path / "nope.gguf")
    assert "--target" not in err
    err = refused(capsys, "--draft", "serve-cmd", "--engine", "llamacpp", "--target", gguf, "--draft", data)
    assert f"draft export {data}" not in err
    code, out, _ = run(capsys, "serve-cmd", "--engine", "sglang", "--target", "Qwen/Qwen3-4B")  # a hub id
    assert code == 0 and "Qwen/Qwen3-4B" in out
