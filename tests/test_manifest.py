"""The typed plan and manifest: every JSON file a build writes reads back to the same JSON, byte for byte when
written again; a damaged file is refused in one line that names the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_config

from kdcache.data.sources import read_rows
from kdcache.errors import CacheFormatError
from kdcache.store.fingerprint import canonical_json
from kdcache.store.location import CacheLocation
from kdcache.store.manifest import CommitRecord, Manifest, finalize, read_manifest, read_plan
from kdcache.store.plan import Plan, SparsifierInfo, make_plan
from kdcache.store.reader import CacheReader
from kdcache.store.verify import verify_cache
from kdcache.teacher.build import build_cache

VARIANTS = {
    "topk": (),
    "sample": ("sparsifier.kind=sample", "sparsifier.temperature=0.7", "sparsifier.seed=3"),
    "float16-all-system": ("sparsifier.logprob_dtype=float16", "template.distill=all", "template.system=Be brief.",
                           "data.id_field=null", "data.label_fields=[]"),
    "generate": ("generate.enabled=true", "generate.max_new_tokens=4", "generate.num_samples=2",
                 "generate.temperature=1.0"),
}


def _json(path: Path):
    return json.loads(path.read_text())


def _assert_round_trip(cls, path: Path, tmp_path: Path):
    raw = _json(path)
    record = cls.from_dict(raw)
    assert record.to_dict() == raw and canonical_json(record.to_dict()) == canonical_json(raw)
    again = tmp_path / f"again-{path.name}"
    CacheLocation(str(tmp_path)).write_json(str(again), record.to_dict())
    assert again.read_bytes() == path.read_bytes()  # same keys, values and types: the same bytes
    return record


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_file_a_build_writes_reads_back_to_the_same_json(tmp_path, teacher_dir, data_file, variant):
    out = tmp_path / "cache"
    result = build_cache(make_config(out, teacher_dir, data_file, "shard_size=10", *VARIANTS[variant]))
    plan = _assert_round_trip(Plan, out / "plan.json", tmp_path)
    manifest = _assert_round_trip(Manifest, out / "manifest.json", tmp_path)
    commits = [_assert_round_trip(CommitRecord, out / "shards" / f"{i:05d}.commit.json", tmp_path) for i in range(3)]
    location = CacheLocation(str(out))
    assert read_plan(location) == plan == manifest.plan
    assert read_manifest(location) == manifest == result.manifest
    assert manifest.shards == tuple(commits) and manifest.counts.num_examples == sum(c.num_examples for c in commits)
    assert (manifest.generate is not None) == (variant == "generate")
    assert ("generate" in _json(out / "plan.json")) == (variant == "generate")  # teacher-forced plans as they were
    assert manifest.teacher.vllm is None and "vllm" not in _json(out / "plan.json")["teacher"]


def test_a_vllm_plan_records_the_engine_settings_that_shape_content(teacher_dir, data_file, tokenizer):
    engine = {"quantization": "fp8", "gpu_memory_utilization": 0.5, "hf_overrides": {"rope_theta": 1e6}}
    config = make_config("unused", teacher_dir, data_file, "teacher.backend=vllm", f"teacher.vllm={json.dumps(engine)}")
    rows, unparsed = read_rows(config.data)
    plan = make_plan(config, tokenizer, rows, len(unparsed))
    assert plan.teacher.vllm == {"quantization": "fp8", "hf_overrides": {"rope_theta": 1e6}, "scoring": "exact"}
    assert Plan.from_dict(plan.to_dict()) == plan
    assert plan.to_dict()["teacher"]["vllm"] == plan.teacher.vllm


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, teacher_dir, data_file) -> Path:
    out = tmp_path_factory.mktemp("small") / "cache"
    build_cache(make_config(out, teacher_dir, data_file, "shard_size=10"))
    return out


def _set(path: list, value):
    def damage(manifest: dict):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return damage


DAMAGES = [
    (["sparsifier", "k"], "8", r"sparsifier\.k must be an integer, got '8'"),
    (["sparsifier", "kind"], "top", r"sparsifier\.kind must be one of 'topk', 'sample', got 'top'"),
    (["sparsifier", "temperature"], 1.0, r"sparsifier\.temperature must be absent for a topk sparsifier, got 1\.0"),
    (["tokenizer", "vocab_size"], 0, r"tokenizer\.vocab_size must be at least 1, got 0"),
    (["tokenizer", "fingerprint"], KeyError, r"tokenizer\.fingerprint is missing"),
    (["teacher", "colour"], "red", r"teacher\.colour is not a known key; known keys here: backend, dtype, model, revision, vllm"),
    (["dataset", "sources"], "a.jsonl", r"dataset\.sources must be a list, got 'a.jsonl'"),
    (["template", "add_eos"], 1, r"template\.add_eos must be true or false, got 1"),
    (["shards", 1, "rows"], [10], r"shards\[1\]\.rows must be \[start, stop\], got \[10\]"),
    (["shards", 2, "files", "records.parquet", "bytes"], None,
     r"shards\[2\]\.files\['records.parquet'\]\.bytes must be an integer, got None"),
    (["counts"], [], r"counts must be a mapping, got \[\]"),
]


@pytest.mark.parametrize("path, value, message", DAMAGES, ids=[".".join(map(str, d[0])) for d in DAMAGES])
def test_a_damaged_manifest_is_refused_in_one_line_naming_the_field(tmp_path, small_cache, path, value, message):
    cache = tmp_path / "cache"
    shutil.copytree(small_cache, cache)
    manifest = _json(cache / "manifest.json")
    _set(path, value)(manifest)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheFormatError, match=f"manifest.json is damaged: {message}; .*kdcache cache finalize") as info:
        CacheReader(str(cache))
    assert "\n" not in str(info.value)
    assert "manifest.json is damaged" in verify_cache(str(cache)).first_problem
    finalize(CacheLocation(str(cache)))  # what the message advises: the manifest is written again from the shards
    assert CacheReader(str(cache)).manifest.to_dict() == _json(small_cache / "manifest.json")


def test_a_damaged_commit_record_stops_finalize_naming_the_file(tmp_path, small_cache):
    cache = tmp_path / "cache"
    shutil.copytree(small_cache, cache)
    commit = _json(cache / "shards" / "00001.commit.json")
    commit["num_targets"] = "many"
    (cache / "shards" / "00001.commit.json").write_text(json.dumps(commit))
    with pytest.raises(CacheFormatError, match=r"00001\.commit\.json is damaged: num_targets must be an integer, "
                                               r"got 'many'; remove it and re-run"):
        finalize(CacheLocation(str(cache)))


def test_sparsifier_fields_follow_its_kind():
    with pytest.raises(CacheFormatError, match="temperature must be a number for a sample sparsifier, got None"):
        SparsifierInfo.from_dict({"kind": "sample", "k": 4, "logprob_dtype": "float32"})
    sample = {"kind": "sample", "k": 4, "logprob_dtype": "float16", "temperature": 0.5, "seed": 2}
    assert SparsifierInfo.from_dict(sample).to_dict() == sample
