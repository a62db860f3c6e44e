"""The lossless verify loop (SPEC section 5), shared by every drafter: greedy, or sampling (T > 0).

    prefill the prompt -> bonus = argmax of the last logits
    repeat:
        block = [bonus, d_1 .. d_k]                       d_i from the drafter (k may be 0)
        y_0 .. y_k = argmax(target(block))                one target forward, with its KV cache
        a = longest prefix with d_{i+1} == y_i            the target agrees with the draft that far
        commit bonus, d_1 .. d_a; the new bonus is y_a    so every committed token is the target's own
        roll the target cache back to the committed length (crop; see `start_rollback`); hand the committed tokens' features to the drafter

With `sampling.temperature > 0` the same loop samples: the prefill token is drawn from the target's
processed distribution, and the block is verified by the speculative-sampling chain rule of
`dflash_lab.decoding.sampling.verify_chain` (accept d_{i+1} with probability p_i(d) for a one-hot
proposal; at the first rejection the new bonus is drawn from p_i with d removed; all accepted: from
p_k), so the committed tokens are distributed exactly as plain sampling of the target. T = 0 takes
the greedy path above, bit for bit.

Each cycle commits a + 1 tokens (the "acceptance length", at most the block size); tau is their
mean. Stop tokens and `max_new_tokens` may cut the last cycle short; the recorded length is what
was committed, as in z-lab's reference loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from dflash_lab.decoding.drafters import Proposal
from dflash_lab.decoding.sampling import GREEDY, SamplingParams, make_generator, processed_probs, sample, verify_chain


@dataclass
class GenerationResult:
    output_ids: list[int]  # generated tokens only (the prompt excluded)
    cycle_acceptance: list[int]  # a + 1 per verify cycle
    num_prompt_tokens: int
    finish_reason: str  # "stop" or "length"
    wall_s: float
    prefill_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def tau(self) -> float:
        """Mean committed tokens per verify cycle (0 cycles: nan)."""
        return sum(self.cycle_acceptance) / len(self.cycle_acceptance) if self.cycle_acceptance else float("nan")


def needs_past_recording(cache: DynamicCache) -> bool:
    """True when some layer of `cache` cannot simply drop its last tokens: a sliding-window layer
    (Gemma 3/4, gpt-oss, Mistral: once the window is full it has already discarded the keys a
    rollback would need) or a linear-attention layer (Qwen3.5, Qwen3-Next Gated DeltaNet: a
    recurrent state and a conv window, not a list of keys)."""
    return any(getattr(layer, "is_sliding", False) or hasattr(layer, "recurrent_states") for layer in cache.layers)


def start_rollback(cache: DynamicCache, block_size: int) -> bool:
    """Make the cache able to roll back a verified block (called after the prefill, so the prompt's
    states are never kept twice). Dense caches are left as they are: their `crop` is exact and free.

    Otherwise transformers' past recording keeps, until the next `crop`, the keys a sliding layer
    would have dropped and the recurrent state after each of the last `block_size` tokens of a
    linear-attention layer (its verify forward then steps through the block token by token, as
    plain decoding does). `crop` restores exactly the state after the accepted prefix. Returns
    whether recording is on (then every cycle must `crop`, even by 0, to drop the history)."""
    if not needs_past_recording(cache):
        return False
    cache.activate_past_recording(recurrent_states_to_keep=max(1, block_size))
    return True


def _crop(cache: DynamicCache, keep: int, recording: bool = False) -> None:
    """Roll the cache back to its first `keep` tokens (the committed ones)."""
    # transformers rejects crop(positive) on some versions; a negative count removes that many tokens.
    # A linear-attention layer reports its length as a tensor, hence int().
    remove = int(cache.get_seq_length()) - keep
    if remove > 0 or recording:
        cache.crop(-remove)


@torch.inference_mode()
def speculative_generate(
    target,
    drafter,
    prompt_ids: list[int] | torch.Tensor,
    max_new_tokens: int,
    stop_token_ids: list[int] | None = None,
    sampling: SamplingParams = GREEDY,
) -> GenerationResult:
    """Decoding of `target` accelerated by `drafter`: greedy (the output equals plain greedy) or,
    with `sampling.temperature > 0`, sampled (the output is distributed as plain sampling).
    A sampled result's `extra` holds the seed used."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    device = target.device
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).flatten()
    num_prompt = prompt.shape[0]
    max_length = num_prompt + max_new_tokens
    stops = torch.tensor(sorted(set(stop_token_ids or [])), dtype=torch.long, device=device)
    layer_ids = drafter.layer_ids
    tokens = torch.empty(max_length + 1, dtype=torch.long, device=device)
    tokens[:num_prompt] = prompt
    positions = torch.arange(max_length + 1, device=device)
    cache = DynamicCache(config=target.config)
    generator, seed = (None, None) if sampling.greedy else make_generator(sampling.seed, device)
    configure = getattr(drafter, "configure", None)
    if configure is not None:
        configure(sampling, generator)

    t0 = time.perf_counter()
    logits, features = target.forward(
        prompt[None], layer_ids, position_ids=positions[None, :num_prompt], past_key_values=cache, logits_to_keep=1
    )
    tokens[num_prompt] = logits[0, -1].argmax() if sampling.greedy else sample(
        processed_probs(logits[0, -1], sampling), generator)
    drafter.start(features, positions[None, :num_prompt])
    recording = start_rollback(cache, drafter.block_size)
    prefill_s = time.perf_counter() - t0

    start = num_prompt  # position of the bonus token
    cycles: list[int] = []
    stopped = bool(torch.isin(tokens[start], stops))
    while start + 1 < max_length and not stopped:
        verify_size = min(drafter.block_size, max_length - start)
        proposal = as_proposal(drafter.propose(tokens, start, verify_size - 1) if verify_size > 1 else tokens[:0])
        proposals = proposal.tokens
        block = torch.cat([tokens[start:start + 1], proposals])
        size = block.shape[0]
        logits, features = target.forward(
            block[None], layer_ids, position_ids=positions[None, start:start + size], past_key_values=cache
        )
        if sampling.greedy:
            predicted = logits[0].argmax(dim=-1)  # y_0 .. y_k
            agree = (proposals == predicted[: size - 1]).int()
            accepted = int(agree.cumprod(0).sum()) if size > 1 else 0
            bonus = predicted[accepted]
        else:
            accepted, bonus = verify_chain(proposals, processed_probs(logits[0], sampling), proposal.q, generator)
        tokens[start:start + accepted + 1] = block[: accepted + 1]
        tokens[start + accepted + 1] = bonus
        produced = min(accepted + 1, max_length - start - 1)
        if stops.numel():
            hit = torch.isin(tokens[start + 1:start + produced + 1], stops).nonzero()
            if hit.numel():
                produced = int(hit[0]) + 1
                stopped = True
        if features is not None:
            drafter.commit(features[:, :produced], positions[None, start:start + produced])
        start += produced
        _crop(cache, start, recording)
        cycles.append(produced)

    end = min(start + 1, max_length)
    wall = time.perf_counter() - t0
    return GenerationResult(
        output_ids=tokens[num_prompt:end].tolist(),
        cycle_acceptance=cycles,
        num_prompt_tokens=num_prompt,
        finish_reason="stop" if stopped else "length",
        wall_s=wall,
        prefill_s=prefill_s,
        extra={} if sampling.greedy else {"sampling": {**sampling.describe(), "seed": seed}},
    )


def as_proposal(proposed) -> Proposal:
    """A drafter's `propose` answer as a `Proposal` (a bare token tensor means one-hot proposals)."""
    return proposed if isinstance(proposed, Proposal) else Proposal(proposed)


def greedy_generate(target, prompt_ids, max_new_tokens: int, stop_token_ids=None) -> GenerationResult:
    """Plain target greedy decoding (the speed baseline), through the same loop."""
    from dflash_lab.decoding.drafters import NoDrafter

    return speculative_generate(target, NoDrafter(), prompt_ids, max_new_tokens, stop_token_ids)
