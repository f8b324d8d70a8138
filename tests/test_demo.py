"""The demo end to end at its smallest size: every stage through the public API."""

from __future__ import annotations

import json

import pytest

from kdcache.demo import run_demo
from kdcache.store.verify import verify_cache


@pytest.mark.slow
def test_demo_smallest_runs_end_to_end(tmp_path):
    result = run_demo(str(tmp_path / "demo"), "smallest", progress=False)
    assert verify_cache(result["cache"]).ok
    assert result["heldout_kd"]["distilled"] < result["heldout_kd"]["untrained"]
    root = tmp_path / "demo"
    for name in ("teacher", "distilled", "hard-labels", "untrained"):
        metrics = json.loads((root / "eval" / name / "metrics.json").read_text())
        assert 0 <= metrics["accuracy"] <= 1
        assert (root / "eval" / name / "report.md").read_text().strip()
    comparison = json.loads((root / "compare" / "comparison.json").read_text())
    assert comparison
    assert (root / "compare" / "report.md").read_text().startswith("#")
    assert (root / "summary.md").read_text().count("|") > 20
