"""Distillation quality on real data: does a student distilled from a kdcache cache beat the same student trained on
labels? (issue 10, point 5)

Task: WordNet 3.0 noun definition -> one of 24 one-word categories (benchmarks/realdata.py; `apt-get install
wordnet-base`; WordNet 3.0 licence, Princeton). A teacher (a small Qwen2 trained from scratch on `teacher_train`, rows
no student ever sees) stands in for a 72B model; every student starts from one saved init (a smaller Qwen2), with the
same lr and steps; a seed changes the data order only. Everything runs through kdcache's public pieces, as a user
would: `build_cache`, `train` and `run_eval` with config keys. The target is the label token alone
(template.add_eos=false): with an EOS after it, these small from-scratch models learned the label about half as
fast (teacher: 0.40 instead of 0.60 test accuracy for the same steps). Arms (`--only` takes names or fnmatch patterns):

  hard                  hard labels only (loss.alpha = 1) on the student pool
  fkl_T{1,2,4}_a{.1,.5} forward KL from the top-k (k = 64) cache, at temperature T and weight alpha on hard CE
  rkl_T1_a0.1, jsd_T1_a0.1   reverse KL, Jensen-Shannon
  sampled_T1_a0.1       a `sample` cache whose k (draws) is chosen to match the top-k cache's bytes per target
  fkl_T1_a0.1_bytes     forward KL from a top-k' cache with k' chosen to match the sample cache's bytes per target
  dense_T{1,2,4}_a0.1   reference: online KD, teacher in memory, full-vocabulary softmax (benchmarks/dense_kd.py)
  gold10                label-scarce: hard labels on 10% of the pool's gold labels
  generated             label-scarce: distilled from teacher-generated (greedy) answers on every pool row
  mixed                 label-scarce: gold label on that 10%, the teacher's answer elsewhere, teacher-forced cache
  xtok_hard, xtok_uld_a0.5, xtok_gold_skl_a0.{1,5}
                        issue 18: a student with another tokenizer (benchmarks/crosstok_student.py: a unigram
                        vocabulary of 1,536 tokens), hard labels vs ULD vs skew forward KL through the vocabulary
                        map (loss.vocab_map=hybrid); `--only 'xtok*'` runs just these
  hidden_kd_b{0,0.01,0.1,1}
                        issue 17: fkl_T1_a0.1 from a cache that also holds the teacher's hidden states (layers 1
                        and last, random projection 128 -> 64, fp16), plus beta * hidden MSE (b0: KD alone, the
                        control); `--only 'hidden*'` runs just these

Seeds: 2 per arm, 3 for hard and gold10, and a third for the best distilled arm. Every student (and the teacher) is
scored on the `test` split (accuracy, macro-F1, ECE, agreement with the teacher's predictions, retention = accuracy /
teacher accuracy) and on the `heldout` split, which alone chooses the best distilled arm. PASS / FAIL lines check
the issue's targets: hard-label sd <= 3 points; |fkl_T{T}_a0.1 - dense_T{T}_a0.1| <= the larger sd at T = 1, 2, 4;
best distilled mean >= hard mean with lower ECE; generated (and mixed) >= gold10 + 10 points with lower ECE.
Output in --out: results.md (table: mean ± sd over seeds) and results.json (every run's figures and curves). A run's
folder keeps result.json when finished, so a killed benchmark continues where it stopped; the report covers every
finished run in --out, also of arms left out by --only.

    python benchmarks/distill_quality.py --smoke --out /tmp/dq-smoke --threads 1            # 1.5-3 minutes
    python benchmarks/distill_quality.py --out storage/bench/distill_quality --threads 1   # ~45 minutes, 2 cores
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import yaml
from transformers import AutoTokenizer

from kdcache.config import CacheBuildConfig, TrainConfig, load_config
from kdcache.eval import EvalConfig, run_eval
from kdcache.store.reader import CacheReader
from kdcache.store.stats import cache_stats
from kdcache.teacher.build import build_cache
from kdcache.tiny import build_qwen2, build_tokenizer, save_model
from kdcache.train.loader import heldout_mask
from kdcache.train.trainer import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crosstok_student import unigram_student  # noqa: E402
from dense_kd import train_dense  # noqa: E402
from distill_report import arm_summary, checks, curve_summary, machine, markdown, sparse_bytes  # noqa: E402
from realdata import LABELS, load_splits  # noqa: E402

PROMPT = "Definition: {text}\nCategory:"
TARGET = " {label}"
TOPK = 64
TOPK_CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# The `hidden` cache (issue 17): the teacher's state after block 1 and its final (normed) state, each projected by a
# seeded random orthogonal matrix from 128 to 64 numbers, fp16, at the target positions.
HIDDEN_CACHE = ["hidden.layers=[1, last]", "hidden.reduction=random", "hidden.dim=64", "hidden.dtype=float16"]
SAMPLE_K_CANDIDATES = tuple(sorted({base * 2**i for base in (8, 12) for i in range(10)}))  # 8, 12, 16, ..., 6144


@dataclass(frozen=True)
class Size:
    teacher_train: int
    student: int  # the student pool
    heldout: int
    test: int
    vocab: int
    teacher: tuple[int, int, int]  # hidden, layers, heads
    teacher_steps: int
    teacher_lr: float
    student_shape: tuple[int, int, int]
    steps: int
    batch: int
    lr: float
    warmup: int
    seeds: int  # seeds for every arm; hard, gold10 and the best distilled arm get `best_seeds`
    best_seeds: int
    max_length: int = 96


SIZES = {
    "full": Size(teacher_train=14400, student=2400, heldout=480, test=1200, vocab=2048, teacher=(128, 2, 2),
                 teacher_steps=2400, teacher_lr=2e-3, student_shape=(64, 2, 2), steps=800, batch=32, lr=1e-3,
                 warmup=25, seeds=2, best_seeds=3),
    "smoke": Size(teacher_train=1920, student=480, heldout=96, test=192, vocab=768, teacher=(64, 1, 2),
                  teacher_steps=500, teacher_lr=3e-3, student_shape=(48, 1, 2), steps=150, batch=16, lr=3e-3,
                  warmup=0, seeds=1, best_seeds=1),
}


@dataclass(frozen=True)
class Arm:
    name: str
    cache: str  # topk | sample | topk_match | generated | mixed | gold10
    loss: str = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.1
    dense: bool = False
    group: str = "distilled"  # hard | distilled | dense | scarce | hidden
    many_seeds: bool = False  # hard-label rows get best_seeds
    hidden_weight: float = 0.0  # loss.hidden_weight (beta); needs the `hidden` cache
    student: str = "pool"  # pool: the student init (the teacher's tokenizer); unigram: another tokenizer
    vocab_map: str = "off"  # loss.vocab_map (a student with another tokenizer)


def arms() -> list[Arm]:
    out = [Arm("hard", "topk", alpha=1.0, group="hard", many_seeds=True)]
    out += [Arm(f"fkl_T{t}_a{a}", "topk", temperature=float(t), alpha=a) for t in (1, 2, 4) for a in (0.1, 0.5)]
    out += [Arm("rkl_T1_a0.1", "topk", "reverse_kl"), Arm("jsd_T1_a0.1", "topk", "jsd"),
            Arm("sampled_T1_a0.1", "sample", "sampled_ce"), Arm("fkl_T1_a0.1_bytes", "topk_match")]
    out += [Arm(f"dense_T{t}_a0.1", "topk", temperature=float(t), dense=True, group="dense") for t in (1, 2, 4)]
    out += [Arm("gold10", "gold10", alpha=1.0, group="scarce", many_seeds=True),
            Arm("generated", "generated", group="scarce"), Arm("mixed", "mixed", group="scarce")]
    out += [Arm(f"hidden_kd_b{b:g}", "hidden", hidden_weight=b, group="hidden") for b in (0.0, 0.01, 0.1, 1.0)]
    # Another tokenizer: the cache with character spans; the hard-label arm trains the same aligned positions.
    out += [Arm("xtok_hard", "spans", "uld", alpha=1.0, group="crosstok", student="unigram"),
            Arm("xtok_uld_a0.5", "spans", "uld", alpha=0.5, group="crosstok", student="unigram"),
            Arm("xtok_gold_skl_a0.1", "spans", "skew_forward_kl", group="crosstok", student="unigram",
                vocab_map="hybrid"),
            Arm("xtok_gold_skl_a0.5", "spans", "skew_forward_kl", alpha=0.5, group="crosstok", student="unigram",
                vocab_map="hybrid")]
    return out


def say(message: str, started: float) -> None:
    print(f"[distill_quality {time.perf_counter() - started:7.0f}s] {message}", flush=True)


def write_jsonl(rows: list[dict], path: Path) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


class Bench:
    """The benchmark's state: sizes, folders, data files, models and caches (each made once, reused when present)."""

    def __init__(self, size: Size, out: Path, started: float):
        self.size, self.out, self.started = size, out, started
        self.caches: dict[str, str] = {}
        self.cache_info: dict[str, dict] = {}
        self.teacher_eval: dict = {}

    def log(self, message: str) -> None:
        say(message, self.started)

    # ------------------------------------------------------------------ data and models

    def same_size(self) -> bool:
        """Record the sizes that shape the folder's content; False when OUT holds a benchmark of other sizes."""
        shaping = {k: v for k, v in asdict(self.size).items() if k not in ("seeds", "best_seeds")}
        shaping = json.loads(json.dumps(shaping))
        path = self.out / "size.json"
        if path.exists():
            return json.loads(path.read_text()) == shaping
        self.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(shaping, indent=2) + "\n")
        return True

    def prepare(self) -> None:
        s, data = self.size, self.out / "data"
        data.mkdir(parents=True, exist_ok=True)
        splits = load_splits(s.teacher_train, s.student, s.heldout, s.test, seed=0)
        self.files = {name: write_jsonl(rows, data / f"{name}.jsonl") for name, rows in splits.items()}
        self.pool = splits["student"]
        held = heldout_mask(range(len(self.pool)), self.heldout_fraction)  # the trainer's held-out rows
        self.gold_rows = [i for i in range(len(self.pool)) if not held[i]][: len(self.pool) // 10]
        self.files["gold10"] = write_jsonl([self.pool[i] for i in self.gold_rows], data / "gold10.jsonl")
        models = self.out / "models"
        self.teacher_init, self.student_init = models / "teacher-init", models / "student-init"
        if not (models / "tokenizer" / "tokenizer.json").exists():
            texts = [PROMPT.format(**r) + TARGET.format(**r) for k in ("teacher_train", "student") for r in splits[k]]
            build_tokenizer(texts, vocab_size=s.vocab, chat=False).save_pretrained(models / "tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(models / "tokenizer")
        single = sum(len(tokenizer(" " + label, add_special_tokens=False)["input_ids"]) == 1 for label in LABELS)
        self.log(f"tokenizer: {len(tokenizer)} tokens; {single} of {len(LABELS)} labels are one token")
        for folder, (hidden, layers, heads), seed in ((self.teacher_init, s.teacher, 1),
                                                      (self.student_init, s.student_shape, 2)):
            if not (folder / "config.json").exists():
                save_model(build_qwen2(len(tokenizer), hidden, layers, heads, seed=seed), tokenizer, folder)
        self.params = {name: _parameters(path) for name, path in
                       (("teacher", self.teacher_init), ("student", self.student_init))}

    @property
    def heldout_fraction(self) -> float:
        return 0.1

    # ------------------------------------------------------------------ caches

    def build(self, name: str, data_file: str, teacher: str, extra: list[str] = ()) -> str:
        path = self.out / "caches" / name
        if not (path / "manifest.json").exists():  # written last: a cache without it is (re)built or resumed
            t0 = time.perf_counter()
            build_cache(load_config(CacheBuildConfig, None, [
                f"output={path}", f"teacher.model={teacher}", f"data.paths=[{data_file}]", "data.id_field=id",
                "data.label_fields=[label]", f"template.prompt={json.dumps(PROMPT)}",
                f"template.target={json.dumps(TARGET)}", "template.chat='no'", "template.add_eos=false",
                f"sparsifier.k={TOPK}", "shard_size=100000", f"max_length={self.size.max_length}",
                "teacher.batch_size=64", "progress=false", *extra]))
            self.log(f"cache {name} built in {time.perf_counter() - t0:.0f} s")
        return str(path)

    def cache(self, key: str) -> str:
        if key in self.caches:
            return self.caches[key]
        teacher = str(self.teacher_dir)
        if key == "topk":
            path = self.build("topk64", self.files["student"], teacher)
        elif key == "gold10":
            path = self.build("gold10", self.files["gold10"], teacher)
        elif key == "generated":
            path = self.build("generated", self.files["student"], teacher,
                              ["generate.enabled=true", "generate.temperature=0", "generate.max_new_tokens=1"])
        elif key == "mixed":
            answers = {e.index: e.record["teacher_text"] for e in CacheReader(self.cache("generated")).iter_examples()}
            gold = set(self.gold_rows)
            rows = [{**r, "answer": " " + r["label"] if i in gold else answers[i]} for i, r in enumerate(self.pool)]
            data_file = write_jsonl(rows, self.out / "data" / "mixed.jsonl")
            path = self.build("mixed", data_file, teacher, ['template.target="{answer}"', "skip_bad_rows=true"])
        elif key == "sample":
            k = self.byte_match()["sample_k"]
            path = self.build(f"sample{k}", self.files["student"], teacher, ["sparsifier.kind=sample",
                                                                          f"sparsifier.k={k}"])
        elif key == "spans":  # the same top-64 cache, built with the target tokens' character spans
            path = self.build("topk64-spans", self.files["student"], teacher)
        elif key == "hidden":
            path = self.build("topk64-hidden", self.files["student"], teacher, HIDDEN_CACHE)
        elif key == "topk_match":
            k = self.byte_match()["topk_k"]
            path = self.build(f"topk{k}", self.files["student"], teacher, [f"sparsifier.k={k}"])
        else:
            raise ValueError(f"unknown cache {key!r}")
        stats = cache_stats(CacheReader(path))
        self.cache_info[key] = {"path": path, "sparse_bytes_per_target": sparse_bytes(path),
                                "bytes_per_target_token": stats["bytes_per_target_token"],
                                "mean_sparse_mass": stats["mean_sparse_mass"], "examples": stats["examples"],
                                "skipped_rows": stats["skipped_rows"], "target_tokens": stats["target_tokens"],
                                "sparsifier": CacheReader(path).sparsifier.to_dict()}
        if key == "generated":
            answers = [((e.record["teacher_text"] or "").strip(), json.loads(e.record["fields"])["label"])
                       for e in CacheReader(path).iter_examples()]
            self.cache_info[key]["teacher_answer_accuracy"] = sum(a == gold for a, gold in answers) / len(answers)
            self.cache_info[key]["teacher_answer_is_label"] = sum(a in LABELS for a, _ in answers) / len(answers)
        self.caches[key] = path
        return path

    def byte_match(self) -> dict:
        """Draws for the `sample` cache and a top-k' for the `topk_match` cache, chosen by bytes alone on the first
        rows of the pool, before any student is trained: the number of draws whose sample cache comes closest to the
        top-64 cache's sparse bytes per target (at most the vocabulary size: a confident teacher's draws repeat and
        compress well, so even the most draws may stay below), then the k' <= 64 whose top-k' cache comes closest
        to that sample cache, so that one top-k / sampled pair is at about equal bytes either way."""
        record = self.out / "caches" / "byte_match.json"
        if record.exists():
            return json.loads(record.read_text())
        probe = write_jsonl(self.pool[: max(64, len(self.pool) // 5)], self.out / "data" / "probe.jsonl")
        teacher = str(self.teacher_dir)
        topk = {k: sparse_bytes(self.build(f"probe-topk{k}", probe, teacher, [f"sparsifier.k={k}"]))
                for k in TOPK_CANDIDATES}
        sample = {k: sparse_bytes(self.build(f"probe-sample{k}", probe, teacher,
                                             ["sparsifier.kind=sample", f"sparsifier.k={k}"]))
                  for k in SAMPLE_K_CANDIDATES if k <= self.size.vocab}
        draws = min(sample, key=lambda k: abs(sample[k] - topk[TOPK]))
        match = min(topk, key=lambda k: abs(topk[k] - sample[draws]))
        found = {"sample_k": draws, "topk_k": match, "topk_sparse_bytes": topk, "sample_sparse_bytes": sample}
        record.write_text(json.dumps(found, indent=2) + "\n")
        self.log(f"bytes per target on {probe}: sample cache k = {draws} draws {sample[draws]:.1f}, top-{TOPK} "
                 f"{topk[TOPK]:.1f}, top-{match} {topk[match]:.1f}")
        return found

    # ------------------------------------------------------------------ teacher, students, evaluation

    def train_teacher(self) -> None:
        s = self.size
        self.teacher_dir = self.out / "teacher" / "final"
        if not (self.teacher_dir / "config.json").exists():
            t0 = time.perf_counter()
            cache = self.build("teacher-train", self.files["teacher_train"], str(self.teacher_init),
                               ["sparsifier.k=1"])
            train(load_config(TrainConfig, None, self.train_overrides(
                cache, self.teacher_init, self.out / "teacher", seed=0, alpha=1.0, heldout=0.0, lr=s.teacher_lr,
                steps=s.teacher_steps)))
            self.log(f"teacher trained in {time.perf_counter() - t0:.0f} s ({s.teacher_steps} steps)")
        done = self.out / "teacher" / "result.json"
        if not done.exists():
            scores = self.evaluate(self.out / "teacher", self.teacher_dir)
            scores["curve"] = curve_summary(self.out / "teacher" / "metrics.jsonl", s.teacher_steps)
            done.write_text(json.dumps(scores, indent=2) + "\n")
        self.teacher_eval = json.loads(done.read_text())
        self.log(f"teacher: test accuracy {self.teacher_eval['test']['accuracy']:.3f}, heldout "
                 f"{self.teacher_eval['heldout']['accuracy']:.3f} ({self.params['teacher']:,} parameters)")

    def train_overrides(self, cache: str, student, out: Path, seed: int, alpha: float, heldout: float,
                        lr: float | None = None, steps: int | None = None, arm: Arm | None = None) -> list[str]:
        s = self.size
        steps = steps or s.steps
        evals = max(1, steps // 4) if heldout > 0 else 0  # held-out curve at 25, 50, 75, 100% of the run
        loss = [f"loss.kind={arm.loss}", f"loss.temperature={arm.temperature}"] if arm else []
        if arm and arm.hidden_weight:
            loss.append(f"loss.hidden_weight={arm.hidden_weight}")
        if arm and arm.vocab_map != "off":
            loss.append(f"loss.vocab_map={arm.vocab_map}")
        return [f"cache={cache}", f"student={student}", f"out={out}", "profile=cpu", "lora.enabled=false",
                f"loss.alpha={alpha}", *loss, f"batch_size={s.batch}", f"lr={lr or s.lr}", f"max_steps={steps}",
                f"warmup_steps={min(s.warmup, steps // 2)}", f"eval_every={evals}", f"save_every={max(1, steps // 4)}",
                f"heldout_fraction={heldout}", f"seed={seed}", "progress=false", "tensorboard=false"]

    def evaluate(self, run_dir: Path, model: Path) -> dict:
        result = {}
        for split in ("test", "heldout"):
            config = EvalConfig(model=str(model), data=[self.files[split]], out=str(run_dir / f"eval-{split}"),
                                labels=list(LABELS), label_field="label", prompt=PROMPT, chat="no",
                                batch_size=16, max_length=self.size.max_length, warmup=False, plots=False)
            evaluated = run_eval(config)
            m = evaluated.metrics
            result[split] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                             "ece": m.get("calibration", {}).get("ece"),
                             "predictions": {r["id"]: r["predicted"] for r in evaluated.predictions}}
        return result

    def finished(self) -> list[dict]:
        """Every finished run in OUT (also those of arms left out by --only), in arm order, then by seed."""
        order = {a.name: i for i, a in enumerate(arms())}
        found = [json.loads(p.read_text()) for p in (self.out / "runs").glob("*/seed*/result.json")]
        return sorted(found, key=lambda r: (order.get(r["arm"], len(order)), r["seed"]))

    def run(self, arm: Arm, seed: int) -> dict:
        """Train (or reuse) one student and score it; the figures are kept in the run folder's result.json."""
        run_dir = self.out / "runs" / arm.name / f"seed{seed}"
        done = run_dir / "result.json"
        if done.exists():
            return json.loads(done.read_text())
        t0 = time.perf_counter()
        cache = self.cache(arm.cache)
        heldout = 0.0 if arm.cache == "gold10" else self.heldout_fraction
        if arm.dense:
            final = train_dense(str(self.student_init), str(self.teacher_dir), cache, run_dir,
                                temperature=arm.temperature, alpha=arm.alpha, seed=seed, batch_size=self.size.batch,
                                max_steps=self.size.steps, lr=self.size.lr, heldout_fraction=heldout,
                                warmup_steps=min(self.size.warmup, self.size.steps // 2))
        else:
            student = self.student_init if arm.student == "pool" else unigram_student(
                self.out, [PROMPT.format(**r) + TARGET.format(**r) for r in self.pool], self.size.student_shape,
                LABELS, self.log)
            train(load_config(TrainConfig, None, self.train_overrides(cache, student, run_dir, seed,
                                                                      arm.alpha, heldout, arm=arm)))
            final = run_dir / "final"
        train_s = time.perf_counter() - t0
        scores = self.evaluate(run_dir, final)
        result = {"arm": arm.name, "seed": seed, "train_seconds": train_s,
                  "seconds": time.perf_counter() - t0, "curve": curve_summary(run_dir / "metrics.jsonl",
                                                                              self.size.steps)}
        for split, figures in scores.items():
            teacher = self.teacher_eval[split]["predictions"]
            predictions = figures.pop("predictions")
            figures["agreement"] = sum(predictions[i] == teacher[i] for i in teacher) / len(teacher)
            result[split] = figures
        done.write_text(json.dumps(result, indent=2) + "\n")
        return result


def _parameters(folder: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", default="storage/bench/distill_quality", help="folder for everything (resumable)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 seed, a few steps (a quick check)")
    parser.add_argument("--only", default=None, help="comma-separated arm names or fnmatch patterns (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: 2, 3 for the hard-label, "
                        "gold10 and best rows; smoke: 1)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change one size field, e.g. --set steps=800 --set student_shape=[96,2,2] (sizing runs)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    size = SIZES["smoke" if args.smoke else "full"]
    if args.seeds:
        size = replace(size, seeds=args.seeds, best_seeds=max(args.seeds, size.best_seeds))
    for assignment in args.set:
        key, _, raw = assignment.partition("=")
        if key not in Size.__dataclass_fields__:
            parser.error(f"--set {assignment}: the size fields are {', '.join(Size.__dataclass_fields__)}")
        value = yaml.safe_load(raw)
        size = replace(size, **{key: tuple(value) if isinstance(value, list) else value})
    selected = arms()
    if args.only:
        patterns = [p.strip() for p in args.only.split(",") if p.strip()]
        selected = [a for a in selected if any(fnmatch.fnmatchcase(a.name, p) for p in patterns)]
        if not selected:
            parser.error(f"--only {args.only} matches no arm; arms: {', '.join(a.name for a in arms())}")
    started = time.perf_counter()
    bench = Bench(size, Path(args.out), started)
    if not bench.same_size():
        parser.error(f"{args.out} was made with other sizes ({bench.out / 'size.json'}): use another --out")
    bench.prepare()
    bench.train_teacher()
    if any(a.cache == "topk_match" for a in selected) and bench.byte_match()["topk_k"] == TOPK:
        bench.log(f"the sample cache already matches top-{TOPK}: fkl_T1_a0.1 is the equal-bytes pair, "
                  "fkl_T1_a0.1_bytes is left out")
        selected = [a for a in selected if a.cache != "topk_match"]
    plan = [(arm, seed) for arm in selected for seed in range(size.best_seeds if arm.many_seeds else size.seeds)]

    def execute(arm: Arm, seed: int, number: int, total: int) -> None:
        t0 = time.perf_counter()
        result = bench.run(arm, seed)
        test = result["test"]
        bench.log(f"run {number}/{total} {arm.name} seed {seed}: test acc {test['accuracy']:.3f} F1 "
                  f"{test['macro_f1']:.3f} ECE {test['ece']:.3f} agree {test['agreement']:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)")

    for number, (arm, seed) in enumerate(plan, 1):
        execute(arm, seed, number, len(plan))
    # The best distilled setting, chosen on the heldout split (never on test), gets best_seeds seeds.
    known = {a.name: a for a in arms()}
    summary = arm_summary(bench.finished(), bench.teacher_eval)
    candidates = [known[name] for name in summary if known.get(name) and known[name].group == "distilled"]
    best = max(candidates, key=lambda a: summary[a.name]["heldout_accuracy"]["mean"], default=None)
    if best is not None and best in selected:
        extra = [(best, seed) for seed in range(size.seeds, size.best_seeds)]
        for number, (arm, seed) in enumerate(extra, 1):
            execute(arm, seed, number, len(extra))
        summary = arm_summary(bench.finished(), bench.teacher_eval)
    reported = [known[name] for name in summary if name in known]
    for key in dict.fromkeys(a.cache for a in reported):  # byte figures also for caches of reused runs
        bench.cache(key)
    report = {"size": asdict(size), "machine": machine(args.threads), "parameters": bench.params,
              "teacher": {k: v for k, v in bench.teacher_eval.items()},
              "caches": bench.cache_info, "best_distilled": best.name if best else None,
              "arms": {a.name: asdict(a) for a in reported}, "summary": summary, "runs": bench.finished(),
              "seconds": time.perf_counter() - started}
    for split in ("test", "heldout"):
        report["teacher"][split] = {k: v for k, v in bench.teacher_eval[split].items() if k != "predictions"}
    report["checks"] = checks(summary, report["best_distilled"])
    text = markdown(report)
    (bench.out / "results.md").write_text(text + "\n")
    (bench.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    bench.log(f"done; wrote {bench.out / 'results.md'} and {bench.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
