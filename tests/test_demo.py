"""The demo end to end at its smallest size: every stage through the public API, and distillation ahead."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from kdcache.demo import LABELS, run_demo
from kdcache.store.verify import verify_cache


@pytest.mark.slow
def test_demo_smallest_runs_end_to_end(tmp_path):
    result = run_demo(str(tmp_path / "demo"), "smallest", progress=False)
    assert verify_cache(result["cache"]).ok and verify_cache(result["gold_cache"]).ok
    assert result["rows"] == {"teacher": 200, "pool": 200, "gold": 21}
    assert result["heldout_kd"]["distilled"] < result["heldout_kd"]["hard-labels"] < result["heldout_kd"]["untrained"]
    root = tmp_path / "demo"
    for name in ("teacher", "distilled", "hard-labels", "untrained"):
        metrics = json.loads((root / "eval" / name / "metrics.json").read_text())
        assert 0 <= metrics["accuracy"] <= 1 and metrics["n"] == 120
        assert (root / "eval" / name / "report.md").read_text().strip()
    comparison = json.loads((root / "compare" / "comparison.json").read_text())
    assert comparison
    assert (root / "compare" / "report.md").read_text().startswith("#")
    summary = (root / "summary.md").read_text()
    assert summary.count("|") > 20
    assert "teacher trained on 200 labelled rows; students: 200 rows, 21 with gold labels (10%)" in summary

    # What the demo is for: with 10 % gold labels, the student distilled from the teacher's answers over the whole
    # pool beats the same student fine-tuned on the gold rows, on accuracy and on calibration. With these fixed
    # seeds (deterministic on a CPU, 1 or 2 threads alike) the margins are 0.55 (accuracy 0.783 vs 0.233) and 0.46
    # (ECE 0.148 vs 0.610); over four other student seeds they stayed above 0.35 and 0.15, so the thresholds leave
    # room for a CPU whose kernels round differently.
    m = result["metrics"]
    assert m["distilled"]["accuracy"] >= m["hard-labels"]["accuracy"] + 0.2
    assert m["distilled"]["calibration"]["ece"] <= m["hard-labels"]["calibration"]["ece"] - 0.08
    assert m["teacher"]["accuracy"] >= m["distilled"]["accuracy"] - 0.05
    # No trained model answers one class for everything (the untrained student, whose label log-likelihoods are
    # near-uniform per token, always picks the shortest label, "none": it is the floor, not a trained model).
    for name in ("teacher", "distilled", "hard-labels"):
        predicted = set(pq.read_table(root / "eval" / name / "predictions.parquet").column("predicted").to_pylist())
        assert len(predicted) > 1, (name, predicted)
    for name in ("teacher", "distilled"):
        predicted = set(pq.read_table(root / "eval" / name / "predictions.parquet").column("predicted").to_pylist())
        assert predicted == set(LABELS), (name, predicted)
