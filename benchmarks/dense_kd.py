"""The dense online-KD reference for benchmarks/distill_quality.py: a small, independent training loop.

The teacher is held in memory and run on every batch; its full-vocabulary distribution is softened at temperature T
and the student is trained on

    loss = alpha * CE(student, gold token) + (1 - alpha) * T^2 * KL(q_T || p_T)

averaged over the target tokens, where q_T = softmax(teacher logits / T) and p_T = softmax(student logits / T) over
the whole vocabulary (Hinton et al. 2015). No kdcache loss code is used: this is what a cache-free distillation
would compute, so a student trained from a kdcache cache should land within the seed spread of it.

To make the comparison about the targets alone, everything else matches `kdcache train`: the batches are the
trainer's own (the same `CacheDataset` over the same cache, split, seed, batch size and epochs: only the cache's
input tokens and target mask are read, never its sparse targets), AdamW with no weight decay, gradient clipping at
1.0, and the trainer's schedule (linear warmup, then cosine decay to 10% of the peak).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdcache.train.loader import CacheDataset


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """The learning-rate multiplier at `step` (0-based): linear warmup, then cosine decay to 0.1 (as the trainer)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def target_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor):
    """Logits [N, V] at the positions that predict the N target tokens (row-major order of `target_mask`)."""
    rows, cols = target_mask.nonzero(as_tuple=True)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return model.get_output_embeddings()(hidden[rows, cols - 1]).float()


def dense_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                  temperature: float, alpha: float) -> tuple[torch.Tensor, dict]:
    """alpha * CE + (1 - alpha) * T^2 * KL(q_T || p_T), means over the N positions; logits [N, V], labels [N]."""
    ce = F.cross_entropy(student_logits, labels)
    log_q = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_p = F.log_softmax(student_logits / temperature, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    loss = alpha * ce + (1 - alpha) * temperature**2 * kl
    return loss, {"ce": ce.item(), "kd": temperature**2 * kl.item()}


def train_dense(student: str, teacher: str, cache: str, out: str | Path, *, temperature: float, alpha: float,
                seed: int, batch_size: int, max_steps: int, lr: float, heldout_fraction: float,
                warmup_steps: int = 0, clip_grad: float = 1.0, log_every: int = 1) -> Path:
    """Train the student folder `student` against the teacher folder `teacher` on the batches `kdcache train` would
    draw from `cache`; write OUT/metrics.jsonl (step, loss, ce, kd, lr) and the model to OUT/final. Returns OUT/final.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(student)
    data = CacheDataset(cache, split="train", batch_size=batch_size, seed=seed, heldout_fraction=heldout_fraction,
                        tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, max_steps))
    iterator = iter(data)
    with open(out / "metrics.jsonl", "w") as log:
        for step in range(1, max_steps + 1):
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:  # next epoch, as the trainer does
                data.set_epoch(data.epoch + 1)
                iterator = iter(data)
                batch = next(iterator)
            rows, cols = batch.target_mask.nonzero(as_tuple=True)
            labels = batch.input_ids[rows, cols]
            with torch.no_grad():
                teacher_z = target_logits(teacher_model, batch.input_ids, batch.attention_mask, batch.target_mask)
            student_z = target_logits(model, batch.input_ids, batch.attention_mask, batch.target_mask)
            loss, parts = dense_kd_loss(student_z, teacher_z, labels, temperature, alpha)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step % log_every == 0 or step == max_steps:
                log.write(json.dumps({"step": step, "loss": loss.item(), **parts, "lr": scheduler.get_last_lr()[0],
                                      "seconds": time.perf_counter() - started}) + "\n")
    model.save_pretrained(out / "final")
    tokenizer.save_pretrained(out / "final")
    return out / "final"
