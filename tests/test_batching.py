"""The loader's epoch plan and batching, as pure functions: no cache needed."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kdcache.train.batching import (
    EpochPlan,
    ExampleTooLong,
    batch_positions,
    buffer_order,
    fixed_size_batches,
    heldout_mask,
    plan_epoch,
    round_up,
    token_budget_batches,
)

SIZES = [5, 5, 5, 5, 4]


def plan(rank=0, world_size=1, seed=0, epoch=0, shuffle=True, buffer_shards=1, sizes=SIZES) -> EpochPlan:
    return plan_epoch(sizes, seed=seed, epoch=epoch, shuffle=shuffle, rank=rank, world_size=world_size,
                      buffer_shards=buffer_shards)


def shards(p: EpochPlan) -> list[int]:
    return [s for buffer in p.buffers for s in buffer]


def test_round_up():
    assert [round_up(n, 8) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
    assert round_up(7, 1) == 7


def test_shards_are_permuted_by_seed_and_epoch_then_dealt_to_ranks():
    order = np.random.default_rng([3, 1, 0]).permutation(len(SIZES)).tolist()
    assert shards(plan(seed=3, epoch=1)) == order  # the key of stream 0 is (seed, epoch, 0)
    assert shards(plan(shuffle=False)) == [0, 1, 2, 3, 4]
    for world_size in (1, 2, 3, 5):
        parts = [shards(plan(r, world_size, seed=3, epoch=1)) for r in range(world_size)]
        assert parts == [order[r::world_size] for r in range(world_size)]
        assert all(plan(r, world_size).stride is None for r in range(world_size))
    assert shards(plan(seed=3, epoch=2)) != order


def test_buffers_group_consecutive_shards_and_offsets_count_examples_before_them():
    p = plan(shuffle=False, buffer_shards=2)
    assert p.buffers == ((0, 1), (2, 3), (4,))
    assert p.offsets == (0, 10, 20)
    q = plan(seed=1, buffer_shards=3)
    assert q.offsets == (0, sum(SIZES[s] for s in q.buffers[0]))
    assert plan(sizes=[]).buffers == () and plan(sizes=[]).offsets == ()


def test_workers_take_every_num_workers_th_buffer():
    p = plan(shuffle=False)
    assert list(p.buffers_of(0, 2)) == [0, 2, 4] and list(p.buffers_of(1, 2)) == [1, 3]
    assert list(p.buffers_of(0, 1)) == [0, 1, 2, 3, 4]


def test_fewer_shards_than_ranks_split_examples_by_stride():
    indices = np.arange(100, 124)  # 24 examples, source rows 100..123
    kept = []
    for rank in range(6):
        p = plan(rank, 6, shuffle=False)
        assert p.stride == 6 and shards(p) == [0, 1, 2, 3, 4]
        stream = 0
        for b, buffer in enumerate(p.buffers):
            n = sum(SIZES[s] for s in buffer)
            positions = buffer_order(indices[stream : stream + n], plan=p, buffer=b, rank=rank, split="all",
                                     heldout_fraction=0.0, split_seed=0, shuffle=False, seed=0, epoch=0)
            assert all((p.offsets[b] + i) % 6 == rank for i in positions)  # example j of the stream -> rank j % 6
            kept += (stream + positions).tolist()
            stream += n
    assert sorted(kept) == list(range(24))


def test_buffer_order_filters_the_split_then_shuffles():
    indices = np.arange(40)
    p = plan(shuffle=False)
    kwargs = {"plan": p, "buffer": 0, "rank": 0, "heldout_fraction": 0.3, "split_seed": 2, "seed": 4, "epoch": 1}
    held = heldout_mask(indices, 0.3, 2)
    train = buffer_order(indices, split="train", shuffle=False, **kwargs)
    heldout = buffer_order(indices, split="heldout", shuffle=False, **kwargs)
    assert train.tolist() == np.flatnonzero(~held).tolist() and heldout.tolist() == np.flatnonzero(held).tolist()
    assert buffer_order(indices, split="all", shuffle=False, **kwargs).tolist() == list(range(40))
    shuffled = buffer_order(indices, split="train", shuffle=True, **kwargs)
    permutation = np.random.default_rng([4, 1, 1, 0, 0]).permutation(len(train))  # (seed, epoch, 1, rank, buffer)
    assert shuffled.tolist() == train[permutation].tolist()
    assert buffer_order(indices[:0], split="train", shuffle=True, **kwargs).tolist() == []


def test_heldout_mask_depends_only_on_index_fraction_and_split_seed():
    indices = np.arange(2000)
    mask = heldout_mask(indices, 0.25, 7)
    assert mask.dtype == bool and 0.2 < mask.mean() < 0.3
    assert heldout_mask(indices[::-1], 0.25, 7).tolist() == mask[::-1].tolist()
    assert not heldout_mask(indices, 0.0).any() and heldout_mask(indices, 1.0).all()
    assert heldout_mask(indices, 0.25, 8).tolist() != mask.tolist()
    with pytest.raises(ValueError, match="heldout_fraction must be in"):
        heldout_mask(indices, 1.5)


def test_fixed_size_batches_keep_order_and_drop_only_a_short_last_batch():
    assert fixed_size_batches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert fixed_size_batches(7, 3, drop_last=True) == [[0, 1, 2], [3, 4, 5]]
    assert fixed_size_batches(6, 3, drop_last=True) == [[0, 1, 2], [3, 4, 5]]
    assert fixed_size_batches(0, 3) == []


@pytest.mark.parametrize("multiple", [1, 8])
def test_token_budget_batches_pack_by_ascending_length_within_the_budget(multiple):
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=50).tolist()
    budget = 200
    groups = token_budget_batches(lengths, budget, pad_to_multiple_of=multiple)
    assert sorted(i for g in groups for i in g) == list(range(50))
    sorted_positions = [i for g in groups for i in g]
    assert sorted_positions == np.argsort(lengths, kind="stable").tolist()  # shortest first, ties in given order
    for g in groups:
        assert len(g) * round_up(max(lengths[i] for i in g), multiple) <= budget
    for g, nxt in itertools.pairwise(groups):  # greedy: the next example would have broken the budget
        assert (len(g) + 1) * round_up(max(lengths[i] for i in g + nxt[:1]), multiple) > budget
    capped = token_budget_batches(lengths, 10_000, max_examples=4)
    assert [len(g) for g in capped] == [4] * 12 + [2]


def test_an_example_over_the_budget_is_named_by_position():
    with pytest.raises(ExampleTooLong, match="max_tokens=10") as info:
        token_budget_batches([3, 12, 4, 11], 10)
    assert (info.value.position, info.value.length, info.value.padded) == (3, 11, 11)  # the first in length order
    assert isinstance(info.value, ValueError)
    with pytest.raises(ExampleTooLong):
        token_budget_batches([9], 10, pad_to_multiple_of=8)  # padded to 16


def test_batch_positions_shuffles_only_token_budget_batches():
    lengths = list(range(10, 40))
    common = {"pad_to_multiple_of": 1, "drop_last": False, "seed": 1, "epoch": 2, "rank": 0, "buffer": 3}
    fixed = batch_positions(lengths, batch_size=4, max_tokens=None, shuffle=True, **common)
    assert fixed == fixed_size_batches(30, 4)
    packed = token_budget_batches(lengths, 120, max_examples=None)
    shuffled = batch_positions(lengths, batch_size=None, max_tokens=120, shuffle=True, **common)
    permutation = np.random.default_rng([1, 2, 2, 0, 3]).permutation(len(packed))  # (seed, epoch, 2, rank, buffer)
    assert shuffled == [packed[i] for i in permutation] != packed
    assert batch_positions(lengths, batch_size=None, max_tokens=120, shuffle=False, **common) == packed
    assert batch_positions([], batch_size=2, max_tokens=None, shuffle=True, **common) == []
    assert batch_positions(lengths, batch_size=8, max_tokens=None, shuffle=False,
                           **{**common, "drop_last": True}) == fixed_size_batches(30, 8)[:3]
