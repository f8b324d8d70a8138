"""Universal Logit Distillation against the cache: pinned to the dense sorted-vector distance (values and gradients),
with student and teacher vocabularies of different sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.targets import SparseTargets
from kdcache.train.losses import LossConfig, kd_loss
from kdcache.train.uld import universal_logit_distillation


def dense_uld(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """The reference (Boizard et al. 2024, eq. 5): both full distributions sorted, zero-padded to one length, L1."""
    p = torch.softmax(student_logits, -1).sort(-1, descending=True).values
    q = teacher_logprobs.exp().sort(-1, descending=True).values
    width = max(p.shape[1], q.shape[1])
    p = torch.nn.functional.pad(p, (0, width - p.shape[1]))
    q = torch.nn.functional.pad(q, (0, width - q.shape[1]))
    return (p - q).abs().sum(-1)


def topk_targets(teacher_logprobs: torch.Tensor, k: int) -> SparseTargets:
    values, ids = teacher_logprobs.topk(k, dim=-1)
    rest = teacher_logprobs.scatter(-1, ids, float("-inf"))
    return SparseTargets(ids=ids, logprobs=values, tail_logmass=torch.logsumexp(rest, -1))


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    student = (2.0 * torch.randn(7, 37, generator=g, dtype=torch.float64)).requires_grad_()
    teacher = torch.log_softmax(3.0 * torch.randn(7, 50, generator=g, dtype=torch.float64), -1)
    return student, teacher


def test_full_vocabulary_cache_equals_the_dense_loss_in_value_and_gradient(pair):
    student, teacher = pair
    targets = topk_targets(teacher, 50)  # k = V: tail mass 0
    got = universal_logit_distillation(student, targets, reduction="none")
    expected = dense_uld(student, teacher)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    (g_got,) = torch.autograd.grad(got.sum(), student)
    (g_ref,) = torch.autograd.grad(expected.sum(), student)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 5, 36, 40])  # 40 > the student's 37 tokens: its missing ranks are zeros
def test_top_k_cache_is_the_bucketed_distance_and_a_lower_bound(pair, k):
    student, teacher = pair
    targets = topk_targets(teacher, k)
    got = universal_logit_distillation(student, targets, reduction="none")
    p = np.sort(torch.softmax(student, -1).detach().numpy(), -1)[:, ::-1]
    p = np.pad(p, ((0, 0), (0, max(0, k - p.shape[1]))))
    q = np.exp(targets.logprobs.numpy())  # already sorted by topk
    tail = np.exp(targets.tail_logmass.numpy())
    reference = np.abs(p[:, :k] - q).sum(-1) + np.abs(p[:, k:].sum(-1) - tail)
    np.testing.assert_allclose(got.detach().numpy(), reference, rtol=1e-12, atol=1e-12)
    assert torch.all(got <= dense_uld(student, teacher) + 1e-12)


def test_gradcheck_and_padding_entries(pair):
    student, teacher = pair
    targets = topk_targets(teacher, 6)
    ids = targets.ids.clone()
    ids[:, 4:] = -1  # padded entries: their mass belongs to no rank
    padded = SparseTargets(ids=ids, logprobs=targets.logprobs, tail_logmass=targets.tail_logmass)
    assert torch.autograd.gradcheck(lambda z: universal_logit_distillation(z, padded, reduction="none"),
                                    (student.detach().clone().requires_grad_(),))
    shorter = SparseTargets(ids=targets.ids[:, :4], logprobs=targets.logprobs[:, :4], tail_logmass=targets.tail_logmass)
    torch.testing.assert_close(universal_logit_distillation(student, padded),
                               universal_logit_distillation(student, shorter))


def test_kd_loss_dispatches_uld_and_refuses_what_it_cannot_do(pair):
    student, teacher = pair
    targets = topk_targets(teacher, 8)
    torch.testing.assert_close(kd_loss(LossConfig(kind="uld", alpha=0.0), student, targets),
                               universal_logit_distillation(student, targets))
    with pytest.raises(ValueError, match="T = 1"):
        universal_logit_distillation(student, targets, temperature=2.0)
    sampled = SparseTargets(ids=targets.ids, logprobs=targets.logprobs, counts=torch.ones_like(targets.ids))
    with pytest.raises(ValueError, match="topk targets"):
        universal_logit_distillation(student, sampled)
    assert torch.all(universal_logit_distillation(teacher.clone(), topk_targets(teacher, 50), reduction="none")
                     < 1e-12)  # the teacher itself is at distance 0
