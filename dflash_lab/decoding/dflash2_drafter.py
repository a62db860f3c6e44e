"""The DFlash2 drafter (SPEC section 10, decoding): one draft forward over `[bonus, MASK x n]`, then a
walk through the candidate selector's trellis.

    slot t = 1..n:  C_t = top-16 of U_t;  row_t(b) = S_t(prev, b) for b in C_t;  prev_1 = the bonus token
    T = 0:  d_t = argmax_b row_t(b)                               (greedy: the verify loop stays exact)
    T > 0:  d_t ~ q_t = softmax(row_t / T) over C_t                (temperature only, no top-k/top-p)
            and the proposal carries q_t [V] (zeros outside C_t), so the verify loop can run chain
            rejection sampling with it: accept d_t while u * q_t(d_t) < p_t(d_t); on rejection sample
            from normalise(max(p_t - q_t, 0)).

The walk conditions slot t on the token actually drafted at t - 1, which is what makes the proposal a
chain: q_t is the distribution of d_t given d_1..d_{t-1}, exactly what chain rejection sampling needs.

Sliding window: with `use_sliding_window`, a block query at position i sees context position j only
when i - j < sliding_window (as the reference's sliding-attention layers); the draft applies it, as
a v1 draft's sliding layers do (its cache keeps only the context a block can still see).
"""

from __future__ import annotations

import torch

from dflash_lab.decoding.drafters import DFlashDrafter, Proposal
from dflash_lab.models.dflash2 import DFlash2DraftModel


class DFlash2Drafter(DFlashDrafter):
    name = "dflash2"

    def __init__(self, draft: DFlash2DraftModel, target, temperature: float = 0.0,
                 generator: torch.Generator | None = None):
        if not isinstance(draft, DFlash2DraftModel):
            raise TypeError("DFlash2Drafter needs a DFlash2DraftModel (a v1 draft goes to DFlashDrafter)")
        super().__init__(draft, target)
        self.temperature = float(temperature)
        self.generator = generator

    def _hidden(self, tokens: torch.Tensor, start: int, n: int) -> torch.Tensor:
        block = torch.full((1, n + 1), self.mask_token_id, dtype=tokens.dtype, device=tokens.device)
        block[0, 0] = tokens[start]
        positions = torch.arange(start, start + n + 1, device=tokens.device)[None]
        features, feature_positions = self.pending
        # the draft applies its window: its cache keeps only the context a block can still see
        hidden = self.draft(self.target.embed(block), positions, features, feature_positions, cache=self.cache)
        self.pending = (None, None)  # the cache now holds them
        return hidden[:, 1:]  # [1, n, H]: the predicted slots

    @torch.no_grad()
    def propose(self, tokens: torch.Tensor, start: int, n: int, temperature: float | None = None):
        temperature = self.temperature if temperature is None else float(temperature)
        hidden = self._hidden(tokens, start, n)
        anchor = tokens[start:start + 1]
        if temperature <= 0:
            return self.draft.greedy_walk(hidden, anchor, self.target.lm_head)[0][0]
        return self.sample_walk(hidden[0], int(tokens[start]), temperature)

    def sample_walk(self, hidden: torch.Tensor, anchor: int, temperature: float) -> Proposal:
        """hidden [n, H] -> Proposal(tokens [n], q [n, V])."""
        draft = self.draft
        ids, unary = draft.candidates(hidden, self.target.lm_head)  # [n, k]
        q = torch.zeros(hidden.shape[0], draft.config.vocab_size, dtype=torch.float32, device=hidden.device)
        prev = torch.tensor([anchor], device=hidden.device)
        out = []
        for t in range(hidden.shape[0]):
            row = draft.selector_scores(hidden[t], unary[t], ids[t], prev)[0]  # [k]
            probs = torch.softmax(row.float() / temperature, dim=-1)
            pick = torch.multinomial(probs, 1, generator=self.generator)
            q[t].scatter_(0, ids[t], probs)
            prev = ids[t][pick]
            out.append(prev)
        return Proposal(torch.cat(out), q)


def drafter_for(draft, target, temperature: float = 0.0, generator: torch.Generator | None = None):
    """The drafter a loaded draft needs: DFlash2Drafter for a DFlash2 draft, else v1's DFlashDrafter.
    (For `make_drafter` and the eval harness, which build `DFlashDrafter` directly today.)"""
    if isinstance(draft, DFlash2DraftModel):
        return DFlash2Drafter(draft, target, temperature=temperature, generator=generator)
    return DFlashDrafter(draft, target)


__all__ = ["DFlash2Drafter", "Proposal", "drafter_for"]
