"""The student's training objective: the distillation loss without full logits, as one module DDP can wrap.

A plain forward pass materialises ``[B, L, V]`` logits (for a 150k-token vocabulary and 8k tokens that is 4.9 GB in
float32, before softmax intermediates and their gradients). Here only the ``N`` hidden states that predict target
tokens are projected, ``chunk_size`` rows at a time, and each chunk's logits are freed right after its loss terms are
summed. With a plain linear head that is frozen (LoRA students) the gradient w.r.t. the hidden states is made in
forward, so nothing is remade (:func:`kdcache.train.fused_linear.frozen_head_sums`); with a trained one (full
fine-tuning) the fused Function remakes only the logits in backward (:func:`kdcache.train.fused.ce_and_kd_from_head`);
otherwise (LoRA or quantised heads, soft-capped or scaled logits, loss kinds outside the buckets) each chunk runs
under activation checkpointing, which reruns the chunk's whole forward. Peak memory of the head/loss part is a small multiple of ``chunk_size x V`` in
forward and in backward.

Each chunk contributes the numerators of the CE and KD weighted means; the denominators are computed once over all N
positions, and :func:`kdcache.train.losses.combine_terms` mixes the two means exactly as ``distillation_loss`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kdcache.modeling import (is_encoder_decoder, linear_head_weight, output_logits, row_chunks,
                              seq2seq_target_hidden_states, target_hidden_states)
from kdcache.targets import SparseTargets
from kdcache.train.buckets import BUCKET_KINDS
from kdcache.train.fused import ce_and_kd, ce_and_kd_from_head
from kdcache.train.fused_linear import frozen_head_sums, mix_coefficients
from kdcache.train.uld import has_unmapped_term
from kdcache.train.hidden import HiddenTerm, hidden_state_loss, student_rows
from kdcache.train.losses import (
    LossConfig,
    combine_terms,
    hard_ce,
    kd_loss,
    label_weights,
    teacher_confidence_weight,
    term_sums,
    weighted_sum,
)

__all__ = ["DistillationObjective", "check_loss_for_cache", "chunked_distillation_loss", "student_hidden_states"]


def student_hidden_states(model, input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor,
                          prompt_lengths: Tensor | None = None) -> Tensor:
    """The hidden states ``[N, H]`` that predict the target tokens, in row-major order of ``target_mask``: a causal
    LM's at ``t - 1``, an encoder-decoder's on the decoder side (prompt to the encoder, ``prompt_lengths`` [B])."""
    if is_encoder_decoder(model):
        if prompt_lengths is None:
            raise ValueError("an encoder-decoder student needs prompt_lengths (what its encoder reads)")
        return seq2seq_target_hidden_states(model, input_ids, attention_mask, target_mask, prompt_lengths)
    return target_hidden_states(model, input_ids, attention_mask, target_mask)


@dataclass
class _Rows:
    """The per-position inputs of the loss terms, [N, ...] each on the hidden states' device; ``None`` where a term
    is off (targets and kd_weights for alpha = 1, labels and ce_weights for alpha = 0) or unweighted (kd_weights)."""

    hidden: Tensor  # [N, H]
    targets: SparseTargets | None
    labels: Tensor | None  # long [N]
    ce_weights: Tensor | None  # [N]: 0 at ignored labels, else the position weight
    kd_weights: Tensor | None  # [N]

    def __getitem__(self, rows: slice) -> _Rows:
        def cut(x):
            return None if x is None else x[rows]

        return _Rows(self.hidden[rows], cut(self.targets), cut(self.labels), cut(self.ce_weights),
                     cut(self.kd_weights))


def _check_vocab_size(model, vocab_size: int | None) -> None:
    rows_in_head = model.get_output_embeddings().weight.shape[0]
    if vocab_size is not None and not 0 < vocab_size <= rows_in_head:
        raise ValueError(f"vocab_size={vocab_size} but the student's LM head has {rows_in_head} rows")


def _loss_dtype(model) -> torch.dtype:
    """The losses' compute dtype for this student's logits: float64 for a float64 head, else float32."""
    return torch.float64 if model.get_output_embeddings().weight.dtype == torch.float64 else torch.float32


def _loss_rows(hidden: Tensor, input_ids: Tensor, target_mask: Tensor, targets: SparseTargets | None,
               labels: Tensor | None, weights: Tensor | None, alpha: float, dtype: torch.dtype) -> _Rows:
    """Check the inputs against the N selected positions and put them on the hidden states' device.

    Labels default to the tokens at the target positions; weights carry no gradient.
    """
    n, device = hidden.shape[0], hidden.device
    use_ce, use_kd = alpha > 0, alpha < 1
    if use_kd:
        if targets is None:
            raise ValueError(f"alpha={alpha} < 1 needs teacher targets for the distillation term")
        if targets.num_rows != n:
            raise ValueError(f"targets have {targets.num_rows} rows but target_mask marks {n} positions")
    if use_ce and labels is None:
        rows, cols = target_mask.nonzero(as_tuple=True)
        labels = input_ids[rows, cols]
    if use_ce and labels.shape != (n,):
        raise ValueError(f"labels must be [N] = [{n}], got shape {tuple(labels.shape)}")
    if weights is not None and weights.shape != (n,):
        raise ValueError(f"weights must be [N] = [{n}], got shape {tuple(weights.shape)}")
    w = None if weights is None else weights.detach().to(device=device, dtype=dtype)
    ce_weights = None
    if use_ce:
        labels = labels.to(device=device, dtype=torch.long)
        ce_weights = label_weights(labels, w, dtype)
    return _Rows(hidden, targets.to(device) if use_kd else None, labels if use_ce else None, ce_weights,
                 w if use_kd else None)


def _denominators(rows: _Rows, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """The global denominators (no gradient) of the CE and KD means over all N positions, as tensors."""
    tiny = torch.finfo(dtype).tiny
    ce_den = None if rows.ce_weights is None else rows.ce_weights.sum().clamp_min(tiny)
    kd_den = None
    if rows.targets is not None:
        n = rows.hidden.shape[0]
        kd_den = (torch.tensor(float(max(n, 1)), dtype=dtype, device=rows.hidden.device) if rows.kd_weights is None
                  else rows.kd_weights.sum().clamp_min(tiny))
    return ce_den, kd_den


def _chunk_sums(model, loss_config: LossConfig, vocab_size: int | None, dtype: torch.dtype, rows: _Rows) -> Tensor:
    """``[ce_sum, kd_sum]`` (``dtype``) of one chunk: its LM-head logits, then each term's weighted sum (0 when off)."""
    logits = output_logits(model, rows.hidden)
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[:, :vocab_size]
    ce = kd = None
    if rows.labels is not None and rows.targets is not None:  # both terms from one pass over the chunk
        ce, kd = ce_and_kd(loss_config, logits, rows.labels, rows.targets)
    elif rows.labels is not None:
        ce = hard_ce(logits, rows.labels, reduction="none")
    elif rows.targets is not None:
        kd = kd_loss(loss_config, logits, rows.targets, reduction="none")
    return term_sums(ce, rows.ce_weights, kd, rows.kd_weights, dtype)


def _head_chunk_sums(weight: Tensor, loss_config: LossConfig, vocab_size: int | None, dtype: torch.dtype,
                     rows: _Rows, mix: Tensor | None) -> Tensor:
    """:func:`_chunk_sums` for a plain linear head (:func:`kdcache.modeling.linear_head_weight`): a frozen one's
    gradient made in forward for the batch's ``mix`` (:func:`kdcache.train.fused_linear.frozen_head_sums`), a
    trained one's remade in backward (:func:`kdcache.train.fused.ce_and_kd_from_head`)."""
    vocab = weight.shape[0] if vocab_size is None else min(vocab_size, weight.shape[0])
    if mix is not None:
        return frozen_head_sums(loss_config, rows.hidden, weight, vocab, rows.labels, rows.targets, rows.ce_weights,
                                rows.kd_weights, mix)
    ce, kd = ce_and_kd_from_head(loss_config, rows.hidden, weight, vocab, rows.labels, rows.targets)
    return term_sums(ce if rows.labels is not None else None, rows.ce_weights, kd, rows.kd_weights, dtype)


def _summed_over_chunks(model, loss_config: LossConfig, vocab_size: int | None, dtype: torch.dtype, rows: _Rows,
                        chunk_size: int, checkpoint_chunks: bool, ce_den: Tensor | None,
                        kd_den: Tensor | None) -> Tensor:
    """``[ce_sum, kd_sum]`` over all rows, one chunk of logits at a time (recomputed in backward when checkpointed;
    a frozen plain head's gradient made in forward for the mix of ``ce_den`` and ``kd_den``)."""
    hidden = rows.hidden
    sums = (hidden.sum() * 0.0).to(dtype).expand(2)  # keeps the graph connected when there are no targets
    recompute = checkpoint_chunks and torch.is_grad_enabled() and hidden.requires_grad
    # the CE alone, or with a bucket KD that needs nothing but the student's buckets
    fused = rows.targets is None or (loss_config.kind in BUCKET_KINDS and not has_unmapped_term(loss_config))
    head = linear_head_weight(model) if fused else None
    mix = None
    if head is not None and not head.requires_grad:
        mix = mix_coefficients(loss_config.alpha, ce_den, kd_den, dtype, hidden.device)
    for part in row_chunks(hidden.shape[0], chunk_size):
        if head is not None:  # the fused Functions keep no logits: no checkpoint
            sums = sums + _head_chunk_sums(head, loss_config, vocab_size, dtype, rows[part], mix)
        elif recompute:
            sums = sums + checkpoint(_chunk_sums, model, loss_config, vocab_size, dtype, rows[part],
                                     use_reentrant=False)
        else:
            sums = sums + _chunk_sums(model, loss_config, vocab_size, dtype, rows[part])
    return sums


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
    prompt_lengths: Tensor | None = None,
    hidden_term: HiddenTerm | None = None,
    hidden_targets: Tensor | None = None,
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
    prompt_lengths: [B] tokens before the target text; an encoder-decoder student reads them with its encoder and the
        targets on its decoder side (:func:`student_hidden_states`). Unused for a causal LM.
    hidden_term, hidden_targets: the hidden-state term (``hidden_term.weight`` times the mean of
        :func:`kdcache.train.hidden.hidden_state_loss` between the projected student layers and ``hidden_targets``
        ``[R, C, d]``: the cache's rows, one per target or per real token, row-major), from the same decoder pass.

    Normalisation is global, not per chunk: each term is ``sum_i w_i l_i / sum_i w_i`` over all N positions (CE also
    skipping labels of -100). Returns ``(loss, parts)`` with detached ``"ce"`` / ``"kd"`` for the computed terms.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_vocab_size(model, vocab_size)
    dtype = _loss_dtype(model)
    extra = {}
    if hidden_term is None or hidden_term.weight == 0:
        hidden = student_hidden_states(model, input_ids, attention_mask, target_mask, prompt_lengths)
    else:
        if hidden_targets is None:
            raise ValueError("a hidden term needs the cache's hidden states (hidden_targets)")
        hidden, chosen = student_rows(model, input_ids, attention_mask, target_mask, hidden_term.student_layers,
                                      hidden_term.positions)
        distance = hidden_state_loss(hidden_term.projector(chosen), hidden_targets, hidden_term.kind)
        hidden_sum, hidden_den = weighted_sum(distance)
        extra = dict(hidden_sum=hidden_sum, hidden_den=hidden_den, hidden_weight=hidden_term.weight)
    rows = _loss_rows(hidden, input_ids, target_mask, targets, labels, weights, loss_config.alpha, dtype)
    ce_den, kd_den = _denominators(rows, dtype)
    sums = _summed_over_chunks(model, loss_config, vocab_size, dtype, rows, chunk_size, checkpoint_chunks, ce_den,
                               kd_den)
    return combine_terms(sums[0], ce_den, sums[1], kd_den, loss_config.alpha, **extra)


class DistillationObjective(nn.Module):
    """The student plus its chunked distillation loss as one module, so DDP sees the whole forward pass.

    The loss never calls ``model(...)``: it runs the decoder (``get_decoder()``) and projects target positions through
    the LM head chunk by chunk (:func:`chunked_distillation_loss`). Wrapping the bare student in DDP would leave
    ``DistributedDataParallel.forward`` unused, and DDP only prepares its gradient reducer (buckets, the
    bucket-by-bucket all-reduce overlapped with backward) inside its own forward. Making the loss computation this
    module's ``forward`` puts every parameter use, the LM head under activation checkpointing included, inside
    ``DDP.forward``; gradient accumulation uses DDP's ``no_sync()`` on all but the last micro-batch. Checkpointing is
    non-reentrant throughout (the chunked head and the decoder's), which DDP supports.
    """

    def __init__(self, model: nn.Module, losses: LossConfig, chunk_size: int, vocab_size: int,
                 confidence_weight: bool, hidden_term: HiddenTerm | None = None):
        super().__init__()
        self.model = model
        self.hidden_term = hidden_term
        self.projector = None if hidden_term is None else hidden_term.projector  # a submodule: DDP reduces it too
        self.losses = losses
        self.chunk_size = chunk_size
        self.vocab_size = vocab_size
        self.confidence_weight = confidence_weight

    def forward(self, batch):
        """``(loss, parts)`` for one micro-batch (a :class:`kdcache.train.loader.CacheBatch` on the model's device)."""
        weights = teacher_confidence_weight(batch.targets) if self.confidence_weight else None
        return chunked_distillation_loss(
            self.model, batch.input_ids, batch.attention_mask, batch.target_mask, batch.targets, batch.labels,
            self.losses, chunk_size=self.chunk_size, vocab_size=self.vocab_size, weights=weights,
            prompt_lengths=batch.prompt_lengths, hidden_term=self.hidden_term, hidden_targets=batch.hidden)


def check_loss_for_cache(loss: LossConfig, manifest) -> None:
    """Refuse, before any training step, a loss the cache cannot serve exactly (one line saying what to do).

    manifest: the cache's :class:`kdcache.store.manifest.Manifest`. Checks the temperature against the tail
    temperatures a topk cache stores (``loss.tail_mode``), reverse KLs against caches whose tail is derived rather
    than computed (vLLM's prompt_logprobs route, sample caches), ``top_k`` against the cache's k, and the
    temperature of ``sampled_ce`` against the temperature the samples were drawn at.
    """
    from kdcache.errors import BadInputError
    from kdcache.train.losses import REVERSE_KINDS

    if loss.alpha == 1.0:  # plain fine-tuning reads no teacher targets
        return
    sparsifier, T = manifest.sparsifier, loss.temperature
    derived = sparsifier.kind == "sample" or (manifest.teacher.vllm or {}).get("scoring") == "prompt_logprobs"
    if loss.kind in REVERSE_KINDS and derived:
        imported = getattr(manifest, "imported", None)
        source = ("a sample cache" if sparsifier.kind == "sample" else
                  f"imported from {imported.format} top-k files" if imported is not None else
                  "vLLM prompt_logprobs route")
        rebuild = ("build a topk cache from the teacher with kdcache cache build" if imported is not None else
                   "rebuild a topk cache with teacher.vllm.scoring=exact")
        raise BadInputError(
            f"loss.kind={loss.kind} needs the teacher's exact tail, but this cache's tail is derived as 1 - sum(top-k) "
            f"({source}), which makes reverse KL wrong by up to many nats: use forward_kl or jsd, or {rebuild}")
    if loss.vocab_map != "off" and sparsifier.kind != "topk":
        raise BadInputError(f"loss.vocab_map={loss.vocab_map} maps a topk cache's entries to the student's vocabulary; "
                            "this is a sample cache: use a topk cache (sparsifier.kind=topk)")
    if loss.kind == "uld":
        if sparsifier.kind != "topk":
            raise BadInputError("loss.kind=uld compares sorted probability vectors, which a sample cache does not "
                                "hold: use a topk cache (sparsifier.kind=topk)")
        if abs(T - 1.0) > 1e-6:
            raise BadInputError(f"loss.kind=uld compares the distributions at T = 1, got loss.temperature={T:g}: "
                                "set loss.temperature=1")
    if loss.kind == "sampled_ce":
        if sparsifier.kind != "sample":
            raise BadInputError("loss.kind=sampled_ce needs a sample cache (sparsifier.kind=sample); this one is topk")
        if abs(T - sparsifier.temperature) > 1e-6:
            raise BadInputError(
                f"loss.kind=sampled_ce at temperature {T:g}, but the samples were drawn at {sparsifier.temperature:g}: "
                "sampled targets cannot be re-tempered; train at loss.temperature="
                f"{sparsifier.temperature:g}, or rebuild the cache with sparsifier.temperature={T:g}")
        return
    if loss.top_k is not None and loss.top_k > sparsifier.k:
        raise BadInputError(f"loss.top_k={loss.top_k} but the cache holds k={sparsifier.k} entries per position; "
                            f"use loss.top_k <= {sparsifier.k}")
    if abs(T - 1.0) <= 1e-6 or loss.kind == "topk_forward_kl" or loss.tail_mode == "single_atom":
        return
    cached = tuple(sparsifier.tail_temperatures or ())
    if derived or sparsifier.tail_temperatures is None:
        if loss.tail_mode == "exact":
            what = ("is a format v1 cache: it stores the teacher's tail at T = 1 only" if not derived
                    else "derives its tail from the top-k, so it has the teacher's tail at T = 1 only")
            raise BadInputError(
                f"loss.temperature={T:g} but this cache {what}. Rebuild it with this kdcache (a topk cache stores the "
                "tail at sparsifier.tail_temperatures), or set loss.tail_mode=single_atom to use the old, inexact "
                "approximation (docs/losses.md)")
        return
    if loss.tail_mode == "exact" and not any(abs(T - t) <= 1e-6 * max(1.0, t) for t in cached):
        shown = ", ".join(f"{t:g}" for t in sorted({1.0, *cached}))
        raise BadInputError(
            f"loss.temperature={T:g} but this cache stores the teacher's exact tail at T = {shown} only: train at "
            f"one of those, rebuild the cache with sparsifier.tail_temperatures including {T:g}, or set "
            "loss.tail_mode=interpolate (bounded error, docs/losses.md)")
    if loss.tail_mode == "interpolate" and T < min((1.0, *cached)) * (1 - 1e-6):
        raise BadInputError(
            f"loss.temperature={T:g} is below the smallest cached tail temperature ({min((1.0, *cached)):g}), where "
            "interpolation has no bound: rebuild the cache with sparsifier.tail_temperatures including it")
