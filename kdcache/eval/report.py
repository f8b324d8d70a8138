"""Markdown reports: one run (`kdcache eval`) and two runs side by side (`kdcache compare`)."""

from __future__ import annotations

import math
from typing import Any

from kdcache.eval.criteria import CheckResult

# (row title, dotted path into metrics.json, kind): kinds decide formatting and how differences are shown.
HEADLINE = [
    ("Accuracy", "accuracy", "pct"),
    ("Macro F1", "macro_f1", "pct"),
    ("Micro F1", "micro_f1", "pct"),
    ("Macro precision", "macro_precision", "pct"),
    ("Macro recall", "macro_recall", "pct"),
    ("Relevance accuracy", "relevance.accuracy", "pct"),
    ("Relevance precision", "relevance.precision", "pct"),
    ("Relevance recall", "relevance.recall", "pct"),
    ("Relevance F1", "relevance.f1", "pct"),
    ("Label accuracy on relevant", "relevance.accuracy_on_relevant", "pct"),
    ("Unparsed generations", "unparsed", "int"),
    ("ECE", "calibration.ece", "num"),
    ("Mean confidence", "confidence.mean", "pct"),
    ("Mean confidence, right", "confidence.mean_correct", "pct"),
    ("Mean confidence, wrong", "confidence.mean_wrong", "pct"),
    ("Exact match", "generation.exact_match", "pct"),
    ("Token F1", "generation.token_f1", "pct"),
    ("ROUGE-L", "generation.rouge_l", "pct"),
    ("BLEU", "generation.bleu", "pct"),
    ("chrF", "generation.chrf", "pct"),
]
SPEED = [
    ("Latency per example, mean", "speed.latency_mean_s", "ms"),
    ("Latency per example, p95", "speed.latency_p95_s", "ms"),
    ("Throughput", "speed.throughput_per_s", "rate"),
    ("Peak GPU memory", "speed.peak_gpu_memory_bytes", "bytes"),
    ("Parameters", "size.parameters", "count"),
    ("Adapter parameters", "size.adapter_parameters", "count"),
    ("Size on disk", "size.size_on_disk_bytes", "bytes"),
    ("Base model size on disk", "size.base_size_on_disk_bytes", "bytes"),
]


def get(metrics: dict, path: str) -> Any:
    node: Any = metrics
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def fmt(value: Any, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "num":
        return f"{value:.3f}"
    if kind == "ms":
        return f"{1000 * value:.2f} ms"
    if kind == "rate":
        return f"{value:.1f}/s"
    if kind == "bytes":
        for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if value >= size:
                return f"{value / size:.2f} {unit}"
        return f"{value} B"
    if kind in ("count", "int"):
        return f"{int(value):,}"
    return str(value)


def diff(a: Any, b: Any, kind: str) -> str:
    if a is None or b is None:
        return ""
    if kind == "pct":
        return f"{100 * (b - a):+.1f} pts"
    if kind in ("num", "int"):
        return f"{b - a:+.3f}" if kind == "num" else f"{int(b - a):+d}"
    return f"x{b / a:.2f}" if a else ""


def _floor(value: float, digits: int) -> float:
    return math.floor(value * 10**digits) / 10**digits


def threshold_digits(thresholds: list[float | None]) -> int:
    """Decimals (4 to 10) enough to tell the given thresholds apart once cut down (never rounded up)."""
    values = sorted({t for t in thresholds if t is not None})
    digits = 4
    while digits < 10 and len({_floor(t, digits) for t in values}) < len(values):
        digits += 1
    return digits


def fmt_threshold(value: float | None, digits: int) -> str:
    """A threshold cut down (not rounded up) to `digits` decimals, so `confidence >= shown` keeps what it kept."""
    return "defer all" if value is None else f"{_floor(value, digits):.{digits}f}"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    marks = [":--" if a == "l" else "--:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
    return lines


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", "\\n")


def confusion_table(confusion: dict) -> list[str]:
    header = ["gold \\ predicted", *[_escape(c) for c in confusion["predicted_labels"]]]
    rows = [[_escape(label), *row] for label, row in zip(confusion["gold_labels"], confusion["matrix"])]
    return _table(header, rows)


def per_class_table(metrics: dict) -> list[str]:
    rows = [[_escape(label), v["support"], v["predicted"], fmt(v["precision"], "pct"), fmt(v["recall"], "pct"),
             fmt(v["f1"], "pct")] for label, v in metrics["per_class"].items()]
    return _table(["class", "gold", "predicted", "precision", "recall (class accuracy)", "F1"], rows)


def _run_lines(run: dict) -> list[str]:
    lines = [f"- model: `{run['model']}`" + (f" (adapter on `{run['base']}`)" if run.get("base") else "")]
    lines.append(f"- data: {', '.join(f'`{d}`' for d in run['data'])}, gold field `{run['label_field']}`"
                 + (f", limit {run['limit']}" if run.get("limit") else ""))
    if run.get("labels"):
        method = ("label scoring (sum of label-token log-likelihoods, softmax over labels)" if run["mode"] == "score"
                  else f"greedy generation ({run['max_new_tokens']} new tokens), parsed to the first label found")
        lines.append(f"- labels: {', '.join(f'`{_escape(x)}`' for x in run['labels'])}; {method}")
    elif run["mode"] == "generate":
        lines.append(f"- greedy generation ({run['max_new_tokens']} new tokens) against the references")
    if run.get("negative_label") is not None:
        lines.append(f"- relevance: every label but `{run['negative_label']}` counts as relevant")
    chat = "used" if run["chat_template_used"] else "not used"
    prompt = f"- prompt: `{_escape(run['prompt'])}`; chat template {chat}"
    if run["mode"] == "score":
        prompt += f"; label prefix {run['label_prefix']!r}{' + EOS' if run.get('label_eos') else ''}"
    lines.append(prompt)
    lines.append(f"- dtype {run['dtype']}, max length {run['max_length']}, prompts cut to fit: "
                 f"{run['prompts_truncated']}")
    return lines


def eval_report(metrics: dict, images: dict[str, str] | None = None) -> str:
    """The Markdown report of one evaluation run."""
    images = images or {}
    speed = metrics["speed"]
    lines = [f"# Evaluation: `{metrics['run']['model']}`", "", *_run_lines(metrics["run"]),
             f"- examples: {metrics['n']}", "", "## Results", ""]
    rows = [[title, fmt(get(metrics, path), kind)] for title, path, kind in HEADLINE if get(metrics, path) is not None]
    lines += _table(["metric", "value"], rows)
    if "per_class" in metrics:
        lines += ["", "## Per class", "", *per_class_table(metrics), "", "## Confusion matrix", "",
                  *confusion_table(metrics["confusion"])]
        if "confusion" in images:
            lines += ["", f"![confusion matrix]({images['confusion']})"]
    if "calibration" in metrics:
        cal = metrics["calibration"]
        lines += ["", "## Calibration", "",
                  f"Expected calibration error over {cal['n_bins']} equal-width confidence bins: {cal['ece']:.4f}.", ""]
        rows = [[f"[{b['lower']:.2f}, {b['upper']:.2f}{']' if b['upper'] >= 1 else ')'}", b["count"],
                 fmt(b["mean_confidence"], "pct"), fmt(b["accuracy"], "pct"),
                 "" if b["gap"] is None else f"{100 * b['gap']:+.1f} pts"] for b in cal["bins"] if b["count"]]
        lines += _table(["confidence bin", "examples", "mean confidence", "accuracy", "over-confidence"], rows)
        if "reliability" in images:
            lines += ["", f"![reliability diagram]({images['reliability']})"]
    lines += ["", "## Speed and size", "",
              f"Measured on {speed['device_name']} ({speed['device']}), {speed['dtype']}, batch size "
              f"{speed['batch_size']}{', after one untimed warm-up batch' if speed['warmup_batch'] else ''}. "
              "Latency per example is the wall time of its batch divided by the batch's examples.", ""]
    rows = [[title, fmt(get(metrics, path), kind)] for title, path, kind in SPEED if get(metrics, path) is not None]
    lines += _table(["measure", "value"], rows)
    return "\n".join(lines) + "\n"


def comparison_rows(a: dict, b: dict) -> list[dict]:
    """The side-by-side rows (metric, both values, difference) for every metric either run has."""
    rows = []
    for title, path, kind in HEADLINE + SPEED:
        va, vb = get(a, path), get(b, path)
        if va is None and vb is None:
            continue
        rows.append({"title": title, "metric": path, "kind": kind, "a": va, "b": vb,
                     "difference": None if va is None or vb is None else vb - va})
    return rows


def compare_report(a: dict, b: dict, names: tuple[str, str], retention: dict, cascade: dict | None,
                   checks: list[CheckResult] | None, images: dict[str, str], notes: list[str]) -> str:
    """The Markdown report of two runs side by side (A: the reference, e.g. the teacher; B: e.g. the student)."""
    lines = _comparison_header(a, b, names, retention, notes)
    lines += _side_by_side(a, b, names, retention)
    if "per_class" in a and "per_class" in b:
        lines += _per_class_comparison(a, b, names, images)
    if "reliability" in images:
        lines += ["", "## Calibration", "", f"![reliability diagram]({images['reliability']})"]
    if cascade is not None:
        lines += _cascade_section(cascade, names, images)
    if checks is not None:
        lines += _criteria_section(checks)
    return "\n".join(lines) + "\n"


def _comparison_header(a: dict, b: dict, names: tuple[str, str], retention: dict, notes: list[str]) -> list[str]:
    """Title, the two models, the shared data, notes, and the accuracy kept."""
    na, nb = names
    lines = [f"# {na} vs {nb}", "", f"A = **{na}**: `{a['run']['model']}`", "",
             f"B = **{nb}**: `{b['run']['model']}`", "",
             f"Both on the same {a['n']} examples ({', '.join(f'`{d}`' for d in a['run']['data'])}).", ""]
    for note in notes:
        lines.append(f"> {note}")
    if notes:
        lines.append("")
    if retention.get("accuracy") is not None:
        lines += [f"**{nb} keeps {100 * retention['accuracy']:.1f}% of {na}'s accuracy** "
                  f"({fmt(get(b, 'accuracy'), 'pct')} / {fmt(get(a, 'accuracy'), 'pct')}).", ""]
    return lines


def _side_by_side(a: dict, b: dict, names: tuple[str, str], retention: dict) -> list[str]:
    """Every metric of either run with both values and the difference, retention rows among them."""
    na, nb = names
    rows = []
    for row in comparison_rows(a, b):
        rows.append([row["title"], fmt(row["a"], row["kind"]), fmt(row["b"], row["kind"]),
                     diff(row["a"], row["b"], row["kind"])])
    if retention.get("accuracy") is not None:
        rows.insert(1, ["Accuracy retention (B / A)", "", f"{100 * retention['accuracy']:.1f}%", ""])
    if retention.get("macro_f1") is not None:
        rows.insert(3, ["Macro F1 retention (B / A)", "", f"{100 * retention['macro_f1']:.1f}%", ""])
    return ["## Side by side", "", *_table(["metric", na, nb, "B - A (B / A for speed and size)"], rows)]


def _per_class_comparison(a: dict, b: dict, names: tuple[str, str], images: dict[str, str]) -> list[str]:
    """Precision, recall and F1 per class for both runs, then both confusion matrices."""
    na, nb = names
    lines = ["", "## Per class", ""]
    rows = []
    for label in a["per_class"]:
        pa, pb = a["per_class"][label], b["per_class"].get(label)
        if pb is None:
            continue
        rows.append([_escape(label), pa["support"], fmt(pa["precision"], "pct"), fmt(pa["recall"], "pct"),
                     fmt(pa["f1"], "pct"), fmt(pb["precision"], "pct"), fmt(pb["recall"], "pct"),
                     fmt(pb["f1"], "pct"), diff(pa["f1"], pb["f1"], "pct")])
    lines += _table(["class", "gold", f"{na} precision", f"{na} recall", f"{na} F1", f"{nb} precision",
                     f"{nb} recall", f"{nb} F1", "F1 B - A"], rows)
    lines += ["", "## Confusion matrices", "", f"**{na}**", "", *confusion_table(a["confusion"]), "",
              f"**{nb}**", "", *confusion_table(b["confusion"])]
    if "confusion" in images:
        lines += ["", f"![confusion matrices]({images['confusion']})"]
    return lines


def _cascade_section(cascade: dict, names: tuple[str, str], images: dict[str, str]) -> list[str]:
    """The student answers above a confidence threshold and the teacher the rest: the table and the chosen one."""
    na, nb = names
    lines = ["", "## Cascade", "",
             f"{nb} answers when its confidence is at least the threshold; {na} answers the rest. "
             f"{na} alone: {fmt(cascade['teacher_accuracy'], 'pct')}, {nb} alone: "
             f"{fmt(cascade['student_accuracy'], 'pct')}, best cascade: {fmt(cascade['best_accuracy'], 'pct')}. "
             "Measured on this evaluation set (an in-sample estimate).", ""]
    digits = threshold_digits([p["threshold"] for p in cascade["table"]])
    rows = [[fmt_threshold(p["threshold"], digits), p["kept"],
             fmt(p["kept_share"], "pct"), fmt(p["deferred_share"], "pct"), fmt(p["accuracy"], "pct")]
            for p in cascade["table"]]
    lines += _table(["keep if confidence >=", "kept", "kept share", f"deferred to {na}", "cascade accuracy"], rows)
    if cascade.get("target_accuracy") is not None:
        lines += ["", _cascade_target(cascade, names, digits)]
    if "cascade" in images:
        lines += ["", f"![cascade]({images['cascade']})"]
    return lines


def _cascade_target(cascade: dict, names: tuple[str, str], digits: int) -> str:
    """The sentence on the threshold that reaches the target accuracy (or that none does)."""
    na, nb = names
    chosen = cascade["chosen"]
    target = fmt(cascade["target_accuracy"], "pct")
    if chosen is None:
        return (f"No threshold reaches the target accuracy {target}; the best cascade reaches "
                f"{fmt(cascade['best_accuracy'], 'pct')}.")
    if chosen["threshold"] is None:
        return f"Target {target}: only deferring every example to {na} reaches it ({fmt(chosen['accuracy'], 'pct')})."
    shown = fmt_threshold(chosen["threshold"], max(digits, threshold_digits([chosen["threshold"]])))
    return (f"Target {target}: keep examples with {nb} confidence >= **{shown}**: "
            f"{nb} keeps {fmt(chosen['kept_share'], 'pct')}, {na} gets "
            f"{fmt(chosen['deferred_share'], 'pct')}, cascade accuracy "
            f"{fmt(chosen['accuracy'], 'pct')}.")


def _criteria_section(checks: list[CheckResult]) -> list[str]:
    failed = sum(not c.passed for c in checks)
    verdict = "all hold" if not failed else f"{failed} of {len(checks)} failed"
    lines = ["", f"## Success criteria: {verdict}", ""]
    for c in checks:
        label = f"{c.criterion.name}: " if c.criterion.name else ""
        lines.append(f"- {'PASS' if c.passed else '**FAIL**'}: {_escape(label + c.description)}")
    return lines
