"""Held-out figures during training (`evaluate`), and what they were measured on (`run_summary`, written to
run_summary.json at the end of a run). The same yardsticks for every run over a cache, so ablations compare."""

from __future__ import annotations

import torch

from kdcache.config import TrainConfig
from kdcache.errors import BadInputError
from kdcache.modeling import output_logits, row_chunks
from kdcache.train.checkpoint import TrainState
from kdcache.train.distributed import Distributed
from kdcache.train.fsdp import lockstep
from kdcache.train.hidden import HiddenTerm, hidden_state_loss, student_rows
from kdcache.train.loader import CacheDataset
from kdcache.train.losses import LossConfig, kd_loss
from kdcache.train.objective import student_hidden_states

__all__ = ["combine_figures", "evaluate", "evaluate_heldout", "run_summary"]


@torch.no_grad()
def evaluate(model, dataset: CacheDataset, losses: LossConfig, precision, chunk_size: int,
             dist: Distributed | None = None, eos_id: int | None = None, hidden_term: HiddenTerm | None = None,
             allow_empty: bool = False) -> dict:
    """Held-out distillation loss (the run's own, alpha = 0), forward KL at T = 1 on the (k+1) buckets (comparable
    across runs with different losses), and agreement of the student's top-1 with the teacher's top-1.

    With ``eos_id``, the same three figures also on the answer tokens alone (`*_answer`: target positions whose
    token is not EOS). The EOS after a short answer is a near-certain target that both models get right, so it
    inflates the all-targets figures; the answer-token ones are what a label's quality depends on.
    With a hidden term, also the mean squared error between the projected student and the cached teacher hidden
    states (``heldout_hidden_mse``, per number).

    Under DDP each rank scores its own share of the held-out shards and the sums are added over ranks, so every
    rank gets the same figures over the whole held-out split (and takes the same early-stopping decision). Under FSDP
    the ranks go round in lockstep (a rank whose share has run out runs idle forwards until every share has).
    An empty split is an error, or with ``allow_empty`` (one of several caches) ``{"heldout_targets": 0}``."""
    model.eval()
    vocab = dataset.vocab_size
    if dataset.view is not None:  # another tokenizer: the cached ids are not the student's
        return _evaluate_cross_tokenizer(model, dataset, losses, precision, chunk_size, dist, allow_empty)
    kd_only = losses.with_ce_weight(0.0)
    common = LossConfig(kind="forward_kl", temperature=1.0, alpha=0.0)  # one yardstick across ablations
    sums = torch.zeros(2, 4, dtype=torch.float64)  # [all targets, answer tokens] x [kd, forward KL, agree, count]
    hidden_sums = torch.zeros(2, dtype=torch.float64)  # squared error, rows
    for batch in lockstep(dataset, dist or Distributed(), precision.device, _idle(model, precision)):
        batch = batch.to(precision.device)
        with torch.autocast(precision.device.type, dtype=precision.autocast_dtype,
                            enabled=precision.autocast_dtype is not None):
            if hidden_term is None:
                selected = student_hidden_states(model, batch.input_ids, batch.attention_mask, batch.target_mask,
                                                 batch.prompt_lengths)
            else:
                selected, chosen = student_rows(model, batch.input_ids, batch.attention_mask, batch.target_mask,
                                                hidden_term.student_layers, hidden_term.positions)
                projected = hidden_term.projector(chosen)
        if hidden_term is not None:
            hidden_sums += torch.tensor([float(hidden_state_loss(projected, batch.hidden, "mse").sum()),
                                         projected.shape[0]], dtype=torch.float64)
        for part in row_chunks(selected.shape[0], chunk_size):
            logits = output_logits(model, selected[part]).float()[:, :vocab]
            targets = batch.targets[part]
            rows = torch.stack([kd_loss(kd_only, logits, targets, reduction="none").double(),
                                kd_loss(common, logits, targets, reduction="none").double(),
                                (logits.argmax(-1) == targets.ids[:, 0].long()).double(),
                                torch.ones(logits.shape[0], dtype=torch.float64, device=logits.device)]).cpu()
            answer = (batch.labels[part] != eos_id).cpu() if eos_id is not None else torch.ones(rows.shape[1], dtype=bool)
            sums[0] += rows.sum(1)
            sums[1] += rows[:, answer].sum(1)
    model.train()
    flat = sums.flatten().tolist() + hidden_sums.tolist()
    if dist is not None:
        flat = dist.all_sum(flat, precision.device)
    (kd_sum, fkl_sum, agree, count), answer_sums, (hidden_sum, hidden_rows) = flat[:4], flat[4:8], flat[8:]
    if count == 0:
        if allow_empty:
            return {"heldout_targets": 0}
        raise BadInputError("the held-out split is empty: raise heldout_fraction, set heldout_cache, or use a larger "
                            "cache")
    figures = {"heldout_kd": kd_sum / count, "heldout_forward_kl": fkl_sum / count,
               "heldout_top1_agreement": agree / count, "heldout_targets": int(count)}
    if eos_id is not None:
        a_kd, a_fkl, a_agree, a_count = answer_sums
        figures.update({"heldout_kd_answer": a_kd / a_count if a_count else None,
                        "heldout_forward_kl_answer": a_fkl / a_count if a_count else None,
                        "heldout_top1_agreement_answer": a_agree / a_count if a_count else None,
                        "heldout_answer_targets": int(a_count)})
    if hidden_term is not None:
        figures["heldout_hidden_mse"] = hidden_sum / max(hidden_rows, 1)
    return figures


@torch.no_grad()
def _evaluate_cross_tokenizer(model, dataset: CacheDataset, losses: LossConfig, precision, chunk_size: int,
                              dist: Distributed | None, allow_empty: bool = False) -> dict:
    """Held-out figures for a student with another tokenizer: its distillation loss (ULD, or loss.kind through
    loss.vocab_map) over the aligned positions
    (the forward KL and top-1 agreement against cached ids need one vocabulary, so they are not reported)."""
    model.eval()
    kd_only = losses.with_ce_weight(0.0)
    kd_sum = count = 0.0
    for batch in lockstep(dataset, dist or Distributed(), precision.device, _idle(model, precision)):
        batch = batch.to(precision.device)
        with torch.autocast(precision.device.type, dtype=precision.autocast_dtype,
                            enabled=precision.autocast_dtype is not None):
            selected = student_hidden_states(model, batch.input_ids, batch.attention_mask, batch.target_mask,
                                             batch.prompt_lengths)
        for part in row_chunks(selected.shape[0], chunk_size):
            logits = output_logits(model, selected[part]).float()[:, :dataset.vocab_size]
            kd_sum += float(kd_loss(kd_only, logits, batch.targets[part], reduction="none").sum())
            count += logits.shape[0]
    model.train()
    if dist is not None:
        kd_sum, count = dist.all_sum([kd_sum, count], precision.device)
    if count == 0:
        if allow_empty:
            return {"heldout_targets": 0}
        raise BadInputError("the held-out split has no aligned target positions: raise heldout_fraction or use a "
                            "larger cache")
    return {"heldout_kd": kd_sum / count, "heldout_targets": int(count)}


def _idle(model, precision):
    """What an FSDP rank whose held-out share has run out does while others score theirs (kdcache.train.fsdp's
    ``lockstep``): the student's decoder on its last batch (or on two tokens, if it had none), the result dropped."""
    def forward(batch) -> None:
        if batch is None:
            ids = torch.zeros((1, 2), dtype=torch.long, device=precision.device)
            student_hidden_states(model, ids, torch.ones_like(ids), torch.tensor([[False, True]],
                                  device=precision.device), torch.tensor([1], device=precision.device))
            return
        batch = batch.to(precision.device)
        with torch.autocast(precision.device.type, dtype=precision.autocast_dtype,
                            enabled=precision.autocast_dtype is not None):
            student_hidden_states(model, batch.input_ids, batch.attention_mask, batch.target_mask,
                                  batch.prompt_lengths)
    return forward


def combine_figures(parts: list[dict]) -> dict:
    """The held-out figures over several held-out sets together, from each set's figures (:func:`evaluate`'s): each
    mean weighted by its set's count (``heldout_targets``; ``heldout_answer_targets`` for the ``*_answer`` figures),
    which is the mean over the pooled targets. The hidden-state MSE is weighted by targets too (exact for
    ``hidden.positions=target``, where rows are targets). An empty set (count 0) adds nothing."""
    counts = {"heldout_targets", "heldout_answer_targets"}
    total = sum(p.get("heldout_targets", 0) for p in parts)
    if total == 0:
        raise BadInputError("the held-out split of every cache is empty: raise heldout_fraction, set heldout_cache, "
                            "or use larger caches")
    keys = [k for p in parts for k in p]
    out: dict = {}
    for key in dict.fromkeys(keys):
        if key in counts:
            out[key] = int(sum(p.get(key) or 0 for p in parts))
            continue
        by = "heldout_answer_targets" if key.endswith("_answer") else "heldout_targets"
        pairs = [(p[key], p[by]) for p in parts if p.get(key) is not None and p.get(by)]
        weight = sum(n for _, n in pairs)
        out[key] = sum(v * n for v, n in pairs) / weight if weight else None
    return out


def evaluate_heldout(model, heldout, losses: LossConfig, precision, chunk_size: int, dist: Distributed | None = None,
                     eos_id: int | None = None, hidden_term: HiddenTerm | None = None) -> dict:
    """:func:`evaluate` on a run's held-out set: one dataset, or ``(label, dataset)`` pairs (several caches, each
    its own held-out split), whose figures are combined (:func:`combine_figures`) and also kept per cache under
    ``heldout_caches`` (label -> figures)."""
    if isinstance(heldout, CacheDataset):
        return evaluate(model, heldout, losses, precision, chunk_size, dist, eos_id, hidden_term)
    per_cache = {label: evaluate(model, dataset, losses, precision, chunk_size, dist, eos_id, hidden_term,
                                 allow_empty=True) for label, dataset in heldout}
    return {**combine_figures(list(per_cache.values())), "heldout_caches": per_cache}


def run_summary(config: TrainConfig, state: TrainState, first_step: int, wall_s: float, tokens: int,
                caches: list[dict] | None = None) -> dict:
    """run_summary.json: what the held-out figures were measured on (and so what training did not see), and this
    invocation's wall time and throughput (a resumed run counts the steps since its resume).

    caches: with several caches, one record per cache (:meth:`kdcache.train.mixing.CacheMixture.summary`), to which
    the last evaluation's held-out target count of each is added."""
    cache, caches_ = ("each cache", "each cache's") if caches is not None else ("the cache", "the cache's")
    if config.heldout_cache:
        heldout = (f"every example of {config.heldout_cache}; training used "
                   + (f"every example of {cache}" if config.heldout_fraction == 0 else
                      f"{1 - config.heldout_fraction:.0%} of {cache} ({config.heldout_fraction:.0%} held out, "
                      "unused)"))
    elif config.heldout_fraction > 0:
        heldout = (f"{config.heldout_fraction:.0%} of {caches_} examples (heldout_fraction), which training did "
                   f"not see: it trained on the other {1 - config.heldout_fraction:.0%}")
    else:
        heldout = f"none (heldout_fraction=0): training used every example of {cache}"
    last = state.evals[-1] if state.evals else {}
    summary = {"step": state.step, "steps_this_run": state.step - first_step, "heldout": heldout,
               "heldout_fraction": config.heldout_fraction, "heldout_cache": config.heldout_cache,
               "heldout_targets": last.get("heldout_targets"),
               "heldout_answer_targets": last.get("heldout_answer_targets"),
               "wall_s": wall_s, "tokens_this_run": tokens, "tokens_per_s": tokens / wall_s if wall_s > 0 else None}
    if caches is not None:  # each cache's weight, share of the batches drawn, and held-out targets
        per_cache = last.get("heldout_caches", {})
        summary["caches"] = [{**c, "heldout_targets": per_cache.get(c["label"], {}).get("heldout_targets")}
                             for c in caches]
    return summary
