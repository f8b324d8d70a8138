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


@pytest.fixture(scope="session")
def sharp_cache(tmp_path_factory, tokenizer, data_file) -> str:
    """A cache (4 shards of 6 rows) from a teacher whose LM head is scaled up, so its distributions have clear top-1
    tokens: what the trainer tests distill from."""
    import torch

    from kdcache.teacher.build import build_cache

    root = tmp_path_factory.mktemp("trainer")
    teacher = build_qwen2(len(tokenizer), hidden_size=64, layers=2, heads=2, seed=11, tie_embeddings=False)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)
    folder = save_model(teacher, tokenizer, root / "teacher")
    build_cache(make_config(root / "cache", folder, data_file, "template.distill=all", "shard_size=6",
                            "sparsifier.k=32"))
    return str(root / "cache")


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, tokenizer) -> str:
    """A 1-layer Qwen2 student over the same tokenizer."""
    model = build_qwen2(len(tokenizer), hidden_size=64, layers=1, heads=2, seed=5)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("student"))
