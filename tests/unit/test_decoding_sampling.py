"""Sampling (T > 0) in the verify loop: the processed distribution matches Hugging Face's warpers,
the chain rule is lossless in distribution (chi-square tests, fixed seeds), T = 0 is today's greedy.

Chi-square threshold: the statistic must stay below the 0.999 quantile of chi-square with df degrees
of freedom (Wilson-Hilferty approximation), after merging the cells whose expected count is < 5.
The seeds are fixed, so each test is deterministic; a wrong rule (e.g. accepting when the draft
agrees with an independently sampled target token, or sampling the bonus from the unmodified p)
shifts the distribution far beyond this threshold at these sample counts.
"""

import math

import pytest
import torch

from dflash_lab.decoding.drafters import DFlashDrafter, NoDrafter, PromptLookupDrafter, Proposal
from dflash_lab.decoding.sampling import SamplingParams, processed_probs, verify_chain
from dflash_lab.decoding.speculative import greedy_generate, speculative_generate
from dflash_lab.errors import DFlashLabError
from dflash_lab.models.draft import DFlashDraftModel, build_draft_config
from dflash_lab.models.target import wrap_target
from dflash_lab.testing import tiny_model

Z_999 = 3.0902  # standard normal 0.999 quantile


def chi2_threshold(df: int) -> float:
    """0.999 quantile of chi-square(df), Wilson-Hilferty."""
    a = 2.0 / (9.0 * df)
    return df * (1 - a + Z_999 * math.sqrt(a)) ** 3


def chi_square(counts: dict, expected_probs: dict, total: int) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom; cells with expected < 5 are merged into one."""
    assert set(counts) <= {k for k, v in expected_probs.items() if v > 0}, "a sample the target cannot produce"
    stat, df, small_obs, small_exp = 0.0, -1, 0, 0.0
    for key, prob in expected_probs.items():
        expected = prob * total
        if expected < 5:
            small_obs += counts.get(key, 0)
            small_exp += expected
            continue
        stat += (counts.get(key, 0) - expected) ** 2 / expected
        df += 1
    if small_exp > 0:
        stat += (small_obs - small_exp) ** 2 / small_exp
        df += 1
    return stat, df


# -- the processed distribution -----------------------------------------------------------------------
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 20, 0.8), (1.0, 0, 1.0), (1.3, 5, 1.0), (0.5, 0, 0.6)])
def test_processed_probs_match_hf_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                  + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    reference = torch.softmax(warpers(None, logits.clone()), dim=-1)
    ours = processed_probs(logits, SamplingParams(temperature, top_p=top_p, top_k=top_k))
    assert torch.allclose(ours, reference, atol=1e-6)
    if top_k:
        assert int((ours > 0).sum(-1).max()) <= top_k


def test_sampling_params_reject_bad_values():
    for kwargs in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}):
        with pytest.raises(DFlashLabError):
            SamplingParams(**kwargs)


# -- the chain rule on fixed distributions ------------------------------------------------------------
def _chain_samples(p, make_proposal, trials, seed):
    """Emulate a target whose distribution at step i is p[i] whatever came before: run the chain,
    then complete the sequence after a rejection with fresh draws from the following rows. The
    result must be distributed as p[0] x p[1] x ... x p[k]."""
    gen = torch.Generator().manual_seed(seed)
    k = p.shape[0] - 1
    counts: dict = {}
    for _ in range(trials):
        tokens, q = make_proposal(gen)
        accepted, bonus = verify_chain(tokens, p, q, gen)
        seq = tokens[:accepted].tolist() + [bonus]
        while len(seq) < k + 1:
            seq.append(int(torch.multinomial(p[len(seq)], 1, generator=gen)))
        counts[tuple(seq)] = counts.get(tuple(seq), 0) + 1
    return counts


def _product(p):
    import itertools

    k1, vocab = p.shape
    return {seq: math.prod(float(p[i, t]) for i, t in enumerate(seq))
            for seq in itertools.product(range(vocab), repeat=k1)}


@pytest.mark.parametrize("kind", ["one-hot", "general-q"])
def test_verify_chain_is_lossless_in_distribution(kind):
    gen = torch.Generator().manual_seed(1)
    vocab, k = 5, 2
    p = torch.softmax(torch.randn(k + 1, vocab, generator=gen) * 1.5, dim=-1)
    p[1, 4] = 0.0  # a token the target never produces at step 1: never accepted there
    p[1] /= p[1].sum()
    q_rows = torch.softmax(torch.randn(k, vocab, generator=gen), dim=-1)

    if kind == "one-hot":
        fixed = torch.tensor([int(p[0].argmax()), 4])  # a likely token, then an impossible one half the time
        alt = torch.tensor([int(p[0].argmin()), int(p[1].argmax())])

        def make_proposal(g):
            return (fixed if torch.rand(1, generator=g) < 0.5 else alt), None
    else:
        def make_proposal(g):
            return torch.multinomial(q_rows, 1, generator=g)[:, 0], q_rows

    trials = 8000
    counts = _chain_samples(p, make_proposal, trials, seed=2)
    stat, df = chi_square(counts, _product(p), trials)
    assert stat < chi2_threshold(df), (stat, df)


def test_verify_chain_rejects_wrong_rules():
    """The test above has power: a rule that forgets to remove the rejected token fails it."""
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(2, 4, generator=gen) * 1.5, dim=-1)
    likely = torch.tensor([int(p[0].argmax())])
    counts: dict = {}
    g = torch.Generator().manual_seed(3)
    trials = 20000
    for _ in range(trials):
        if torch.rand(1, generator=g) < p[0, likely[0]]:
            seq = (int(likely[0]), int(torch.multinomial(p[1], 1, generator=g)))
        else:  # wrong: the bonus drawn from p itself
            seq = (int(torch.multinomial(p[0], 1, generator=g)), int(torch.multinomial(p[1], 1, generator=g)))
        counts[seq] = counts.get(seq, 0) + 1
    stat, df = chi_square(counts, _product(p), trials)
    assert stat > chi2_threshold(df)


# -- through the loop, on a tiny target ---------------------------------------------------------------
class RandomQDrafter(NoDrafter):
    """Samples each drafted token from a random distribution q and returns q: the general rule."""

    name = "random-q"

    def __init__(self, vocab, block_size):
        self.vocab, self.block_size = vocab, block_size

    def propose(self, tokens, start, n):
        q = torch.softmax(torch.randn(n, self.vocab, generator=self.generator) * 2, dim=-1)
        return Proposal(torch.multinomial(q, 1, generator=self.generator)[:, 0], q)


def _exact_first_tokens(target, prompt, params, length):
    """P(first `length` generated tokens) of plain sampling, by enumeration."""
    out = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for prefix, prob in out.items():
            ids = torch.tensor([prompt + list(prefix)])
            with torch.no_grad():
                logits = target.model(ids).logits[0, -1]
            probs = processed_probs(logits, params)
            for tok in probs.nonzero().flatten().tolist():
                nxt[prefix + (tok,)] = prob * float(probs[tok])
        out = nxt
    return out


def _tiny_sampling_setup():
    vocab = 10
    model = tiny_model("qwen3", seed=3, vocab_size=vocab, layers=2, hidden=32, heads=2, kv_heads=1, intermediate=64)
    target = wrap_target(model, mask_token_id=3)
    draft = DFlashDraftModel(build_draft_config(target, num_layers=1, block_size=3)).init_weights(seed=2, std=0.3)
    drafters = [DFlashDrafter(draft, target), PromptLookupDrafter(block_size=3), RandomQDrafter(vocab, 3)]
    return target, drafters, [1, 5, 7, 5, 7], SamplingParams(temperature=1.2, top_k=6, top_p=0.95)


def _sampled_counts(target, drafters, prompt, params, seeds):
    """First 3 generated tokens per seed; the drafter rotates with the seed (every drafter must give
    the same distribution, so one chi-square covers them all)."""
    counts: dict = {}
    multi = {d.name: 0 for d in drafters}
    for seed in seeds:
        drafter = drafters[seed % len(drafters)]
        sampling = SamplingParams(params.temperature, top_p=params.top_p, top_k=params.top_k, seed=seed)
        result = speculative_generate(target, drafter, prompt, 3, sampling=sampling)
        assert result.extra["sampling"]["seed"] == seed
        counts[tuple(result.output_ids)] = counts.get(tuple(result.output_ids), 0) + 1
        multi[drafter.name] += max(result.cycle_acceptance) > 1
    return counts, multi


def test_sampled_generation_matches_plain_sampling_of_the_target():
    target, drafters, prompt, params = _tiny_sampling_setup()
    exact = _exact_first_tokens(target, prompt, params, 3)
    trials = 600
    counts, multi = _sampled_counts(target, drafters, prompt, params, range(trials))
    stat, df = chi_square(counts, exact, trials)
    assert stat < chi2_threshold(df), (stat, df)
    assert all(multi.values()), multi  # every drafter had drafted tokens accepted


@pytest.mark.slow
def test_sampled_generation_matches_plain_sampling_per_drafter():
    target, drafters, prompt, params = _tiny_sampling_setup()
    exact = _exact_first_tokens(target, prompt, params, 3)
    for i, drafter in enumerate(drafters):
        trials = 1500
        counts, multi = _sampled_counts(target, [drafter], prompt, params, range(i * trials, (i + 1) * trials))
        stat, df = chi_square(counts, exact, trials)
        assert stat < chi2_threshold(df), (drafter.name, stat, df)
        assert multi[drafter.name] > 0


def test_same_seed_same_output_and_temperature_zero_is_greedy():
    model = tiny_model("llama", seed=11, vocab_size=24)
    target = wrap_target(model, mask_token_id=3)
    draft = DFlashDraftModel(build_draft_config(target, num_layers=2, block_size=8)).init_weights(seed=2, std=0.3)
    prompt = [4, 9, 2, 9, 2, 7]
    reference = greedy_generate(target, prompt, 30)
    for drafter in (DFlashDrafter(draft, target), PromptLookupDrafter(8), NoDrafter()):
        today = speculative_generate(target, drafter, prompt, 30)
        t0 = speculative_generate(target, drafter, prompt, 30,
                                  sampling=SamplingParams(0.0, top_p=0.5, top_k=3, seed=9))
        assert t0.output_ids == today.output_ids == reference.output_ids
        assert t0.cycle_acceptance == today.cycle_acceptance and t0.extra == {}
        hot = SamplingParams(0.9, top_p=0.9, top_k=10, seed=5)
        first, second = (speculative_generate(target, drafter, prompt, 30, sampling=hot) for _ in range(2))
        assert first.output_ids == second.output_ids and first.cycle_acceptance == second.cycle_acceptance


def test_generate_cli_sampling_flags(tmp_path, capsys):
    import json

    from dflash_lab.cli import main
    from dflash_lab.testing import tiny_target_dir

    target_dir = tiny_target_dir(tmp_path / "t")
    base = ["generate", "--target", str(target_dir), "--drafter", "prompt-lookup", "--prompt", "hi",
            "--max-new-tokens", "6", "--json"]
    assert main(base + ["--temperature", "0.7", "--top-p", "0.8", "--top-k", "20", "--seed", "4"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["sampling"] == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "seed": 4}
    assert main(base + ["--temperature", "0.7", "--top-p", "0.8", "--top-k", "20", "--seed", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["output_ids"] == first["output_ids"]
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out)["sampling"] is None
    assert main(base + ["--top-p", "0"]) == 2
    assert "--top-p" in capsys.readouterr().err
