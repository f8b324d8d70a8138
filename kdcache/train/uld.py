"""Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
Distillation Loss for LLMs", arXiv:2402.12030) against a sparsely cached teacher.

ULD compares the two distributions as sorted probability vectors, so it needs no mapping between the teacher's and
the student's vocabularies: with both vectors sorted in decreasing order and padded with zeros to one length, the
Wasserstein-1 distance under a uniform transport cost has the closed form ``sum_r |q_(r) - p_(r)|``.

The cache holds the teacher's top-k probabilities and its tail mass, not the order of its tail. Here the first k
ranks are compared one by one and everything past rank k as one bucket on each side::

    ULD_k = sum_{r <= k} |p_(r) - q_(r)|  +  |(1 - sum_{r <= k} p_(r)) - tail_q|

with p the student, q the teacher. It equals the dense ULD when the cache holds the whole vocabulary (k = V, tail
0) and is a lower bound of it otherwise (the triangle inequality on the ranks past k). No T^2 factor: like total
variation it is a bounded distance (in [0, 2]).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdcache.targets import SparseTargets
from kdcache.train.buckets import _check_logits, _compute_dtype

__all__ = ["universal_logit_distillation"]


def universal_logit_distillation(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """ULD between the student's softmax over its own vocabulary and the teacher's cached top-k and tail.

    student_logits: [N, V_s] (any V_s, not the teacher's vocabulary); targets: topk targets [N, k] whose ids only mark
    padding (``-1``: a row with m real entries compares m ranks); ``tail_logmass`` [N] (``None``: derived as ``1 - sum(top-k)``). Returns [N] (``reduction="none"``)
    or the (weighted) mean. ``temperature`` must be 1: the sorted teacher vector is known at T = 1 only.
    """
    from kdcache.train.losses import _reduce

    _check_logits(student_logits, targets)
    if targets.is_sampled:
        raise ValueError("universal_logit_distillation needs topk targets (probabilities), not sample counts")
    if abs(float(temperature) - 1.0) > 1e-6:
        raise ValueError(f"universal_logit_distillation compares distributions at T = 1, got temperature={temperature}")
    dtype = _compute_dtype(student_logits)
    device = student_logits.device
    valid = targets.ids.to(device) >= 0
    teacher = torch.where(valid, targets.logprobs.to(device=device, dtype=dtype).exp(),
                          torch.zeros((), dtype=dtype, device=device))
    teacher = teacher.sort(dim=-1, descending=True).values  # [N, k]
    if targets.tail_logmass is not None:
        tail = targets.tail_logmass.to(device=device, dtype=dtype).exp()
    else:
        tail = (1.0 - teacher.sum(dim=-1)).clamp_min(0.0)
    k = teacher.shape[1]
    probs = torch.softmax(student_logits.to(dtype), dim=-1)
    top = probs.topk(min(k, probs.shape[1]), dim=-1).values
    if top.shape[1] < k:  # a student vocabulary smaller than k: its missing ranks are 0
        top = torch.nn.functional.pad(top, (0, k - top.shape[1]))
    # A row with m < k real entries (``-1`` padding) compares its first m ranks; the rest join the tail bucket.
    ranked = torch.arange(k, device=device)[None, :] < valid.sum(dim=-1, keepdim=True)
    top = torch.where(ranked, top, torch.zeros((), dtype=dtype, device=device))
    rest = (probs.sum(dim=-1) - top.sum(dim=-1)).clamp_min(0.0)
    values = (top - teacher).abs().sum(dim=-1) + (rest - tail).abs()
    return _reduce(values, weights, reduction)
