"""What the cache-build benchmarks share: the UPSC sample data they run on, its template, and the machine's CPU.

benchmarks/cache_build.py (transformers backend) and benchmarks/vllm_cache_build.py (vLLM backend) both import this
module, and not each other's helpers, so both build the same data set the same way.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UPSC = [REPO / "examples" / "upsc" / "golden.jsonl", REPO / "examples" / "upsc" / "silver.jsonl"]
PROMPT = "Title: {title}\nArticle: {text}\nWhich GS paper?"
TARGET = " {gs_paper}"


def upsc_rows() -> list[dict]:
    """The 520 rows of the shipped UPSC sample (golden, then silver)."""
    rows = []
    for path in UPSC:
        rows.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return rows


def write_data(path: Path, base: list[dict], n: int) -> None:
    """n rows cycling the base rows; a repeat gets '#c' on its id and ' (c)' on its text, so every row differs."""
    with open(path, "w") as handle:
        for i in range(n):
            row = dict(base[i % len(base)])
            cycle = i // len(base)
            if cycle:
                row["id"] = f"{row['id']}#{cycle}"
                row["text"] = f"{row['text']} ({cycle})"
            handle.write(json.dumps(row) + "\n")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown CPU" where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"
