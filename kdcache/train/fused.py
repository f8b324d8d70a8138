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

:class:`_HeadCEAndBuckets` does the same from the hidden states and a plain LM head's weight: it makes the logits
itself and remakes them in backward by one matmul, saving nothing ``[n, V]`` (so the caller needs no activation
checkpoint, which would have run the whole forward, loss passes included, a second time). The logits' gradient is
then ``g``, and the inputs' are ``g @ W`` and ``g.T @ hidden``.

:func:`ce_and_kd` is the per-position pair ``(hard_ce, kd_loss)`` with ``reduction="none"``, fused for every
bucket kind (:data:`kdcache.train.buckets.BUCKET_KINDS`) and computed apart for the others;
:func:`ce_and_kd_from_head` is the same pair from hidden states and a head weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.config import LossConfig
from kdcache.targets import SparseTargets
from kdcache.train.buckets import (
    BUCKET_KINDS,
    _check_logits,
    _compute_dtype,
    _valid_ids,
    bucket_divergence,
    teacher_bucket_logprobs,
    top_and_tail,
)
from kdcache.train.losses import hard_ce, kd_loss, prepared_targets
from kdcache.train.uld import has_unmapped_term, with_unmapped_term

__all__ = ["ce_and_kd", "ce_and_kd_from_head", "ce_and_student_buckets"]


def _forward(logits: Tensor, labels: Tensor, keep: Tensor, ids: Tensor, valid: Tensor,
             T: float) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """``(ce [n], log_p [n, k+1], stats)`` from logits [n, V]; ``stats`` is what :func:`_grad_logits` needs besides
    the logits: ``(ids_safe, valid_safe, lse, lse_tail, lse1)``, nothing wider than [n, k]."""
    dtype = _compute_dtype(logits)
    same_t = T == 1.0
    if ids.shape[1] == 0:  # no targets (the CE alone): one logsumexp, an empty top and the whole mass in the tail
        z1 = logits.to(dtype)
        lse = torch.logsumexp(z1 if same_t else z1 / T, dim=-1)
        lse1 = lse if same_t else torch.logsumexp(z1, dim=-1)
        ce = torch.where(keep, lse1 - z1.gather(1, labels[:, None]).squeeze(1), torch.zeros_like(lse1))
        return ce, torch.zeros(ids.shape[0], 1, dtype=dtype, device=logits.device), (ids, valid, lse, lse, lse1)
    zs = torch.div(logits.to(dtype), T)  # always a new tensor: the tail mask below writes into it
    lse = torch.logsumexp(zs, dim=-1)
    z1 = zs if same_t else logits.to(dtype)
    lse1 = lse if same_t else torch.logsumexp(z1, dim=-1)
    ce = torch.where(keep, lse1 - z1.gather(1, labels[:, None]).squeeze(1), torch.zeros_like(lse1))
    del z1
    lp_top, ids_safe, valid_safe, lse_tail = top_and_tail(zs, lse, ids, valid)
    del zs
    return ce, torch.cat([lp_top, (lse_tail - lse)[:, None]], dim=1), (ids_safe, valid_safe, lse, lse_tail, lse1)


def _grad_logits(logits: Tensor, labels: Tensor, keep: Tensor, valid: Tensor, stats: tuple[Tensor, ...], T: float,
                 grad_ce: Tensor | None, grad: Tensor | None) -> Tensor:
    """The gradient [n, V] (compute dtype) of ``(ce, log_p)`` of :func:`_forward` w.r.t. the logits, given the
    upstream gradients ``grad_ce`` [n] and ``grad`` [n, k+1] (None = zero)."""
    ids_safe, valid_safe, lse, lse_tail, lse1 = stats
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
    return out


class _CEAndBuckets(torch.autograd.Function):
    """``(ce [n], log_p [n, k+1])`` from logits [n, V]: the CE at T = 1 of ``labels`` (0 where ignored) and the
    student's bucket log-probabilities at T, with one hand-written backward (module docstring)."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, keep: Tensor, ids: Tensor, valid: Tensor,
                temperature: float) -> tuple[Tensor, Tensor]:
        ce, log_p, stats = _forward(logits, labels, keep, ids, valid, temperature)
        ctx.save_for_backward(logits, labels, keep, valid, *stats)
        ctx.temperature = temperature
        return ce, log_p

    @staticmethod
    def backward(ctx, grad_ce: Tensor | None, grad: Tensor | None):
        logits, labels, keep, valid, *stats = ctx.saved_tensors
        out = _grad_logits(logits, labels, keep, valid, tuple(stats), ctx.temperature, grad_ce, grad)
        return out.to(logits.dtype), None, None, None, None, None


class _HeadCEAndBuckets(torch.autograd.Function):
    """:class:`_CEAndBuckets` from hidden states [n, H] and a bias-free LM head ``weight`` [V_rows, H] (its first
    ``vocab`` rows): the logits are made in forward, dropped, and remade in backward by one matmul, so neither the
    logits nor a recomputation of the loss passes is needed (under checkpointing the whole chunk's forward ran
    twice). The matmuls run under the forward's autocast state, as ``F.linear`` would."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, vocab: int, labels: Tensor, keep: Tensor, ids: Tensor,
                valid: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        logits = F.linear(hidden, weight[:vocab])
        ce, log_p, stats = _forward(logits, labels, keep, ids, valid, temperature)
        del logits
        ctx.save_for_backward(hidden, weight, labels, keep, valid, *stats)
        ctx.vocab, ctx.temperature = vocab, temperature
        return ce, log_p

    @staticmethod
    def backward(ctx, grad_ce: Tensor | None, grad: Tensor | None):
        hidden, weight, labels, keep, valid, *stats = ctx.saved_tensors
        device, enabled, cast = ctx.autocast
        head = weight[:ctx.vocab]
        with torch.autocast(device, dtype=cast, enabled=enabled):
            logits = F.linear(hidden, head)
        g = _grad_logits(logits, labels, keep, valid, tuple(stats), ctx.temperature, grad_ce, grad).to(logits.dtype)
        del logits
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (g @ head.to(g.dtype)).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight)
            grad_weight[:ctx.vocab] = (g.t() @ hidden.to(g.dtype)).to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def ce_and_student_buckets(student_logits: Tensor, labels: Tensor, targets: SparseTargets, temperature: float = 1.0,
                           ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """``(ce [N], log_p [N, k+1])``: :func:`kdcache.train.losses.hard_ce` (``reduction="none"``; 0 where the label
    is ``ignore_index``) and the student half of :func:`kdcache.train.buckets.bucket_logprobs`, in one pass.

    student_logits: [N, V]; labels: [N] ids (``ignore_index`` = leave out); targets: topk or sample targets [N].
    """
    _check_logits(student_logits, targets)
    labels, keep = _labels_and_keep(labels, student_logits.shape[0], student_logits.device, ignore_index)
    ids, valid = _valid_ids(targets, student_logits.device)
    return _CEAndBuckets.apply(student_logits, labels, keep, ids, valid, float(temperature))


def _labels_and_keep(labels: Tensor | None, n: int, device: torch.device, ignore_index: int) -> tuple[Tensor, Tensor]:
    if labels is None:  # no CE term: every label ignored
        return torch.zeros(n, dtype=torch.long, device=device), torch.zeros(n, dtype=torch.bool, device=device)
    if labels.shape != (n,):
        raise ValueError(f"labels must be [N] = [{n}], got shape {tuple(labels.shape)}")
    labels = labels.to(device=device, dtype=torch.long)
    keep = labels != ignore_index
    return labels.masked_fill(~keep, 0), keep


def ce_and_kd_from_head(config: LossConfig, hidden: Tensor, weight: Tensor, vocab: int, labels: Tensor | None,
                        targets: SparseTargets | None, ignore_index: int = -100) -> tuple[Tensor, Tensor | None]:
    """:func:`ce_and_kd` of the logits ``hidden @ weight[:vocab].T`` without keeping them: hidden [N, H], weight
    [V_rows, H] (a bias-free LM head, ``V_rows >= vocab``), labels [N] or None (CE not needed: returned as zeros),
    targets or None (the CE alone, as a Liger-style fused linear CE: kd returned as None).
    Bucket kinds only (:data:`kdcache.train.buckets.BUCKET_KINDS`)."""
    if config.kind not in BUCKET_KINDS:
        raise ValueError(f"ce_and_kd_from_head needs a bucket loss kind {BUCKET_KINDS}, got {config.kind!r}")
    if has_unmapped_term(config):
        raise ValueError("ce_and_kd_from_head cannot add vocab_map=hybrid's ULD term (it needs the whole logits)")
    if targets is None:  # the CE alone
        if labels is None:
            raise ValueError("ce_and_kd_from_head needs labels, targets or both")
        n = hidden.shape[0]
        labels, keep = _labels_and_keep(labels, n, hidden.device, ignore_index)
        empty = torch.zeros(n, 0, dtype=torch.long, device=hidden.device)
        ce, _ = _HeadCEAndBuckets.apply(hidden, weight, int(vocab), labels, keep, empty, empty.bool(), 1.0)
        return ce, None
    if targets.ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets have {targets.ids.shape[0]} positions but hidden has {hidden.shape[0]}")
    targets = prepared_targets(config, targets)
    T = float(config.temperature)
    labels, keep = _labels_and_keep(labels, hidden.shape[0], hidden.device, ignore_index)
    ids, valid = _valid_ids(targets, hidden.device)
    ce, log_p = _HeadCEAndBuckets.apply(hidden, weight, int(vocab), labels, keep, ids, valid, T)
    return ce, _divergence(config, targets, log_p, vocab, T)


def _divergence(config: LossConfig, targets: SparseTargets, log_p: Tensor, vocab: int, T: float) -> Tensor:
    log_q = teacher_bucket_logprobs(targets, T, vocab_size=vocab, tail_mode=config.tail_mode, dtype=log_p.dtype,
                                    device=log_p.device)
    return bucket_divergence(config.kind, log_q, log_p, T, skew=config.skew, beta=config.beta)


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
    kd = _divergence(config, targets, log_p, student_logits.shape[1], T)
    return ce, with_unmapped_term(config, kd, student_logits, targets)
