"""Tests for kdcache.train.losses against independent dense / bucketed references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdcache.targets import SparseTargets
from kdcache.tempering import TemperatureNotCached
from kdcache.train import losses as L
from kdcache.train.losses import LossConfig

BUCKET_KINDS = ["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "tv"]
DIVERGENCE_KINDS = BUCKET_KINDS + ["topk_forward_kl"]
SKEW = 0.2
BETA = 0.3
TEMPS = (0.5, 0.7, 1.5, 2.0, 3.0, 4.0)  # cached tail temperatures of the targets built here (besides 1)


# ----------------------------------------------------------------------------------------
# Independent references (probability space, straight from the definitions)
# ----------------------------------------------------------------------------------------


def _kl(a, b):
    return (a * (a.log() - b.log())).sum(-1)


def ref_divergence(kind: str, q, p, T: float):
    """Per-position divergence between teacher probs q and student probs p (both [N, B], all > 0)."""
    if kind in ("forward_kl", "topk_forward_kl"):
        return T**2 * _kl(q, p)
    if kind == "reverse_kl":
        return T**2 * _kl(p, q)
    if kind == "skew_forward_kl":
        return T**2 * _kl(q, SKEW * q + (1 - SKEW) * p)
    if kind == "skew_reverse_kl":
        return T**2 * _kl(p, SKEW * p + (1 - SKEW) * q)
    if kind == "jsd":
        m = BETA * q + (1 - BETA) * p
        return T**2 * (BETA * _kl(q, m) + (1 - BETA) * _kl(p, m))
    if kind == "tv":
        return 0.5 * (q - p).abs().sum(-1)
    raise AssertionError(kind)


def dense_reference(kind, teacher_logits, student_logits, T):
    q = torch.softmax(teacher_logits.double() / T, -1)
    p = torch.softmax(student_logits.double() / T, -1)
    return ref_divergence(kind, q, p, T)


def bucket_reference(kind, teacher_logits, student_logits, k, T, single_atom=False):
    """The (k+1)-bucket loss built by hand from dense softmaxes: the teacher tempered token by token, then summed
    over the tail (``single_atom``: the pre-v2 approximation, the T = 1 tail mass tempered as one atom)."""
    qd = torch.softmax(teacher_logits.double(), -1)
    ids = qd.argsort(-1, descending=True)[:, :k]
    pd = torch.softmax(student_logits.double() / T, -1)
    if kind == "topk_forward_kl":
        qk = qd.gather(1, ids) ** (1 / T)
        pk = pd.gather(1, ids)
        return ref_divergence(kind, qk / qk.sum(-1, keepdim=True), pk / pk.sum(-1, keepdim=True), T)
    qk = qd.gather(1, ids)
    if single_atom:
        qb = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], 1) ** (1 / T)
    else:
        qt = qd ** (1 / T)
        qtk = qt.gather(1, ids)
        qb = torch.cat([qtk, qt.sum(-1, keepdim=True) - qtk.sum(-1, keepdim=True)], 1)
    qb = qb / qb.sum(-1, keepdim=True)
    pk = pd.gather(1, ids)
    pb = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], 1)
    return ref_divergence(kind, qb, pb, T)


def make_targets(teacher_logits, k, temperatures=TEMPS) -> SparseTargets:
    """topk targets as the cache would store them (tail and its log-partition at each cached temperature from the
    sorted remainder)."""
    lp = torch.log_softmax(teacher_logits, -1)
    srt, order = lp.sort(-1, descending=True)
    V = lp.shape[1]
    if k < V:
        tail = torch.logsumexp(srt[:, k:], -1)
        grid = torch.stack([torch.logsumexp(srt[:, k:] / t, -1) for t in temperatures], 1)
    else:
        tail = torch.full((lp.shape[0],), float("-inf"), dtype=lp.dtype)
        grid = torch.full((lp.shape[0], len(temperatures)), float("-inf"), dtype=lp.dtype)
    return SparseTargets(ids=order[:, :k].clone(), logprobs=srt[:, :k].clone(), tail_logmass=tail,
                         tail_grid=grid if temperatures else None, tail_temperatures=tuple(temperatures))


def make_logits(N, V, seed, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    s = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    return t, s


def run_kind(kind, student_logits, targets, T, reduction="none", **extra):
    cfg = LossConfig(kind=kind, temperature=T, skew=SKEW, beta=BETA, **extra)
    return L.kd_loss(cfg, student_logits, targets, reduction=reduction)


# ----------------------------------------------------------------------------------------
# Agreement with references
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_k_equals_V_matches_dense(kind, T, dtype):
    N, V = 6, 50
    t, s = make_logits(N, V, seed=1, dtype=dtype)
    targets = make_targets(t, V)
    assert torch.isneginf(targets.tail_logmass).all()
    got = run_kind(kind, s, targets, T)
    ref = dense_reference(kind, t, s, T)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    mean = run_kind(kind, s, targets, T, reduction="mean")
    torch.testing.assert_close(mean.double(), ref.mean(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
@pytest.mark.parametrize("T", [1.0, 2.0, 0.7, 0.5, 4.0])
@pytest.mark.parametrize("k", [1, 4, 11])
def test_k_less_than_V_matches_bucket_reference(kind, T, k):
    N, V = 5, 13
    t, s = make_logits(N, V, seed=2)
    got = run_kind(kind, s, make_targets(t, k), T)
    ref = bucket_reference(kind, t, s, k, T)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-8)


def test_bucket_logprobs_are_normalised_and_tail_is_exact():
    t, s = make_logits(4, 20, seed=3)
    log_q, log_p = L.bucket_logprobs(s, make_targets(t, 5), temperature=1.5)
    torch.testing.assert_close(log_q.exp().sum(-1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(4, dtype=torch.float64))
    # student tail against a direct masked sum
    ids = make_targets(t, 5).ids
    pd = torch.softmax(s / 1.5, -1)
    mask = torch.zeros_like(pd, dtype=torch.bool).scatter_(1, ids, True)
    torch.testing.assert_close(log_p[:, -1], pd.masked_fill(mask, 0).sum(-1).log())


def test_sampled_ce_matches_reference_formula():
    t, s = make_logits(3, 9, seed=4)
    ids = torch.tensor([[4, 1, -1, -1], [0, 2, 8, 3], [5, -1, -1, -1]])
    counts = torch.tensor([[3, 1, 0, 0], [1, 1, 1, 1], [4, 0, 0, 0]])
    targets = SparseTargets(ids=ids, logprobs=torch.zeros(3, 4, dtype=torch.float64), counts=counts)
    for T in (1.0, 2.0):
        got = L.sampled_cross_entropy(s, targets, temperature=T, reduction="none")
        lp = torch.log_softmax(s / T, -1)
        ref = torch.stack(
            [
                -(3 * lp[0, 4] + 1 * lp[0, 1]) / 4,
                -(lp[1, 0] + lp[1, 2] + lp[1, 8] + lp[1, 3]) / 4,
                -lp[2, 5],
            ]
        )
        torch.testing.assert_close(got, T**2 * ref)


# ----------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_gradcheck(kind, k, T):
    N, V = 3, 7
    t, s = make_logits(N, V, seed=5)
    targets = make_targets(t, k)
    s = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: run_kind(kind, x, targets, T, reduction="mean"), (s,))


def test_gradcheck_sampled_and_hard_ce():
    N, V = 3, 7
    _, s = make_logits(N, V, seed=6)
    ids = torch.tensor([[2, 0, -1], [1, 3, 6], [4, -1, -1]])
    counts = torch.tensor([[2, 1, 0], [1, 1, 1], [3, 0, 0]])
    targets = SparseTargets(ids=ids, logprobs=torch.zeros(3, 3, dtype=torch.float64), counts=counts)
    labels = torch.tensor([1, -100, 5])
    s = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: L.sampled_cross_entropy(x, targets, temperature=1.5), (s,))
    assert torch.autograd.gradcheck(lambda x: L.hard_ce(x, labels), (s,))
    cfg = LossConfig(kind="sampled_ce", alpha=0.3)
    assert torch.autograd.gradcheck(lambda x: L.distillation_loss(cfg, x, targets, labels)[0], (s,))


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_no_nan_with_full_vocab_and_extreme_logits(kind):
    N, V = 4, 32
    t, s = make_logits(N, V, seed=7, dtype=torch.float32, scale=40.0)
    targets = make_targets(t, V)
    for T in (1.0, 3.0):
        x = s.clone().requires_grad_(True)
        loss = run_kind(kind, x, targets, T, reduction="mean")
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------------------
# Identities
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [4, 10])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_skew_zero_is_plain_kl(k, T):
    t, s = make_logits(5, 10, seed=8)
    targets = make_targets(t, k)
    fkl = L.forward_kl(s, targets, temperature=T, reduction="none")
    rkl = L.reverse_kl(s, targets, temperature=T, reduction="none")
    assert torch.equal(L.skew_forward_kl(s, targets, skew=0.0, temperature=T, reduction="none"), fkl)
    assert torch.equal(L.skew_reverse_kl(s, targets, skew=0.0, temperature=T, reduction="none"), rkl)


def test_alpha_one_is_plain_ce_exactly():
    t, s = make_logits(6, 11, seed=9, dtype=torch.float32)
    labels = torch.tensor([0, 3, -100, 10, 2, 2])
    targets = make_targets(t, 4)
    for kind in DIVERGENCE_KINDS:
        total, parts = L.distillation_loss(LossConfig(kind=kind, alpha=1.0), s, targets, labels)
        ref = F.cross_entropy(s, labels, ignore_index=-100)
        assert torch.equal(total, L.hard_ce(s, labels))
        torch.testing.assert_close(total, ref, atol=0, rtol=0)
        assert set(parts) == {"ce"}
    # targets are not even needed
    total, _ = L.distillation_loss(LossConfig(alpha=1.0), s, None, labels)
    assert torch.equal(total, F.cross_entropy(s, labels))


def test_alpha_mix_and_parts():
    t, s = make_logits(6, 11, seed=10)
    labels = torch.tensor([0, 3, 1, 10, 2, 2])
    targets = make_targets(t, 4)
    w = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    cfg = LossConfig(kind="reverse_kl", alpha=0.25, temperature=2.0)
    total, parts = L.distillation_loss(cfg, s, targets, labels, weights=w)
    ce = L.hard_ce(s, labels, weights=w)
    kd = L.reverse_kl(s, targets, temperature=2.0, weights=w)
    torch.testing.assert_close(total, 0.25 * ce + 0.75 * kd)
    torch.testing.assert_close(parts["ce"], ce)
    torch.testing.assert_close(parts["kd"], kd)
    assert not parts["kd"].requires_grad
    # weighted mean = sum(w l) / sum(w)
    per = L.reverse_kl(s, targets, temperature=2.0, reduction="none")
    torch.testing.assert_close(kd, (w * per).sum() / w.sum())
    # alpha = 0 needs no labels
    total0, parts0 = L.distillation_loss(LossConfig(kind="tv", alpha=0.0), s, targets, None)
    assert set(parts0) == {"kd"}
    assert torch.equal(total0, L.total_variation(s, targets))


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_top_k_truncation_equals_direct_targets(kind):
    t, s = make_logits(5, 16, seed=11)
    big, small = make_targets(t, 9), make_targets(t, 4)
    trunc = L.top_k_truncate(big, 4)
    assert torch.equal(trunc.ids, small.ids)
    assert torch.equal(trunc.logprobs, small.logprobs)
    torch.testing.assert_close(trunc.tail_logmass, small.tail_logmass, atol=1e-12, rtol=1e-12)
    for T in (1.0, 2.0):
        via_cfg = run_kind(kind, s, big, T, top_k=4)
        direct = run_kind(kind, s, small, T)
        torch.testing.assert_close(via_cfg, direct, atol=1e-12, rtol=1e-10)


def test_top_k_truncation_from_full_vocab_and_errors():
    t, s = make_logits(3, 8, seed=12)
    full = make_targets(t, 8)  # tail -inf
    trunc = L.top_k_truncate(full, 3)
    torch.testing.assert_close(trunc.tail_logmass, make_targets(t, 3).tail_logmass)
    assert L.top_k_truncate(full, 8) is full
    with pytest.raises(ValueError):
        L.top_k_truncate(full, 9)
    with pytest.raises(ValueError):
        LossConfig(kind="sampled_ce", top_k=3)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_nonnegative_and_zero_at_equality(kind):
    V = 12
    t, s = make_logits(6, V, seed=13)
    for k in (1, 5, V):
        targets = make_targets(t, k)
        for T in (1.0, 2.0):
            vals = run_kind(kind, s, targets, T)
            assert (vals >= -1e-12).all(), (k, T, vals)
            if kind == "topk_forward_kl" and k == 1:
                # renormalised over one id, both sides are [1]: the top-k loss is blind
                # to everything, which is the bias the tail bucket removes
                assert (vals == 0).all()
            else:
                assert (vals > 1e-6).all()  # random student differs from the teacher
        # student == teacher: zero at every cached temperature, k < V included (the tail is tempered exactly)
        for T in (1.0, *TEMPS):
            vals = run_kind(kind, t.clone(), targets, T)
            torch.testing.assert_close(vals, torch.zeros_like(vals), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------
# Sampled estimator
# ----------------------------------------------------------------------------------------


def _sample_targets(q, S, gen):
    """Draw S samples per row of q [N, V] and pack them like the "sample" sparsifier."""
    N, V = q.shape
    draws = torch.multinomial(q, S, replacement=True, generator=gen)
    dense = torch.zeros(N, V, dtype=torch.long).scatter_add_(1, draws, torch.ones_like(draws))
    m = min(S, V)
    counts, ids = dense.sort(-1, descending=True)
    counts, ids = counts[:, :m], ids[:, :m]
    ids = torch.where(counts > 0, ids, torch.full_like(ids, -1))
    logprobs = torch.where(counts > 0, q.log().gather(1, ids.clamp_min(0)), torch.full(ids.shape, 123.0, dtype=q.dtype))
    return SparseTargets(ids=ids, logprobs=logprobs, counts=counts)


def test_sampled_estimator_is_unbiased():
    gen = torch.Generator().manual_seed(1234)
    N, V, S, R = 4, 12, 8, 5000
    t, s = make_logits(N, V, seed=14)
    q = torch.softmax(t, -1)
    dense_ce = -(q * torch.log_softmax(s, -1)).sum(-1)  # [N]
    targets = _sample_targets(q.repeat(R, 1), S, gen)
    assert (targets.ids == -1).any()  # padding exercised
    per = L.sampled_cross_entropy(s.repeat(R, 1), targets, reduction="none").view(R, N)
    est, se = per.mean(0), per.std(0) / math.sqrt(R)
    assert (est - dense_ce).abs().max() < 6 * se.max() + 1e-9, (est, dense_ce, se)
    # and the KD loss of a sample cache differs from forward KL only by the teacher entropy
    ent = -(q * q.log()).sum(-1)
    fkl = L.forward_kl(s, make_targets(t, V), reduction="none")
    torch.testing.assert_close(dense_ce - ent, fkl)


def test_sample_targets_work_with_bucket_losses():
    """Sample targets (unique ids with exact logprobs, padded) form a valid bucket set too."""
    t, s = make_logits(3, 10, seed=15)
    lp = torch.log_softmax(t, -1)
    ids = torch.tensor([[3, 7, -1], [0, 1, 2], [9, -1, -1]])
    counts = torch.tensor([[2, 1, 0], [1, 1, 1], [3, 0, 0]])
    logprobs = torch.where(ids >= 0, lp.gather(1, ids.clamp_min(0)), torch.zeros(3, 3, dtype=torch.float64))
    sampled = SparseTargets(ids=ids, logprobs=logprobs, counts=counts)
    for row in range(3):
        keep = ids[row] >= 0
        r_ids = ids[row][keep][None]
        r_lp = lp[row : row + 1].gather(1, r_ids)
        r_tail = torch.log1p(-r_lp.exp().sum(-1))
        plain = SparseTargets(ids=r_ids, logprobs=r_lp, tail_logmass=r_tail)
        for kind in DIVERGENCE_KINDS:
            if kind in L.REVERSE_KINDS:  # refused on targets without a cached tail
                with pytest.raises(ValueError, match="needs targets with the teacher's tail"):
                    run_kind(kind, s, sampled, 1.0)
                continue
            got = run_kind(kind, s, sampled, 1.0)[row]
            ref = run_kind(kind, s[row : row + 1], plain, 1.0)[0]
            torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-8)


# ----------------------------------------------------------------------------------------
# Misc
# ----------------------------------------------------------------------------------------


def test_derived_tail_when_not_cached():
    t, s = make_logits(4, 15, seed=16)
    for k in (3, 15):
        cached = make_targets(t, k)
        derived = SparseTargets(ids=cached.ids, logprobs=cached.logprobs)
        a = L.forward_kl(s, cached, reduction="none")
        b = L.forward_kl(s, derived, reduction="none")
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)
    # a derived tail has no shape: T != 1 is refused unless the old approximation is asked for by name (or k = V)
    derived = SparseTargets(ids=make_targets(t, 3).ids, logprobs=make_targets(t, 3).logprobs)
    with pytest.raises(TemperatureNotCached, match="single_atom"):
        L.forward_kl(s, derived, temperature=2.0)
    old = L.forward_kl(s, derived, temperature=2.0, tail_mode="single_atom", reduction="none")
    torch.testing.assert_close(old, bucket_reference("forward_kl", t, s, 3, 2.0, single_atom=True))
    full = make_targets(t, 15)
    L.forward_kl(s, SparseTargets(ids=full.ids, logprobs=full.logprobs), temperature=2.0)  # empty tail: fine


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_single_atom_mode_is_the_old_approximation_and_far_from_exact(kind):
    t, s = make_logits(6, 400, seed=21, scale=3.0)
    targets = make_targets(t, 8)
    old = run_kind(kind, s, targets, 4.0, tail_mode="single_atom")
    torch.testing.assert_close(old, bucket_reference(kind, t, s, 8, 4.0, single_atom=True))
    exact = run_kind(kind, s, targets, 4.0)
    torch.testing.assert_close(exact, bucket_reference(kind, t, s, 8, 4.0))
    assert float((old - exact).abs().max()) > 1e-2  # the defect v2 caches remove
    # student == teacher: the old approximation is not zero, the exact loss is
    assert float(run_kind(kind, t.clone(), targets, 4.0, tail_mode="single_atom").max()) > 1e-3


def test_off_grid_temperature_is_refused_or_interpolated_within_bound():
    from kdcache.tempering import interpolation_bound

    t, s = make_logits(6, 300, seed=22, scale=3.0)
    targets = make_targets(t, 8)
    with pytest.raises(TemperatureNotCached, match="not at T = 2.5"):
        run_kind("forward_kl", s, targets, 2.5)
    got = run_kind("forward_kl", s, targets, 2.5, tail_mode="interpolate")
    ref = bucket_reference("forward_kl", t, s, 8, 2.5)
    n_tail = torch.full((6,), 292.0, dtype=torch.float64)
    bound = interpolation_bound(targets.tail_logmass, targets.tail_grid, TEMPS, 2.5, n_tail)
    assert float(bound.max()) < 0.1
    # a log-partition error of e moves the teacher's tail bucket by at most a factor e^e: the loss stays close
    torch.testing.assert_close(got, ref, atol=0.02, rtol=0.02)


def test_truncation_folds_every_cached_temperature_into_the_tail():
    t, s = make_logits(5, 30, seed=23)
    trunc, direct = L.top_k_truncate(make_targets(t, 12), 5), make_targets(t, 5)
    torch.testing.assert_close(trunc.tail_grid, direct.tail_grid, atol=1e-12, rtol=1e-12)
    assert trunc.tail_temperatures == TEMPS


def test_teacher_confidence_weight():
    t, _ = make_logits(4, 9, seed=17)
    targets = make_targets(t, 3)
    w = L.teacher_confidence_weight(targets)
    torch.testing.assert_close(w.double(), torch.softmax(t, -1).amax(-1), atol=1e-6, rtol=1e-6)
    padded = SparseTargets(
        ids=torch.tensor([[2, -1], [-1, -1]]),
        logprobs=torch.tensor([[-0.5, 9.0], [9.0, 9.0]]),
        counts=torch.tensor([[3, 0], [0, 0]]),
    )
    torch.testing.assert_close(L.teacher_confidence_weight(padded), torch.tensor([math.exp(-0.5), 0.0]))


def test_low_precision_inputs_are_upcast():
    t, s = make_logits(4, 16, seed=18, dtype=torch.float32)
    targets = make_targets(t, 5)
    bf = SparseTargets(targets.ids, targets.logprobs.bfloat16(), targets.tail_logmass.bfloat16())
    x = s.bfloat16().requires_grad_(True)
    loss = L.forward_kl(x, bf)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    ref = L.forward_kl(s.bfloat16().float(), bf)
    torch.testing.assert_close(loss, ref)


def test_weighted_reduction_edge_cases():
    vals = torch.tensor([1.0, float("inf"), 3.0])
    assert L.reduce_positions(vals, torch.tensor([1.0, 0.0, 1.0])) == 2.0
    assert L.reduce_positions(vals, torch.zeros(3)) == 0.0
    assert L.reduce_positions(torch.zeros(0)) == 0.0
    with pytest.raises(ValueError):
        L.reduce_positions(vals, torch.ones(2))


def test_combine_terms_mixes_means_and_skips_zero_coefficients():
    ce_sum, ce_den, kd_sum, kd_den = torch.tensor(6.0), torch.tensor(3.0), torch.tensor(2.0), 4
    total, parts = L.combine_terms(ce_sum, ce_den, kd_sum, kd_den, 0.25)
    assert total.item() == 0.25 * 2.0 + 0.75 * 0.5 and parts == {"ce": 2.0, "kd": 0.5}
    total, parts = L.combine_terms(ce_sum, ce_den, None, None, 1.0)
    assert total.item() == 2.0 and set(parts) == {"ce"}
    total, parts = L.combine_terms(None, None, kd_sum, kd_den, 0.0)
    assert total.item() == 0.5 and set(parts) == {"kd"}
    # chunk sums of numerators and denominators give the mean over all positions
    vals, w = torch.tensor([1.0, 2.0, 4.0, 8.0]), torch.tensor([1.0, 0.0, 0.5, 2.0])
    (n1, d1), (n2, d2) = L.weighted_sum(vals[:2], w[:2]), L.weighted_sum(vals[2:], w[2:])
    torch.testing.assert_close(L.combine_terms(None, None, n1 + n2, d1 + d2, 0.0)[0], L.reduce_positions(vals, w))

def test_config_validation():
    with pytest.raises(ValueError):
        LossConfig(kind="kl")
    with pytest.raises(ValueError):
        LossConfig(temperature=0.0)
    with pytest.raises(ValueError):
        LossConfig(alpha=1.5)
    with pytest.raises(ValueError):
        LossConfig(skew=1.0)
    with pytest.raises(ValueError):
        LossConfig(beta=0.0)
    with pytest.raises(ValueError):
        LossConfig(top_k=0)
    t, s = make_logits(2, 5, seed=19)
    with pytest.raises(ValueError):
        L.kd_loss(LossConfig(kind="sampled_ce"), s, make_targets(t, 2))
    with pytest.raises(ValueError):
        L.distillation_loss(LossConfig(alpha=0.5), s, make_targets(t, 2), None)


def test_kd_loss_dispatches_every_kind_with_its_settings():
    t, s = make_logits(4, 7, seed=23)
    topk, T = make_targets(t, 3), 2.0
    sampled = _sample_targets(t.softmax(-1), 5, torch.Generator().manual_seed(0))
    expected = {
        "forward_kl": L.forward_kl(s, topk, temperature=T),
        "reverse_kl": L.reverse_kl(s, topk, temperature=T),
        "skew_forward_kl": L.skew_forward_kl(s, topk, temperature=T, skew=0.3),
        "skew_reverse_kl": L.skew_reverse_kl(s, topk, temperature=T, skew=0.3),
        "jsd": L.generalized_jsd(s, topk, temperature=T, beta=0.2),
        "tv": L.total_variation(s, topk, temperature=T),
        "topk_forward_kl": L.topk_forward_kl(s, topk, temperature=T),
        "sampled_ce": L.sampled_cross_entropy(s, sampled, temperature=T),
        "uld": L.universal_logit_distillation(s, topk),  # at T = 1 only (tests/test_uld.py)
    }
    assert tuple(expected) == L.LOSS_KINDS
    for kind in L.LOSS_KINDS:
        config = LossConfig(kind=kind, temperature=1.0 if kind == "uld" else T, skew=0.3, beta=0.2)
        got = L.kd_loss(config, s, sampled if kind == "sampled_ce" else topk)
        assert torch.equal(got, expected[kind]), kind
