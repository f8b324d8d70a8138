"""SparseTargets: the one class for sparse teacher targets, from the teacher's chunks to the student's loss."""

from __future__ import annotations

import pytest
import torch

from kdcache.targets import SparseTargets


def topk(n: int, k: int = 3, start: int = 0) -> SparseTargets:
    ids = torch.arange(start, start + n * k, dtype=torch.int32).reshape(n, k)
    return SparseTargets(ids, -ids.float(), tail_logmass=torch.full((n,), -5.0))


def sampled(n: int, k: int = 2) -> SparseTargets:
    ids = torch.arange(n * k, dtype=torch.int32).reshape(n, k)
    return SparseTargets(ids, torch.zeros(n, k), counts=torch.ones(n, k, dtype=torch.int32))


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"ids must be \[N, k\]"):
        SparseTargets(torch.zeros(3, dtype=torch.int32), torch.zeros(3))
    with pytest.raises(ValueError, match="logprobs shape"):
        SparseTargets(torch.zeros(3, 2, dtype=torch.int32), torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"tail_logmass must be \[N\] = \[3\]"):
        SparseTargets(torch.zeros(3, 2, dtype=torch.int32), torch.zeros(3, 2), tail_logmass=torch.zeros(2))
    with pytest.raises(ValueError, match="counts shape"):
        SparseTargets(torch.zeros(3, 2, dtype=torch.int32), torch.zeros(3, 2), counts=torch.zeros(3, 1))


def test_slice_cat_and_move_keep_every_tensor_and_dtype():
    parts = [topk(2), topk(0), topk(3, start=100)]
    whole = SparseTargets.cat(parts)
    assert whole.num_rows == 5 and not whole.is_sampled and whole.counts is None
    assert whole.ids.dtype == torch.int32 and whole.logprobs.dtype == torch.float32
    assert torch.equal(whole[2:5].ids, parts[2].ids)
    assert torch.equal(whole[2:5].tail_logmass, parts[2].tail_logmass)
    assert whole[1:1].num_rows == 0
    moved = whole.to("cpu")
    assert moved.ids.dtype == torch.int32 and torch.equal(moved.logprobs, whole.logprobs)
    assert whole.map(torch.Tensor.contiguous).tail_logmass is not None


def test_sampled_targets_keep_their_counts():
    both = SparseTargets.cat([sampled(2), sampled(1)])
    assert both.is_sampled and both.tail_logmass is None
    assert torch.equal(both[2:3].counts, torch.ones(1, 2, dtype=torch.int32))


def test_cat_refuses_nothing_and_mixtures_and_rows_are_sliced_only():
    with pytest.raises(ValueError, match="at least one part"):
        SparseTargets.cat([])
    with pytest.raises(ValueError, match="all have tail_logmass or all lack it"):
        SparseTargets.cat([topk(1, k=2), sampled(1)])
    with pytest.raises(TypeError, match="slice of positions"):
        topk(2)[0]
