"""The fused CE + bucket pass (kdcache.train.fused) against the unfused losses (hard_ce, kd_loss): values and
gradients at several temperatures, alphas, k, tail modes and kinds, plus float64 gradcheck and the edge cases."""

from __future__ import annotations

import pytest
import torch
from test_losses import BETA, SKEW, make_logits, make_targets

from kdcache.targets import SparseTargets
from kdcache.train.buckets import BUCKET_KINDS
from kdcache.train.fused import ce_and_kd, ce_and_kd_from_head, ce_and_student_buckets
from kdcache.train.losses import LossConfig, bucket_logprobs, distillation_loss, hard_ce, kd_loss


def _labels(N, V, seed, ignored=(1,)):
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(seed))
    for i in ignored:
        labels[i] = -100
    return labels


def _fused_loss(cfg, logits, labels, targets, w_ce, w_kd):
    ce, kd = ce_and_kd(cfg, logits, labels, targets)
    return cfg.alpha * (ce * w_ce).sum() + (1 - cfg.alpha) * (kd * w_kd).sum()


def _unfused_loss(cfg, logits, labels, targets, w_ce, w_kd):
    ce = hard_ce(logits, labels, reduction="none")
    kd = kd_loss(cfg, logits, targets, reduction="none")
    return cfg.alpha * (ce * w_ce).sum() + (1 - cfg.alpha) * (kd * w_kd).sum()


def _value_and_grad(fn, logits, *args):
    x = logits.clone().requires_grad_(True)
    loss = fn(x, *args)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


@pytest.mark.parametrize("T", [0.7, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("alpha", [0.2, 0.9])
@pytest.mark.parametrize("k", [1, 5, 40])
@pytest.mark.parametrize("tail_mode", ["exact", "single_atom"])
def test_forward_kl_matches_unfused_values_and_gradients(T, alpha, k, tail_mode):
    N, V = 9, 40
    t, s = make_logits(N, V, seed=11, dtype=torch.float32, scale=3.0)
    targets = make_targets(t, k)
    labels = _labels(N, V, seed=3)
    g = torch.Generator().manual_seed(4)
    w_ce, w_kd = torch.rand(N, generator=g), torch.rand(N, generator=g)  # arbitrary upstream gradients
    cfg = LossConfig(kind="forward_kl", alpha=alpha, temperature=T, tail_mode=tail_mode)
    fused = _value_and_grad(lambda x: _fused_loss(cfg, x, labels, targets, w_ce, w_kd), s)
    unfused = _value_and_grad(lambda x: _unfused_loss(cfg, x, labels, targets, w_ce, w_kd), s)
    torch.testing.assert_close(fused[0], unfused[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], unfused[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", BUCKET_KINDS + ("topk_forward_kl",))
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_every_kind_and_interpolated_tail_match_unfused(kind, T):
    N, V, k = 6, 23, 4
    t, s = make_logits(N, V, seed=21)
    targets = make_targets(t, k)
    labels = _labels(N, V, seed=5, ignored=(0, 4))
    w_ce, w_kd = torch.linspace(0.1, 1.0, N, dtype=torch.float64), torch.linspace(1.0, 0.2, N, dtype=torch.float64)
    cfg = LossConfig(kind=kind, alpha=0.4, temperature=T, tail_mode="interpolate", skew=SKEW, beta=BETA)
    fused = _value_and_grad(lambda x: _fused_loss(cfg, x, labels, targets, w_ce, w_kd), s)
    unfused = _value_and_grad(lambda x: _unfused_loss(cfg, x, labels, targets, w_ce, w_kd), s)
    torch.testing.assert_close(fused[0], unfused[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused[1], unfused[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("T", [0.7, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("k", [1, 4, 7])
def test_gradcheck_float64(T, k):
    N, V = 4, 7
    t, s = make_logits(N, V, seed=8)
    targets = make_targets(t, k)
    labels = torch.tensor([3, -100, 0, 6])
    ids = targets.ids.clone()
    ids[2, k - 1:] = -1  # padding columns, and a row whose padding covers its last id
    padded = SparseTargets(ids=ids, logprobs=targets.logprobs, tail_logmass=targets.tail_logmass)
    g = torch.Generator().manual_seed(2)
    w_ce, w_b = torch.rand(N, generator=g, dtype=torch.float64), torch.randn(N, k + 1, generator=g, dtype=torch.float64)

    def f(x):
        ce, log_p = ce_and_student_buckets(x, labels, padded, T)
        return (ce * w_ce).sum() + torch.where(torch.isfinite(log_p), log_p * w_b, torch.zeros_like(log_p)).sum()

    assert torch.autograd.gradcheck(f, (s.clone().requires_grad_(True),))
    cfg = LossConfig(kind="forward_kl", alpha=0.3, temperature=T)
    assert torch.autograd.gradcheck(lambda x: _fused_loss(cfg, x, labels, targets, w_ce, w_ce.flip(0)),
                                    (s.clone().requires_grad_(True),))


def test_outputs_equal_hard_ce_and_bucket_logprobs():
    t, s = make_logits(5, 11, seed=1, dtype=torch.float32)
    targets = make_targets(t, 3)
    labels = torch.tensor([1, -100, 10, 0, 3])
    for T in (1.0, 2.0):
        ce, log_p = ce_and_student_buckets(s, labels, targets, T)
        torch.testing.assert_close(ce, hard_ce(s, labels, reduction="none"))
        torch.testing.assert_close(log_p, bucket_logprobs(s, targets, T)[1])
        assert float(ce[1]) == 0.0


def test_full_vocabulary_and_extreme_logits_give_no_nan():
    """k = V (empty tail) and a student sure of one token (its tail mass underflows): finite values, finite grads."""
    N, V = 3, 6
    t, s = make_logits(N, V, seed=3, dtype=torch.float32)
    s = s.clone()
    s[0, 2] = 200.0
    s[1] = torch.tensor([-1e4, 0.0, 0.0, 0.0, 0.0, 1e4])
    labels = torch.tensor([2, 0, -100])
    ones = torch.ones(N)
    for k in (V, 2):
        targets = make_targets(t, k)
        for T in (1.0, 2.0):
            cfg = LossConfig(kind="forward_kl", alpha=0.5, temperature=T)
            assert torch.isfinite(ce_and_kd(cfg, s, labels, targets)[1]).all()
            fused = _value_and_grad(lambda y, c=cfg, t=targets: _fused_loss(c, y, labels, t, ones, ones), s)
            ref = _value_and_grad(lambda y, c=cfg, t=targets: _unfused_loss(c, y, labels, t, ones, ones), s)
            assert torch.isfinite(fused[1]).all()
            torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-5)


def test_half_precision_logits_are_upcast_and_grad_keeps_dtype():
    t, s = make_logits(4, 9, seed=2, dtype=torch.float32)
    targets = make_targets(t, 3)
    labels = torch.tensor([1, 2, 3, 4])
    cfg = LossConfig(kind="forward_kl", alpha=0.5, temperature=2.0)
    x = s.to(torch.bfloat16).requires_grad_(True)
    ce, kd = ce_and_kd(cfg, x, labels, targets)
    assert ce.dtype == kd.dtype == torch.float32
    (ce.sum() + kd.sum()).backward()
    assert x.grad.dtype == torch.bfloat16
    ref_ce, ref_kd = (hard_ce(x.detach(), labels, reduction="none"),
                      kd_loss(cfg, x.detach(), targets, reduction="none"))
    torch.testing.assert_close(ce, ref_ce)
    torch.testing.assert_close(kd, ref_kd)


def test_sample_targets_and_top_k_follow_kd_loss():
    N, V = 4, 10
    _, s = make_logits(N, V, seed=9)
    ids = torch.tensor([[2, 0, -1], [1, 3, 6], [4, -1, -1], [9, 8, 7]])
    counts = torch.tensor([[2, 1, 0], [1, 1, 1], [3, 0, 0], [1, 1, 1]])
    sampled = SparseTargets(ids=ids, logprobs=torch.full((N, 3), -2.0, dtype=torch.float64), counts=counts)
    labels = torch.tensor([0, 1, 2, 3])
    for cfg in (LossConfig(kind="jsd", alpha=0.5, temperature=2.0, tail_mode="single_atom"),
                LossConfig(kind="sampled_ce", alpha=0.5)):
        fused = _value_and_grad(lambda x, c=cfg: _fused_loss(c, x, labels, sampled, torch.ones(N), torch.ones(N)), s)
        ref = _value_and_grad(lambda x, c=cfg: _unfused_loss(c, x, labels, sampled, torch.ones(N), torch.ones(N)), s)
        torch.testing.assert_close(fused, ref)
    t, _ = make_logits(N, V, seed=10)
    cfg = LossConfig(kind="forward_kl", alpha=0.5, temperature=2.0, top_k=2)
    full = make_targets(t, 5)
    torch.testing.assert_close(ce_and_kd(cfg, s, labels, full), (hard_ce(s, labels, reduction="none"),
                                                                  kd_loss(cfg, s, full, reduction="none")))


def test_distillation_loss_reference_agrees_with_the_fused_mix():
    """distillation_loss (unfused, one chunk) and the fused per-position terms give the same total."""
    t, s = make_logits(7, 15, seed=12, dtype=torch.float32)
    targets = make_targets(t, 4)
    labels = _labels(7, 15, seed=1)
    cfg = LossConfig(kind="forward_kl", alpha=0.3, temperature=2.0)
    total, _ = distillation_loss(cfg, s, targets, labels)
    ce, kd = ce_and_kd(cfg, s, labels, targets)
    keep = (labels != -100).float()
    torch.testing.assert_close(total, 0.3 * (ce * keep).sum() / keep.sum() + 0.7 * kd.mean())


def _head_inputs(N, H, rows, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = torch.randn(rows, H, generator=g, dtype=dtype) / H**0.5 * 3
    return hidden, weight


@pytest.mark.parametrize("kind", BUCKET_KINDS)
@pytest.mark.parametrize("T", [0.7, 1.0, 2.0])
@pytest.mark.parametrize("with_ce", [True, False])
@pytest.mark.parametrize("k", [1, 5])
def test_from_head_equals_the_unfused_loss_on_its_logits(kind, T, with_ce, k):
    """ce_and_kd_from_head(hidden, W) = hard_ce + kd_loss on hidden @ W[:V].T: values, and gradients w.r.t. the
    hidden states and the whole weight (rows past V, the embedding padding, get zero)."""
    N, H, V, rows = 7, 6, 19, 23
    hidden, weight = _head_inputs(N, H, rows, seed=k)
    t, _ = make_logits(N, V, seed=31)
    targets = make_targets(t, k)
    labels = _labels(N, V, seed=6, ignored=(2,))
    w_ce, w_kd = torch.linspace(0.2, 1.0, N, dtype=torch.float64), torch.linspace(1.0, 0.1, N, dtype=torch.float64)
    cfg = LossConfig(kind=kind, alpha=0.4 if with_ce else 0.0, temperature=T, skew=SKEW, beta=BETA)

    def fused(h, w):
        ce, kd = ce_and_kd_from_head(cfg, h, w, V, labels if with_ce else None, targets)
        if not with_ce:
            assert not ce.any()
        return cfg.alpha * (ce * w_ce).sum() + (1 - cfg.alpha) * (kd * w_kd).sum()

    def unfused(h, w):
        return _unfused_loss(cfg, h @ w[:V].T, labels, targets, w_ce, w_kd)

    grads = []
    for fn in (fused, unfused):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = fn(h, w)
        grads.append((loss.detach(), *torch.autograd.grad(loss, (h, w))))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert not grads[0][2][V:].any() and grads[0][2][:V].abs().sum() > 0


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_from_head_gradcheck_and_frozen_head(T):

    N, H, V = 4, 3, 7
    hidden, weight = _head_inputs(N, H, V + 2, seed=3)
    t, _ = make_logits(N, V, seed=8)
    targets = make_targets(t, 3)
    labels = torch.tensor([3, -100, 0, 6])
    cfg = LossConfig(kind="forward_kl", alpha=0.3, temperature=T)

    def f(h, w):
        ce, kd = ce_and_kd_from_head(cfg, h, w, V, labels, targets)
        return (ce * torch.arange(1.0, N + 1, dtype=torch.float64)).sum() + kd.sum()

    assert torch.autograd.gradcheck(f, (hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)))
    h = hidden.clone().requires_grad_(True)  # a frozen head (LoRA students): only the hidden states get a gradient
    f(h, weight).backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_from_head_with_no_targets_is_the_plain_ce():
    """targets None (alpha = 1, SFT through kdcache): the CE of hidden @ W[:V].T and its gradients, kd None."""
    N, H, V = 6, 5, 11
    hidden, weight = _head_inputs(N, H, V + 3, seed=9)
    labels = _labels(N, V, seed=2, ignored=(0,))
    w = torch.linspace(0.5, 1.5, N, dtype=torch.float64)
    cfg = LossConfig(kind="forward_kl", alpha=1.0)
    results = []
    for fused in (True, False):
        h, wt = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if fused:
            ce, kd = ce_and_kd_from_head(cfg, h, wt, V, labels, None)
            assert kd is None
        else:
            ce = hard_ce(h @ wt[:V].T, labels, reduction="none")
        loss = (ce * w).sum()
        results.append((loss.detach(), *torch.autograd.grad(loss, (h, wt))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda h: ce_and_kd_from_head(cfg, h, weight, V, labels, None)[0].sum(),
                                    (hidden.clone().requires_grad_(True),))
