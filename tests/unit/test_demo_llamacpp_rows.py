"""The demo report's llama.cpp section: the builtin loop's rows and llama.cpp's, for the final draft
and prompt-lookup, each naming the target file it ran on (issue 14, item 5)."""

from dflash_lab.demo import STAGES, _append_llamacpp_rows


def _bench(tau, tps, greedy):
    return {"tau_pooled": tau, "tokens_per_s": tps, "greedy_tokens_per_s": greedy, "speedup": tps / greedy}


def test_rows_for_both_drafters_both_engines_and_target_files(tmp_path):
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    results = {STAGES[-1]: {"benchmarks": {"gsm8k": _bench(1.25, 5.0, 10.0)}},
               "prompt-lookup": {"benchmarks": {"gsm8k": _bench(1.5, 12.0, 10.0)}}}
    engine = {(drafter, gguf): {"llamacpp_target": f"/cache/smollm2.{gguf}.gguf",
                                "benchmarks": {"gsm8k": _bench(tau, 30.0, 40.0)}}
              for drafter, tau in (("final", 1.26), ("prompt-lookup", 1.6)) for gguf in ("f32", "q4_1")}
    _append_llamacpp_rows(tmp_path, results, engine)
    rows = [line for line in report.read_text().splitlines() if line.startswith("| builtin") or line.startswith("| llama")]
    assert rows == [
        f"| builtin loop | {STAGES[-1]} | gsm8k | HF safetensors (fp32, dequantised Q4_1) | 1.25 | 5.0 | 10.0 | 0.50 |",
        "| builtin loop | prompt-lookup | gsm8k | HF safetensors (fp32, dequantised Q4_1) | 1.50 | 12.0 | 10.0 | 1.20 |",
        f"| llama.cpp | {STAGES[-1]} | gsm8k | smollm2.f32.gguf | 1.26 | 30.0 | 40.0 | 0.75 |",
        f"| llama.cpp | {STAGES[-1]} | gsm8k | smollm2.q4_1.gguf | 1.26 | 30.0 | 40.0 | 0.75 |",
        "| llama.cpp | prompt-lookup | gsm8k | smollm2.f32.gguf | 1.60 | 30.0 | 40.0 | 0.75 |",
        "| llama.cpp | prompt-lookup | gsm8k | smollm2.q4_1.gguf | 1.60 | 30.0 | 40.0 | 0.75 |",
    ]


def test_no_section_without_llamacpp(tmp_path):
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    _append_llamacpp_rows(tmp_path, {}, {})
    assert report.read_text() == "# report\n"
