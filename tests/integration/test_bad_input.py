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
