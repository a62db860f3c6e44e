"""`dflash-lab draft check` on the embedded target (issue 21): builtin and llama.cpp run one draft on
the same prompts; a memorised draft and a random one agree across engines (exit 0), a draft GGUF
exported wrong (no rope.freq_base: SPEC 2b's silent failure) is caught (exit 1)."""

import json
import sys
from pathlib import Path

import pytest

from dflash_lab.cli import main
from dflash_lab.eval import draft_check as C
from dflash_lab.models.gguf_export import ExportFault, export_draft_gguf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_llamacpp import GATE_MAX_NEW, GATE_PROMPTS, TARGET, gate_labels, target  # noqa: E402,F401
from test_llamacpp import _train_memorising_draft  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, gate_labels):  # noqa: F811
    return _train_memorising_draft(gate_labels, tmp_path_factory.mktemp("memo"), None)


def test_prompts_start_with_the_memorised_records():
    assert list(C.CHECK_PROMPTS[:2]) == GATE_PROMPTS


def test_memorised_draft_agrees_in_builtin_and_llamacpp(memorised, tmp_path, capsys):
    out = tmp_path / "check.json"
    code = main(["draft", "check", str(memorised), "--target", TARGET, "--engines", "builtin,llamacpp,vllm",
                 "--prompts", "2", "--max-new-tokens", str(GATE_MAX_NEW), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = {r["engine"]: r for r in json.loads(out.read_text())["engines"]}
    builtin, llama = report["builtin"], report["llamacpp"]
    assert builtin["lossless"] == llama["lossless"] == "yes"
    assert llama["drafts"] == "same totals" and llama["tau"] == pytest.approx(builtin["tau"])
    assert builtin["tau"] > 4 and builtin["acceptance_per_position"][0] == 1.0  # memorised: whole blocks
    assert report["vllm"]["available"] is False or report["vllm"]["failed"] is False
    assert "acceptance per position 1.00" in printed and "OK: every available engine" in printed


def test_random_draft_agrees_and_a_wrong_export_is_caught(tmp_path, memorised, target):  # noqa: F811
    from dflash_lab.models.checkpoint import save_draft
    from dflash_lab.models.draft import DFlashDraftModel, build_draft_config

    prompts = [target.encode_prompt([{"role": "user", "content": t}]) for t in GATE_PROMPTS]
    random_draft = save_draft(DFlashDraftModel(build_draft_config(target, num_layers=1)).init_weights(seed=0),
                              tmp_path / "rand")
    job = C.CheckJob(target=target, target_spec=TARGET, draft_dir=random_draft, prompts=prompts,
                     max_new_tokens=GATE_MAX_NEW)
    builtin, llama = C.check_draft(job, ["llamacpp"])
    assert llama.drafts == "same totals" and not llama.failed and llama.tau == pytest.approx(builtin.tau)

    def wrong_export(draft_dir, target_gguf, out_dir):
        return export_draft_gguf(draft_dir, target_gguf, tmp_path / "no-rope.gguf", fault=ExportFault.NO_ROPE_FREQ_BASE)

    job.draft_dir = memorised
    builtin, llama = C.check_draft(job, ["llamacpp"], engines={"llamacpp": lambda: C.LlamaCppEngine(wrong_export)})
    assert llama.failed and llama.drafts == "diverged" and llama.divergence["kind"] == "failure", llama
    assert llama.lossless == "yes"  # the target still decides every token: only the drafts differ
