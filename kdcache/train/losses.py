"""Distillation losses against a sparsely cached teacher.

The teacher's per-token distribution is cached sparsely (see ``docs/losses.md``
for the full derivation).  Two kinds of target are supported:

``topk`` targets
    ``ids`` int [N, k] (the teacher's top-k token ids), ``logprobs`` float [N, k]
    (the teacher's full-vocabulary log-probabilities at those ids, at T = 1, so
    they do *not* sum to one) and ``tail_logmass`` float [N] (log of the teacher
    probability outside the top-k; ``-inf`` when k = V).

``sample`` targets
    ``ids`` int [N, m] (unique sampled ids, padded with ``-1``), ``counts`` int
    [N, m] (hits out of the S samples, 0 for padding) and ``logprobs`` [N, m]
    (teacher log-probs at the ids; padding entries arbitrary).

All divergences except :func:`topk_forward_kl` and :func:`sampled_cross_entropy`
are computed on the (k+1)-way *bucket* distribution {id_1, ..., id_k, tail}:

* teacher ``q = [exp(logprobs), exp(tail_logmass)]``;
* student ``p = [softmax(z)[ids], 1 - sum softmax(z)[ids]]`` where the student
  tail is computed exactly and stably as ``logsumexp`` of the student's
  log-probabilities with the k ids masked out (not ``log1p(-sum)``).

Temperature T.  The student's bucket log-probs come from ``log_softmax(z / T)``.
The cached teacher log-probs are at T = 1; the teacher's bucket distribution at
temperature T is ``softmax([logprobs / T, tail_logmass / T])`` renormalised over
the k + 1 buckets.  **Approximation:** the tail's internal shape is unknown, so
the tail is treated as a single atom of mass ``tail^(1/T)`` (before
renormalisation).  The true tempered tail mass is ``sum_j q_j^(1/T)`` over the
tail tokens, which is *larger* than ``(sum_j q_j)^(1/T)`` for T > 1 (and smaller
for T < 1).  The approximation is exact at T = 1 and whenever k = V (empty
tail).  The teacher buckets are always renormalised, also at T = 1, so that
rounding in the cached values cannot make ``q`` sum to something other than 1.

The KL-type losses (forward, reverse, skew, JSD, top-k renormalised, sampled)
are multiplied by T^2 (Hinton et al. 2015) so that gradient magnitudes stay
comparable across temperatures; total variation is *not* (it is a bounded
distance in [0, 1]).

Every loss function returns the per-position values with ``reduction="none"``
and otherwise their (optionally weighted) mean over positions:
``sum_i w_i * l_i / sum_i w_i`` (a plain mean when ``weights`` is ``None``;
0 when there are no positions or all weights are 0).

All maths is in log space.  Empty buckets (``-inf`` log-mass, e.g. the tail when
k = V, or ``-1`` padding) follow the ``0 * log 0 = 0`` convention and produce
neither NaN values nor NaN gradients.  Half / bfloat16 inputs are upcast to
float32; float64 inputs are kept in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.config import LOSS_KINDS, LossConfig
from kdcache.targets import SparseTargets

__all__ = [
    "LOSS_KINDS",
    "LossConfig",
    "bucket_logprobs",
    "combine_terms",
    "distillation_loss",
    "forward_kl",
    "generalized_jsd",
    "hard_ce",
    "kd_loss",
    "label_weights",
    "reduce_positions",
    "reverse_kl",
    "sampled_cross_entropy",
    "skew_forward_kl",
    "skew_reverse_kl",
    "teacher_confidence_weight",
    "top_k_truncate",
    "topk_forward_kl",
    "total_variation",
    "weighted_sum",
]

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------
# Numerics helpers
# --------------------------------------------------------------------------------------


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _logsumexp(x: Tensor, dim: int = -1) -> Tensor:
    """``logsumexp`` whose value *and gradient* are safe when every input is -inf.

    ``torch.logsumexp`` returns -inf there but back-propagates NaN
    (``exp(-inf - -inf)``); here the result is -inf with a zero gradient.
    """
    m = x.detach().amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m).sum(dim=dim)
    nonempty = s > 0
    out = torch.log(torch.where(nonempty, s, torch.ones_like(s))) + m.squeeze(dim)
    return torch.where(nonempty, out, torch.full_like(out, _NEG_INF))


def _kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Element-wise ``a * (log a - log b)`` with ``0 * log 0 = 0`` (value and gradient)."""
    empty = torch.isneginf(log_a)
    la = log_a.masked_fill(empty, 0.0)
    lb = log_b.masked_fill(empty, 0.0)
    return torch.where(empty, torch.zeros_like(la), la.exp() * (la - lb))


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``KL(a || b)`` over the last dimension, from log-probabilities."""
    return _kl_terms(log_a, log_b).sum(dim=-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """``log(w * a + (1 - w) * b)``, stable, with w in [0, 1]."""
    lw = math.log(w) if w > 0 else _NEG_INF
    l1w = math.log1p(-w) if w < 1 else _NEG_INF
    return _logsumexp(torch.stack([log_a + lw, log_b + l1w], dim=0), dim=0)


def weighted_sum(values: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor | int]:
    """``(numerator, denominator)`` of the mean of per-position ``values`` [N]: ``(sum(v), max(N, 1))``, or with
    ``weights`` [N] (>= 0) ``(sum(w*v), sum(w))`` (the latter floored at the dtype's tiny).

    Positions with weight 0 contribute nothing (not even NaN from an infinite
    value).  Weights are not checked for negativity (that would force a device
    sync every step).  Summing numerators and denominators over chunks gives the
    mean over all positions (see :func:`combine_terms`).
    """
    if weights is None:
        return values.sum(), max(values.numel(), 1)
    if weights.shape != values.shape:
        raise ValueError(f"weights shape {tuple(weights.shape)} != per-position shape {tuple(values.shape)}")
    w = weights.to(dtype=values.dtype, device=values.device)
    num = torch.where(w > 0, w * values, torch.zeros_like(values)).sum()
    return num, w.sum().clamp_min(torch.finfo(values.dtype).tiny)


def reduce_positions(values: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean of per-position ``values`` [N]; with ``weights`` [N] (>= 0): ``sum(w*v) / sum(w)``.

    Returns 0 when N = 0 or all weights are 0 (see :func:`weighted_sum`).
    """
    num, den = weighted_sum(values, weights)
    return num / den


def _reduce(values: Tensor, weights: Tensor | None, reduction: str) -> Tensor:
    if reduction == "none":
        return values
    if reduction == "mean":
        return reduce_positions(values, weights)
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _check_logits(student_logits: Tensor, targets: SparseTargets | None = None) -> None:
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got shape {tuple(student_logits.shape)}")
    if targets is not None and targets.ids.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"targets have {targets.ids.shape[0]} positions but student_logits has {student_logits.shape[0]}"
        )


# --------------------------------------------------------------------------------------
# Targets helpers
# --------------------------------------------------------------------------------------


def _valid_ids(targets: SparseTargets, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """(ids clamped to >= 0 for gathering, validity mask) on ``device``; padding = id < 0 or count 0."""
    ids = targets.ids.to(device=device, dtype=torch.long)
    valid = ids >= 0
    if targets.counts is not None:
        valid = valid & (targets.counts.to(device) > 0)
    return ids.clamp_min(0), valid


def _derived_tail(logprobs: Tensor, valid: Tensor, vocab_size: int) -> Tensor:
    """``log(1 - sum exp(logprobs))`` for targets cached without a tail.

    Rows that cover the whole vocabulary get -inf.  Other rows get a mass floored
    at the dtype's epsilon: below that the difference is rounding noise, and a
    spurious -inf tail would make reverse KL infinite.
    """
    lp = logprobs.masked_fill(~valid, _NEG_INF)
    lse = _logsumexp(lp, dim=-1).clamp_max(0.0)
    mass = -torch.expm1(lse)  # 1 - sum, accurate when the sum is small
    eps = torch.finfo(lp.dtype).eps
    full = valid.sum(dim=-1) >= vocab_size
    tail = torch.log(mass.clamp_min(eps))
    return torch.where(full, torch.full_like(tail, _NEG_INF), tail)


def top_k_truncate(targets: SparseTargets, k: int) -> SparseTargets:
    """Keep the first ``k`` cached entries of topk targets, folding the rest into the tail.

    The new tail is ``logsumexp([tail_logmass, logprobs[:, k:]])`` (exact).  With
    ``tail_logmass=None`` the tail stays ``None`` (it is derived later from the
    kept entries, which is the same quantity).  ``k`` larger than the cached k is
    an error; ``k`` equal to it returns ``targets`` unchanged.
    """
    if targets.is_sampled:
        raise ValueError("top_k truncation applies to topk targets, not sampled ones")
    kc = targets.ids.shape[1]
    if k < 1 or k > kc:
        raise ValueError(f"top_k={k} but the cache holds k={kc} entries per position; use 1 <= top_k <= {kc}")
    if k == kc:
        return targets
    tail = targets.tail_logmass
    if tail is not None:
        dropped = targets.logprobs[:, k:]
        dtype = torch.promote_types(dropped.dtype, tail.dtype)
        dropped = dropped.to(dtype).masked_fill(targets.ids[:, k:] < 0, _NEG_INF)
        tail = _logsumexp(torch.cat([tail.to(dtype)[:, None], dropped], dim=1), dim=-1)
    return SparseTargets(ids=targets.ids[:, :k], logprobs=targets.logprobs[:, :k], tail_logmass=tail)


def teacher_confidence_weight(targets: SparseTargets) -> Tensor:
    """Per-position confidence weight ``exp(max_i logprobs_i)`` in [0, 1], shape [N].

    This is the teacher's top-1 probability (at T = 1).  Pass it (or multiply it
    into your own weights) as ``weights=`` to down-weight positions where the
    teacher itself is unsure, so that distillation concentrates on tokens the
    teacher "knows".  It is a heuristic, not part of any divergence, and carries
    no gradient.  Padding entries are ignored; rows with no valid entry get 0.
    """
    _, valid = _valid_ids(targets)
    lp = targets.logprobs.detach().float().masked_fill(~valid, _NEG_INF)
    if lp.shape[1] == 0:
        return torch.zeros(lp.shape[0], dtype=lp.dtype, device=lp.device)
    return lp.amax(dim=-1).exp()


# --------------------------------------------------------------------------------------
# Bucket distributions
# --------------------------------------------------------------------------------------


class _StudentBuckets(torch.autograd.Function):
    """Student (k+1)-bucket log-probabilities from logits, with a hand-written backward.

    Autograd through log_softmax + gather + masked logsumexp keeps several [N, V] tensors alive and makes about ten
    passes over them; this keeps none (the logits are the caller's) and makes about four. Gradient w.r.t. the
    tempered logits zs = z / T, with p = softmax(zs), g the upstream gradient, G = sum(g) and tail set R:
    d/dzs_i = -G p_i + g_tail p_i / P_R for i in R, plus g_j where i = ids_j.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, valid: Tensor, temperature: float) -> Tensor:
        dtype = _compute_dtype(logits)
        zs = logits.to(dtype) / temperature
        lse = torch.logsumexp(zs, dim=-1)
        gathered = zs.gather(1, ids)
        lp_top = torch.where(valid, gathered - lse[:, None], torch.full_like(gathered, _NEG_INF))
        # Padding columns are redirected to column 0's id, so duplicate writes always agree.
        ids_safe = torch.where(valid, ids, ids[:, :1])
        valid_safe = valid | valid[:, :1]
        masked = zs.scatter_(1, ids_safe, torch.where(valid_safe, torch.full_like(gathered, _NEG_INF),
                                                      zs.gather(1, ids_safe)))
        lse_tail = torch.logsumexp(masked, dim=-1)
        del zs, masked
        ctx.save_for_backward(logits, ids_safe, valid, valid_safe, lse, lse_tail)
        ctx.temperature = temperature
        return torch.cat([lp_top, (lse_tail - lse)[:, None]], dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, ids_safe, valid, valid_safe, lse, lse_tail = ctx.saved_tensors
        T = ctx.temperature
        dtype = _compute_dtype(logits)
        grad = grad.to(dtype)
        tail_finite = torch.isfinite(lse_tail)
        g_top = torch.where(valid, grad[:, :-1], torch.zeros_like(grad[:, :-1]))
        g_tail = torch.where(tail_finite, grad[:, -1], torch.zeros_like(grad[:, -1]))
        total = g_top.sum(dim=-1) + g_tail
        zs = logits.to(dtype) / T
        # p_i / P_R = exp(zs_i - lse_tail) <= 1 on the tail, where it is used; id columns are overwritten below.
        safe_tail = torch.where(tail_finite, lse_tail, torch.full_like(lse_tail, float("inf")))
        tail_term = (zs - safe_tail[:, None]).exp_().mul_(g_tail[:, None])
        tail_term.scatter_(1, ids_safe, torch.where(valid_safe, torch.zeros_like(g_top),
                                                    tail_term.gather(1, ids_safe)))
        out = zs.sub_(lse[:, None]).exp_().mul_(-total[:, None]).add_(tail_term)
        del tail_term
        out.scatter_add_(1, ids_safe, g_top)
        return out.div_(T).to(logits.dtype), None, None, None


def bucket_logprobs(
    student_logits: Tensor, targets: SparseTargets, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The (k+1)-bucket log-distributions ``(log_q, log_p)``, each [N, k+1].

    Column j < k is token ``ids[:, j]``, column k the tail ("everything else").
    Padding columns (id -1) are -inf on both sides.

    * student: ``log_p[:, j] = log_softmax(z / T)[ids[:, j]]`` and
      ``log_p[:, k] = logsumexp(log_softmax(z / T)`` with the ids masked out ``)``;
    * teacher: ``log_q = log_softmax([logprobs / T, tail_logmass / T])`` over the
      k + 1 buckets (tail treated as a single atom, exact at T = 1 or k = V).
    """
    _check_logits(student_logits, targets)
    n, vocab = student_logits.shape
    dtype = _compute_dtype(student_logits)
    T = float(temperature)
    ids, valid = _valid_ids(targets, student_logits.device)

    # Student (hand-written backward: see _StudentBuckets).
    log_p = _StudentBuckets.apply(student_logits, ids, valid, T)
    z = log_p  # device and dtype reference for the teacher side

    # Teacher.
    t_lp = targets.logprobs.detach().to(dtype=dtype, device=z.device).masked_fill(~valid, _NEG_INF)
    if targets.tail_logmass is not None:
        t_tail = targets.tail_logmass.detach().to(dtype=dtype, device=z.device)
    else:
        t_tail = _derived_tail(t_lp, valid, vocab)
    t = torch.cat([t_lp, t_tail[:, None]], dim=1) / T
    norm = _logsumexp(t, dim=-1)
    norm = torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))
    log_q = t - norm[:, None]
    return log_q, log_p


def _renormalised_topk_logprobs(
    student_logits: Tensor, targets: SparseTargets, temperature: float
) -> tuple[Tensor, Tensor]:
    """Teacher and student log-distributions renormalised over the k ids only (no tail)."""
    _check_logits(student_logits, targets)
    dtype = _compute_dtype(student_logits)
    T = float(temperature)
    ids, valid = _valid_ids(targets, student_logits.device)
    z = student_logits.to(dtype).gather(1, ids) / T
    z = z.masked_fill(~valid, _NEG_INF)
    log_p = z - _logsumexp(z, dim=-1)[:, None]
    t = targets.logprobs.detach().to(dtype=dtype, device=z.device).masked_fill(~valid, _NEG_INF) / T
    norm = _logsumexp(t, dim=-1)
    norm = torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))
    log_q = t - norm[:, None]
    # Rows with no valid id: make the student row -inf too (the KL term is then 0).
    log_p = torch.where(torch.isfinite(log_p), log_p, torch.full_like(log_p, _NEG_INF))
    return log_q, log_p


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------


def forward_kl(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Forward KL (Hinton): ``T^2 * KL(q || p) = T^2 * sum_b q_b (log q_b - log p_b)`` over k+1 buckets."""
    log_q, log_p = bucket_logprobs(student_logits, targets, temperature)
    return _reduce(temperature**2 * _kl(log_q, log_p), weights, reduction)


def reverse_kl(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Reverse KL (MiniLLM): ``T^2 * KL(p || q) = T^2 * sum_b p_b (log p_b - log q_b)`` over k+1 buckets.

    Infinite if the student puts mass on a bucket the teacher gives exactly 0
    (e.g. a finite student tail against a cached tail of -inf with k < V).
    """
    log_q, log_p = bucket_logprobs(student_logits, targets, temperature)
    return _reduce(temperature**2 * _kl(log_p, log_q), weights, reduction)


def skew_forward_kl(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    skew: float = 0.1,
    temperature: float = 1.0,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Skew forward KL (DistiLLM, Ko et al. ICML 2024): ``T^2 * KL(q || a q + (1 - a) p)``.

    ``a = skew`` in [0, 1); a = 0 is exactly :func:`forward_kl`.
    """
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew must be in [0, 1), got {skew}")
    log_q, log_p = bucket_logprobs(student_logits, targets, temperature)
    log_m = log_p if skew == 0 else _log_mixture(log_q, log_p, skew)
    return _reduce(temperature**2 * _kl(log_q, log_m), weights, reduction)


def skew_reverse_kl(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    skew: float = 0.1,
    temperature: float = 1.0,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Skew reverse KL (DistiLLM): ``T^2 * KL(p || a p + (1 - a) q)``; a = 0 is exactly :func:`reverse_kl`."""
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew must be in [0, 1), got {skew}")
    log_q, log_p = bucket_logprobs(student_logits, targets, temperature)
    log_m = log_q if skew == 0 else _log_mixture(log_p, log_q, skew)
    return _reduce(temperature**2 * _kl(log_p, log_m), weights, reduction)


def generalized_jsd(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Generalised Jensen-Shannon divergence, times T^2.

    Convention (the same as TRL's GKD ``generalized_jsd_loss``): beta weights the
    *teacher*::

        m   = beta * q + (1 - beta) * p
        JSD = beta * KL(q || m) + (1 - beta) * KL(p || m)

    beta = 0.5 is the ordinary JSD (bounded by log 2).  beta must be in (0, 1);
    the endpoints make the divergence identically 0.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    log_q, log_p = bucket_logprobs(student_logits, targets, temperature)
    log_m = _log_mixture(log_q, log_p, beta)
    jsd = beta * _kl(log_q, log_m) + (1.0 - beta) * _kl(log_p, log_m)
    return _reduce(temperature**2 * jsd, weights, reduction)


def total_variation(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Total variation distance ``0.5 * sum_b |q_b - p_b|`` over k+1 buckets (in [0, 1]; no T^2 factor)."""
    log_q, log_p = bucket_logprobs(student_logits, targets, temperature)
    tv = 0.5 * (log_q.exp() - log_p.exp()).abs().sum(dim=-1)
    return _reduce(tv, weights, reduction)


def topk_forward_kl(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Top-k-renormalised forward KL, times T^2 (what most tools do; kept for comparison).

    Teacher ``q'`` = softmax(logprobs / T) over the k ids, student ``p'`` =
    softmax(z[ids] / T) over the same ids; returns ``T^2 * KL(q' || p')``.  The
    tail is ignored, so the student is never told how much mass lies outside the
    top-k: this is biased towards over-confident students (see docs/losses.md).
    """
    log_q, log_p = _renormalised_topk_logprobs(student_logits, targets, temperature)
    return _reduce(temperature**2 * _kl(log_q, log_p), weights, reduction)


def sampled_cross_entropy(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Unbiased sampled estimator for ``sample`` targets, times T^2.

    With ``S_n = sum_i counts[n, i]`` samples at position n, the teacher estimate is
    ``q_hat(i) = counts_i / S_n`` and the loss is::

        T^2 * ( - sum_i q_hat(i) * log_softmax(z / T)[ids_i] )

    Since ``E[q_hat(i)] = q(i)``, this is an unbiased estimate of the cross-entropy
    ``H(q, p) = KL(q || p) + H(q)``, i.e. of forward KL up to the teacher-entropy
    constant (so its value is not 0 when student == teacher, but its gradient is
    unbiased for the forward-KL gradient).  The cached ``logprobs`` are not used.

    Temperature: the samples were drawn at the cache-time sampling temperature
    (normally 1) and cannot be re-tempered, so ``q`` is that distribution whatever
    ``temperature`` says; ``temperature`` only divides the student logits (and
    applies the T^2 factor).  Set it equal to the cache's sampling temperature
    (1 for a default cache) to get a Hinton-style match at that temperature.
    Positions with no samples contribute 0.
    """
    if targets.counts is None:
        raise ValueError("sampled_cross_entropy needs sample targets (SparseTargets.counts is None)")
    _check_logits(student_logits, targets)
    dtype = _compute_dtype(student_logits)
    T = float(temperature)
    ids, valid = _valid_ids(targets, student_logits.device)
    z = student_logits.to(dtype) / T
    log_p = z.gather(1, ids) - _logsumexp(z, dim=-1)[:, None]
    counts = targets.counts.to(dtype=dtype, device=z.device).masked_fill(~valid, 0.0)
    s = counts.sum(dim=-1)
    weighted = torch.where(valid, counts * log_p, torch.zeros_like(log_p)).sum(dim=-1)
    ce = -weighted / s.clamp_min(1.0)
    return _reduce(T**2 * ce, weights, reduction)


def hard_ce(
    student_logits: Tensor,
    labels: Tensor,
    *,
    weights: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> Tensor:
    """Cross-entropy of the student (at T = 1) on the target tokens ``labels`` [N].

    Positions whose label is ``ignore_index`` get 0 and are left out of the mean.
    """
    _check_logits(student_logits)
    if labels.shape != student_logits.shape[:1]:
        raise ValueError(f"labels must be [N] = [{student_logits.shape[0]}], got shape {tuple(labels.shape)}")
    dtype = _compute_dtype(student_logits)
    labels = labels.long()
    ce = F.cross_entropy(student_logits.to(dtype), labels, reduction="none", ignore_index=ignore_index)
    if reduction == "none":
        return ce
    return _reduce(ce, label_weights(labels, weights, dtype, ignore_index), reduction)


def label_weights(labels: Tensor, weights: Tensor | None, dtype: torch.dtype, ignore_index: int = -100) -> Tensor:
    """Per-position weights [N] of the cross-entropy term: 0 where ``labels`` is ``ignore_index``, else ``weights``
    (1 when ``None``), in ``dtype``."""
    keep = (labels != ignore_index).to(dtype)
    return keep if weights is None else keep * weights.to(dtype)


# One entry per name in LOSS_KINDS: the function, and the LossConfig fields it takes besides the temperature.
_KD_FUNCS = {
    "forward_kl": (forward_kl, ()),
    "reverse_kl": (reverse_kl, ()),
    "skew_forward_kl": (skew_forward_kl, ("skew",)),
    "skew_reverse_kl": (skew_reverse_kl, ("skew",)),
    "jsd": (generalized_jsd, ("beta",)),
    "tv": (total_variation, ()),
    "topk_forward_kl": (topk_forward_kl, ()),
    "sampled_ce": (sampled_cross_entropy, ()),
}
if tuple(_KD_FUNCS) != LOSS_KINDS:
    raise ImportError(f"losses.py implements {tuple(_KD_FUNCS)} but config.LOSS_KINDS names {LOSS_KINDS}")


def kd_loss(
    config: LossConfig,
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """The distillation term selected by ``config.kind`` (with ``config.top_k`` truncation applied)."""
    if config.kind == "sampled_ce":
        if not targets.is_sampled:
            raise ValueError("kind 'sampled_ce' needs sample targets (with counts); these are topk targets")
    elif config.top_k is not None:
        targets = top_k_truncate(targets, config.top_k)
    func, fields = _KD_FUNCS[config.kind]
    settings = {name: getattr(config, name) for name in fields}
    return func(student_logits, targets, temperature=config.temperature, weights=weights, reduction=reduction,
                **settings)


def combine_terms(
    ce_sum: Tensor | None,
    ce_den: Tensor | int | None,
    kd_sum: Tensor | None,
    kd_den: Tensor | int | None,
    alpha: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``total = alpha * ce_sum / ce_den + (1 - alpha) * kd_sum / kd_den``: the hard/soft mix, written once.

    Each term is a weighted mean given as (numerator, denominator) from :func:`weighted_sum`, over one chunk or
    summed over chunks.  A term whose coefficient is 0 is skipped (its sums may be ``None``), and a coefficient of 1
    multiplies nothing, so alpha = 1 is exactly the CE mean and alpha = 0 exactly the KD mean.

    Returns ``(total, parts)`` with ``parts`` holding detached ``"ce"`` / ``"kd"`` means for the terms computed.
    """
    parts: dict[str, Tensor] = {}
    total: Tensor | None = None
    if alpha > 0:
        ce = ce_sum / ce_den
        parts["ce"] = ce.detach()
        total = ce if alpha == 1 else alpha * ce
    if alpha < 1:
        kd = kd_sum / kd_den
        parts["kd"] = kd.detach()
        kd_term = kd if alpha == 0 else (1.0 - alpha) * kd
        total = kd_term if total is None else total + kd_term
    assert total is not None
    return total, parts


def distillation_loss(
    config: LossConfig,
    student_logits: Tensor,
    targets: SparseTargets | None,
    labels: Tensor | None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``total = alpha * CE(labels) + (1 - alpha) * KD(config.kind)`` for one chunk.

    ``weights`` [N] (optional) weight positions in both terms (weighted mean, see
    :func:`reduce_positions`); CE additionally skips labels equal to -100.  KD is
    not masked by labels: ``targets`` are assumed to cover exactly the positions
    to distil.  A term whose coefficient is 0 is not computed (so alpha = 1 needs
    no targets and gives exactly :func:`hard_ce`; alpha = 0 needs no labels).

    Returns ``(total, parts)`` with ``parts`` holding detached ``"ce"`` / ``"kd"``
    scalars for the terms that were computed.
    """
    ce_sum = ce_den = kd_sum = kd_den = None
    if config.alpha > 0:
        if labels is None:
            raise ValueError(f"alpha={config.alpha} > 0 needs labels for the cross-entropy term")
        ce = hard_ce(student_logits, labels, reduction="none")
        ce_sum, ce_den = weighted_sum(ce, label_weights(labels.long(), weights, ce.dtype))
    if config.alpha < 1:
        if targets is None:
            raise ValueError(f"alpha={config.alpha} < 1 needs teacher targets for the distillation term")
        kd_sum, kd_den = weighted_sum(kd_loss(config, student_logits, targets, reduction="none"), weights)
    return combine_terms(ce_sum, ce_den, kd_sum, kd_den, config.alpha)
