"""Held-out figures during training (`evaluate`), and what they were measured on (`run_summary`, written to
run_summary.json at the end of a run). The same yardsticks for every run over a cache, so ablations compare."""

from __future__ import annotations

import torch

from kdcache.config import TrainConfig
from kdcache.errors import BadInputError
from kdcache.modeling import output_logits, row_chunks
from kdcache.train.checkpoint import TrainState
from kdcache.train.distributed import Distributed
from kdcache.train.hidden import HiddenTerm, hidden_state_loss, student_rows
from kdcache.train.loader import CacheDataset
from kdcache.train.losses import LossConfig, kd_loss
from kdcache.train.objective import student_hidden_states

__all__ = ["evaluate", "run_summary"]


@torch.no_grad()
def evaluate(model, dataset: CacheDataset, losses: LossConfig, precision, chunk_size: int,
             dist: Distributed | None = None, eos_id: int | None = None, hidden_term: HiddenTerm | None = None) -> dict:
    """Held-out distillation loss (the run's own, alpha = 0), forward KL at T = 1 on the (k+1) buckets (comparable
    across runs with different losses), and agreement of the student's top-1 with the teacher's top-1.

    With ``eos_id``, the same three figures also on the answer tokens alone (`*_answer`: target positions whose
    token is not EOS). The EOS after a short answer is a near-certain target that both models get right, so it
    inflates the all-targets figures; the answer-token ones are what a label's quality depends on.
    With a hidden term, also the mean squared error between the projected student and the cached teacher hidden
    states (``heldout_hidden_mse``, per number).

    Under DDP each rank scores its own share of the held-out shards and the sums are added over ranks, so every
    rank gets the same figures over the whole held-out split (and takes the same early-stopping decision)."""
    model.eval()
    vocab = dataset.vocab_size
    if dataset.view is not None:  # another tokenizer: the cached ids are not the student's
        return _evaluate_cross_tokenizer(model, dataset, losses, precision, chunk_size, dist)
    kd_only = losses.with_ce_weight(0.0)
    common = LossConfig(kind="forward_kl", temperature=1.0, alpha=0.0)  # one yardstick across ablations
    sums = torch.zeros(2, 4, dtype=torch.float64)  # [all targets, answer tokens] x [kd, forward KL, agree, count]
    hidden_sums = torch.zeros(2, dtype=torch.float64)  # squared error, rows
    for batch in dataset:
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
                              dist: Distributed | None) -> dict:
    """Held-out figures for a student with another tokenizer: its distillation loss (ULD) over the aligned positions
    (the forward KL and top-1 agreement against cached ids need one vocabulary, so they are not reported)."""
    model.eval()
    kd_only = losses.with_ce_weight(0.0)
    kd_sum = count = 0.0
    for batch in dataset:
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
        raise BadInputError("the held-out split has no aligned target positions: raise heldout_fraction or use a "
                            "larger cache")
    return {"heldout_kd": kd_sum / count, "heldout_targets": int(count)}


def run_summary(config: TrainConfig, state: TrainState, first_step: int, wall_s: float, tokens: int) -> dict:
    """run_summary.json: what the held-out figures were measured on (and so what training did not see), and this
    invocation's wall time and throughput (a resumed run counts the steps since its resume)."""
    if config.heldout_cache:
        heldout = (f"every example of {config.heldout_cache}; training used "
                   + ("every example of the cache" if config.heldout_fraction == 0 else
                      f"{1 - config.heldout_fraction:.0%} of the cache ({config.heldout_fraction:.0%} held out, "
                      "unused)"))
    elif config.heldout_fraction > 0:
        heldout = (f"{config.heldout_fraction:.0%} of the cache's examples (heldout_fraction), which training did "
                   f"not see: it trained on the other {1 - config.heldout_fraction:.0%}")
    else:
        heldout = "none (heldout_fraction=0): training used every example of the cache"
    last = state.evals[-1] if state.evals else {}
    return {"step": state.step, "steps_this_run": state.step - first_step, "heldout": heldout,
            "heldout_fraction": config.heldout_fraction, "heldout_cache": config.heldout_cache,
            "heldout_targets": last.get("heldout_targets"), "heldout_answer_targets": last.get("heldout_answer_targets"),
            "wall_s": wall_s, "tokens_this_run": tokens, "tokens_per_s": tokens / wall_s if wall_s > 0 else None}
