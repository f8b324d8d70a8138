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

from kdcache.config import LossConfig
from kdcache.targets import SparseTargets
from kdcache.train.buckets import _check_logits, _compute_dtype

__all__ = ["has_unmapped_term", "universal_logit_distillation", "unmapped_uld", "with_unmapped_term"]


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
    probs = torch.softmax(student_logits.to(dtype), dim=-1)
    values = _ranked_l1(probs, teacher, valid.sum(dim=-1, keepdim=True), tail, probs.sum(dim=-1))
    return _reduce(values, weights, reduction)


def _ranked_l1(probs: Tensor, teacher: Tensor, count: Tensor, teacher_rest: Tensor, student_total: Tensor) -> Tensor:
    """``sum_{r <= m} |p_(r) - q_(r)| + |(student_total - sum_{r <= m} p_(r)) - teacher_rest|`` per row [N].

    probs: [N, V] the student's probabilities (entries to leave out already 0); teacher: [N, k] sorted decreasing
    (0 past the row's m = ``count`` [N, 1] real entries); teacher_rest, student_total: [N]."""
    k = teacher.shape[1]
    top = probs.topk(min(k, probs.shape[1]), dim=-1).values
    if top.shape[1] < k:  # a student vocabulary smaller than k: its missing ranks are 0
        top = torch.nn.functional.pad(top, (0, k - top.shape[1]))
    # A row with m < k real entries compares its first m ranks; the rest join the remainder bucket.
    ranked = torch.arange(k, device=probs.device)[None, :] < count
    top = torch.where(ranked, top, torch.zeros((), dtype=top.dtype, device=top.device))
    rest = (student_total - top.sum(dim=-1)).clamp_min(0.0)
    return (top - teacher).abs().sum(dim=-1) + (rest - teacher_rest).abs()


def unmapped_uld(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """The ULD half of the GOLD hybrid (:mod:`kdcache.train.vocabmap`): the teacher's entries with no student
    counterpart against the student's probabilities outside the row's mapped ids, as sorted vectors.

    student_logits: [N, V_s]; targets: mapped targets [N, k] (student ids, :data:`~kdcache.train.vocabmap.UNMAPPED`
    for the unmapped entries, ``-1`` padding) whose ``tail_logmass`` holds the tail *and* the unmapped mass (what
    :func:`~kdcache.train.vocabmap.map_rows` gives; ``None``: derived). With u the m unmapped probabilities sorted,
    r_q = tail - sum(u) the teacher's remainder, p' the student's probabilities with the row's mapped ids zeroed and
    sorted, r_p = sum(p') - sum_{r <= m} p'_(r)::

        sum_{r <= m} |p'_(r) - u_(r)| + |r_p - r_q|

    With the whole teacher vocabulary cached (k = V_t, tail 0) the mapped ids are every mapped token and this is
    GOLD's unmatched term ``sum |sort(p[unmatched]) - sort(q[unmatched])|`` (zero-padded). Returns [N] or the mean.
    """
    from kdcache.train.losses import _reduce
    from kdcache.train.vocabmap import UNMAPPED

    _check_logits(student_logits, targets)
    dtype = _compute_dtype(student_logits)
    device = student_logits.device
    ids = targets.ids.to(device)
    zero = torch.zeros((), dtype=dtype, device=device)
    q = targets.logprobs.to(device=device, dtype=dtype).exp()
    unmapped = ids == UNMAPPED
    teacher = torch.where(unmapped, q, zero).sort(dim=-1, descending=True).values  # [N, k]
    if targets.tail_logmass is not None:
        rest_q = targets.tail_logmass.to(device=device, dtype=dtype).exp()
    else:
        rest_q = (1.0 - torch.where(ids >= 0, q, zero).sum(dim=-1)).clamp_min(0.0)
    rest_q = (rest_q - teacher.sum(dim=-1)).clamp_min(0.0)
    probs = torch.softmax(student_logits.to(dtype), dim=-1)
    vocab = probs.shape[1]
    mapped = torch.zeros(probs.shape[0], vocab + 1, dtype=torch.bool, device=device)
    mapped.scatter_(1, torch.where(ids >= 0, ids, vocab).long(), True)  # padding and unmapped -> the spare column
    kept = probs.masked_fill(mapped[:, :vocab], 0.0)
    values = _ranked_l1(kept, teacher, unmapped.sum(dim=-1, keepdim=True), rest_q, kept.sum(dim=-1))
    return _reduce(values, weights, reduction)


def has_unmapped_term(config: LossConfig) -> bool:
    """Whether :func:`with_unmapped_term` adds a term, which needs the student's whole logits."""
    return config.vocab_map == "hybrid" and config.unmapped_weight != 0


def with_unmapped_term(config: LossConfig, values: Tensor, student_logits: Tensor, targets: SparseTargets) -> Tensor:
    """``values`` [N] (the mapped entries' divergence) plus, with ``vocab_map=hybrid``, ``unmapped_weight`` times the
    ULD of the unmapped entries (:func:`kdcache.train.uld.unmapped_uld`; TRL GOLD's hybrid loss)."""
    if not has_unmapped_term(config):
        return values
    return values + config.unmapped_weight * unmapped_uld(student_logits, targets, reduction="none").to(values.dtype)
