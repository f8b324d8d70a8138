"""Shared fixtures: a tokenizer trained locally on the shipped UPSC sample, and tiny Qwen2 teachers saved to disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdcache.config import CacheBuildConfig, load_config
from kdcache.tiny import build_qwen2, build_tokenizer, save_model

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "examples" / "upsc" / "golden.jsonl"

PROMPT = "Title: {title}\nArticle: {text}\nWhich GS paper?"
TARGET = " {gs_paper}"


def upsc_rows(limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in GOLDEN.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


@pytest.fixture(scope="session")
def tokenizer():
    texts = [f"{r['title']} {r['text']} {r['gs_paper']}" for r in upsc_rows()]
    return build_tokenizer(texts, vocab_size=384)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer) -> str:
    """A 2-layer Qwen2 whose vocabulary equals the tokenizer's."""
    model = build_qwen2(len(tokenizer), hidden_size=64, layers=2, heads=2, seed=1)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> str:
    """The first 24 golden rows, shortened so tests stay fast."""
    path = tmp_path_factory.mktemp("data") / "golden24.jsonl"
    with open(path, "w") as handle:
        for row in upsc_rows(24):
            row = {**row, "text": " ".join(row["text"].split()[:30])}
            handle.write(json.dumps(row) + "\n")
    return str(path)


def make_config(output, teacher_dir, data_file, *overrides) -> CacheBuildConfig:
    """A cache build config over the test data with small shards; overrides are `key=value` strings."""
    base = [
        f"output={output}",
        f"teacher.model={teacher_dir}",
        f"data.paths=[{data_file}]",
        f"template.prompt={json.dumps(PROMPT)}",
        f"template.target={json.dumps(TARGET)}",
        "data.id_field=id",
        "data.label_fields=[relevant, gs_paper]",
        "shard_size=5",
        "sparsifier.k=16",
        "teacher.batch_size=3",
        "teacher.chunk_size=7",
        "progress=false",
    ]
    return load_config(CacheBuildConfig, None, [*base, *overrides])
