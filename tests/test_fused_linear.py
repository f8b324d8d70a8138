"""The frozen-head sums with the gradient made in forward (kdcache.train.fused_linear) against the unfused losses
on ``hidden @ W[:V].T`` mixed by combine_terms: values and gradients w.r.t. the hidden states for every bucket kind,
several T and k, the exact passes for rows whose tail underflows, float16 matmuls, and the mix check."""

from __future__ import annotations

import pytest
import torch
from test_fused import _head_inputs, _labels
from test_losses import BETA, SKEW, make_logits, make_targets

import kdcache.train.fused_linear as fused_linear
from kdcache.train.buckets import BUCKET_KINDS
from kdcache.train.fused_linear import frozen_head_sums, mix_coefficients
from kdcache.train.losses import LossConfig, combine_terms, hard_ce, kd_loss, weighted_sum


def _case(N=7, H=6, V=19, rows=23, k=5, seed=0, dtype=torch.float64, logit_scale=1.0):
    hidden, weight = _head_inputs(N, H, rows, seed=seed, dtype=dtype)
    weight = weight * logit_scale
    t, _ = make_logits(N, V, seed=31 + seed)
    labels = _labels(N, V, seed=6 + seed, ignored=(2,))
    w_ce = torch.linspace(0.2, 1.0, N, dtype=dtype) * (labels != -100)
    w_kd = torch.linspace(1.0, 0.1, N, dtype=dtype)
    return hidden, weight, V, labels, make_targets(t, k), w_ce, w_kd


def _losses(cfg, hidden, weight, V, labels, targets, w_ce, w_kd):
    """(fused, unfused): total = combine_terms(ce_sum, ce_den, kd_sum, kd_den, alpha), as functions of hidden."""
    use_ce, use_kd = cfg.alpha > 0, cfg.alpha < 1
    ce_den, kd_den = (w_ce.sum() if use_ce else None), (w_kd.sum() if use_kd else None)
    mix = mix_coefficients(cfg.alpha, ce_den, kd_den, hidden.dtype if hidden.dtype == torch.float64
                           else torch.float32, hidden.device)

    def fused(h):
        sums = frozen_head_sums(cfg, h, weight, V, labels if use_ce else None, targets if use_kd else None,
                                w_ce if use_ce else None, w_kd if use_kd else None, mix)
        return combine_terms(sums[0], ce_den, sums[1], kd_den, cfg.alpha)[0]

    def unfused(h):
        z = h.to(weight.dtype) @ weight[:V].T
        ce_sum = weighted_sum(hard_ce(z, labels, reduction="none"), w_ce)[0] if use_ce else None
        kd_sum = weighted_sum(kd_loss(cfg, z, targets, reduction="none"), w_kd)[0] if use_kd else None
        return combine_terms(ce_sum, ce_den, kd_sum, kd_den, cfg.alpha)[0]

    return fused, unfused


def _value_and_grad(fn, hidden, upstream=3.0):
    h = hidden.clone().requires_grad_(True)
    loss = fn(h) * upstream  # an upstream factor (a loss scaler's, an accumulation's) reaches the hidden states
    return loss.detach(), torch.autograd.grad(loss, h)[0]


@pytest.mark.parametrize("kind", BUCKET_KINDS)
@pytest.mark.parametrize("T", [0.7, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("k", [1, 5, 19])
def test_equals_the_unfused_mix_in_value_and_gradient(kind, T, k):
    """k = 19 = V: the tail is empty, so every row takes the exact passes."""
    hidden, weight, V, labels, targets, w_ce, w_kd = _case(k=k)
    cfg = LossConfig(kind=kind, alpha=0.4, temperature=T, skew=SKEW, beta=BETA)
    fused, unfused = _losses(cfg, hidden, weight, V, labels, targets, w_ce, w_kd)
    for a, b in zip(_value_and_grad(fused, hidden), _value_and_grad(unfused, hidden)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_one_term_alone(alpha, T):
    """alpha = 1: the CE alone (no targets, a Liger-style fused linear CE); alpha = 0: the divergence alone."""
    hidden, weight, V, labels, targets, w_ce, w_kd = _case()
    cfg = LossConfig(kind="forward_kl", alpha=alpha, temperature=T)
    fused, unfused = _losses(cfg, hidden, weight, V, labels, targets, w_ce, w_kd)
    for a, b in zip(_value_and_grad(fused, hidden), _value_and_grad(unfused, hidden)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_rows_whose_tail_underflows_take_the_exact_passes(monkeypatch):
    """Logits 60x larger put the student's tail below 2**-60 of its top entry on some rows (E underflows there);
    those rows, and only those, are recomputed by the exact passes, and the result still equals the reference."""
    hidden, weight, V, labels, targets, w_ce, w_kd = _case(k=3, logit_scale=60.0)
    seen = []
    original = fused_linear._forward

    def recording(logits, *rest):
        seen.append(logits.shape[0])
        return original(logits, *rest)

    monkeypatch.setattr(fused_linear, "_forward", recording)
    cfg = LossConfig(kind="forward_kl", alpha=0.3, temperature=0.7)
    fused, unfused = _losses(cfg, hidden, weight, V, labels, targets, w_ce, w_kd)
    got, want = _value_and_grad(fused, hidden), _value_and_grad(unfused, hidden)
    z = (hidden @ weight[:V].T / 0.7).log_softmax(-1)
    tail = z.scatter(1, targets.ids, float("-inf")).logsumexp(-1) - z.max(-1).values
    slow = int((tail < -60 * torch.log(torch.tensor(2.0, dtype=z.dtype))).sum())
    assert 0 < slow < hidden.shape[0] and seen == [slow]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_gradcheck_float64():
    hidden, weight, V, labels, targets, w_ce, w_kd = _case(N=4, H=3, V=7, rows=9, k=3)
    cfg = LossConfig(kind="forward_kl", alpha=0.3, temperature=2.0)
    fused, _ = _losses(cfg, hidden, weight, V, labels, targets, w_ce, w_kd)
    assert torch.autograd.gradcheck(fused, (hidden.clone().requires_grad_(True),))


def test_without_grad_the_values_alone():
    hidden, weight, V, labels, targets, w_ce, w_kd = _case()
    cfg = LossConfig(kind="jsd", alpha=0.5, temperature=2.0, beta=BETA)
    fused, unfused = _losses(cfg, hidden, weight, V, labels, targets, w_ce, w_kd)
    with torch.no_grad():
        torch.testing.assert_close(fused(hidden), unfused(hidden), rtol=1e-10, atol=1e-12)


def test_float16_matmuls_lose_no_gradient_to_underflow():
    """Under float16 autocast, rows weighted 1e-6 of the first (a long batch's typical row) have logit gradients
    near 1e-9, which float16 flushes to zero; each row is scaled before the cast, so every row's gradient w.r.t.
    the (float32) hidden states keeps float16 precision against float64."""
    hidden, weight, V, labels, targets, w_ce, w_kd = _case(N=8, H=16, V=64, rows=64, k=8)
    hidden, weight = hidden.float(), weight.float()
    w = torch.full((8,), 1e-6, dtype=torch.float64)
    w[0] = 1.0
    labels[2] = 5
    cfg = LossConfig(kind="forward_kl", alpha=0.5, temperature=2.0)
    fused = _losses(cfg, hidden, weight, V, labels, targets, w.float(), w.float())[0]
    with torch.autocast("cpu", dtype=torch.float16):
        _, g16 = _value_and_grad(fused, hidden)
    ref = _losses(cfg, hidden.half().double(), weight.half().double(), V, labels, targets, w, w)[1]
    _, g64 = _value_and_grad(ref, hidden.half().double())
    assert g16.dtype == torch.float32 and g64[1:].abs().max() < 1e-5
    err = ((g16.double() - g64).norm(dim=1) / g64.norm(dim=1)).max()
    assert err < 1e-2, err


def test_sums_mixed_otherwise_than_they_were_made_for_are_refused():
    hidden, weight, V, labels, targets, w_ce, w_kd = _case()
    cfg = LossConfig(kind="forward_kl", alpha=0.5)
    mix = mix_coefficients(0.5, w_ce.sum(), w_kd.sum(), torch.float64, hidden.device)
    h = hidden.clone().requires_grad_(True)
    sums = frozen_head_sums(cfg, h, weight, V, labels, targets, w_ce, w_kd, mix)
    with pytest.raises(RuntimeError, match="not a multiple of the mix"):
        (sums[0] + 5 * sums[1]).backward()
    with pytest.raises(ValueError, match="frozen head"):
        frozen_head_sums(cfg, h, weight.clone().requires_grad_(True), V, labels, targets, w_ce, w_kd, mix)


def test_the_t2_gradient_made_in_row_blocks(monkeypatch):
    """At T = 2 the CE's softmax term is made a block of rows at a time (no second [n, V] buffer); blocks of 1 and 3
    rows give the same gradient as one block."""
    hidden, weight, V, labels, targets, w_ce, w_kd = _case(N=8, k=4)
    cfg = LossConfig(kind="forward_kl", alpha=0.6, temperature=2.0)
    fused, unfused = _losses(cfg, hidden, weight, V, labels, targets, w_ce, w_kd)
    want = _value_and_grad(unfused, hidden)
    for rows in (1, 3):
        monkeypatch.setattr(fused_linear, "_BLOCK", rows * V)
        for a, b in zip(_value_and_grad(fused, hidden), want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_bfloat16_autocast_matches_float64_within_its_precision():
    """The bf16 profile: logits made in bfloat16 under autocast, upcast for the passes, the gradient's matmul in
    bfloat16 again; against float64 on the same (bf16-rounded) inputs, within bfloat16's precision."""
    hidden, weight, V, labels, targets, w_ce, w_kd = _case(N=8, H=16, V=64, rows=64, k=8)
    hidden, weight = hidden.bfloat16().float(), weight.bfloat16().float()
    cfg = LossConfig(kind="forward_kl", alpha=0.5, temperature=2.0)
    fused = _losses(cfg, hidden, weight, V, labels, targets, w_ce.float(), w_kd.float())[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, grad = _value_and_grad(fused, hidden)
    ref = _losses(cfg, hidden.double(), weight.double(), V, labels, targets, w_ce, w_kd)[1]
    want_value, want_grad = _value_and_grad(ref, hidden.double())
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
    assert abs(value.double() - want_value) / want_value < 2e-2
    assert ((grad.double() - want_grad).norm(dim=1) / want_grad.norm(dim=1)).max() < 5e-2
