"""Figures, checks and the markdown table of benchmarks/distill_quality.py (pure functions over its run results)."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

SPARSE_ARRAYS = ("sparse_ids", "sparse_logprobs", "tail_logmass", "sample_counts")
METRICS = ("accuracy", "macro_f1", "ece", "agreement")


def sparse_bytes(cache: str | Path) -> float:
    """On-disk bytes of the teacher-target arrays (ids, log-probs, tail or counts) per target token of a cache."""
    cache = Path(cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    total = sum(f.stat().st_size for name in SPARSE_ARRAYS
                for f in cache.glob(f"shards/*/tokens.zarr/{name}/**/*") if f.is_file())
    return total / max(1, manifest["counts"]["num_targets"])


def curve_summary(metrics_file: str | Path, max_steps: int, marks: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)) -> dict:
    """A compact training curve from a metrics.jsonl: the mean step loss (and its ce / kd parts) over the window
    of steps ending at each mark (10%, 25%, 50%, 100% of the run; windows of 10% of the steps), and every
    held-out evaluation (held-out loss, forward KL at T = 1 against the cache, top-1 agreement)."""
    path = Path(metrics_file)
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    window = max(1, max_steps // 10)
    curve: dict = {"window": window, "loss": {}, "heldout": []}
    for mark in marks:
        end = max(1, round(mark * max_steps))
        chunk = [r for r in steps if end - window < r["step"] <= end]
        if chunk:
            curve["loss"][str(end)] = {key: statistics.fmean(r[key] for r in chunk)
                                       for key in ("loss", "ce", "kd") if all(key in r for r in chunk)}
    for r in records:
        if "heldout_kd" in r:
            curve["heldout"].append({key: r[key] for key in ("step", "heldout_kd", "heldout_forward_kl",
                                                             "heldout_top1_agreement", "heldout_hidden_mse")
                                     if key in r})
    return curve


def _stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def arm_summary(results: list[dict], teacher: dict) -> dict:
    """Per arm: mean, sd and n over seeds of every test metric, retention (accuracy / teacher accuracy), the
    heldout-split accuracy (used to choose the best setting) and the last held-out forward KL of the curves."""
    by_arm: dict[str, list[dict]] = {}
    for result in results:
        by_arm.setdefault(result["arm"], []).append(result)
    summary = {}
    teacher_accuracy = teacher["test"]["accuracy"]
    for arm, runs in by_arm.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        row = {metric: _stats([r["test"][metric] for r in runs]) for metric in METRICS}
        row["retention"] = _stats([r["test"]["accuracy"] / teacher_accuracy for r in runs])
        row["heldout_accuracy"] = _stats([r["heldout"]["accuracy"] for r in runs])
        row["heldout_forward_kl"] = _stats([r["curve"]["heldout"][-1].get("heldout_forward_kl") for r in runs
                                            if r.get("curve", {}).get("heldout")])
        row["heldout_hidden_mse"] = _stats([r["curve"]["heldout"][-1].get("heldout_hidden_mse") for r in runs
                                            if r.get("curve", {}).get("heldout")])
        row["train_seconds"] = _stats([r["train_seconds"] for r in runs])
        row["seeds"] = [r["seed"] for r in runs]
        summary[arm] = row
    return summary


def _line(ok: bool | None, what: str, detail: str) -> dict:
    status = "n/a" if ok is None else ("PASS" if ok else "FAIL")
    return {"status": status, "check": what, "detail": detail}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def checks(summary: dict, best: str | None) -> list[dict]:
    """The issue's targets as PASS / FAIL / n/a lines (n/a: an arm is missing or has too few seeds)."""
    out = []
    hard = summary.get("hard")
    if hard and hard["accuracy"]["sd"] is not None:
        sd = hard["accuracy"]["sd"]
        out.append(_line(sd <= 0.03, "hard-label seed spread: sd of test accuracy <= 3 points",
                         f"sd {_pct(sd)} points over {hard['accuracy']['n']} seeds"))
    else:
        out.append(_line(None, "hard-label seed spread: sd of test accuracy <= 3 points", "needs >= 2 hard seeds"))
    for t in (1, 2, 4):
        sparse, dense = summary.get(f"fkl_T{t}_a0.1"), summary.get(f"dense_T{t}_a0.1")
        what = f"sparse vs dense at T = {t}: |mean difference| <= the larger seed sd (fkl_T{t}_a0.1 vs dense_T{t}_a0.1)"
        if not sparse or not dense or sparse["accuracy"]["sd"] is None or dense["accuracy"]["sd"] is None:
            out.append(_line(None, what, "needs both arms with >= 2 seeds"))
            continue
        diff = sparse["accuracy"]["mean"] - dense["accuracy"]["mean"]
        spread = max(sparse["accuracy"]["sd"], dense["accuracy"]["sd"])
        out.append(_line(abs(diff) <= spread, what, f"difference {_pct(diff)} points, spread {_pct(spread)} points"))
    what = "best distilled (>= 3 seeds) mean accuracy >= hard-label mean, with lower ECE"
    if best and hard and summary[best]["accuracy"]["n"] >= 3:
        b = summary[best]
        ok = b["accuracy"]["mean"] >= hard["accuracy"]["mean"] and b["ece"]["mean"] < hard["ece"]["mean"]
        out.append(_line(ok, what, f"{best}: {_pct(b['accuracy']['mean'])} vs {_pct(hard['accuracy']['mean'])}; "
                                   f"ECE {b['ece']['mean']:.3f} vs {hard['ece']['mean']:.3f}"))
    else:
        out.append(_line(None, what, "needs the hard arm and a distilled arm with >= 3 seeds"))
    gold = summary.get("gold10")
    for name in ("generated", "mixed"):
        what = f"label-scarce: {name} beats 10% gold labels by >= 10 points, with lower ECE"
        arm = summary.get(name)
        if not gold or not arm:
            out.append(_line(None, what, "needs the gold10 and " + name + " arms"))
            continue
        diff = arm["accuracy"]["mean"] - gold["accuracy"]["mean"]
        ok = diff >= 0.10 and arm["ece"]["mean"] < gold["ece"]["mean"]
        out.append(_line(ok, what, f"{_pct(diff)} points; ECE {arm['ece']['mean']:.3f} vs {gold['ece']['mean']:.3f}"))
    out += hidden_checks(summary)
    return out


def hidden_checks(summary: dict) -> list[dict]:
    """Issue 17: each KD + hidden MSE arm against KD alone from the same cache (hidden_kd_b0). Not a target, a
    finding: "helps" only when the mean gain in test accuracy exceeds the larger seed sd, "hurts" when the loss
    does, else "no difference" (inside the seed spread)."""
    control, out = summary.get("hidden_kd_b0"), []
    for name in sorted(n for n in summary if n.startswith("hidden_kd_b") and n != "hidden_kd_b0"):
        arm, what = summary[name], f"hidden MSE: {name} vs KD alone (hidden_kd_b0), test accuracy"
        if not control or control["accuracy"]["sd"] is None or arm["accuracy"]["sd"] is None:
            out.append(_line(None, what, "needs both arms with >= 2 seeds"))
            continue
        diff = arm["accuracy"]["mean"] - control["accuracy"]["mean"]
        spread = max(control["accuracy"]["sd"], arm["accuracy"]["sd"])
        verdict = "helps" if diff > spread else ("hurts" if diff < -spread else "no difference")
        out.append({"status": verdict.upper(), "check": what,
                    "detail": f"{_pct(diff)} points, seed spread {_pct(spread)} points; heldout accuracy "
                              f"{_pct(arm['heldout_accuracy']['mean'])} vs {_pct(control['heldout_accuracy']['mean'])}; "
                              f"last held-out hidden MSE {_cell(arm['heldout_hidden_mse'], 1.0, 3)}"})
    return out


def _cell(stats: dict, scale: float = 100.0, digits: int = 1) -> str:
    if stats["mean"] is None:
        return "-"
    mean = f"{scale * stats['mean']:.{digits}f}"
    return mean if stats["sd"] is None else f"{mean} ± {scale * stats['sd']:.{digits}f}"


def markdown(report: dict) -> str:
    """results.md: setup, caches, the table (mean ± sd over seeds) and the check lines."""
    size, teacher, machine = report["size"], report["teacher"], report["machine"]
    setup = (f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
             f"({machine['torch_threads']} threads), transformers {machine['transformers']}. {len(report['runs'])} "
             f"student runs, {sum(r['seconds'] for r in report['runs']) / 60:.1f} minutes of training and scoring "
             f"in all; this invocation took {report['seconds'] / 60:.1f} minutes.")
    rows = (f"Rows: teacher_train {size['teacher_train']}, student pool {size['student']} (10% held out by the "
            f"trainer), heldout {size['heldout']}, test {size['test']}. Teacher {report['parameters']['teacher']:,} "
            f"parameters {tuple(size['teacher'])} (hidden, layers, heads), {size['teacher_steps']} steps; student "
            f"{report['parameters']['student']:,} parameters {tuple(size['student_shape'])}, {size['steps']} "
            f"steps, batch {size['batch']}, lr {size['lr']}.")
    scores = (f"Teacher on test: accuracy {_pct(teacher['test']['accuracy'])}, macro-F1 "
              f"{_pct(teacher['test']['macro_f1'])}, ECE {teacher['test']['ece']:.3f}; heldout accuracy "
              f"{_pct(teacher['heldout']['accuracy'])}.")
    lines = ["# Distillation quality: WordNet 3.0 noun definition -> 24 categories", "", setup, rows, scores, ""]
    lines += ["| cache | sparsifier | examples | sparse bytes / target | all bytes / target | mean top-k mass |",
              "|---|---|---|---|---|---|"]
    for name, c in report["caches"].items():
        sp = c["sparsifier"]
        mass = "-" if c["mean_sparse_mass"] is None else f"{c['mean_sparse_mass']:.4f}"
        lines.append(f"| {name} | {sp['kind']} k={sp['k']} {sp['logprob_dtype']} | {c['examples']} "
                     f"(skipped {c['skipped_rows']}) | {c['sparse_bytes_per_target']:.1f} | "
                     f"{c['bytes_per_target_token']:.1f} | {mass} |")
    generated = report["caches"].get("generated", {})
    if "teacher_answer_accuracy" in generated:
        lines.append(f"\nThe teacher's generated answers on the pool: {_pct(generated['teacher_answer_accuracy'])}% "
                     f"equal the gold label, {_pct(generated['teacher_answer_is_label'])}% are one of the labels.")
    header = ("| arm | loss | T | alpha | cache | n | test acc % | macro-F1 % | ECE | agreement % | retention % "
              "| heldout acc % | held-out FKL | train s |")
    lines += ["", header, "|---" * 14 + "|"]
    for name, row in report["summary"].items():
        arm = report["arms"].get(name, {})
        loss = "dense KL" if arm.get("dense") else ("CE" if arm.get("alpha") == 1.0 else arm.get("loss", "?"))
        if arm.get("hidden_weight"):
            loss += f" + {arm['hidden_weight']:g} hidden MSE"
        if arm.get("vocab_map", "off") != "off":
            loss += f" via vocab map ({arm['vocab_map']})"
        best = " (best)" if name == report.get("best_distilled") else ""
        lines.append(f"| {name}{best} | {loss} | {arm.get('temperature')} | {arm.get('alpha')} | {arm.get('cache')} "
                     f"| {row['accuracy']['n']} | {_cell(row['accuracy'])} | {_cell(row['macro_f1'])} | "
                     f"{_cell(row['ece'], 1.0, 3)} | {_cell(row['agreement'])} | {_cell(row['retention'])} | "
                     f"{_cell(row['heldout_accuracy'])} | {_cell(row['heldout_forward_kl'], 1.0, 3)} | "
                     f"{_cell(row['train_seconds'], 1.0, 0)} |")
    lines += curve_lines(report["runs"])
    lines += ["", "Checks (the best distilled setting is chosen on the heldout split, never on test):", ""]
    lines += [f"- {c['status']}: {c['check']} ({c['detail']})" for c in report["checks"]]
    return "\n".join(lines)


def curve_lines(runs: list[dict]) -> list[str]:
    """The training curves, mean over seeds per arm: the mean step loss in the window ending at each mark, and the
    held-out forward KL (T = 1, against the cache) at each evaluation: where a student converges or overfits."""
    by_arm: dict[str, list[dict]] = {}
    for run in runs:
        if run.get("curve", {}).get("loss"):
            by_arm.setdefault(run["arm"], []).append(run["curve"])
    if not by_arm:
        return []
    marks = sorted({int(m) for curves in by_arm.values() for c in curves for m in c["loss"]})
    evals = sorted({h["step"] for curves in by_arm.values() for c in curves for h in c["heldout"]})
    lines = ["", "Training curves (mean over seeds): train loss over the window ending at step s, then held-out "
             "forward KL to the teacher at each evaluation.", "",
             "| arm | " + " | ".join(f"loss @{m}" for m in marks) + " | "
             + " | ".join(f"held-out FKL @{s}" for s in evals) + " |",
             "|---" * (1 + len(marks) + len(evals)) + "|"]
    for arm, curves in by_arm.items():
        loss = [_mean([c["loss"].get(str(m), {}).get("loss") for c in curves]) for m in marks]
        fkl = [_mean([h.get("heldout_forward_kl") for c in curves for h in c["heldout"] if h["step"] == s])
               for s in evals]
        lines.append(f"| {arm} | " + " | ".join(loss + fkl) + " |")
    return lines


def _mean(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.fmean(values):.3f}" if values else "-"


def machine(threads: int | None) -> dict:
    """The CPU, core and thread counts, and library versions, for the report."""
    import platform

    import torch
    import transformers

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": threads or torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
