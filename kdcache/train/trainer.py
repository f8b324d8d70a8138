"""`kdcache train`: distill a student from a cache alone (the teacher is never loaded).

The loop is kept readable in one screen (`_train`); evaluation, checkpoints and logging are small helpers beside it.
The same command runs as one process or under ``torchrun --nproc_per_node N`` (DDP, see
:mod:`kdcache.train.distributed`): each rank reads its own shards, gradients are all-reduced, held-out sums are
reduced over ranks, and rank 0 alone writes checkpoints, metrics, TensorBoard logs and the progress bar.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
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
from kdcache.modeling import load_tokenizer, output_logits, row_chunks, target_hidden_states
from kdcache.train.distributed import Distributed, init_distributed, sync_context, wrap_for_training
from kdcache.train.loader import CacheDataset
from kdcache.train.losses import LossConfig, kd_loss
from kdcache.train.objective import DistillationObjective, check_loss_for_cache
from kdcache.train.student import (
    load_student,
    make_optimizer,
    require_bitsandbytes,
    resolve_precision,
    trainable_state,
)

CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
DIGEST_ENV = "KDCACHE_PARAM_DIGESTS"  # set to 1: each rank writes param-digest-rank<r>.json at the end (tests)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    out: str
    step: int
    evals: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    is_main: bool = True  # False on DDP ranks other than 0 (which print and write nothing)


def lr_lambda(config: TrainConfig):
    """Linear warmup, then cosine decay to 10% of the peak over the remaining steps."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


@torch.no_grad()
def evaluate(model, dataset: CacheDataset, losses: LossConfig, precision, chunk_size: int,
             dist: Distributed | None = None) -> dict:
    """Held-out distillation loss (the run's own, alpha = 0), forward KL at T = 1 on the (k+1) buckets (comparable
    across runs with different losses), and agreement of the student's top-1 with the teacher's top-1.

    Under DDP each rank scores its own share of the held-out shards and the sums are added over ranks, so every
    rank gets the same figures over the whole held-out split (and takes the same early-stopping decision)."""
    model.eval()
    kd_sum = agree = count = 0.0
    vocab = dataset.vocab_size
    kd_only = dataclasses.replace(losses, alpha=0.0)
    common = LossConfig(kind="forward_kl", temperature=1.0, alpha=0.0)  # one yardstick across ablations
    fkl_sum = 0.0
    for batch in dataset:
        batch = batch.to(precision.device)
        with torch.autocast(precision.device.type, dtype=precision.autocast_dtype,
                            enabled=precision.autocast_dtype is not None):
            selected = target_hidden_states(model, batch.input_ids, batch.attention_mask, batch.target_mask)
        for part in row_chunks(selected.shape[0], chunk_size):
            logits = output_logits(model, selected[part]).float()[:, :vocab]
            targets = batch.targets[part]
            kd_sum += float(kd_loss(kd_only, logits, targets, reduction="none").sum())
            fkl_sum += float(kd_loss(common, logits, targets, reduction="none").sum())
            agree += float((logits.argmax(-1) == targets.ids[:, 0].long()).sum())
            count += logits.shape[0]
    model.train()
    if dist is not None:
        kd_sum, fkl_sum, agree, count = dist.all_sum([kd_sum, fkl_sum, agree, count], precision.device)
    if count == 0:
        raise BadInputError("the held-out split is empty: raise heldout_fraction or use a larger cache")
    return {"heldout_kd": kd_sum / count, "heldout_forward_kl": fkl_sum / count,
            "heldout_top1_agreement": agree / count, "heldout_targets": int(count)}


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _seed_rank(seed: int, dist: Distributed) -> None:
    """Under DDP, give each rank its own random stream (dropout masks) once the model is built identically."""
    if dist.enabled:
        random.seed(seed + dist.rank), np.random.seed(seed + dist.rank), torch.manual_seed(seed + dist.rank)


def save_checkpoint(out: Path, model, optimizer, scheduler, scaler, loader: CacheDataset, state: dict,
                    dist: Distributed | None = None) -> None:
    """Write the checkpoint into a fresh folder, then swap it in, so a kill never leaves a half checkpoint.

    Model, optimizer, scheduler and scaler are the same on every rank; the loader position and RNG state are each
    rank's own, so they are gathered and kept as one entry per rank. Rank 0 writes; the barrier after it keeps every
    rank from going on (or exiting) before the checkpoint is complete.
    """
    dist = dist or Distributed()
    per_rank = dist.all_gather({"loader": loader.state_dict(), "rng": _rng_state()})
    if dist.is_main:
        staging = out / f".{CHECKPOINT}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        torch.save({"trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "loader": [r["loader"] for r in per_rank], "rng": [r["rng"] for r in per_rank],
                    "world_size": dist.world_size}, staging / "state.pt")
        (staging / "trainer_state.json").write_text(json.dumps(state, indent=2))
        final, old = out / CHECKPOINT, out / f".{CHECKPOINT}.old"
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_checkpoint(out: Path, model, optimizer, scheduler, scaler, loader: CacheDataset,
                    dist: Distributed | None = None, device: torch.device | str = "cpu") -> dict | None:
    """Restore a checkpoint (each rank takes its own loader position and RNG state); None when there is none."""
    dist = dist or Distributed()
    folder = out / CHECKPOINT
    if not (folder / "trainer_state.json").exists():
        return None
    saved = torch.load(folder / "state.pt", weights_only=False, map_location=device)
    loaders, rngs = saved["loader"], saved["rng"]
    if isinstance(loaders, dict):  # written by a single-process run before per-rank entries existed
        loaders, rngs = [loaders], [rngs]
    if len(loaders) != dist.world_size:
        raise BadInputError(
            f"the checkpoint in {folder} was written by {len(loaders)} process(es) but this run has "
            f"{dist.world_size}: each rank's loader position is its own, so resume with the same number "
            f"(torchrun --nproc_per_node {len(loaders)}), or train into a new --out"
        )
    params = dict(model.named_parameters())
    for name, value in saved["trainable"].items():
        params[name].data.copy_(value)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    loader.load_state_dict(loaders[dist.rank])
    _set_rng_state(rngs[dist.rank])
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


_warned_no_tensorboard = False


def _summary_writer(folder: Path, resume_step: int):
    """A TensorBoard SummaryWriter (None, with one warning per process, when tensorboard is not installed).

    ``purge_step`` drops events a killed run wrote after its last checkpoint, so a resumed curve has no doubles.
    """
    global _warned_no_tensorboard
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _warned_no_tensorboard:
            log.warning("tensorboard=true but the tensorboard package is not installed, so no TensorBoard logs are "
                        "written (metrics.jsonl still is): pip install tensorboard, or set tensorboard=false")
            _warned_no_tensorboard = True
        return None
    return SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step else None)


def scalar_tag(key: str) -> str:
    """TensorBoard tag of a metrics record key: heldout_* under heldout/, everything else under train/."""
    return f"heldout/{key[len('heldout_'):]}" if key.startswith("heldout_") else f"train/{key}"


class RunLog:
    """Where a run's figures go: metrics.jsonl and TensorBoard scalars, written by rank 0 only (a no-op elsewhere)."""

    def __init__(self, out: Path, resume_step: int, tensorboard: bool, active: bool):
        self.metrics = MetricsLog(out, resume_step) if active else None
        self.writer = _summary_writer(out / TENSORBOARD, resume_step) if active and tensorboard else None

    def write(self, record: dict) -> None:
        if self.metrics is None:
            return
        self.metrics.write(record)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(scalar_tag(key), value, record["step"])

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _next_batch(iterator, dataset: CacheDataset):
    try:
        return next(iterator), iterator
    except StopIteration:
        dataset.set_epoch(dataset.epoch + 1)
        iterator = iter(dataset)
        return next(iterator), iterator


def train(config: TrainConfig, stop_after_steps: int | None = None) -> TrainResult:
    """Train (or resume) a student from `config.cache`; `stop_after_steps` ends early as a kill would (tests).

    Under torchrun (``WORLD_SIZE`` > 1) this process joins the DDP group first and leaves it at the end.
    """
    for name in ("cache", "student", "out"):
        if not getattr(config, name):
            raise BadInputError(f"no {name} given: set --{name}")
    precision = resolve_precision(config.profile, full_finetune=not config.lora.enabled)
    if config.optimizer == "adamw_8bit":
        require_bitsandbytes("adamw_8bit", precision.device)  # before any model is loaded
    dist = init_distributed(precision.device)
    try:
        precision = dataclasses.replace(precision, device=dist.device(precision.device))
        return _train(config, precision, dist, stop_after_steps)
    finally:
        dist.shutdown()


def _train(config: TrainConfig, precision, dist: Distributed, stop_after_steps: int | None) -> TrainResult:
    """The training loop proper, on one rank of ``dist`` (the only one when not distributed)."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(config.seed), np.random.seed(config.seed), torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(config.student)
    common = dict(batch_size=config.batch_size, max_tokens=config.max_tokens, seed=config.seed,
                  heldout_fraction=config.heldout_fraction, tokenizer=tokenizer, rank=dist.rank,
                  world_size=dist.world_size)
    train_data = CacheDataset(config.cache, split="train", **common)  # refuses another tokenizer
    check_loss_for_cache(config.loss, train_data.manifest)  # before the model is loaded
    heldout = CacheDataset(config.cache, split="heldout", shuffle=False, **common)
    model = load_student(config.student, precision, config.lora, train_data.vocab_size, config.gradient_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(config.optimizer, params, config.lr, config.weight_decay, precision.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    scaler = torch.amp.GradScaler(precision.device.type, enabled=precision.grad_scaler)
    losses = config.loss
    state = load_checkpoint(out, model, optimizer, scheduler, scaler, train_data, dist, precision.device)
    if state is None:
        state = {"step": 0, "best": None, "evals_since_best": 0, "evals": []}
        _seed_rank(config.seed, dist)
    objective = DistillationObjective(model, losses, config.chunk_size, train_data.vocab_size,
                                      config.loss.confidence_weight)
    step_module = wrap_for_training(objective, dist, precision.device)  # DDP when there are several ranks
    if dist.is_main:
        (out / "train_config.json").write_text(json.dumps(to_dict(config), indent=2))
    run_log = RunLog(out, state["step"], config.tensorboard, active=dist.is_main)
    result = TrainResult(out=str(out), step=state["step"], evals=state["evals"], is_main=dist.is_main)
    from tqdm import tqdm

    bar = tqdm(total=config.max_steps, initial=state["step"], desc="train",
               disable=not (config.progress and dist.is_main))
    model.train()
    iterator = iter(train_data)
    while state["step"] < config.max_steps:
        if stop_after_steps is not None and state["step"] - result.step >= stop_after_steps:
            break
        started, tokens, wait = time.perf_counter(), 0, 0.0
        step_loss, step_parts = 0.0, {}  # means over the micro-batches of this step
        for micro in range(config.grad_accum):
            waited = time.perf_counter()
            batch, iterator = _next_batch(iterator, train_data)
            wait += time.perf_counter() - waited
            batch = batch.to(precision.device)
            with sync_context(step_module, sync=micro == config.grad_accum - 1):  # all-reduce on the last only
                with torch.autocast(precision.device.type, dtype=precision.autocast_dtype,
                                    enabled=precision.autocast_dtype is not None):
                    loss, parts = step_module(batch)
                scaler.scale(loss / config.grad_accum).backward()
            step_loss = step_loss + loss.detach() / config.grad_accum  # tensors: no device sync per micro-batch
            for key, value in parts.items():
                step_parts[key] = step_parts.get(key, 0.0) + value.detach() / config.grad_accum
            tokens += batch.num_tokens
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.clip_grad)  # grads are already the ranks' mean
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        record = _step_record(state["step"], step_loss, step_parts, tokens, wait, started, dist, precision.device)
        record.update(lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm))
        if precision.device.type == "cuda":
            record["max_memory_gib"] = torch.cuda.max_memory_allocated(precision.device) / 2**30
        run_log.write(record)
        postfix = {"loss": f"{record['loss']:.4f}", "tok_s": f"{record['tokens_per_s']:,.0f}"}
        if "max_memory_gib" in record:
            postfix["mem"] = f"{record['max_memory_gib']:.1f}G"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if config.eval_every and state["step"] % config.eval_every == 0:
            metrics = {"step": state["step"],
                       **evaluate(model, heldout, losses, precision, config.chunk_size, dist)}
            run_log.write(metrics)
            state["evals"].append(metrics)
            if state["best"] is None or metrics["heldout_kd"] < state["best"]:
                state["best"], state["evals_since_best"] = metrics["heldout_kd"], 0
                if dist.is_main:
                    save_student(model, tokenizer, out / "best")
            else:
                state["evals_since_best"] += 1
            if config.patience is not None and state["evals_since_best"] >= config.patience:
                result.stopped_early = True
        if state["step"] % config.save_every == 0 or state["step"] == config.max_steps or result.stopped_early:
            run_log.flush()
            save_checkpoint(out, model, optimizer, scheduler, scaler, train_data, state, dist)
        if result.stopped_early:
            break
    bar.close()
    run_log.close()
    if (state["step"] >= config.max_steps or result.stopped_early) and dist.is_main:
        save_student(model, tokenizer, out / "final")
    if os.environ.get(DIGEST_ENV) == "1":
        write_param_digest(out, model, dist, state["step"])
    dist.barrier()
    result.step, result.evals = state["step"], state["evals"]
    return result


def _step_record(step: int, loss, parts: dict, tokens: int, wait: float, started: float, dist: Distributed,
                 device) -> dict:
    """One step's figures over all ranks: losses averaged, tokens/s of the whole job, mean loader wait."""
    keys = sorted(parts)
    sums = dist.all_sum([float(loss), *(float(parts[k]) for k in keys), float(tokens), wait], device)
    n = dist.world_size
    seconds = time.perf_counter() - started
    record = {"step": step, "loss": sums[0] / n, **{k: v / n for k, v in zip(keys, sums[1:-2])}}
    record.update(tokens_per_s=sums[-2] / seconds, loader_wait_s=sums[-1] / n)
    return record


def write_param_digest(out: Path, model, dist: Distributed, step: int) -> None:
    """sha256 of every trainable parameter's bytes, one file per rank: DDP ranks must agree bit for bit (tests)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    record = {"rank": dist.rank, "world_size": dist.world_size, "step": step, "sha256": digest.hexdigest()}
    (out / f"param-digest-rank{dist.rank}.json").write_text(json.dumps(record))


def save_student(model, tokenizer, folder: Path) -> None:
    """The adapter (LoRA) or the whole model, with the tokenizer: loadable with peft / transformers."""
    staging = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
