"""The hard-label cross-entropy and the bucket distillation term from one logits chunk, in one autograd Function.

Computed apart, the CE (``F.cross_entropy``) and the student's (k+1) buckets (:class:`kdcache.train.buckets.
_StudentBuckets`) each make their own vocabulary-wide passes over a chunk of logits ``z`` [n, V], and the CE keeps
its own ``[n, V]`` log-softmax for backward. :class:`_CEAndBuckets` makes them share:

* at T = 1, the logsumexp and the softmax: ``ce = lse - z[label]`` costs one gather, and the backward is one ``exp``
  pass, ``grad_i = e_i * (P_R * (g_ce - G) + g_tail)`` on the tail columns with ``e_i = exp(z_i - lse_tail) <= 1``
  and ``P_R = exp(lse_tail - lse)`` (the student's tail mass), then the k id columns and the label column written
  by scatters;
* at T != 1, the chunk: one more logsumexp pass forward, and one more ``exp`` pass backward (the softmax at T = 1).

Notation of the backward, as in ``_StudentBuckets``: ``g_top`` [n, k] and ``g_tail`` [n] the upstream gradients of
the bucket log-probabilities, ``G = sum(g_top) + g_tail``, ``g_ce`` [n] the upstream gradient of the CE, ``p``
the softmax at T. Nothing ``[n, V]`` is saved but the caller's logits.

:func:`ce_and_kd` is the per-position pair ``(hard_ce, kd_loss)`` with ``reduction="none"``, fused for every
bucket kind (:data:`kdcache.train.buckets.BUCKET_KINDS`) and computed apart for the others.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdcache.config import LossConfig
from kdcache.targets import SparseTargets
from kdcache.train.buckets import (
    _NEG_INF,
    BUCKET_KINDS,
    _check_logits,
    _compute_dtype,
    _valid_ids,
    bucket_divergence,
    teacher_bucket_logprobs,
)
from kdcache.train.losses import hard_ce, kd_loss, prepared_targets, with_unmapped_term

__all__ = ["ce_and_kd", "ce_and_student_buckets"]


class _CEAndBuckets(torch.autograd.Function):
    """``(ce [n], log_p [n, k+1])`` from logits [n, V]: the CE at T = 1 of ``labels`` (0 where ignored) and the
    student's bucket log-probabilities at T, with one hand-written backward (module docstring)."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, keep: Tensor, ids: Tensor, valid: Tensor,
                temperature: float) -> tuple[Tensor, Tensor]:
        dtype = _compute_dtype(logits)
        T = temperature
        same_t = T == 1.0
        zs = torch.div(logits.to(dtype), T)  # always a new tensor: the tail mask below writes into it
        lse = torch.logsumexp(zs, dim=-1)
        z1 = zs if same_t else logits.to(dtype)
        lse1 = lse if same_t else torch.logsumexp(z1, dim=-1)
        ce = torch.where(keep, lse1 - z1.gather(1, labels[:, None]).squeeze(1), torch.zeros_like(lse1))
        del z1
        gathered = zs.gather(1, ids)
        lp_top = torch.where(valid, gathered - lse[:, None], torch.full_like(gathered, _NEG_INF))
        # Padding columns are redirected to column 0's id, so duplicate writes always agree (as in _StudentBuckets).
        ids_safe = torch.where(valid, ids, ids[:, :1])
        valid_safe = valid | valid[:, :1]
        masked = zs.scatter_(1, ids_safe, torch.where(valid_safe, torch.full_like(gathered, _NEG_INF),
                                                      zs.gather(1, ids_safe)))
        lse_tail = torch.logsumexp(masked, dim=-1)
        del zs, masked
        ctx.save_for_backward(logits, labels, keep, ids_safe, valid, valid_safe, lse, lse_tail, lse1)
        ctx.temperature = T
        return ce, torch.cat([lp_top, (lse_tail - lse)[:, None]], dim=1)

    @staticmethod
    def backward(ctx, grad_ce: Tensor | None, grad: Tensor | None):
        logits, labels, keep, ids_safe, valid, valid_safe, lse, lse_tail, lse1 = ctx.saved_tensors
        T = ctx.temperature
        dtype = _compute_dtype(logits)
        n = logits.shape[0]
        g_ce = torch.zeros(n, dtype=dtype, device=logits.device) if grad_ce is None else grad_ce.to(dtype)
        g_ce = torch.where(keep, g_ce, torch.zeros_like(g_ce))
        if grad is None:
            grad = torch.zeros(n, ids_safe.shape[1] + 1, dtype=dtype, device=logits.device)
        grad = grad.to(dtype)
        tail_finite = torch.isfinite(lse_tail)
        g_top = torch.where(valid, grad[:, :-1], torch.zeros_like(grad[:, :-1]))
        g_tail = torch.where(tail_finite, grad[:, -1], torch.zeros_like(grad[:, -1]))
        total = g_top.sum(dim=-1) + g_tail
        # At T = 1 the CE's softmax is the buckets' p: fold g_ce into p's coefficient (the result is not divided).
        g_p = (g_ce - total) if T == 1.0 else -total  # coefficient of p_i
        tail_mass = torch.where(tail_finite, (lse_tail - lse).exp(), torch.zeros_like(lse))
        safe_tail = torch.where(tail_finite, lse_tail, torch.full_like(lse_tail, float("inf")))
        zs = torch.div(logits.to(dtype), T)
        # Tail columns: p_i * g_p + g_tail * p_i / P_R = e_i * (P_R * g_p + g_tail), e_i = exp(zs_i - lse_tail) <= 1.
        p_ids = (zs.gather(1, ids_safe) - lse[:, None]).exp()
        out = zs.sub_(safe_tail[:, None]).exp_().mul_((tail_mass * g_p + g_tail)[:, None])
        # Id columns: p_i * g_p + g_j (written, so that e_i > 1 or inf there never enters).
        out.scatter_(1, ids_safe, torch.where(valid_safe, p_ids * g_p[:, None], out.gather(1, ids_safe)))
        out.scatter_add_(1, ids_safe, g_top)
        if T != 1.0:
            out.div_(T)
            out.add_(logits.to(dtype).sub(lse1[:, None]).exp_().mul_(g_ce[:, None]))
        out.scatter_add_(1, labels[:, None], -g_ce[:, None])
        return out.to(logits.dtype), None, None, None, None, None


def ce_and_student_buckets(student_logits: Tensor, labels: Tensor, targets: SparseTargets, temperature: float = 1.0,
                           ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """``(ce [N], log_p [N, k+1])``: :func:`kdcache.train.losses.hard_ce` (``reduction="none"``; 0 where the label
    is ``ignore_index``) and the student half of :func:`kdcache.train.buckets.bucket_logprobs`, in one pass.

    student_logits: [N, V]; labels: [N] ids (``ignore_index`` = leave out); targets: topk or sample targets [N].
    """
    _check_logits(student_logits, targets)
    if labels.shape != student_logits.shape[:1]:
        raise ValueError(f"labels must be [N] = [{student_logits.shape[0]}], got shape {tuple(labels.shape)}")
    labels = labels.to(device=student_logits.device, dtype=torch.long)
    keep = labels != ignore_index
    ids, valid = _valid_ids(targets, student_logits.device)
    return _CEAndBuckets.apply(student_logits, labels.masked_fill(~keep, 0), keep, ids, valid, float(temperature))


def ce_and_kd(config: LossConfig, student_logits: Tensor, labels: Tensor, targets: SparseTargets,
              ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Per-position ``(ce [N], kd [N])``, equal to ``hard_ce(student_logits, labels, reduction="none")`` and
    ``kd_loss(config, student_logits, targets, reduction="none")``; one fused pass for the bucket kinds."""
    if config.kind not in BUCKET_KINDS:
        return (hard_ce(student_logits, labels, reduction="none", ignore_index=ignore_index),
                kd_loss(config, student_logits, targets, reduction="none"))
    targets = prepared_targets(config, targets)
    T = float(config.temperature)
    ce, log_p = ce_and_student_buckets(student_logits, labels, targets, T, ignore_index)
    log_q = teacher_bucket_logprobs(targets, T, vocab_size=student_logits.shape[1], tail_mode=config.tail_mode,
                                    dtype=log_p.dtype, device=student_logits.device)
    kd = bucket_divergence(config.kind, log_q, log_p, T, skew=config.skew, beta=config.beta)
    return ce, with_unmapped_term(config, kd, student_logits, targets)
