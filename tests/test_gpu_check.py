"""benchmarks/gpu_check.sh --smoke: every step of the GPU script (train step arms, cache build, kdcache train,
loader wait, overflow check) runs end to end on the CPU at tiny sizes, and writes its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in ("1. train step", "2. cache build", "3. kdcache train", "4. fp16 overflow check", "gpu_check done"):
        assert step in done.stdout
    figures = json.loads((tmp_path / "train_step_seq32.json").read_text())
    assert figures["kd_step_s"] > 0 and figures["sft_chunked_step_s"] > 0 and figures["kd_over_sft"] > 0
    assert "loader wait:" in done.stdout and "0 with a non-finite loss" in done.stdout
    assert json.loads((tmp_path / "cache_build.json").read_text())["timing"]["build_median_s"] > 0
