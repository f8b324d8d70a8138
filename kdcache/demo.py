"""`kdcache demo`: the whole pipeline on the shipped UPSC sample, small enough for a laptop CPU.

Every stage calls the same public API a user with real weights uses (cache build, train, eval, compare); the demo
only chooses small sizes, and trains a small teacher first to stand in for Qwen2.5-72B-Instruct.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kdcache.config import CacheBuildConfig, TemplateConfig, TrainConfig, load_config
from kdcache.data.encode import encode
from kdcache.data.sources import Row
from kdcache.tiny import build_qwen2, build_tokenizer, save_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "upsc"
PROMPT = "Title: {title}\nArticle: {text}\nUPSC GS paper (GS1, GS2, GS3, GS4 or none)?"
TARGET = " {gs_paper}"
LABELS = ["GS1", "GS2", "GS3", "GS4", "none"]


@dataclass(frozen=True)
class DemoSize:
    """Model and training sizes; `smallest` is for the end-to-end test, `default` for a newcomer's first run."""

    vocab: int
    teacher_hidden: int
    teacher_layers: int
    student_hidden: int
    student_layers: int
    teacher_steps: int
    student_steps: int
    train_rows: int | None
    eval_rows: int | None
    words: int  # articles are cut to this many words, so sequences stay short on a CPU


SIZES = {
    "smallest": DemoSize(384, 64, 2, 32, 1, 60, 40, 120, 40, 40),
    "default": DemoSize(768, 128, 2, 64, 1, 250, 200, None, None, 60),
}


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _write_split(source: Path, out: Path, limit: int | None, words: int) -> str:
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    with open(out, "w") as handle:
        for row in rows[:limit]:
            handle.write(json.dumps({**row, "text": " ".join(row["text"].split()[:words])}) + "\n")
    return str(out)


def train_teacher_on_labels(model, tokenizer, data_file: str, steps: int, seed: int = 0) -> None:
    """Plain cross-entropy on the answer tokens: makes the stand-in teacher better than chance."""
    from kdcache.train.losses import LossConfig
    from kdcache.train.objective import chunked_distillation_loss

    template = TemplateConfig(prompt=PROMPT, target=TARGET)
    rows = [json.loads(line) for line in Path(data_file).read_text().splitlines() if line.strip()]
    encoded = [encode(template, tokenizer, Row(data_file, i, r), PROMPT.format(**r), TARGET.format(**r), 512)
               for i, r in enumerate(rows)]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = [encoded[int(i)] for i in torch.randint(len(encoded), (16,), generator=generator)]
        length = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), length), tokenizer.pad_token_id or 0)
        attention = torch.zeros_like(ids)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for row, e in enumerate(batch):
            ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
            attention[row, : len(e.input_ids)] = 1
            mask[row, : len(e.input_ids)] = torch.tensor(e.target_mask)
        # alpha = 1: cross-entropy only, so no teacher targets.
        loss, _ = chunked_distillation_loss(model, ids, attention, mask, None, ids[mask], LossConfig(alpha=1.0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def run_demo(out: str = "storage/demo", size: str = "default", progress: bool = True) -> dict:
    """Run every stage into `out`; returns the figures of the final table."""
    from kdcache.eval import EvalConfig, compare_runs, run_eval
    from kdcache.store.reader import CacheReader
    from kdcache.store.stats import cache_stats
    from kdcache.store.verify import verify_cache
    from kdcache.teacher.build import build_cache
    from kdcache.train.trainer import train

    spec = SIZES[size]
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_file = _write_split(EXAMPLES / "silver.jsonl", root / "train.jsonl", spec.train_rows, spec.words)
    eval_file = _write_split(EXAMPLES / "golden.jsonl", root / "heldout.jsonl", spec.eval_rows, spec.words)
    _say(f"data: {train_file} (training split), {eval_file} (held-out split)")

    _say("1/4 building a small teacher and student from Qwen2 configs; training the teacher on the labels "
         "(it stands in for Qwen2.5-72B-Instruct)")
    texts = [json.dumps(json.loads(line)) for line in Path(train_file).read_text().splitlines()]
    tokenizer = build_tokenizer(texts, vocab_size=spec.vocab)
    teacher = build_qwen2(len(tokenizer), spec.teacher_hidden, spec.teacher_layers, heads=2, seed=1)
    train_teacher_on_labels(teacher, tokenizer, train_file, spec.teacher_steps)
    teacher_dir = save_model(teacher, tokenizer, root / "teacher")
    student = build_qwen2(len(tokenizer), spec.student_hidden, spec.student_layers, heads=2, seed=2)
    student_dir = save_model(student, tokenizer, root / "student-untrained")
    del teacher, student

    _say("2/4 kdcache cache build: teacher top-k + tail over the training split")
    cache = str(root / "cache")
    build_cache(load_config(CacheBuildConfig, None, [
        f"output={cache}", f"teacher.model={teacher_dir}", f"data.paths=[{train_file}]", "data.id_field=id",
        "data.label_fields=[gs_paper]", f"template.prompt={json.dumps(PROMPT)}", f"template.target={json.dumps(TARGET)}",
        "sparsifier.k=32", "shard_size=64", "max_length=512", f"progress={str(progress).lower()}"]))
    assert verify_cache(cache).ok
    gc.collect()  # the teacher is gone from here on: training reads the cache alone

    _say("3/4 kdcache train: the student from the cache (distilled), and on hard labels only (alpha = 1)")
    runs = {}
    for name, alpha in (("distilled", 0.2), ("hard-labels", 1.0)):
        config = load_config(TrainConfig, None, [
            f"cache={cache}", f"student={student_dir}", f"out={root / 'runs' / name}", "profile=cpu",
            "lora.enabled=false", f"loss.alpha={alpha}", "loss.temperature=2.0", "batch_size=16", "lr=3e-3",
            f"max_steps={spec.student_steps}", f"eval_every={spec.student_steps}", f"save_every={spec.student_steps}",
            "heldout_fraction=0.1", f"progress={str(progress).lower()}"])
        runs[name] = train(config)

    untrained_kd = _heldout_kd(cache, student_dir)
    _say("4/4 kdcache eval on the held-out split, then kdcache compare")
    models = {"teacher": teacher_dir, "distilled": str(root / "runs" / "distilled" / "final"),
              "hard-labels": str(root / "runs" / "hard-labels" / "final"), "untrained": student_dir}
    metrics = {}
    for name, model in models.items():
        result = run_eval(EvalConfig(model=model, data=[eval_file], out=str(root / "eval" / name), labels=LABELS,
                                     label_field="gs_paper", prompt=PROMPT, negative_label="none", batch_size=8,
                                     progress=progress))
        metrics[name] = result.metrics
    compare_runs(root / "eval" / "teacher", root / "eval" / "distilled", names=("teacher", "distilled"),
                 out=root / "compare")
    bytes_per_target = cache_stats(CacheReader(cache))["bytes_per_target_token"]
    heldout_kd = {name: run.evals[-1]["heldout_forward_kl"] for name, run in runs.items()}
    heldout_kd["untrained"] = untrained_kd
    table = _table(metrics, heldout_kd, bytes_per_target)
    (root / "summary.md").write_text(table + "\n")
    print(table)
    _say(f"done in {time.perf_counter() - started:.0f} s; full report: {root / 'compare' / 'report.md'}")
    return {"metrics": metrics, "heldout_kd": heldout_kd, "cache": cache, "bytes_per_target_token": bytes_per_target,
            "report": str(root / "compare" / "report.md")}


def _heldout_kd(cache: str, student: str) -> float:
    """Held-out forward KL (T = 1) of a student against the cache, as the trainer's evaluation measures it."""
    from kdcache.config import LoraConfig, LossConfig
    from kdcache.train.loader import CacheDataset
    from kdcache.train.student import load_student, resolve_precision
    from kdcache.train.trainer import evaluate

    precision = resolve_precision("cpu", True)
    heldout = CacheDataset(cache, split="heldout", heldout_fraction=0.1, batch_size=16, shuffle=False)
    model = load_student(student, precision, LoraConfig(enabled=False), heldout.vocab_size)
    return evaluate(model, heldout, LossConfig(alpha=0.0), precision, 1024)["heldout_forward_kl"]


def _table(metrics: dict, heldout_kd: dict, bytes_per_target: float) -> str:
    lines = ["| model | accuracy | macro F1 | ECE | latency (ms) | parameters | held-out KD |",
             "|---|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        kd = heldout_kd.get(name)
        ece = m.get("calibration", {}).get("ece")
        lines.append(f"| {name} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | "
                     f"{'-' if ece is None else f'{ece:.3f}'} | {1000 * m['speed']['latency_mean_s']:.1f} | "
                     f"{m['size']['parameters']:,} | {'-' if kd is None else f'{kd:.3f}'} |")
    lines.append(f"\ncache: {bytes_per_target:.1f} bytes per target token (k = 32, with tokens and records)")
    return "\n".join(lines)
