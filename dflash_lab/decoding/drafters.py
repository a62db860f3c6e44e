"""Drafters: what proposes the tokens that the target verifies (SPEC section 5).

A drafter sees the committed tokens and, when it asks for them (`layer_ids`), the target features
of each newly committed token. The interface the verify loop (`speculative_generate`) calls:

    name: str, block_size: int (verify block = bonus + up to block_size - 1 drafted tokens),
    layer_ids: list[int] | None (target layers whose features it wants; None = none)
    configure(sampling, generator)   once per generation, before start: the sampling settings of
                                     this generation (`SamplingParams`; temperature 0 = greedy) and
                                     its random generator (None when greedy). Optional.
    start(features, positions)       the prompt's features [1, S, n*H] and positions [1, S]
    propose(tokens, start, n)        up to n tokens to follow the bonus token tokens[start]:
                                     a `Proposal`, or a bare LongTensor [<= n] (= one-hot proposals)
    commit(features, positions)      features of the tokens committed in the last cycle

`Proposal(tokens, q)`: `q` [len(tokens), V] is the distribution each token was drawn from, for a
drafter that samples its tokens; None (the default) means a one-hot proposal at each token, which
is what a DFlash v1 draft (its argmax block, z-lab PR #169) and prompt lookup propose. Under
sampling (T > 0) the target verifies with `sampling.verify_chain`: accept x with probability
min(1, p(x) / q(x)) (one-hot: p(x)), on rejection draw from normalise(max(p - q, 0)) (one-hot: p
without x). Under greedy decoding q is ignored: a token is accepted iff it is the target's argmax.
The output is lossless either way. q must be a distribution over the target's full vocabulary
(rows summing to 1) in which each proposed token has q(x) > 0.

- `DFlashDrafter`: one forward of a DFlash draft over `[bonus, MASK x n]`.
- `PromptLookupDrafter`: copy what followed the latest earlier occurrence of the current suffix
  n-gram (no training; the tau baseline every trained draft must beat).
- `NoDrafter`: proposes nothing, so the verify loop is plain greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dflash_lab.decoding.sampling import GREEDY, SamplingParams
from dflash_lab.models.draft import DFlashDraftModel, DraftCache


@dataclass
class Proposal:
    tokens: torch.Tensor  # [n] LongTensor, the drafted tokens in order
    q: torch.Tensor | None = None  # [n, V] proposal distributions; None = one-hot at each token


class NoDrafter:
    name = "none"
    block_size = 1
    layer_ids: list[int] | None = None
    sampling: SamplingParams = GREEDY
    generator: torch.Generator | None = None

    def configure(self, sampling: SamplingParams, generator: torch.Generator | None) -> None:
        """The sampling settings of this generation; a drafter that samples its own tokens draws
        them with `generator` and returns their distributions as `Proposal.q`."""
        self.sampling, self.generator = sampling, generator

    def start(self, features, positions) -> None:
        pass

    def propose(self, tokens: torch.Tensor, start: int, n: int) -> torch.Tensor | Proposal:
        return tokens.new_empty(0)

    def commit(self, features, positions) -> None:
        pass


class PromptLookupDrafter(NoDrafter):
    """n-gram lookup over prompt + generated text (like transformers' prompt lookup decoding, but
    taking the most recent match, which follows repetitive generations better)."""

    name = "prompt-lookup"

    def __init__(self, block_size: int = 16, max_ngram: int = 3, min_ngram: int = 1):
        self.block_size = block_size
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, tokens: torch.Tensor, start: int, n: int) -> torch.Tensor:
        seq = tokens[: start + 1]  # committed tokens, the bonus last
        length = seq.shape[0]
        for size in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            suffix = seq[length - size:]
            # windows that end before the suffix itself and have at least one token after them
            windows = seq[: length - 1].unfold(0, size, 1)
            hits = (windows == suffix).all(dim=1).nonzero().flatten()
            if hits.numel():
                begin = int(hits[-1]) + size
                return seq[begin: begin + n]
        return seq.new_empty(0)


class DFlashDrafter(NoDrafter):
    name = "dflash"

    def __init__(self, draft: DFlashDraftModel, target):
        self.draft, self.target = draft, target
        self.block_size = draft.block_size
        self.layer_ids = list(draft.target_layer_ids)
        self.mask_token_id = draft.mask_token_id

    def start(self, features, positions) -> None:
        self.cache = DraftCache(len(self.draft.layers))
        self.pending = (features, positions)

    def commit(self, features, positions) -> None:
        self.pending = (features, positions)

    def propose(self, tokens: torch.Tensor, start: int, n: int) -> torch.Tensor:
        block = torch.full((1, n + 1), self.mask_token_id, dtype=tokens.dtype, device=tokens.device)
        block[0, 0] = tokens[start]
        positions = torch.arange(start, start + n + 1, device=tokens.device)[None]
        features, feature_positions = self.pending
        hidden = self.draft(
            self.target.embed(block), positions, features, feature_positions, cache=self.cache
        )
        self.pending = (None, None)  # the cache now holds them
        # the argmax block at any temperature: a one-hot proposal (sampling each slot independently
        # collapses acceptance, z-lab PR #169)
        return Proposal(self.target.logits(hidden[:, 1:]).argmax(dim=-1)[0])


def make_drafter(kind: str, target=None, draft: DFlashDraftModel | None = None, block_size: int = 16):
    if kind == "dflash":
        from dflash_lab.decoding.dflash2_drafter import drafter_for  # imports this module

        return drafter_for(draft, target)  # a DFlash2 draft decodes with its selector
    if kind == "prompt-lookup":
        return PromptLookupDrafter(block_size=block_size)
    if kind == "none":
        return NoDrafter()
    raise ValueError(f"unknown drafter {kind!r}: use dflash, prompt-lookup or none")
