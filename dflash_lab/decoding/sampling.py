"""Sampling settings and the lossless speculative-sampling verify rule (SPEC section 5, "Sampling").

The target's processed distribution p (what plain sampling of the target draws from) applies, in
the order Hugging Face `generate` and vLLM apply them:

    1. temperature   logits / T                       (T = 0 means greedy: no sampling at all)
    2. top-k         keep the k largest logits         (top_k = 0: off)
    3. top-p         softmax, then keep the smallest set of the most probable tokens whose mass
                     reaches top_p: token i (sorted by probability, descending) is kept iff the
                     mass of the tokens ranked above it is < top_p (so the first token always is);
                     renormalise                       (top_p = 1: off)

Verify rule for a chain of drafted tokens x_1..x_k, with the target's processed distributions
p_0..p_k (p_i is the target's distribution for the token after block[i]) and an optional
proposal distribution q_i per drafted token (None = one-hot at x_i, what a DFlash v1 draft and
prompt lookup propose):

    for i = 1..k:   accept x_i with probability min(1, p_{i-1}(x_i) / q_i(x_i))
                    (one-hot q: probability p_{i-1}(x_i))
                    on rejection: the bonus token is drawn from normalise(max(p_{i-1} - q_i, 0))
                    (one-hot q: p_{i-1} with x_i removed, renormalised), and the cycle ends
    all accepted:   the bonus token is drawn from p_k

This is the standard speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023): every
committed token is distributed exactly as plain sampling of the target would draw it, whatever the
drafter proposes. `tests/unit/test_decoding_sampling.py` checks that with a chi-square test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dflash_lab.errors import DFlashLabError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None: a fresh random seed per generation (recorded in the result)

    def __post_init__(self):
        problems = []
        if not self.temperature >= 0:
            problems.append(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if problems:
            raise DFlashLabError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def describe(self) -> dict:
        """What changes the output distribution (the seed does not): part of the harness settings
        of a sampled eval, so sampled and greedy tau are never compared with each other."""
        return {"temperature": float(self.temperature), "top_p": float(self.top_p), "top_k": int(self.top_k)}


GREEDY = SamplingParams()


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The target's processed distribution [..., V] (float32) for logits [..., V]; T > 0 only."""
    if params.greedy:
        raise ValueError("processed_probs needs temperature > 0 (greedy takes the argmax)")
    scores = logits.float() / params.temperature
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs * (mass_above < params.top_p)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from a distribution [V]."""
    return int(torch.multinomial(probs, 1, generator=generator))


def verify_chain(
    proposals: torch.Tensor,  # [k] drafted tokens x_1..x_k
    p: torch.Tensor,  # [k + 1, V] the target's processed distributions p_0..p_k
    q: torch.Tensor | None,  # [k, V] proposal distributions, None = one-hot at each token
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """(accepted count a, bonus token): commit x_1..x_a, then the bonus token (module docstring)."""
    k = proposals.shape[0]
    if k:
        p_drafted = p[:k].gather(-1, proposals[:, None])[:, 0]
        q_drafted = torch.ones_like(p_drafted) if q is None else q.float().gather(-1, proposals[:, None])[:, 0]
        u = torch.rand(k, generator=generator, device=p.device)
        # u < p/q, written without a division (q(x) = 0 would mean the drafter proposed a token
        # it gives no mass: never produced by sampling from q, accepted here iff p(x) > 0)
        accept = (u * q_drafted < p_drafted) | ((q_drafted == 0) & (p_drafted > 0))
        accepted = int(accept.int().cumprod(0).sum())
    else:
        accepted = 0
    if accepted == k:
        return accepted, sample(p[k], generator)
    rejected = proposals[accepted]
    residual = p[accepted].clone()
    if q is None:
        residual[rejected] = 0.0
    else:
        residual = (residual - q[accepted].float()).clamp_min(0.0)
    total = residual.sum()
    # all mass removed happens only when p == q (then rejection had probability 0) up to rounding
    residual = residual / total if total > 0 else p[accepted]
    return accepted, sample(residual, generator)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> tuple[torch.Generator, int]:
    """A generator seeded with `seed` (or a fresh random seed), and the seed used."""
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen, int(seed)
