"""Cascade: the student answers when its confidence is at least a threshold, the teacher answers the rest.

For every threshold t among the student's distinct confidences, the student keeps the examples with confidence
>= t and the teacher's prediction is used for the others. The curve pairs the kept share with the accuracy of the
combined answers; the chosen threshold is the one with the largest kept share (smallest deferral) whose accuracy
meets the target. The curve is measured on the evaluation set itself, so a threshold chosen on it is an in-sample
estimate: pick it on one split and confirm it on another before relying on it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kdcache.errors import BadInputError


def cascade_curve(student_confidence: Sequence[float], student_correct: Sequence[bool],
                  teacher_correct: Sequence[bool]) -> list[dict]:
    """Points (threshold, kept, kept_share, deferred_share, accuracy) from keeping nothing to keeping everything.

    The first point (threshold null) defers every example to the teacher; each later point keeps every example
    whose student confidence is >= its threshold. Thresholds decrease along the curve and kept shares increase.
    """
    conf = np.asarray(student_confidence, dtype=np.float64)
    s_ok = np.asarray(student_correct, dtype=bool)
    t_ok = np.asarray(teacher_correct, dtype=bool)
    n = conf.size
    if n == 0:
        raise BadInputError("cannot build a cascade over no examples")
    if not (s_ok.size == t_ok.size == n):
        raise BadInputError("the cascade needs one student confidence, student and teacher result per example")
    if np.isnan(conf).any():
        raise BadInputError("the student run has no confidences (generation mode?); the cascade needs label scoring")
    order = np.argsort(-conf, kind="stable")
    conf, s_ok, t_ok = conf[order], s_ok[order], t_ok[order]
    teacher_total = int(t_ok.sum())
    gain = np.cumsum(s_ok.astype(np.int64) - t_ok.astype(np.int64))  # correct(kept by student) - correct(teacher)
    curve = [{"threshold": None, "kept": 0, "kept_share": 0.0, "deferred_share": 1.0, "accuracy": teacher_total / n}]
    for i in range(n):
        if i + 1 < n and conf[i + 1] == conf[i]:
            continue  # equal confidences are kept or deferred together
        kept = i + 1
        curve.append({"threshold": float(conf[i]), "kept": kept, "kept_share": kept / n,
                      "deferred_share": 1 - kept / n, "accuracy": (teacher_total + int(gain[i])) / n})
    return curve


def choose_threshold(curve: list[dict], target_accuracy: float) -> dict | None:
    """The point with the largest kept share whose accuracy >= target, or None when no point reaches it."""
    meeting = [point for point in curve if point["accuracy"] >= target_accuracy - 1e-12]
    return max(meeting, key=lambda p: p["kept_share"]) if meeting else None


def curve_table(curve: list[dict], shares: Sequence[float] = tuple(i / 10 for i in range(10, -1, -1))) -> list[dict]:
    """For each wanted kept share, the point keeping the most examples without exceeding it (deduplicated)."""
    rows, seen = [], set()
    for share in shares:
        candidates = [p for p in curve if p["kept_share"] <= share + 1e-12]
        point = max(candidates, key=lambda p: p["kept_share"])
        if point["kept"] not in seen:
            seen.add(point["kept"])
            rows.append(point)
    return rows


def cascade_from_predictions(teacher: dict[str, dict], student: dict[str, dict],
                             target_accuracy: float | None = None) -> dict:
    """The cascade over the examples both runs share, matched by id.

    `teacher` and `student` map example id -> prediction record (with `gold`, `predicted`, `confidence`).
    """
    ids = [i for i in student if i in teacher]
    if not ids:
        raise BadInputError("the two runs share no example ids: a cascade needs both models on the same examples")
    for i in ids:
        if teacher[i]["gold"] != student[i]["gold"]:
            raise BadInputError(f"example {i!r} has gold {teacher[i]['gold']!r} in one run and "
                                f"{student[i]['gold']!r} in the other: the runs used different data")
    confidence = [student[i]["confidence"] for i in ids]
    if any(c is None for c in confidence):
        raise BadInputError("the student run has no confidences (generation mode?); the cascade needs label scoring")
    s_ok = [student[i]["predicted"] == student[i]["gold"] for i in ids]
    t_ok = [teacher[i]["predicted"] == teacher[i]["gold"] for i in ids]
    curve = cascade_curve(confidence, s_ok, t_ok)
    result = {
        "n": len(ids),
        "teacher_accuracy": float(np.mean(t_ok)),
        "student_accuracy": float(np.mean(s_ok)),
        "best_accuracy": max(p["accuracy"] for p in curve),
        "curve": curve,
        "table": curve_table(curve),
        "target_accuracy": target_accuracy,
        "chosen": None,
    }
    if target_accuracy is not None:
        result["chosen"] = choose_threshold(curve, target_accuracy)
    return result
