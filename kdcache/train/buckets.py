"""The (k+1)-bucket distributions of teacher and student that every sparse divergence compares.

A topk target row holds the teacher's top-k ids, their T = 1 log-probabilities ``logprobs`` (which do not sum to
one) and ``tail_logmass``, the exact log-mass outside the top-k (``-inf`` when k = V); a cache of format v2 also
holds ``tail_grid``, the tail's log-partition at a grid of temperatures (:mod:`kdcache.tempering`). Over the
buckets {id_1, ..., id_k, tail}:

* student: ``log_p = [log_softmax(z / T)[ids], logsumexp(log_softmax(z / T) with the ids masked out)]``, the
  tail exact and stable (not ``log1p(-sum)``), with a hand-written backward (:class:`_StudentBuckets`);
* teacher at temperature T: ``log_q = log_softmax([logprobs / T, tau(1 / T)])`` where ``tau(1/T) = log sum over
  the tail tokens of q_v^(1/T)`` is read from the cache at T (exact), interpolated between cached temperatures
  (bounded error), or, on request only, tempered as one atom ``tail_logmass / T`` (the pre-v2 approximation,
  wrong at T != 1 when k < V). At T = 1 or k = V every mode is exact. The teacher buckets are always
  renormalised, so rounding in the cached values cannot make ``q`` sum to something other than 1.

All maths is in log space; empty buckets (``-inf``: the tail when k = V, ``-1`` padding) follow ``0 * log 0 = 0``
and produce neither NaN values nor NaN gradients. Half / bfloat16 inputs are upcast to float32; float64 is kept.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdcache.targets import SparseTargets
from kdcache.tempering import tail_at_temperature

__all__ = [
    "BUCKET_KINDS",
    "bucket_divergence",
    "bucket_logprobs",
    "renormalised_topk_logprobs",
    "teacher_bucket_logprobs",
    "teacher_confidence_weight",
    "top_k_truncate",
]

_NEG_INF = float("-inf")




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
    tail, grid = targets.tail_logmass, targets.tail_grid
    if tail is not None:  # the dropped entries join the tail, at T = 1 and at every cached temperature
        dropped = targets.logprobs[:, k:]
        dtype = torch.promote_types(dropped.dtype, tail.dtype)
        dropped = dropped.to(dtype).masked_fill(targets.ids[:, k:] < 0, _NEG_INF)
        tail = _logsumexp(torch.cat([tail.to(dtype)[:, None], dropped], dim=1), dim=-1)
        if grid is not None:
            grid = torch.stack([_logsumexp(torch.cat([grid[:, j].to(dtype)[:, None], dropped / t], dim=1), dim=-1)
                                for j, t in enumerate(targets.tail_temperatures)], dim=1).to(grid.dtype)
    return SparseTargets(ids=targets.ids[:, :k], logprobs=targets.logprobs[:, :k], tail_logmass=tail,
                         tail_grid=grid, tail_temperatures=targets.tail_temperatures if grid is not None else ())


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


def top_and_tail(zs: Tensor, lse: Tensor, ids: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The student's top-k log-probabilities and tail from tempered logits ``zs`` [n, V] (a tensor the caller gives
    up: the ids' columns are overwritten with -inf) and their logsumexp ``lse`` [n]: ``(lp_top [n, k] (-inf at
    padding), ids_safe, valid_safe, lse_tail [n])``. Padding columns are redirected to column 0's id
    (``ids_safe``, ``valid_safe``), so duplicate writes always agree."""
    gathered = zs.gather(1, ids)
    lp_top = torch.where(valid, gathered - lse[:, None], torch.full_like(gathered, _NEG_INF))
    ids_safe = torch.where(valid, ids, ids[:, :1])
    valid_safe = valid | valid[:, :1]
    masked = zs.scatter_(1, ids_safe, torch.where(valid_safe, torch.full_like(gathered, _NEG_INF),
                                                  zs.gather(1, ids_safe)))
    return lp_top, ids_safe, valid_safe, torch.logsumexp(masked, dim=-1)


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
        lp_top, ids_safe, valid_safe, lse_tail = top_and_tail(zs, lse, ids, valid)
        del zs
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


#: Kinds computed on the (k+1) buckets (:func:`bucket_logprobs`), so they share the student's softmax with the CE.
BUCKET_KINDS: tuple[str, ...] = ("forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "tv")


def bucket_divergence(kind: str, log_q: Tensor, log_p: Tensor, temperature: float, *, skew: float = 0.1,
                      beta: float = 0.5) -> Tensor:
    """Per-position divergence ``kind`` (one of :data:`BUCKET_KINDS`) [N] between the teacher's and the student's
    bucket log-distributions ``log_q``, ``log_p`` [N, k+1], times T^2 except for ``tv``. The formulas are the ones
    each kind's function documents; ``skew`` / ``beta`` are not range-checked here (the functions check them)."""
    if kind == "forward_kl":
        return temperature**2 * _kl(log_q, log_p)
    if kind == "reverse_kl":
        return temperature**2 * _kl(log_p, log_q)
    if kind == "skew_forward_kl":
        return temperature**2 * _kl(log_q, log_p if skew == 0 else _log_mixture(log_q, log_p, skew))
    if kind == "skew_reverse_kl":
        return temperature**2 * _kl(log_p, log_q if skew == 0 else _log_mixture(log_p, log_q, skew))
    if kind == "jsd":
        log_m = _log_mixture(log_q, log_p, beta)
        return temperature**2 * (beta * _kl(log_q, log_m) + (1.0 - beta) * _kl(log_p, log_m))
    if kind == "tv":
        return 0.5 * (log_q.exp() - log_p.exp()).abs().sum(dim=-1)
    raise ValueError(f"kind must be one of {', '.join(BUCKET_KINDS)}, got {kind!r}")


def teacher_bucket_logprobs(
    targets: SparseTargets,
    temperature: float = 1.0,
    *,
    vocab_size: int,
    tail_mode: str = "exact",
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor:
    """The teacher's (k+1)-bucket log-distribution at ``temperature``: [N, k+1], no gradient.

    ``log_q = log_softmax([logprobs / T, tau(1 / T)])`` where ``tau`` is the tail's log-partition at T, taken from
    the targets as ``tail_mode`` says (:func:`kdcache.tempering.tail_at_temperature`; ``exact`` raises
    :class:`kdcache.tempering.TemperatureNotCached` at a temperature the cache does not hold). Targets without a
    cached tail use ``log(1 - sum exp(logprobs))`` (floored at the dtype's epsilon), which is exact only at T = 1.
    Padding columns (id -1) are -inf. ``vocab_size`` is the number of tokens the teacher's distribution covers.
    """
    T = float(temperature)
    _, valid = _valid_ids(targets, device)
    t_lp = targets.logprobs.detach().to(dtype=dtype, device=device).masked_fill(~valid, _NEG_INF)
    grid = None
    if targets.tail_logmass is not None:
        tail = targets.tail_logmass.detach().to(dtype=dtype, device=device)
        if targets.tail_grid is not None:
            grid = targets.tail_grid.detach().to(dtype=dtype, device=device)
    else:
        tail = _derived_tail(t_lp, valid, vocab_size)
    tau = tail_at_temperature(tail, grid, targets.tail_temperatures if grid is not None else (), T, mode=tail_mode,
                              num_tail_tokens=vocab_size - valid.sum(dim=-1))
    t = torch.cat([t_lp / T, tau[:, None]], dim=1)
    norm = _logsumexp(t, dim=-1)
    norm = torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))
    return t - norm[:, None]


def bucket_logprobs(
    student_logits: Tensor, targets: SparseTargets, temperature: float = 1.0, tail_mode: str = "exact"
) -> tuple[Tensor, Tensor]:
    """The (k+1)-bucket log-distributions ``(log_q, log_p)``, each [N, k+1].

    Column j < k is token ``ids[:, j]``, column k the tail ("everything else").
    Padding columns (id -1) are -inf on both sides.

    * student: ``log_p[:, j] = log_softmax(z / T)[ids[:, j]]`` and
      ``log_p[:, k] = logsumexp(log_softmax(z / T)`` with the ids masked out ``)``;
    * teacher: :func:`teacher_bucket_logprobs` at T with ``tail_mode`` (the student's vocabulary, ``z``'s
      columns, is the teacher's).
    """
    _check_logits(student_logits, targets)
    dtype = _compute_dtype(student_logits)
    T = float(temperature)
    ids, valid = _valid_ids(targets, student_logits.device)
    log_q = teacher_bucket_logprobs(targets, T, vocab_size=student_logits.shape[1], tail_mode=tail_mode,
                                    dtype=dtype, device=student_logits.device)
    log_p = _StudentBuckets.apply(student_logits, ids, valid, T)  # hand-written backward: see _StudentBuckets
    return log_q, log_p


def renormalised_topk_logprobs(
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
