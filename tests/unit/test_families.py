"""Every target family (issue 22): tiny random targets from each family's own transformers config
class, with Gated DeltaNet layers (qwen3_5, qwen3_next), MoE blocks and sliding windows of 8 tokens
(gpt_oss, gemma3, gemma4, mistral), decoded past the window.

Lossless is checked two ways, both against the target run without any cache (so the reference does
not share the rollback code under test):
- greedy: the output equals the cacheless greedy continuation, token for token;
- every forward of the verify loop (greedy and sampled): the logits that decided each committed token
  equal the cacheless logits at that position. With exact logits, the sampling chain rule (checked in
  distribution by test_decoding_sampling.py) makes sampled decoding lossless for that family too.
"""

import pytest
import torch

from dflash_lab.decoding.dflash2_drafter import DFlash2Drafter
from dflash_lab.decoding.drafters import DFlashDrafter, NoDrafter, PromptLookupDrafter
from dflash_lab.decoding.sampling import SamplingParams
from dflash_lab.decoding.speculative import greedy_generate, speculative_generate
from dflash_lab.models.dflash2 import DFlash2DraftModel, build_dflash2_config
from dflash_lab.models.draft import DFlashDraftModel, build_draft_config
from dflash_lab.models.target import wrap_target
from dflash_lab.testing import FAMILIES, TINY_SLIDING_WINDOW, tiny_model

VOCAB = 40
BLOCK = 6
NEW_TOKENS = 28
PROMPT = [5, 9, 13, 5, 9, 13, 21, 30, 5, 9, 13, 22, 7, 7, 31, 5, 9]  # longer than the window, with repeats


@pytest.fixture(scope="module", params=FAMILIES)
def family_target(request):
    model = tiny_model(request.param, seed=7, vocab_size=VOCAB)
    return request.param, wrap_target(model, mask_token_id=VOCAB - 1)


def cacheless_logits(target, ids: list[int]) -> torch.Tensor:
    """The target's logits over `ids`, one forward, no cache: [len(ids), V]."""
    with torch.inference_mode():
        return target.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


def cacheless_greedy(target, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(cacheless_logits(target, ids)[-1].argmax()))
    return ids[len(prompt):]


class Recorder:
    """The target as the verify loop sees it; keeps the logits of the last forward that computed
    each absolute position (the ones that decided the token after it)."""

    def __init__(self, target):
        self._target, self.logits = target, {}

    def __getattr__(self, name):
        return getattr(self._target, name)

    def forward(self, input_ids, layer_ids=None, *, position_ids=None, logits_to_keep=0, **kwargs):
        logits, features = self._target.forward(input_ids, layer_ids, position_ids=position_ids,
                                                logits_to_keep=logits_to_keep, **kwargs)
        positions = position_ids[0, -logits.shape[1]:].tolist()
        for pos, row in zip(positions, logits[0].float()):
            self.logits[pos] = row
        return logits, features


class NoisyOracle(NoDrafter):
    """Proposes the true greedy continuation with some tokens corrupted: every accept length, full
    blocks included, occurs."""

    name = "noisy-oracle"

    def __init__(self, reference: list[int], num_prompt: int, seed: int):
        self.reference, self.num_prompt, self.block_size = reference, num_prompt, BLOCK
        self.gen = torch.Generator().manual_seed(seed)

    def propose(self, tokens, start, n):
        offset = start - self.num_prompt + 1
        truth = (self.reference[offset:offset + n] + [0] * n)[:n]
        proposal = torch.tensor(truth, dtype=torch.long)
        flip = torch.rand(n, generator=self.gen) < 0.1
        proposal[flip] = (proposal[flip] + 1) % VOCAB
        return proposal


def drafters_for(target, reference):
    v1 = DFlashDraftModel(build_draft_config(target, num_layers=1, block_size=BLOCK)).init_weights(seed=2, std=0.3)
    v2 = DFlash2DraftModel(build_dflash2_config(target, num_layers=1, block_size=BLOCK)).init_weights(seed=2)
    return [DFlashDrafter(v1, target), DFlash2Drafter(v2, target), PromptLookupDrafter(block_size=BLOCK),
            NoisyOracle(reference, len(PROMPT), seed=3)]


def assert_logits_exact(family, recorder, prompt, output):
    """Every logit row that decided a committed token equals the cacheless one (to float32 rounding:
    a Gated DeltaNet layer steps token by token in decoding and in chunks without a cache, about 3e-4
    apart here; a wrong rollback moves logits by whole units)."""
    sequence = list(prompt) + list(output)
    exact = cacheless_logits(recorder._target, sequence[:-1])
    for pos in range(len(prompt) - 1, len(sequence) - 1):
        assert torch.allclose(recorder.logits[pos], exact[pos], atol=2e-3, rtol=0), (family, pos)


def test_greedy_decoding_is_lossless_past_the_window(family_target):
    family, target = family_target
    assert len(PROMPT) + NEW_TOKENS > 3 * TINY_SLIDING_WINDOW
    reference = cacheless_greedy(target, PROMPT, NEW_TOKENS)
    assert greedy_generate(target, PROMPT, NEW_TOKENS).output_ids == reference, family
    accepted, rejected = 0, 0
    for drafter in drafters_for(target, reference):
        recorder = Recorder(target)
        result = speculative_generate(recorder, drafter, PROMPT, NEW_TOKENS)
        assert result.output_ids == reference, (family, drafter.name)
        assert_logits_exact(family, recorder, PROMPT, result.output_ids)
        accepted += sum(a == BLOCK for a in result.cycle_acceptance)
        rejected += sum(a < BLOCK for a in result.cycle_acceptance[:-1])
    assert accepted and rejected, (family, accepted, rejected)  # both full blocks and rollbacks were verified


@pytest.mark.parametrize("temperature", [0.8])
def test_sampled_decoding_uses_exact_target_distributions(family_target, temperature):
    family, target = family_target
    reference = cacheless_greedy(target, PROMPT, NEW_TOKENS)
    for seed, drafter in enumerate(drafters_for(target, reference)):
        recorder = Recorder(target)
        sampling = SamplingParams(temperature, top_k=8, seed=seed)
        result = speculative_generate(recorder, drafter, PROMPT, NEW_TOKENS, sampling=sampling)
        assert len(result.output_ids) == NEW_TOKENS
        assert_logits_exact(family, recorder, PROMPT, result.output_ids)
