"""Hub-style data through `datasets`: a hub id with a config and split read offline from the local cache, a
hub-layout folder, `save_to_disk` folders, globs and `data_files`, streaming; and caches built from them."""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_config, upsc_rows

from kdcache.config import DataConfig
from kdcache.data.sources import read_rows
from kdcache.errors import BadInputError
from kdcache.store.reader import CacheReader
from kdcache.teacher.build import build_cache


@pytest.fixture()
def rows():
    return [{**row, "text": " ".join(row["text"].split()[:30])} for row in upsc_rows(8)]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def offline_hub_cache(tmp_path, rows, monkeypatch):
    """`acme/upsc` with configs `small` (splits train, test) as `datasets` caches a hub dataset it has loaded once,
    and `datasets` switched to offline mode (HF_DATASETS_OFFLINE=1), so nothing can be downloaded."""
    import datasets

    build = tmp_path / "build"
    for split, part in (("train", rows[:5]), ("test", rows[5:])):
        _write_jsonl(tmp_path / "src" / f"{split}.jsonl", part)
    files = {split: str(tmp_path / "src" / f"{split}.jsonl") for split in ("train", "test")}
    datasets.load_dataset("json", data_files=files, cache_dir=str(build))
    (built,) = [Path(p) for p in glob.glob(str(build / "json" / "*" / "*" / "*")) if Path(p).is_dir()]
    cached = tmp_path / "hf-datasets" / "acme___upsc" / "small" / "0.0.0" / "0123abcd"
    cached.mkdir(parents=True)
    for split in ("train", "test"):
        shutil.copy(built / f"json-{split}.arrow", cached / f"upsc-{split}.arrow")
    info = json.loads((built / "dataset_info.json").read_text())
    (cached / "dataset_info.json").write_text(json.dumps({**info, "config_name": "small", "dataset_name": "upsc"}))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return "acme/upsc"


def test_a_hub_id_with_config_and_split_is_read_offline_from_the_local_cache(offline_hub_cache, rows):
    train, bad = read_rows(DataConfig(paths=[offline_hub_cache], config_name="small"))
    assert not bad and [r.fields for r in train] == rows[:5]
    assert train[2].where == "acme/upsc (config small, split train), row 3"
    test, _ = read_rows(DataConfig(paths=[offline_hub_cache], config_name="small", split="test"))
    assert [r.fields for r in test] == rows[5:]
    same, _ = read_rows(DataConfig(paths=[f"{offline_hub_cache}#test"], config_name="small"))
    assert [r.fields for r in same] == rows[5:]
    streamed, _ = read_rows(DataConfig(paths=[offline_hub_cache], config_name="small", streaming=True, limit=2))
    assert [r.fields for r in streamed] == rows[:2]
    with pytest.raises(BadInputError, match="cannot load acme/upsc .*split validation"):
        read_rows(DataConfig(paths=[offline_hub_cache], config_name="small", split="validation"))
    with pytest.raises(BadInputError, match="acme/nothing is not a local file or folder, and neither the hub nor the local"):
        read_rows(DataConfig(paths=["acme/nothing"]))


def test_a_cache_builds_from_a_hub_id(tmp_path, teacher_dir, offline_hub_cache, rows):
    config = make_config(tmp_path / "cache", teacher_dir, offline_hub_cache, "data.config_name=small")
    result = build_cache(config)
    assert result.finalized
    reader = CacheReader(str(tmp_path / "cache"))
    records = [e.record for e in reader.iter_examples()]
    assert [r["id"] for r in records] == [str(r["id"]) for r in rows[:5]]
    assert records[0]["source"] == "acme/upsc (config small, split train)" and records[0]["source_row"] == 1


def test_a_hub_layout_folder_and_data_files_globs(tmp_path, rows):
    """A folder laid out as on the hub (a README with `configs:`, data files per split) is read by load_dataset;
    globs in data.paths are expanded and each file read with its own line numbers; data.data_files goes to
    load_dataset."""
    repo = tmp_path / "repo"
    pq.write_table(pa.Table.from_pylist(rows[:3]), tmp_path / "p1.parquet")
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:4]), repo / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:6]), repo / "data" / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[6:]), repo / "data" / "test-00000-of-00001.parquet")
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                    "    path: data/train-*\n  - split: test\n    path: data/test-*\n---\n# upsc\n")
    train, _ = read_rows(DataConfig(paths=[str(repo)]))
    assert [r.fields for r in train] == rows[:6]
    test, _ = read_rows(DataConfig(paths=[str(repo)], split="test"))
    assert [r.fields for r in test] == rows[6:]

    globbed, _ = read_rows(DataConfig(paths=[str(repo / "data" / "train-*.parquet")]))
    assert [r.fields for r in globbed] == rows[:6]
    assert globbed[4].where.endswith("train-00001-of-00002.parquet, row 1")

    _write_jsonl(tmp_path / "j" / "a.jsonl", rows[:2])
    (tmp_path / "j" / "b.jsonl").write_text(json.dumps(rows[2]) + "\n{not json\n")
    loaded, bad = read_rows(DataConfig(paths=[str(tmp_path / "j" / "*.jsonl")]))
    assert [r.fields for r in loaded] == rows[:3]
    assert [str(b).split(": ")[0] for b in bad] == [f"{tmp_path / 'j' / 'b.jsonl'}, row 2"]

    via_builder, _ = read_rows(DataConfig(paths=["parquet"], data_files=[str(repo / "data" / "train-*.parquet")]))
    assert [r.fields for r in via_builder] == rows[:6]
    with pytest.raises(BadInputError, match="matches no file"):
        read_rows(DataConfig(paths=[str(tmp_path / "none-*.jsonl")]))


def test_save_to_disk_folders_build_a_cache(tmp_path, teacher_dir, rows):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:5]),
                          "test": datasets.Dataset.from_list(rows[5:])}).save_to_disk(str(tmp_path / "saved"))
    result = build_cache(make_config(tmp_path / "cache", teacher_dir, f"{tmp_path / 'saved'}#test"))
    assert result.finalized
    ids = [e.record["id"] for e in CacheReader(str(tmp_path / "cache")).iter_examples()]
    assert ids == [str(r["id"]) for r in rows[5:]]
