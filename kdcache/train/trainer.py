"""`kdcache train`: distill a student from a cache alone (the teacher is never loaded).

`_train` builds the run and loops over two named steps: `_optimizer_step` (micro-batches, loss scaling, clipping, the
step's record) and `_evaluate_and_maybe_save` (held-out figures, best tracking, patience); checkpoints are
:mod:`kdcache.train.checkpoint`'s. The same command runs as one process or under ``torchrun --nproc_per_node N`` (DDP,
see :mod:`kdcache.train.distributed`; or FSDP with ``distributed.strategy: fsdp``, :mod:`kdcache.train.fsdp`): each
rank reads its own shards, gradients are all-reduced (FSDP: reduce-scattered), held-out sums are reduced over ranks,
and rank 0 alone writes checkpoints, metrics, the trackers' logs (report_to,
:mod:`kdcache.train.trackers`) and the progress bar.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
import uuid
from typing import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kdcache.config import TrainConfig, to_dict
from kdcache.errors import BadInputError
from kdcache.modeling import check_model_source, load_tokenizer
from kdcache.outputs import check_output_folder, storage_errors
from kdcache.train.checkpoint import TrainState, has_checkpoint, load_checkpoint, save_checkpoint
from kdcache.train.distributed import Distributed, init_distributed, sync_context, wrap_for_training
from kdcache.train.epochs import planned_steps
from kdcache.train.fsdp import full_tensor, full_tensors, shard_objective, unsharded_root
from kdcache.train.heldout import evaluate, evaluate_heldout, run_summary  # noqa: F401 (evaluate: tests import it)
from kdcache.train.hidden import HiddenProjector, HiddenTerm, student_layers_for
from kdcache.train.loader import CacheDataset
from kdcache.train.mixing import (CacheMixture, EndlessBatches, check_loss_for_caches, named_manifests, open_heldout,
                                  open_train_data)
from kdcache.train.objective import DistillationObjective
from kdcache.train.run_config import check_resume_config, record_config
from kdcache.train.student import Precision, load_student, make_optimizer, require_bitsandbytes, resolve_precision
from kdcache.train.trackers import RunLog, check_trackers

RUN_SUMMARY = "run_summary.json"

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    out: str
    step: int
    evals: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    is_main: bool = True  # False on DDP ranks other than 0 (which print and write nothing)
    summary: dict = field(default_factory=dict)  # run_summary.json: held-out setting, wall time, tokens/s


def lr_lambda(config: TrainConfig):
    """Linear warmup, then cosine decay to 10% of the peak over the remaining steps."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _seed_rank(seed: int, dist: Distributed) -> None:
    """Under DDP, give each rank its own random stream (dropout masks) once the model is built identically."""
    if dist.enabled:
        random.seed(seed + dist.rank), np.random.seed(seed + dist.rank), torch.manual_seed(seed + dist.rank)


@dataclass
class _Run:
    """What a run's steps work on, built once by `_train` on this rank."""

    config: TrainConfig
    precision: Precision
    dist: Distributed
    out: Path
    tokenizer: object
    model: torch.nn.Module
    step_module: torch.nn.Module  # the loss as DDP's module (the objective itself when alone)
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    train_data: CacheDataset | CacheMixture  # several caches: a CacheMixture (kdcache.train.mixing)
    heldout: CacheDataset | list[tuple[str, CacheDataset]]  # several caches: (label, held-out split) of each
    saved_step: int | None = None  # the step of the newest checkpoint in `out` (None before the first)
    hidden_term: HiddenTerm | None = None  # loss.hidden_weight > 0: the projector and the matched layers

    @property
    def projector(self) -> HiddenProjector | None:
        return None if self.hidden_term is None else self.hidden_term.projector

    def save_checkpoint(self, state: TrainState) -> None:
        resume = (f"it resumes from step {self.saved_step}" if self.saved_step is not None
                  else "it starts over, as no checkpoint was saved yet")
        size = sum(p.numel() for p in self.params) * 4 * 3  # float32 parameters and AdamW's two moments
        with storage_errors(f"saving the checkpoint of step {state.step} (about {size / 1e6:.1f} MB) in {self.out}",
                            f"then run the same command again: {resume}"):
            save_checkpoint(self.out, self.model, self.optimizer, self.scheduler, self.scaler, self.train_data, state,
                            self.dist, projector=self.projector)
        self.saved_step = state.step


def train(config: TrainConfig, stop_after_steps: int | None = None,
          on_eval: Callable[[dict], None] | None = None) -> TrainResult:
    """Train (or resume) a student from `config.cache` (or `config.caches`); `stop_after_steps` ends early as a kill
    would (tests). `on_eval` is called with each held-out evaluation's figures (the Optuna search's pruning); an
    exception it raises ends the run there, as a kill would.

    Under torchrun (``WORLD_SIZE`` > 1) this process joins the DDP group first and leaves it at the end.
    """
    for name in ("cache", "student", "out"):
        if not (config.sources() if name == "cache" else getattr(config, name)):
            raise BadInputError(f"no {name} given: set --{name}")
    check_output_folder(config.out, "--out")
    precision = resolve_precision(config.profile, full_finetune=not config.lora.enabled)
    if config.optimizer == "adamw_8bit":
        require_bitsandbytes("adamw_8bit", precision.device)  # before any model is loaded
    check_trackers(config.report_to)
    dist = dataclasses.replace(init_distributed(precision.device), strategy=config.distributed.strategy)
    try:
        precision = dataclasses.replace(precision, device=dist.device(precision.device))
        with storage_errors(f"training into {config.out}", "then run the same command again: it resumes from the "
                                                           "last checkpoint"):
            return _train(config, precision, dist, stop_after_steps, on_eval)
    finally:
        dist.shutdown()


def _train(config: TrainConfig, precision: Precision, dist: Distributed, stop_after_steps: int | None,
           on_eval: Callable[[dict], None] | None = None) -> TrainResult:
    """The training loop proper, on one rank of ``dist`` (the only one when not distributed)."""
    check_model_source(config.student, "student")  # "folder not found" before a run folder is made
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(config.seed), np.random.seed(config.seed), torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(config.student)
    common = dict(batch_size=config.batch_size, max_tokens=config.max_tokens, seed=config.seed,
                  heldout_fraction=config.heldout_fraction, rank=dist.rank, world_size=dist.world_size,
                  verify_checksums=config.verify_checksums)
    train_data = open_train_data(config, tokenizer, common)  # refuses another tokenizer unless loss uld or vocab_map
    ranks_sum = (lambda value: dist.all_sum([value], precision.device)[0]) if dist.enabled else None
    config = dataclasses.replace(config, max_steps=planned_steps(config, train_data, ranks_sum))  # num_epochs
    changes = check_resume_config(out, config) if has_checkpoint(out) else []  # before the model is loaded
    check_loss_for_caches(config.loss, named_manifests(train_data))  # before the model is loaded
    heldout = open_heldout(config, tokenizer, common)
    # FSDP: loaded on the CPU, then moved to the GPU one shard at a time (kdcache.train.fsdp)
    load_on = dataclasses.replace(precision, device=torch.device("cpu")) if dist.sharded else precision
    model = load_student(config.student, load_on, config.lora, train_data.vocab_size, config.gradient_checkpointing)
    hidden_term = _hidden_term(config, model, train_data.manifest.hidden, precision.device)
    objective = DistillationObjective(model, config.loss, config.chunk_size, train_data.vocab_size,
                                      config.loss.confidence_weight, hidden_term)
    if dist.sharded:  # before the optimizer is made: sharding replaces the parameters with their shards
        shard_objective(objective, precision.device, dist)
    params = [p for p in model.parameters() if p.requires_grad]
    if hidden_term is not None:  # trained with the adapters, after them (the optimizer's state is by position)
        params += list(hidden_term.projector.parameters())
    optimizer = make_optimizer(config.optimizer, params, config.lr, config.weight_decay, precision.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    scaler = torch.amp.GradScaler(precision.device.type, enabled=precision.grad_scaler)
    state = load_checkpoint(out, model, optimizer, scheduler, scaler, train_data, dist,
                            projector=None if hidden_term is None else hidden_term.projector)
    saved_step = None if state is None else state.step
    if state is None:
        state = TrainState()
        _seed_rank(config.seed, dist)
    step_module = wrap_for_training(objective, dist, precision.device)  # DDP when several ranks (FSDP: sharded)
    run = _Run(config, precision, dist, out, tokenizer, model, step_module, params, optimizer, scheduler, scaler,
               train_data, heldout, saved_step, hidden_term)
    if dist.is_main:
        record_config(out, config, changes, state.step)
    run_log = RunLog(out, state.step, config.report_to, active=dist.is_main, config=to_dict(config))
    from tqdm import tqdm

    bar = tqdm(total=config.max_steps, initial=state.step, desc="train",
               disable=not (config.progress and dist.is_main))
    model.train()
    batches = train_data if isinstance(train_data, CacheMixture) else EndlessBatches(train_data)
    first_step, stopped_early = state.step, False
    started, tokens = time.perf_counter(), 0
    while state.step < config.max_steps and not stopped_early:
        if stop_after_steps is not None and state.step - first_step >= stop_after_steps:
            break
        record = _optimizer_step(run, batches, state.step + 1)
        tokens += record.pop("tokens")
        state.step += 1
        run_log.write(record)
        _show_progress(bar, record)
        if config.eval_every and state.step % config.eval_every == 0:
            stopped_early = _evaluate_and_maybe_save(run, state, run_log)
        if state.step % config.save_every == 0 or state.step == config.max_steps or stopped_early:
            run_log.flush()
            run.save_checkpoint(state)
        if on_eval is not None and config.eval_every and state.step % config.eval_every == 0:
            run_log.flush()
            on_eval(state.evals[-1])
    bar.close()
    run_log.close()
    if state.step >= config.max_steps or stopped_early:
        save_student(model, tokenizer, out / "final", run.projector, dist)
    summary = run_summary(config, state, first_step, time.perf_counter() - started, tokens,
                          train_data.summary() if isinstance(train_data, CacheMixture) else None)
    if dist.is_main:
        (out / RUN_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    dist.barrier()
    return TrainResult(out=str(out), step=state.step, evals=state.evals, stopped_early=stopped_early,
                       is_main=dist.is_main, summary=summary)


def _hidden_term(config: TrainConfig, model, info, device) -> HiddenTerm | None:
    """The hidden-state term of a run with loss.hidden_weight > 0: the student layers matched to the cache's, and a
    projector from each to the cache's space (initialised from the run's seed, fp32, on the student's device)."""
    if config.loss.hidden_weight == 0:
        return None
    layers = student_layers_for(info, model, config.hidden_student_layers)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    projector = HiddenProjector(int(text.hidden_size), info.dim, len(layers)).to(device)
    return HiddenTerm(projector, layers, info.positions, config.loss.hidden_kind, config.loss.hidden_weight)


def _optimizer_step(run: _Run, batches: EndlessBatches | CacheMixture, step: int) -> dict:
    """Optimizer step number ``step``: ``grad_accum`` micro-batches (DDP all-reduces on the last only), loss scaling,
    gradient clipping, the schedule; returns the step's record (losses, lr, gradient norm, tokens/s, loader wait)."""
    config, device = run.config, run.precision.device
    started, tokens, wait = time.perf_counter(), 0, 0.0
    step_loss, step_parts = 0.0, {}  # means over the micro-batches of this step
    for micro in range(config.grad_accum):
        waited = time.perf_counter()
        batch = batches.next()
        wait += time.perf_counter() - waited
        batch = batch.to(device)
        with sync_context(run.step_module, sync=micro == config.grad_accum - 1):  # all-reduce on the last only
            with torch.autocast(device.type, dtype=run.precision.autocast_dtype,
                                enabled=run.precision.autocast_dtype is not None):
                loss, parts = run.step_module(batch)
            run.scaler.scale(loss / config.grad_accum).backward()
        step_loss = step_loss + loss.detach() / config.grad_accum  # tensors: no device sync per micro-batch
        for key, value in parts.items():
            step_parts[key] = step_parts.get(key, 0.0) + value.detach() / config.grad_accum
        tokens += batch.num_tokens
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, config.clip_grad)  # grads are already the ranks' mean
    grad_norm = full_tensor(grad_norm)  # FSDP: the norm over every rank's shards
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    record = _step_record(step, step_loss, step_parts, tokens, wait, started, run.dist, device)
    record.update(lr=run.scheduler.get_last_lr()[0], grad_norm=float(grad_norm))
    if device.type == "cuda":
        record["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


def _show_progress(bar, record: dict) -> None:
    postfix = {"loss": f"{record['loss']:.4f}", "tok_s": f"{record['tokens_per_s']:,.0f}"}
    if "max_memory_gib" in record:
        postfix["mem"] = f"{record['max_memory_gib']:.1f}G"
    bar.set_postfix(postfix, refresh=False)
    bar.update(1)


def _evaluate_and_maybe_save(run: _Run, state: TrainState, run_log: RunLog) -> bool:
    """Held-out figures at ``state.step``, logged and kept in ``state``; a new best is saved to best/. True when
    ``patience`` evaluations have passed without a new best (stop early)."""
    with unsharded_root(run.step_module, run.dist.sharded):  # FSDP: evaluation calls the head outside forward
        metrics = {"step": state.step, **evaluate_heldout(run.model, run.heldout, run.config.loss, run.precision,
                                                          run.config.chunk_size, run.dist,
                                                          getattr(run.tokenizer, "eos_token_id", None),
                                                          run.hidden_term)}
    run_log.write(metrics)
    state.evals.append(metrics)
    if state.best is None or metrics["heldout_kd"] < state.best:
        state.best, state.evals_since_best = metrics["heldout_kd"], 0
        save_student(run.model, run.tokenizer, run.out / "best", run.projector, run.dist)
    else:
        state.evals_since_best += 1
    return run.config.patience is not None and state.evals_since_best >= run.config.patience


def _step_record(step: int, loss, parts: dict, tokens: int, wait: float, started: float, dist: Distributed,
                 device) -> dict:
    """One step's figures over all ranks: losses averaged, tokens/s of the whole job, mean loader wait."""
    keys = sorted(parts)
    sums = dist.all_sum([float(loss), *(float(parts[k]) for k in keys), float(tokens), wait], device)
    n = dist.world_size
    seconds = time.perf_counter() - started
    record = {"step": step, "loss": sums[0] / n, **{k: v / n for k, v in zip(keys, sums[1:-2])}}
    record.update(tokens_per_s=sums[-2] / seconds, loader_wait_s=sums[-1] / n, step_s=seconds)
    record["tokens"] = int(sums[-2])  # the whole job's (the loop sums it for run_summary.json, not logged)
    return record


def saved_state(model) -> dict:
    """The state dict entries ``save_pretrained`` writes: a peft model's adapter (its ``lora_`` tensors and trained
    parameters, which peft picks from a full state dict anyway), so FSDP gathers no frozen base weight for nothing;
    another model's whole state dict."""
    state = model.state_dict()
    if not hasattr(model, "peft_config"):
        return state
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {key: value for key, value in state.items() if "lora_" in key or key in trained}


def save_student(model, tokenizer, folder: Path, projector: HiddenProjector | None = None,
                 dist: Distributed | None = None) -> None:
    """The adapter (LoRA) or the whole model, with the tokenizer: loadable with peft / transformers; a hidden-state
    projector goes beside it (hidden_projector.safetensors, which export leaves out). Rank 0 writes; under FSDP every
    rank calls this, to join the all-gathers of the whole weights (the folder is the same as without FSDP)."""
    dist = dist or Distributed()
    state = projector_state = None
    if dist.sharded:
        state = full_tensors(saved_state(model), keep=dist.is_main)
        projector_state = None if projector is None else full_tensors(projector.state_dict(), keep=dist.is_main)
    if not dist.is_main:
        return
    staging = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    model.save_pretrained(staging, state_dict=state)
    tokenizer.save_pretrained(staging)
    if projector is not None:
        projector.save(staging, projector_state)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
