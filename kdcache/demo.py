"""`kdcache demo`: the whole pipeline on the shipped UPSC sample, small enough for a laptop CPU.

The setting is the one distillation is for: a silver set. A teacher (a small model trained here on labelled rows
the students never see, standing in for Qwen2.5-72B-Instruct) answers a pool of rows of which only 10 % have gold
labels. Two students of the same size learn from that pool: one by plain fine-tuning on the gold 10 %, one from a
cache of the teacher's own answers and its top-k + tail over the whole pool. Both are evaluated on the golden set.

Every stage calls the same public API a user with real weights uses (cache build, train, eval, compare); the demo
only chooses small sizes.
"""

from __future__ import annotations

import gc
import json
import time
from collections import defaultdict
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
TEACHER_ROWS = 200  # the first half of silver.jsonl: the teacher's labelled data, never shown to a student
GOLD_FRACTION = 0.1  # of the student pool (the other half), per class: the only gold labels the students get
HELDOUT_FRACTION = 0.1  # of the pool, kept out of training: the rows the "held-out KD" column is measured on
# The teacher is confident on the pool (it fits its own rows), so T = 2 (the UPSC recipe's, one of the cache's exact
# temperatures: DEFAULT_TAIL_TEMPERATURES) softens it enough to pass on how it ranks the other papers.
TEMPERATURE = 2.0
ALPHA = 0.0  # no CE: the pool's only "labels" are the teacher's own answer tokens, already in its top-k


@dataclass(frozen=True)
class DemoSize:
    """Model and training sizes; `tiny` is a smoke run (figures meaningless), `smallest` is for the end-to-end test,
    `default` for a newcomer's first run."""

    vocab: int
    teacher_hidden: int
    teacher_layers: int
    student_hidden: int
    student_layers: int
    teacher_steps: int
    student_steps: int  # the same for both students
    words: int  # articles are cut to this many words, so sequences stay short on a CPU


SIZES = {
    # tiny: a smoke run in seconds for the quickstart walk-through test; every file is written, the figures mean
    # nothing (a few training steps).
    "tiny": DemoSize(512, 32, 1, 32, 1, 4, 4, 8),
    "smallest": DemoSize(1024, 128, 2, 64, 1, 200, 1000, 10),
    "default": DemoSize(2048, 256, 2, 64, 1, 200, 1000, 20),
}


def _say(started: float, message: str) -> None:
    print(f"[demo {time.perf_counter() - started:3.0f} s] {message}", flush=True)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(rows: list[dict], out: Path, words: int, keep_label: bool = True) -> str:
    with open(out, "w") as handle:
        for row in rows:
            row = {**row, "text": " ".join(row["text"].split()[:words])}
            if not keep_label:
                row = {k: row[k] for k in ("id", "title", "text")}
            handle.write(json.dumps(row) + "\n")
    return str(out)


def gold_subset(pool: list[dict]) -> list[int]:
    """Indices of the pool rows whose gold labels the students get: GOLD_FRACTION of each class (at least one),
    the first such rows outside the pool's held-out split."""
    from kdcache.train.loader import heldout_mask

    held = heldout_mask(list(range(len(pool))), HELDOUT_FRACTION)
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(pool):
        by_class[row["gs_paper"]].append(i)
    chosen = []
    for label in LABELS:
        rows = by_class[label]
        chosen += [i for i in rows if not held[i]][: max(1, round(GOLD_FRACTION * len(rows)))]
    return sorted(chosen)


def split_silver(root: Path, words: int) -> dict:
    """silver.jsonl -> the teacher's labelled rows, the students' pool (no labels) and its gold part (labels);
    golden.jsonl -> the evaluation rows. Returns the file paths and row counts."""
    silver = _read(EXAMPLES / "silver.jsonl")
    teacher_rows, pool = silver[:TEACHER_ROWS], silver[TEACHER_ROWS:]
    gold = [pool[i] for i in gold_subset(pool)]
    return {"teacher": _write(teacher_rows, root / "teacher.jsonl", words),
            "pool": _write(pool, root / "pool.jsonl", words, keep_label=False),
            "gold": _write(gold, root / "gold.jsonl", words),
            "golden": _write(_read(EXAMPLES / "golden.jsonl"), root / "golden.jsonl", words),
            "rows": {"teacher": len(teacher_rows), "pool": len(pool), "gold": len(gold)}}


def train_teacher_on_labels(model, tokenizer, data_file: str, steps: int, seed: int = 0) -> None:
    """Plain cross-entropy on the answer tokens of the teacher's labelled rows: the stand-in for a strong teacher."""
    from kdcache.train.losses import LossConfig
    from kdcache.train.objective import chunked_distillation_loss

    template = TemplateConfig(prompt=PROMPT, target=TARGET)
    rows = [json.loads(line) for line in Path(data_file).read_text().splitlines() if line.strip()]
    encoded = [encode(template, tokenizer, Row(data_file, i, r), PROMPT.format(**r), TARGET.format(**r), 512)
               for i, r in enumerate(rows)]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
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


def _build(out: str, teacher: str, data: str, progress: bool, generate: bool) -> str:
    """`kdcache cache build` of the teacher over `data`: its own greedy answers (generate) or the gold labels."""
    from kdcache.store.verify import verify_cache
    from kdcache.teacher.build import build_cache

    # " GS3" + EOS is 4 tokens with the demo's tokenizer: room for any label, and a teacher that rambles is cut short.
    answers = ["generate.enabled=true", "generate.max_new_tokens=4"] if generate else ["data.label_fields=[gs_paper]"]
    build_cache(load_config(CacheBuildConfig, None, [
        f"output={out}", f"teacher.model={teacher}", f"data.paths=[{data}]", "data.id_field=id", *answers,
        f"template.prompt={json.dumps(PROMPT)}", f"template.target={json.dumps(TARGET)}", "sparsifier.k=32",
        "shard_size=64", "max_length=512", f"progress={str(progress).lower()}"]))
    assert verify_cache(out).ok
    return out


def _train(cache: str, student: str, out: Path, steps: int, alpha: float, heldout: float, progress: bool):
    from kdcache.train.trainer import train

    return train(load_config(TrainConfig, None, [
        f"cache={cache}", f"student={student}", f"out={out}", "profile=cpu", "lora.enabled=false",
        f"loss.alpha={alpha}", f"loss.temperature={TEMPERATURE}", "batch_size=16", "lr=3e-3", f"max_steps={steps}",
        f"eval_every={steps if heldout else 0}", f"save_every={steps}", f"heldout_fraction={heldout}",
        f"progress={str(progress).lower()}"]))


def run_demo(out: str = "storage/demo", size: str | DemoSize = "default", progress: bool = True) -> dict:
    """Run every stage into `out`; returns the figures of the final table."""
    from kdcache.eval import EvalConfig, compare_runs, run_eval
    from kdcache.store.reader import CacheReader
    from kdcache.store.stats import cache_stats

    spec = SIZES[size] if isinstance(size, str) else size
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    files = split_silver(root, spec.words)
    rows = files["rows"]
    setting = (f"teacher trained on {rows['teacher']} labelled rows; students: {rows['pool']} rows, "
               f"{rows['gold']} with gold labels ({rows['gold'] / rows['pool']:.0%})")
    _say(started, f"data: {setting}; every model is evaluated on {files['golden']}, which none trains on")

    _say(started, "1/4 building a small teacher and student from Qwen2 configs; training the teacher on its "
                  "labelled rows (it stands in for Qwen2.5-72B-Instruct)")
    silver = _read(EXAMPLES / "silver.jsonl")
    tokenizer = build_tokenizer([f"user\n{PROMPT.format(**r)}\nassistant\n{TARGET.format(**r)}" for r in silver],
                                vocab_size=spec.vocab)
    teacher = build_qwen2(len(tokenizer), spec.teacher_hidden, spec.teacher_layers, heads=2, seed=1)
    train_teacher_on_labels(teacher, tokenizer, files["teacher"], spec.teacher_steps)
    teacher_dir = save_model(teacher, tokenizer, root / "teacher")
    student = build_qwen2(len(tokenizer), spec.student_hidden, spec.student_layers, heads=2, seed=2)
    student_dir = save_model(student, tokenizer, root / "student-untrained")
    del teacher, student

    _say(started, "2/4 kdcache cache build: the teacher writes an answer to every pool row (greedy) and its top-k + "
                  "tail is cached there; a second, teacher-forced cache holds the gold rows with their labels")
    cache = _build(str(root / "cache"), teacher_dir, files["pool"], progress, generate=True)
    gold_cache = _build(str(root / "cache-gold"), teacher_dir, files["gold"], progress, generate=False)
    gc.collect()  # the teacher is gone from here on: training reads the caches alone

    _say(started, f"3/4 kdcache train: the student distilled from the teacher's answers over the pool "
                  f"(T = {TEMPERATURE:g}, alpha = {ALPHA:g}, {HELDOUT_FRACTION:.0%} held out), and the same student "
                  "fine-tuned on the gold labels only (alpha = 1)")
    runs = {"distilled": _train(cache, student_dir, root / "runs" / "distilled", spec.student_steps, ALPHA,
                                HELDOUT_FRACTION, progress),
            "hard-labels": _train(gold_cache, student_dir, root / "runs" / "hard-labels", spec.student_steps, 1.0,
                                  0.0, progress)}

    _say(started, "4/4 kdcache eval on the golden set, then kdcache compare")
    models = {"teacher": teacher_dir, "distilled": str(root / "runs" / "distilled" / "final"),
              "hard-labels": str(root / "runs" / "hard-labels" / "final"), "untrained": student_dir}
    metrics = {}
    for name, model in models.items():
        result = run_eval(EvalConfig(model=model, data=[files["golden"]], out=str(root / "eval" / name),
                                     labels=LABELS, label_field="gs_paper", prompt=PROMPT, negative_label="none",
                                     batch_size=8, progress=progress))
        metrics[name] = result.metrics
    compare_runs(root / "eval" / "teacher", root / "eval" / "distilled", names=("teacher", "distilled"),
                 out=root / "compare")
    bytes_per_target = cache_stats(CacheReader(cache))["bytes_per_target_token"]
    # One yardstick for every student: forward KL to the teacher on the pool rows the distilled run held out.
    heldout_kd = {"distilled": runs["distilled"].evals[-1]["heldout_forward_kl"]}
    for name in ("hard-labels", "untrained"):
        heldout_kd[name] = _heldout_kd(cache, models[name])
    table = _table(metrics, heldout_kd, bytes_per_target, setting)
    (root / "summary.md").write_text(table + "\n")
    print(table)
    _say(started, f"done in {time.perf_counter() - started:.0f} s; full report: {root / 'compare' / 'report.md'}")
    return {"metrics": metrics, "heldout_kd": heldout_kd, "cache": cache, "gold_cache": gold_cache,
            "bytes_per_target_token": bytes_per_target, "rows": rows, "report": str(root / "compare" / "report.md")}


def _heldout_kd(cache: str, student: str) -> float:
    """Held-out forward KL (T = 1) of a student against the cache, as the trainer's evaluation measures it."""
    from kdcache.config import LoraConfig, LossConfig
    from kdcache.train.loader import CacheDataset
    from kdcache.train.student import load_student, resolve_precision
    from kdcache.train.heldout import evaluate

    precision = resolve_precision("cpu", True)
    heldout = CacheDataset(cache, split="heldout", heldout_fraction=HELDOUT_FRACTION, batch_size=16, shuffle=False)
    model = load_student(student, precision, LoraConfig(enabled=False), heldout.vocab_size)
    return evaluate(model, heldout, LossConfig(alpha=0.0), precision, 1024)["heldout_forward_kl"]


def _table(metrics: dict, heldout_kd: dict, bytes_per_target: float, setting: str) -> str:
    lines = ["| model | accuracy | macro F1 | ECE | latency (ms) | parameters | held-out KD |",
             "|---|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        kd = heldout_kd.get(name)
        ece = m.get("calibration", {}).get("ece")
        lines.append(f"| {name} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | "
                     f"{'-' if ece is None else f'{ece:.3f}'} | {1000 * m['speed']['latency_mean_s']:.1f} | "
                     f"{m['size']['parameters']:,} | {'-' if kd is None else f'{kd:.3f}'} |")
    lines.append(f"\nsetting: {setting}")
    lines.append(f"cache: {bytes_per_target:.1f} bytes per target token (k = 32, with tokens and records)")
    return "\n".join(lines)
