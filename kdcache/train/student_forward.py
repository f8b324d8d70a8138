"""The student's distillation loss without full logits: hidden states at target positions, LM head chunk by chunk.

A plain forward pass materialises ``[B, L, V]`` logits (for a 150k-token vocabulary and 8k tokens that is 4.9 GB in
float32, before softmax intermediates and their gradients). Here only the ``N`` hidden states that predict target
tokens are projected, ``chunk_size`` rows at a time, and each chunk runs under activation checkpointing, so its
logits are freed right after its loss terms are summed and recomputed one chunk at a time in backward. Peak memory of
the head/loss part is a small multiple of ``chunk_size x V`` in forward and in backward.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kdcache.modeling import output_logits, target_hidden_states
from kdcache.targets import SparseTargets
from kdcache.train.losses import LossConfig, hard_ce, kd_loss

__all__ = ["chunked_distillation_loss"]


def chunked_distillation_loss(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    target_mask: Tensor,
    targets: SparseTargets | None,
    labels: Tensor | None,
    loss_config: LossConfig,
    chunk_size: int = 1024,
    *,
    vocab_size: int | None = None,
    weights: Tensor | None = None,
    checkpoint_chunks: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``alpha * CE(labels) + (1 - alpha) * KD`` over all target positions, equal to
    :func:`kdcache.train.losses.distillation_loss` on the gathered full logits, without ever building them.

    input_ids, attention_mask, target_mask: [B, L] (right padding); targets: [N] rows in row-major order of
    ``target_mask`` (as :class:`kdcache.train.loader.CacheBatch` has them); labels: [N] target token ids (``None``:
    taken from ``input_ids`` at the target positions; -100 = leave out of CE).
    vocab_size: the tokenizer's vocabulary size (the cache's ``manifest['tokenizer']['vocab_size']``); logit columns
        past it (embedding padding rows, e.g. 151,936 rows for 151,665 tokens) are dropped before the softmax.
        ``None`` keeps every row of the LM head.
    weights: optional [N] per-position weights (weighted means, as in ``distillation_loss``).
    checkpoint_chunks: recompute each chunk's logits in backward (set False only to trade memory for speed).

    Normalisation is global, not per chunk: each term is ``sum_i w_i l_i / sum_i w_i`` over all N positions (CE also
    skipping labels of -100). Returns ``(loss, parts)`` with detached ``"ce"`` / ``"kd"`` for the computed terms.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    alpha = loss_config.alpha
    use_ce, use_kd = alpha > 0, alpha < 1
    rows_in_head = model.get_output_embeddings().weight.shape[0]
    if vocab_size is not None and not 0 < vocab_size <= rows_in_head:
        raise ValueError(f"vocab_size={vocab_size} but the student's LM head has {rows_in_head} rows")

    selected = target_hidden_states(model, input_ids, attention_mask, target_mask)
    n = selected.shape[0]
    device = selected.device
    if use_kd:
        if targets is None:
            raise ValueError(f"alpha={alpha} < 1 needs teacher targets for the distillation term")
        if targets.ids.shape[0] != n:
            raise ValueError(f"targets have {targets.ids.shape[0]} rows but target_mask marks {n} positions")
    if use_ce and labels is None:
        rows, cols = target_mask.nonzero(as_tuple=True)
        labels = input_ids[rows, cols]
    if use_ce and labels.shape != (n,):
        raise ValueError(f"labels must be [N] = [{n}], got shape {tuple(labels.shape)}")
    if weights is not None and weights.shape != (n,):
        raise ValueError(f"weights must be [N] = [{n}], got shape {tuple(weights.shape)}")

    head_dtype = model.get_output_embeddings().weight.dtype
    dtype = torch.float64 if head_dtype == torch.float64 else torch.float32  # the losses' compute dtype

    # Global denominators (no gradient), exactly as reduce_positions / hard_ce compute them.
    w = None if weights is None else weights.detach().to(device=device, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    ce_w = kd_den = ce_den = None
    if use_ce:
        labels = labels.to(device=device, dtype=torch.long)
        ce_w = (labels != -100).to(dtype)
        if w is not None:
            ce_w = ce_w * w
        ce_den = ce_w.sum().clamp_min(tiny)
    if use_kd:
        kd_den = torch.tensor(float(max(n, 1)), dtype=dtype, device=device) if w is None else w.sum().clamp_min(tiny)
        targets = targets.to(device)

    def chunk_sums(h, chunk_targets, chunk_labels, chunk_ce_w, chunk_kd_w):
        logits = output_logits(model, h)
        if vocab_size is not None and vocab_size < logits.shape[-1]:
            logits = logits[:, :vocab_size]
        zero = logits.new_zeros((), dtype=dtype)
        ce_sum = kd_sum = zero
        if use_ce:
            ce = hard_ce(logits, chunk_labels, reduction="none")
            ce_sum = torch.where(chunk_ce_w > 0, chunk_ce_w * ce, torch.zeros_like(ce)).sum()
        if use_kd:
            kd = kd_loss(loss_config, logits, chunk_targets, reduction="none")
            if chunk_kd_w is None:
                kd_sum = kd.sum()
            else:
                kd_sum = torch.where(chunk_kd_w > 0, chunk_kd_w * kd, torch.zeros_like(kd)).sum()
        return torch.stack([ce_sum.to(dtype), kd_sum.to(dtype)])

    def part(x: Tensor | None, s: slice) -> Tensor | None:
        return None if x is None else x[s]

    sums = selected.sum() * 0.0  # keeps the graph connected when there are no targets
    sums = sums.to(dtype).expand(2)
    recompute = checkpoint_chunks and torch.is_grad_enabled() and selected.requires_grad
    for start in range(0, n, chunk_size):
        s = slice(start, min(start + chunk_size, n))
        args = (
            selected[s],
            targets[s] if use_kd else None,
            part(labels, s) if use_ce else None,
            part(ce_w, s),
            part(w, s),
        )
        if recompute:
            sums = sums + checkpoint(chunk_sums, *args, use_reentrant=False)
        else:
            sums = sums + chunk_sums(*args)

    parts: dict[str, Tensor] = {}
    total: Tensor | None = None
    if use_ce:
        ce = sums[0] / ce_den
        parts["ce"] = ce.detach()
        total = ce if alpha == 1 else alpha * ce
    if use_kd:
        kd = sums[1] / kd_den
        parts["kd"] = kd.detach()
        kd_term = kd if alpha == 0 else (1.0 - alpha) * kd
        total = kd_term if total is None else total + kd_term
    assert total is not None
    return total, parts
