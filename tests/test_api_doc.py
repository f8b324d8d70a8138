"""docs/api.md's example runs as written (CPU, nothing downloaded), and the API it documents is importable."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "api.md"


def test_the_api_is_importable_from_the_package():
    import kdcache
    from kdcache.eval.compare import compare_runs
    from kdcache.teacher.build import build_cache

    assert kdcache.build_cache is build_cache and kdcache.compare_runs is compare_runs
    for name in kdcache.__all__:
        assert getattr(kdcache, name) is not None
        assert f"`kdcache.{name}" in DOC.read_text() or name.endswith("Config")


@pytest.mark.slow
def test_the_documented_example_runs(tmp_path):
    (example,) = re.findall(r"## Example\n.*?```python\n(.*?)```", DOC.read_text(), flags=re.S)
    (tmp_path / "examples").symlink_to(REPO / "examples")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("steps ") and [line.split()[0] for line in lines[1:3]] == ["teacher", "student"]
    assert (tmp_path / "api-example" / "compare" / "report.md").exists()
    assert (tmp_path / "api-example" / "run" / "final").is_dir()
