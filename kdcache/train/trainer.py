"""`kdcache train`: distill a student from a cache alone (the teacher is never loaded).

The loop is kept readable in one screen (`train`); evaluation, checkpoints and logging are small helpers beside it.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kdcache.config import TrainConfig, to_dict
from kdcache.errors import BadInputError
from kdcache.teacher.build import load_tokenizer
from kdcache.teacher.hf import final_hidden_states, output_logits
from kdcache.train.loader import CacheDataset
from kdcache.train.losses import LossConfig, kd_loss, teacher_confidence_weight
from kdcache.train.student import load_student, resolve_precision, trainable_state
from kdcache.train.student_forward import chunked_distillation_loss

CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"


@dataclass
class TrainResult:
    out: str
    step: int
    evals: list[dict] = field(default_factory=list)
    stopped_early: bool = False


def loss_config(config: TrainConfig) -> LossConfig:
    s = config.loss
    return LossConfig(kind=s.kind, temperature=s.temperature, alpha=s.alpha, skew=s.skew, beta=s.beta, top_k=s.top_k)


def lr_lambda(config: TrainConfig):
    """Linear warmup, then cosine decay to 10% of the peak over the remaining steps."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


@torch.no_grad()
def evaluate(model, dataset: CacheDataset, losses: LossConfig, precision, chunk_size: int) -> dict:
    """Held-out distillation loss (the run's own, alpha = 0), forward KL at T = 1 on the (k+1) buckets (comparable
    across runs with different losses), and agreement of the student's top-1 with the teacher's top-1."""
    model.eval()
    kd_sum = agree = count = 0.0
    vocab = dataset.vocab_size
    kd_only = LossConfig(kind=losses.kind, temperature=losses.temperature, alpha=0.0, skew=losses.skew,
                         beta=losses.beta, top_k=losses.top_k)
    common = LossConfig(kind="forward_kl", temperature=1.0, alpha=0.0)  # one yardstick across ablations
    fkl_sum = 0.0
    for batch in dataset:
        batch = batch.to(precision.device)
        with torch.autocast(precision.device.type, dtype=precision.autocast_dtype,
                            enabled=precision.autocast_dtype is not None):
            hidden = final_hidden_states(model, batch.input_ids, batch.attention_mask)
        rows, cols = batch.target_mask.nonzero(as_tuple=True)
        selected = hidden[rows, cols - 1]
        for start in range(0, selected.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            logits = output_logits(model, selected[part]).float()[:, :vocab]
            targets = _slice_targets(batch.targets, part)
            kd_sum += float(kd_loss(kd_only, logits, targets, reduction="none").sum())
            fkl_sum += float(kd_loss(common, logits, targets, reduction="none").sum())
            agree += float((logits.argmax(-1) == targets.ids[:, 0].long()).sum())
            count += logits.shape[0]
    model.train()
    if count == 0:
        raise BadInputError("the held-out split is empty: raise heldout_fraction or use a larger cache")
    return {"heldout_kd": kd_sum / count, "heldout_forward_kl": fkl_sum / count,
            "heldout_top1_agreement": agree / count, "heldout_targets": int(count)}


def _slice_targets(targets, part: slice):
    from kdcache.train.losses import SparseTargets

    def cut(value):
        return None if value is None else value[part]

    return SparseTargets(cut(targets.ids), cut(targets.logprobs), cut(targets.tail_logmass), cut(targets.counts))


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, model, optimizer, scheduler, scaler, loader: CacheDataset, state: dict) -> None:
    """Write the checkpoint into a fresh folder, then swap it in, so a kill never leaves a half checkpoint."""
    staging = out / f".{CHECKPOINT}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    torch.save({"trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "loader": loader.state_dict(), "rng": _rng_state()}, staging / "state.pt")
    (staging / "trainer_state.json").write_text(json.dumps(state, indent=2))
    final, old = out / CHECKPOINT, out / f".{CHECKPOINT}.old"
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, model, optimizer, scheduler, scaler, loader: CacheDataset) -> dict | None:
    folder = out / CHECKPOINT
    if not (folder / "trainer_state.json").exists():
        return None
    saved = torch.load(folder / "state.pt", weights_only=False)
    params = dict(model.named_parameters())
    for name, value in saved["trainable"].items():
        params[name].data.copy_(value)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    loader.load_state_dict(saved["loader"])
    _set_rng_state(saved["rng"])
    return json.loads((folder / "trainer_state.json").read_text())


class MetricsLog:
    """metrics.jsonl (one line per step or evaluation), trimmed to the checkpoint's step on resume."""

    def __init__(self, out: Path, resume_step: int):
        self.path = out / METRICS
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _next_batch(iterator, dataset: CacheDataset):
    try:
        return next(iterator), iterator
    except StopIteration:
        dataset.set_epoch(dataset.epoch + 1)
        iterator = iter(dataset)
        return next(iterator), iterator


def train(config: TrainConfig, stop_after_steps: int | None = None) -> TrainResult:
    """Train (or resume) a student from `config.cache`; `stop_after_steps` ends early as a kill would (tests)."""
    for name in ("cache", "student", "out"):
        if not getattr(config, name):
            raise BadInputError(f"no {name} given: set --{name}")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(config.seed), np.random.seed(config.seed), torch.manual_seed(config.seed)
    precision = resolve_precision(config.profile, full_finetune=not config.lora.enabled)
    tokenizer = load_tokenizer(config.student)
    common = dict(batch_size=config.batch_size, max_tokens=config.max_tokens, seed=config.seed,
                  heldout_fraction=config.heldout_fraction, tokenizer=tokenizer)
    train_data = CacheDataset(config.cache, split="train", **common)  # refuses another tokenizer
    heldout = CacheDataset(config.cache, split="heldout", shuffle=False, **common)
    model = load_student(config.student, precision, config.lora, train_data.vocab_size, config.gradient_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    scaler = torch.amp.GradScaler(precision.device.type, enabled=precision.grad_scaler)
    losses = loss_config(config)
    state = load_checkpoint(out, model, optimizer, scheduler, scaler, train_data) or {
        "step": 0, "best": None, "evals_since_best": 0, "evals": []}
    (out / "train_config.json").write_text(json.dumps(to_dict(config), indent=2))
    log = MetricsLog(out, state["step"])
    result = TrainResult(out=str(out), step=state["step"], evals=state["evals"])
    from tqdm import tqdm

    bar = tqdm(total=config.max_steps, initial=state["step"], desc="train", disable=not config.progress)
    model.train()
    iterator = iter(train_data)
    while state["step"] < config.max_steps:
        if stop_after_steps is not None and state["step"] - result.step >= stop_after_steps:
            break
        started, tokens, wait = time.perf_counter(), 0, 0.0
        for _ in range(config.grad_accum):
            waited = time.perf_counter()
            batch, iterator = _next_batch(iterator, train_data)
            wait += time.perf_counter() - waited
            batch = batch.to(precision.device)
            weights = teacher_confidence_weight(batch.targets) if config.loss.confidence_weight else None
            with torch.autocast(precision.device.type, dtype=precision.autocast_dtype,
                                enabled=precision.autocast_dtype is not None):
                loss, parts = chunked_distillation_loss(
                    model, batch.input_ids, batch.attention_mask, batch.target_mask, batch.targets, batch.labels,
                    losses, chunk_size=config.chunk_size, vocab_size=train_data.vocab_size, weights=weights)
            scaler.scale(loss / config.grad_accum).backward()
            tokens += batch.num_tokens
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        seconds = time.perf_counter() - started
        record = {"step": state["step"], "loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()},
                  "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "tokens_per_s": tokens / seconds,
                  "loader_wait_s": wait}
        if precision.device.type == "cuda":
            record["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
        bar.update(1)
        if config.eval_every and state["step"] % config.eval_every == 0:
            metrics = {"step": state["step"], **evaluate(model, heldout, losses, precision, config.chunk_size)}
            log.write(metrics)
            state["evals"].append(metrics)
            if state["best"] is None or metrics["heldout_kd"] < state["best"]:
                state["best"], state["evals_since_best"] = metrics["heldout_kd"], 0
                save_student(model, tokenizer, out / "best")
            else:
                state["evals_since_best"] += 1
            if config.patience is not None and state["evals_since_best"] >= config.patience:
                result.stopped_early = True
        if state["step"] % config.save_every == 0 or state["step"] == config.max_steps or result.stopped_early:
            save_checkpoint(out, model, optimizer, scheduler, scaler, train_data, state)
        if result.stopped_early:
            break
    bar.close()
    if state["step"] >= config.max_steps or result.stopped_early:
        save_student(model, tokenizer, out / "final")
    result.step, result.evals = state["step"], state["evals"]
    return result


def save_student(model, tokenizer, folder: Path) -> None:
    """The adapter (LoRA) or the whole model, with the tokenizer: loadable with peft / transformers."""
    staging = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
