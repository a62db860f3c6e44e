"""The epoch order: a permutation, a pure function of (seed, epoch), exact on resume, and grouped
order pads less than random order on a skewed length distribution."""

import numpy as np
import pytest
import torch

from dflash_lab.train.data import Sample
from dflash_lab.train.loader import InMemorySource, LoaderConfig, TrainLoader, split_indices
from dflash_lab.train.sampler import SamplerConfig, epoch_order, padding_fraction


def _skewed(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.lognormal(6.0, 0.8, n).astype(np.int64) + 20, 3072)  # median ~420, long tail
    anchors = np.minimum(lengths - 10, 512)
    return lengths, anchors


@pytest.mark.parametrize("group", [True, False])
def test_every_sample_once_and_deterministic(group):
    lengths, anchors = _skewed(203)
    cfg = SamplerConfig(seed=5, global_batch=8, group_by_length=group, window=4)
    a = epoch_order(cfg, 0, lengths, anchors)
    assert sorted(a.tolist()) == list(range(203))
    assert np.array_equal(a, epoch_order(cfg, 0, lengths, anchors))
    assert not np.array_equal(a, epoch_order(cfg, 1, lengths, anchors))
    assert not np.array_equal(a, epoch_order(SamplerConfig(seed=6, global_batch=8, group_by_length=group, window=4), 0,
                                             lengths, anchors))


def test_random_order_is_the_old_order():
    """Grouping off reproduces the order of earlier runs (randperm seeded by (seed, 17, epoch))."""
    from dflash_lab.train.sampler import mix_seed

    order = epoch_order(SamplerConfig(seed=3, global_batch=4, group_by_length=False), 2, np.ones(50, np.int64))
    old = torch.randperm(50, generator=torch.Generator().manual_seed(mix_seed(3, 17, 2))).tolist()
    assert order.tolist() == old


def test_grouped_order_keeps_the_used_set_and_pads_less():
    lengths, anchors = _skewed(2000)
    gb, micro = 32, 4
    rand = epoch_order(SamplerConfig(seed=1, global_batch=gb, group_by_length=False), 0, lengths, anchors)
    grouped = epoch_order(SamplerConfig(seed=1, global_batch=gb, group_by_length=True, window=8), 0, lengths, anchors)
    full = (2000 // gb) * gb
    assert set(grouped[:full].tolist()) == set(rand[:full].tolist())  # the same samples are dropped
    steps = full // micro
    for sizes in (lengths, anchors):
        r, g = padding_fraction(rand, micro, sizes, steps), padding_fraction(grouped, micro, sizes, steps)
        assert g < 0.5 * r, (g, r)
    # batches are shuffled: not sorted long-to-short over the epoch
    firsts = lengths[grouped[:full].reshape(-1, gb)[:, 0]]
    assert not np.all(np.diff(firsts) <= 0)


def test_padding_fraction_by_hand():
    assert padding_fraction(np.array([0, 1, 2, 3]), 2, np.array([4, 2, 3, 3])) == pytest.approx(2 / 14)


def _source(n=23):
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        length = int(torch.randint(6, 60, (1,), generator=g))
        samples.append(Sample(id=f"s{i}", category="", input_ids=list(range(length)), loss_mask=[0] * 3 + [1] * (length - 3)))
    return InMemorySource(samples)


def test_loader_resume_is_exact_and_layout_free():
    src = _source()
    cfg = dict(seed=2, global_batch=4, num_anchors=8, group_by_length=True, group_window=2)
    full = TrainLoader(src, LoaderConfig(micro_batch=4, **cfg))
    seen = []
    for step in range(12):  # 5 steps per epoch: crosses two epoch ends
        if full.epoch_done:
            full.next_epoch()
        seen.append([s.id for mb in full.micro_batches(step) for s in mb.samples])
        full.advance()
    # a loader restored from the position at step 7 continues identically
    resumed = TrainLoader(src, LoaderConfig(micro_batch=4, **cfg))
    replay = TrainLoader(src, LoaderConfig(micro_batch=4, **cfg))
    for step in range(7):
        if replay.epoch_done:
            replay.next_epoch()
        replay.advance()
    resumed.load_state_dict(replay.state_dict())
    for step in range(7, 12):
        if resumed.epoch_done:
            resumed.next_epoch()
        assert [s.id for mb in resumed.micro_batches(step) for s in mb.samples] == seen[step]
        resumed.advance()
    # two ranks x micro 1 x accum 2 read the same global batch with the same anchor seeds
    one = TrainLoader(src, LoaderConfig(micro_batch=4, **cfg)).micro_batches(0)[0]
    parts = {}
    for rank in range(2):
        for i, mb in enumerate(TrainLoader(src, LoaderConfig(micro_batch=1, grad_accum=2, world_size=2, rank=rank, **cfg)).micro_batches(0)):
            parts[i * 2 + rank] = (mb.samples[0].id, mb.anchor_seeds[0])
    assert [parts[k] for k in range(4)] == list(zip([s.id for s in one.samples], one.anchor_seeds))


def test_split_indices_matches_split_heldout():
    from dflash_lab.train.data import split_heldout

    src = _source(30)
    samples = [src.sample(i) for i in range(30)]
    tr, he = split_heldout(samples, 0.2, 64, 4)
    tri, hei = split_indices(30, 0.2, 64, 4)
    assert [s.id for s in tr] == [samples[i].id for i in tri] and [s.id for s in he] == [samples[i].id for i in hei]
