"""A chunk's loss sums from the hidden states and a *frozen* plain LM head, with the gradient made in forward.

:class:`kdcache.train.fused._HeadCEAndBuckets` returns the per-position ``(ce, log_p)`` and learns the upstream
gradient only in backward, so it must remake the chunk's logits there (one more head matmul) and make its
vocabulary-wide ``exp`` passes again. When the head is frozen (LoRA students, the common case) and the chunk's
output is the pair of weighted sums ``[ce_sum, kd_sum]`` that :func:`kdcache.train.losses.combine_terms` mixes
with known coefficients, the gradient's direction is known in forward, as in Liger's fused linear losses:

* the logits ``z = hidden @ W[:V].T`` are made once, and every pass runs in their buffer: one ``exp`` pass makes
  ``E = exp(z / T - m)`` (``m`` the row max), whose sums give the logsumexp at T; at T != 1 the CE's softmax at
  T = 1 is ``E ** T`` (at T = 2 its sum is a squared norm and the gradient term is made a block of rows at a time,
  so no second [n, V] buffer; other T keep one); the tail's sum is ``E``'s with the id columns zeroed (summed,
  never subtracted, so a small tail keeps its relative precision);
* the divergence and the weighted sums on ``[n, k+1]`` run under autograd to give the upstream gradients of
  ``ce`` [n] and ``log_p`` [n, k+1] for the mix ``c = d total / d [ce_sum, kd_sum]`` (``combine_terms``, written
  once), and the logits' gradient is written into ``E`` in place: ``E_i * (g_p / S + g_tail / S_tail)`` on the
  tail, then the id and label columns (the notation of :mod:`kdcache.train.fused`);
* ``d hidden = g @ W[:V]`` is made in forward and saved ([n, H]); backward scales it by the upstream gradient,
  which must be proportional to ``c`` (checked).

So a distillation chunk costs two head matmuls (the same as a fine-tuning step's) and one ``exp`` pass (plus a ``pow``
at T other than 1 and 2). Rows whose tail underflows in ``E`` (a tail mass below 2**-60 of the row's top entry, or
non-finite logits) are recomputed by the exact passes of :mod:`kdcache.train.fused`. With float16 matmuls each row of
``g`` is scaled to L1 norm 2**10 before the cast, so no gradient underflows for want of the loss scaler's factor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.config import LossConfig
from kdcache.targets import SparseTargets
from kdcache.train.buckets import _compute_dtype, _valid_ids
from kdcache.train.fused import _divergence, _forward, _grad_logits, _labels_and_keep
from kdcache.train.losses import combine_terms, prepared_targets, term_sums

__all__ = ["frozen_head_sums", "mix_coefficients"]

_TINY_TAIL = 2.0 ** -60  # tail sums (relative to the row's top entry) below this take the exact passes


def mix_coefficients(alpha: float, ce_den: Tensor | None, kd_den: Tensor | None, dtype: torch.dtype,
                     device: torch.device) -> Tensor:
    """``c`` [2] = d total / d [ce_sum, kd_sum] of :func:`kdcache.train.losses.combine_terms` (the mix, written
    there once), for the global denominators of one batch."""
    sums = torch.zeros(2, dtype=dtype, device=device, requires_grad=True)
    with torch.enable_grad():
        total, _ = combine_terms(sums[0], ce_den, sums[1], kd_den, alpha)
        (c,) = torch.autograd.grad(total, sums)
    return c


_BLOCK = 2 ** 22  # elements of the row blocks that make the gradient's E ** 2 term at T = 2 without an [n, V] buffer


class _Passes:
    """The vocabulary-wide passes over one chunk's logits [n, V] (module docstring), made in the logits' own buffer:
    the forward statistics, then :meth:`grad` writes the logits' gradient into it. ``make(rows)`` makes the logits
    of ``rows`` (None: all), again for the rows the fast passes cannot serve (``slow``); ``mm_dtype`` is theirs."""

    def __init__(self, make: Callable[[Tensor | None], Tensor], labels: Tensor, keep: Tensor, ids: Tensor,
                 valid: Tensor, T: float):
        logits = make(None)
        self.mm_dtype, dtype = logits.dtype, _compute_dtype(logits)
        e = logits.to(dtype)  # the logits' own buffer when already in the compute dtype: written from here on
        del logits
        self.T, self.labels, self.keep, self.valid = T, labels, keep, valid
        z_label = e.gather(1, labels[:, None]).squeeze(1)
        if T != 1.0:
            e.div_(T)  # zs = z / T
        m = e.amax(dim=-1)
        finite = torch.isfinite(m)
        m = torch.where(finite, m, torch.zeros_like(m))
        self.k = k = ids.shape[1]
        if k:
            self.ids = torch.where(valid, ids, ids[:, :1])  # padding redirected to column 0's id, as top_and_tail
            self.valid_safe = valid | valid[:, :1]
            zs_ids = e.gather(1, self.ids)
        e.sub_(m[:, None]).exp_()  # E = exp(zs - m), each row's top entry 1
        s_all = e.sum(dim=-1)
        self.lse = m + s_all.log()
        self.e1 = None
        if T == 1.0:
            lse1 = self.lse
        else:  # the softmax at T = 1: exp(z - T m) = E ** T, relative to the row's max
            if T == 2.0:  # made again block by block in grad()
                self.s1 = torch.linalg.vector_norm(e, dim=-1).square()
            else:
                self.e1 = e.pow(T)
                self.s1 = self.e1.sum(dim=-1)
            lse1 = T * m + self.s1.log()
        if k:
            e.scatter_(1, self.ids, torch.where(self.valid_safe, torch.zeros_like(zs_ids), e.gather(1, self.ids)))
            s_tail = e.sum(dim=-1)
        else:
            s_tail = s_all
        self.e, self.s_all, self.s_tail = e, s_all, s_tail
        self.fast = finite & (s_tail >= _TINY_TAIL)
        s_tail = torch.where(self.fast, s_tail, torch.ones_like(s_tail))
        lp_tail = (m + s_tail.log() - self.lse)[:, None]
        self.ce = torch.where(keep, lse1 - z_label, torch.zeros_like(lse1))
        if k:
            self.p_ids = (zs_ids - self.lse[:, None]).exp()  # at the safe ids, so duplicate writes agree
            self.p1_ids = None if T == 1.0 else (zs_ids * T - lse1[:, None]).exp()
            lp_top = torch.where(valid, zs_ids - self.lse[:, None], torch.full_like(zs_ids, float("-inf")))
            self.log_p = torch.cat([lp_top, lp_tail], dim=1)
        else:
            self.log_p = lp_tail
        self.slow = (~self.fast).nonzero().squeeze(1)
        if self.slow.numel():  # the exact passes for the rows the fast ones cannot serve
            self.slow_logits = make(self.slow).to(dtype)
            self.slow_stats = _forward(self.slow_logits, labels[self.slow], keep[self.slow], ids[self.slow],
                                       valid[self.slow], T)
            self.ce[self.slow] = self.slow_stats[0]
            self.log_p[self.slow] = self.slow_stats[1]

    def grad(self, g_ce: Tensor, g_lp: Tensor) -> Tensor:
        """The gradient [n, V] w.r.t. the logits of ``sum(g_ce * ce) + sum(g_lp * log_p)``, written into ``E``."""
        T, k, e = self.T, self.k, self.e
        g_ce = torch.where(self.keep, g_ce, torch.zeros_like(g_ce))
        g_top = torch.where(self.valid, g_lp[:, :-1], torch.zeros_like(g_lp[:, :-1])) if k else None
        g_tail = g_lp[:, -1]
        total = g_tail if g_top is None else g_top.sum(dim=-1) + g_tail
        g_p = (g_ce - total) if T == 1.0 else -total  # coefficient of p_i (at T = 1 the CE's softmax is p)
        s_tail = torch.where(self.fast, self.s_tail, torch.ones_like(self.s_tail))
        # tail columns (E is 0 on the ids): E_i (g_p / S + g_tail / S_R) / T, plus g_ce p1_i at T != 1
        coef = ((g_p / self.s_all + g_tail / s_tail) / T)[:, None]
        if T == 2.0:  # p1_i = E_i ** 2 / S1: E_i (coef + c E_i), a block of rows at a time
            c = (g_ce / self.s1)[:, None]
            step = max(1, _BLOCK // max(1, e.shape[1]))
            for r in range(0, e.shape[0], step):
                block = e[r : r + step]
                block.mul_(torch.addcmul(coef[r : r + step], c[r : r + step], block))
            out = e
        else:
            out = e.mul_(coef)
            if self.e1 is not None:
                out.add_(self.e1.mul_((g_ce / self.s1)[:, None]))
        if k:  # id columns, written: (p_j g_p) / T + g_ce p1_j, then + g_top_j / T
            written = self.p_ids * (g_p / T)[:, None]
            if self.p1_ids is not None:
                written = written + self.p1_ids * g_ce[:, None]
            out.scatter_(1, self.ids, torch.where(self.valid_safe, written, out.gather(1, self.ids)))
            out.scatter_add_(1, self.ids, g_top / T)
        out.scatter_add_(1, self.labels[:, None], -g_ce[:, None])
        if self.slow.numel():
            out[self.slow] = _grad_logits(self.slow_logits, self.labels[self.slow], self.keep[self.slow],
                                          self.valid[self.slow], tuple(self.slow_stats[2]), T, g_ce[self.slow],
                                          g_lp[self.slow])
        return out


def _maker(hidden: Tensor, head: Tensor) -> Callable[[Tensor | None], Tensor]:
    """The logits ``hidden @ head.T`` of some rows (None: all), as :class:`_Passes` takes them."""
    return lambda rows: F.linear(hidden if rows is None else hidden[rows], head)


def _hidden_grad(g: Tensor, head: Tensor, mm_dtype: torch.dtype) -> Tensor:
    """``g @ head`` in ``mm_dtype`` (the logits' dtype); float16 rows are scaled to L1 norm 2**10 first."""
    if mm_dtype != torch.float16:
        return g.to(mm_dtype) @ head.to(mm_dtype)
    scale = g.abs().sum(dim=-1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny) / 1024.0
    return (g.div_(scale).to(mm_dtype) @ head.to(mm_dtype)).to(scale.dtype) * scale


class _FrozenHeadSums(torch.autograd.Function):
    """``[ce_sum, kd_sum]`` of one chunk from hidden [n, H] and a frozen head; the gradient w.r.t. the hidden states
    is made in forward for the mix ``c`` and scaled in backward (module docstring)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, head: Tensor, labels: Tensor, keep: Tensor, ids: Tensor, valid: Tensor,
                temperature: float, mix: Tensor, sums_fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        passes = _Passes(_maker(hidden, head), labels, keep, ids, valid, temperature)
        with torch.enable_grad():
            ce = passes.ce.detach().requires_grad_(True)
            log_p = passes.log_p.detach().requires_grad_(True)
            sums = sums_fn(ce, log_p)
            g_ce, g_lp = torch.autograd.grad((sums * mix).sum(), (ce, log_p), allow_unused=True,
                                             materialize_grads=True)
        g, mm_dtype = passes.grad(g_ce, g_lp), passes.mm_dtype
        del passes
        ctx.save_for_backward(_hidden_grad(g, head, mm_dtype), mix)
        ctx.hidden_dtype = hidden.dtype
        return sums.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_hidden, mix = ctx.saved_tensors
        grad = grad.to(mix.dtype)
        scale = (grad * mix).sum() / (mix * mix).sum()
        off = (grad - scale * mix).abs().max() > 1e-5 * grad.abs().max()
        if off.device.type == "cpu":
            if off:
                raise RuntimeError(f"the fused head's sums got the upstream gradient {grad.tolist()}, not a multiple "
                                   f"of the mix {mix.tolist()} they were made for: mix them with combine_terms")
        else:
            torch._assert_async(~off)
        return (grad_hidden * scale.to(grad_hidden.dtype)).to(ctx.hidden_dtype), *([None] * 8)


def frozen_head_sums(config: LossConfig, hidden: Tensor, weight: Tensor, vocab: int, labels: Tensor | None,
                     targets: SparseTargets | None, ce_weights: Tensor | None, kd_weights: Tensor | None,
                     mix: Tensor, ignore_index: int = -100) -> Tensor:
    """``[ce_sum, kd_sum]`` (``mix``'s dtype) of the logits ``hidden @ weight[:vocab].T``: the weighted sums of the
    CE (labels [N] or None: 0) and of ``config``'s bucket divergence (targets [N] or None: 0), as
    :func:`kdcache.train.objective` sums them, for a frozen bias-free head ``weight`` [V_rows, H].

    ``mix`` [2] is :func:`mix_coefficients` for the batch: the sums must reach the loss only through that mix (the
    gradient w.r.t. ``hidden`` is made for it in forward; backward checks it). Without grad, the values alone.
    """
    if weight.requires_grad:
        raise ValueError("frozen_head_sums needs a frozen head (weight.requires_grad False); use ce_and_kd_from_head")
    n, device = hidden.shape[0], hidden.device
    labels, keep = _labels_and_keep(labels, n, device, ignore_index)
    T = float(config.temperature) if targets is not None else 1.0
    if targets is not None:
        targets = prepared_targets(config, targets)
        ids, valid = _valid_ids(targets, device)
    else:
        ids = torch.zeros(n, 0, dtype=torch.long, device=device)
        valid = ids.bool()
    dtype = mix.dtype

    def sums_fn(ce: Tensor, log_p: Tensor) -> Tensor:
        kd = None if targets is None else _divergence(config, targets, log_p, vocab, T)
        return term_sums(ce if ce_weights is not None else None, ce_weights, kd, kd_weights, dtype)

    head = weight[:vocab]
    if not (torch.is_grad_enabled() and hidden.requires_grad):
        passes = _Passes(_maker(hidden, head), labels, keep, ids, valid, T)
        return sums_fn(passes.ce, passes.log_p)
    return _FrozenHeadSums.apply(hidden, head, labels, keep, ids, valid, T, mix, sums_fn)
