"""`kdcache compare`: two eval runs side by side, plots, the cascade, and success criteria."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kdcache.errors import BadInputError
from kdcache.eval.cascade import cascade_from_predictions
from kdcache.eval.criteria import CheckResult, Criterion, check_criteria
from kdcache.eval.report import compare_report, comparison_rows


@dataclass
class Run:
    """One finished `kdcache eval` folder."""

    path: Path
    metrics: dict
    predictions: dict[str, dict]  # example id -> prediction record


@dataclass
class CompareResult:
    markdown: str
    checks: list[CheckResult] | None
    cascade: dict | None
    retention: dict
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    agreement: dict | None = None  # prediction_agreement(A, B)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks or [])


def load_run(path: str | Path) -> Run:
    """Read metrics.json and predictions.parquet from a folder written by `kdcache eval`."""
    import pyarrow.parquet as pq

    path = Path(path)
    metrics_file, predictions_file = path / "metrics.json", path / "predictions.parquet"
    if not metrics_file.is_file() or not predictions_file.is_file():
        raise BadInputError(f"{path} is not an eval run folder (it needs metrics.json and predictions.parquet, "
                            "written by `kdcache eval --out`)")
    try:
        metrics = json.loads(metrics_file.read_text())
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{metrics_file} is not valid JSON: {exc}") from None
    if "kdcache_eval" not in metrics:
        raise BadInputError(f"{metrics_file} was not written by `kdcache eval`")
    records = pq.read_table(predictions_file).to_pylist()
    return Run(path, metrics, {str(r["id"]): r for r in records})


def _check_same_examples(a: Run, b: Run, names: tuple[str, str]) -> None:
    only_a = sorted(set(a.predictions) - set(b.predictions))
    only_b = sorted(set(b.predictions) - set(a.predictions))
    if only_a or only_b:
        raise BadInputError(
            f"the runs were not made on the same examples: {len(only_a)} ids only in {names[0]} (e.g. "
            f"{only_a[:3]}), {len(only_b)} only in {names[1]} (e.g. {only_b[:3]}); evaluate both on the same data "
            "and --limit"
        )
    differing = [i for i in a.predictions if a.predictions[i]["gold"] != b.predictions[i]["gold"]]
    if differing:
        raise BadInputError(f"{len(differing)} examples have different gold labels in the two runs (e.g. "
                            f"{differing[0]!r}); were they evaluated with the same --label-field?")
    la, lb = a.metrics["run"].get("labels") or [], b.metrics["run"].get("labels") or []
    if set(la) != set(lb):
        raise BadInputError(f"the runs used different label sets: {la} and {lb}")



def prediction_agreement(a: dict[str, dict], b: dict[str, dict]) -> dict:
    """How often B predicts the same label as A, overall and per gold class, with who is right when they differ.

    a, b: example id -> prediction record (`gold`, `predicted`), over the same ids. Returns {"n", "agreement"
    (share of examples where both predict the same label), "per_class": {gold label: {"n", "agreement",
    "both_right", "only_a_right", "only_b_right", "both_wrong"}}} (counts, agreement a share; classes sorted).
    """
    ids = sorted(a)
    per_class: dict[str, dict] = {}
    same_total = 0
    for i in ids:
        gold, pa, pb = a[i]["gold"], a[i].get("predicted"), b[i].get("predicted")
        row = per_class.setdefault(str(gold), {"n": 0, "agreement": 0, "both_right": 0, "only_a_right": 0,
                                               "only_b_right": 0, "both_wrong": 0})
        row["n"] += 1
        row["agreement"] += pa == pb
        same_total += pa == pb
        right_a, right_b = pa == gold, pb == gold
        key = ("both_right" if right_a and right_b else "only_a_right" if right_a else "only_b_right" if right_b
               else "both_wrong")
        row[key] += 1
    for row in per_class.values():
        row["agreement"] = row["agreement"] / row["n"]
    return {"n": len(ids), "agreement": same_total / len(ids) if ids else None,
            "per_class": dict(sorted(per_class.items()))}


def agreement_markdown(agreement: dict, names: tuple[str, str]) -> str:
    """The report's agreement section: the overall share, then one row per gold class."""
    na, nb = names
    lines = ["## Agreement", "",
             f"{na} and {nb} predict the same label on {100 * agreement['agreement']:.1f}% of the "
             f"{agreement['n']} examples. Per gold class:", "",
             f"| gold | examples | agreement | both right | only {na} right | only {nb} right | both wrong |",
             "|---|---|---|---|---|---|---|"]
    for label, row in agreement["per_class"].items():
        lines.append(f"| {label} | {row['n']} | {100 * row['agreement']:.1f}% | {row['both_right']} | "
                     f"{row['only_a_right']} | {row['only_b_right']} | {row['both_wrong']} |")
    return "\n".join(lines) + "\n"


def compare_runs(path_a: str | Path, path_b: str | Path, names: tuple[str, str] | None = None,
                 criteria: list[Criterion] | None = None, out: str | Path | None = None,
                 target_accuracy: float | None = None, plots: bool = True) -> CompareResult:
    """Compare run B (e.g. the student) with run A (e.g. the teacher); write report.md, comparison.json and plots
    to `out` when given. Criteria refer to the runs as A and B or by their names."""
    a, b = load_run(path_a), load_run(path_b)
    names = tuple(names) if names else ("A", "B")
    if len(names) != 2 or names[0] == names[1]:
        raise BadInputError(f"give two different names for the runs, got {list(names)}")
    _check_same_examples(a, b, names)
    if target_accuracy is not None and not 0 <= target_accuracy <= 1:
        raise BadInputError(f"the target accuracy is a fraction in [0, 1], got {target_accuracy}")
    notes = []
    for key in ("prompt", "label_prefix", "label_eos", "chat_template_used", "mode"):
        va, vb = a.metrics["run"].get(key), b.metrics["run"].get(key)
        if va != vb:
            notes.append(f"the runs differ in {key}: {va!r} vs {vb!r}")
    sa, sb = a.metrics.get("speed", {}), b.metrics.get("speed", {})
    for key in ("device_name", "batch_size", "dtype"):
        if sa.get(key) != sb.get(key):
            notes.append(f"speed was measured with different {key.replace('_', ' ')}: {sa.get(key)!r} vs "
                         f"{sb.get(key)!r}, so latency and throughput are not like for like")

    retention = {}
    for key in ("accuracy", "macro_f1"):
        va, vb = a.metrics.get(key), b.metrics.get(key)
        retention[key] = vb / va if va else None

    cascade = None
    if "accuracy" in a.metrics and b.metrics["run"].get("mode") == "score":
        cascade = cascade_from_predictions(a.predictions, b.predictions, target_accuracy)
    elif target_accuracy is not None:
        notes.append("no cascade: it needs label scoring in both runs (run B's confidences)")

    checks = None
    if criteria is not None:
        runs = {"A": a.metrics, "B": b.metrics, names[0]: a.metrics, names[1]: b.metrics}
        checks = check_criteria(criteria, runs, {"A": names[0], "B": names[1], names[0]: names[0],
                                                 names[1]: names[1]})

    images: dict[str, str] = {}
    files: list[Path] = []
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        from kdcache.eval import plots as P

        if plots and not P.available():
            notes.append("plots skipped: matplotlib is not installed")
        elif plots:
            if "confusion" in a.metrics and "confusion" in b.metrics:
                images["confusion"] = P.confusion_matrices(
                    [(names[0], a.metrics["confusion"]), (names[1], b.metrics["confusion"])],
                    out / "confusion_matrices.png").name
            calibrated = [(n, m["calibration"]) for n, m in zip(names, (a.metrics, b.metrics)) if "calibration" in m]
            if calibrated:
                images["reliability"] = P.reliability_diagram(calibrated, out / "reliability.png").name
            if cascade is not None:
                images["cascade"] = P.cascade_plot(cascade, out / "cascade.png", names).name
            files.extend(out / name for name in images.values())

    agreement = prediction_agreement(a.predictions, b.predictions)
    markdown = compare_report(a.metrics, b.metrics, names, retention, cascade, checks, images, notes)
    markdown = markdown.rstrip("\n") + "\n\n" + agreement_markdown(agreement, names)
    if out is not None:
        (out / "report.md").write_text(markdown)
        summary = {
            "runs": {"A": {"name": names[0], "path": str(a.path)}, "B": {"name": names[1], "path": str(b.path)}},
            "retention": retention,
            "rows": comparison_rows(a.metrics, b.metrics),
            "cascade": cascade,
            "agreement": agreement,
            "criteria": None if checks is None else [
                {"metric": c.criterion.metric, "run": c.criterion.run, "name": c.criterion.name,
                 "check": c.description, "value": c.value, "bound": c.bound, "passed": c.passed} for c in checks],
            "passed": None if checks is None else all(c.passed for c in checks),
            "notes": notes,
        }
        (out / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
        files[:0] = [out / "report.md", out / "comparison.json"]
    return CompareResult(markdown, checks, cascade, retention, files, notes, agreement)
