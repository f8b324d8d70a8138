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
are computed on the (k+1)-way *bucket* distribution {id_1, ..., id_k, tail}
(:func:`kdcache.train.buckets.bucket_logprobs`).

Temperature T: both sides are tempered over the buckets as :mod:`kdcache.train.buckets` describes; the
teacher's tail at T comes from the cache (exact at the cached temperatures, see ``LossConfig.tail_mode``).

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

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.config import LOSS_KINDS, LossConfig
from kdcache.targets import SparseTargets
from kdcache.train.buckets import (
    BUCKET_KINDS,
    _check_logits,
    _compute_dtype,
    _kl,
    _logsumexp,
    _valid_ids,
    bucket_divergence,
    bucket_logprobs,
    renormalised_topk_logprobs,
    teacher_confidence_weight,
    top_k_truncate,
)
from kdcache.train.uld import universal_logit_distillation, with_unmapped_term

__all__ = [
    "BUCKET_KINDS",
    "LOSS_KINDS",
    "LossConfig",
    "REVERSE_KINDS",
    "bucket_divergence",
    "bucket_logprobs",
    "combine_terms",
    "distillation_loss",
    "forward_kl",
    "generalized_jsd",
    "hard_ce",
    "kd_loss",
    "term_sums",
    "label_weights",
    "prepared_targets",
    "reduce_positions",
    "reverse_kl",
    "sampled_cross_entropy",
    "skew_forward_kl",
    "skew_reverse_kl",
    "teacher_confidence_weight",
    "top_k_truncate",
    "topk_forward_kl",
    "total_variation",
    "universal_logit_distillation",
    "weighted_sum",
    "with_unmapped_term",
]


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


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------


def forward_kl(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    tail_mode: str = "exact",
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Forward KL (Hinton): ``T^2 * KL(q || p) = T^2 * sum_b q_b (log q_b - log p_b)`` over k+1 buckets."""
    log_q, log_p = bucket_logprobs(student_logits, targets, temperature, tail_mode)
    return _reduce(bucket_divergence("forward_kl", log_q, log_p, temperature), weights, reduction)


def reverse_kl(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    tail_mode: str = "exact",
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Reverse KL (MiniLLM): ``T^2 * KL(p || q) = T^2 * sum_b p_b (log p_b - log q_b)`` over k+1 buckets.

    Infinite if the student puts mass on a bucket the teacher gives exactly 0
    (e.g. a finite student tail against a cached tail of -inf with k < V).
    """
    log_q, log_p = bucket_logprobs(student_logits, targets, temperature, tail_mode)
    return _reduce(bucket_divergence("reverse_kl", log_q, log_p, temperature), weights, reduction)


def skew_forward_kl(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    skew: float = 0.1,
    temperature: float = 1.0,
    tail_mode: str = "exact",
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Skew forward KL (DistiLLM, Ko et al. ICML 2024): ``T^2 * KL(q || a q + (1 - a) p)``.

    ``a = skew`` in [0, 1); a = 0 is exactly :func:`forward_kl`.
    """
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew must be in [0, 1), got {skew}")
    log_q, log_p = bucket_logprobs(student_logits, targets, temperature, tail_mode)
    return _reduce(bucket_divergence("skew_forward_kl", log_q, log_p, temperature, skew=skew), weights, reduction)


def skew_reverse_kl(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    skew: float = 0.1,
    temperature: float = 1.0,
    tail_mode: str = "exact",
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Skew reverse KL (DistiLLM): ``T^2 * KL(p || a p + (1 - a) q)``; a = 0 is exactly :func:`reverse_kl`."""
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew must be in [0, 1), got {skew}")
    log_q, log_p = bucket_logprobs(student_logits, targets, temperature, tail_mode)
    return _reduce(bucket_divergence("skew_reverse_kl", log_q, log_p, temperature, skew=skew), weights, reduction)


def generalized_jsd(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    tail_mode: str = "exact",
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
    log_q, log_p = bucket_logprobs(student_logits, targets, temperature, tail_mode)
    return _reduce(bucket_divergence("jsd", log_q, log_p, temperature, beta=beta), weights, reduction)


def total_variation(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    tail_mode: str = "exact",
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Total variation distance ``0.5 * sum_b |q_b - p_b|`` over k+1 buckets (in [0, 1]; no T^2 factor)."""
    log_q, log_p = bucket_logprobs(student_logits, targets, temperature, tail_mode)
    return _reduce(bucket_divergence("tv", log_q, log_p, temperature), weights, reduction)


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
    log_q, log_p = renormalised_topk_logprobs(student_logits, targets, temperature)
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
    "forward_kl": (forward_kl, ("tail_mode",)),
    "reverse_kl": (reverse_kl, ("tail_mode",)),
    "skew_forward_kl": (skew_forward_kl, ("skew", "tail_mode")),
    "skew_reverse_kl": (skew_reverse_kl, ("skew", "tail_mode")),
    "jsd": (generalized_jsd, ("beta", "tail_mode")),
    "tv": (total_variation, ("tail_mode",)),
    "topk_forward_kl": (topk_forward_kl, ()),
    "sampled_ce": (sampled_cross_entropy, ()),
    "uld": (universal_logit_distillation, ()),  # kdcache.train.uld: another tokenizer (no vocabulary mapping)
}
#: Kinds that weigh the teacher's tail by the student's tail mass, so a derived tail makes them wrong.
REVERSE_KINDS: tuple[str, ...] = ("reverse_kl", "skew_reverse_kl")
if tuple(_KD_FUNCS) != LOSS_KINDS:
    raise ImportError(f"losses.py implements {tuple(_KD_FUNCS)} but config.LOSS_KINDS names {LOSS_KINDS}")


def prepared_targets(config: LossConfig, targets: SparseTargets) -> SparseTargets:
    """``targets`` checked against ``config.kind`` and cut to ``config.top_k`` (what :func:`kd_loss` computes on)."""
    if config.kind in REVERSE_KINDS and targets.tail_logmass is None:
        raise ValueError(f"kind '{config.kind}' needs targets with the teacher's tail (tail_logmass); these have "
                         "none, so the tail would be derived as 1 - sum(top-k) and the loss wrong by up to many "
                         "nats. Use a topk cache built with its tail, or kind forward_kl / jsd")
    if config.kind == "sampled_ce":
        if not targets.is_sampled:
            raise ValueError("kind 'sampled_ce' needs sample targets (with counts); these are topk targets")
    elif config.top_k is not None:
        targets = top_k_truncate(targets, config.top_k)
    return targets


def kd_loss(
    config: LossConfig,
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """The distillation term selected by ``config.kind`` (with ``config.top_k`` truncation applied).

    Reverse KLs need the teacher's tail: on targets without one (``tail_logmass=None``: sample targets, or topk
    targets given without a tail) they are refused, since a tail derived as ``1 - sum(top-k)`` is rounding noise
    for a confident teacher and reverse KL weighs it by the student's tail mass (errors of 1 to 20 nats).
    """
    targets = prepared_targets(config, targets)
    func, fields = _KD_FUNCS[config.kind]
    settings = {name: getattr(config, name) for name in fields}
    if config.vocab_map != "hybrid" or config.unmapped_weight == 0:
        return func(student_logits, targets, temperature=config.temperature, weights=weights, reduction=reduction,
                    **settings)
    values = func(student_logits, targets, temperature=config.temperature, reduction="none", **settings)
    return _reduce(with_unmapped_term(config, values, student_logits, targets), weights, reduction)


def term_sums(ce: Tensor | None, ce_weights: Tensor | None, kd: Tensor | None, kd_weights: Tensor | None,
              dtype: torch.dtype) -> Tensor:
    """``[ce_sum, kd_sum]`` (``dtype``): the :func:`weighted_sum` numerators of per-position ``ce`` and ``kd`` [N],
    0 for a term given as None (at least one is given); what each chunk of the chunked loss adds up before
    :func:`combine_terms` mixes the sums over all chunks."""
    given = ce if ce is not None else kd
    zero = given.new_zeros((), dtype=dtype)
    return torch.stack([zero if values is None else weighted_sum(values, weights)[0].to(dtype)
                        for values, weights in ((ce, ce_weights), (kd, kd_weights))])


def combine_terms(
    ce_sum: Tensor | None,
    ce_den: Tensor | int | None,
    kd_sum: Tensor | None,
    kd_den: Tensor | int | None,
    alpha: float,
    *,
    hidden_sum: Tensor | None = None,
    hidden_den: Tensor | int | None = None,
    hidden_weight: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``total = alpha * ce_sum / ce_den + (1 - alpha) * kd_sum / kd_den [+ hidden_weight * hidden_sum / hidden_den]``:
    the hard/soft mix, plus the hidden-state term (Gemma's CE + KL + beta * MSE), written once.

    Each term is a weighted mean given as (numerator, denominator) from :func:`weighted_sum`, over one chunk or
    summed over chunks.  A term whose coefficient is 0 is skipped (its sums may be ``None``), and a coefficient of 1
    multiplies nothing, so alpha = 1 is exactly the CE mean and alpha = 0 exactly the KD mean.

    Returns ``(total, parts)`` with ``parts`` holding detached ``"ce"`` / ``"kd"`` / ``"hidden"`` means for the terms
    computed.
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
    if hidden_weight > 0:
        hidden = hidden_sum / hidden_den
        parts["hidden"] = hidden.detach()
        total = total + hidden_weight * hidden
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
