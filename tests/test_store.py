"""The cache as a contract: lossless round trip, atomic resumable writes, parallel workers, verification, refusals."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import PROMPT, TARGET, make_config

from kdcache.errors import CacheFormatError, IncompatibleCacheError
from kdcache.store.encoding import LogprobEncoding
from kdcache.store.location import CacheLocation
from kdcache.store.manifest import Manifest, finalize
from kdcache.store.reader import CacheReader
from kdcache.store.shard import ShardData, read_shard_files, write_shard_files
from kdcache.store.verify import verify_cache
from kdcache.teacher.build import build_cache
from kdcache.tiny import build_tokenizer


def test_shard_round_trip_is_lossless(tmp_path):
    rng = np.random.default_rng(0)
    data = ShardData(
        input_ids=rng.integers(0, 1000, 50, dtype=np.int32),
        offsets=np.array([0, 20, 50], dtype=np.int64),
        target_mask=rng.random(50) < 0.3,
        target_offsets=np.array([0, 0, 0], dtype=np.int64),
        sparse_ids=rng.integers(0, 1000, (11, 7), dtype=np.int32),
        sparse_logprobs=-rng.random((11, 7)).astype(np.float32) * 10,
        tail_logmass=np.array([-np.inf] + list(-rng.random(10)), dtype=np.float32),
        sample_counts=None,
        records=pa.table({"example_index": [3, 9], "id": ["a", "é"], "teacher_text": [None, "x"]}),
    )
    write_shard_files(str(tmp_path), data)
    back = read_shard_files(str(tmp_path))
    for name, value in data.arrays().items():
        np.testing.assert_array_equal(back.arrays()[name], value)
        assert back.arrays()[name].dtype == value.dtype
    assert back.sample_counts is None
    assert back.records.equals(data.records)


def _manifest(path) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory, teacher_dir, data_file) -> str:
    """An uninterrupted one-worker build: 24 rows in 5 shards."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    result = build_cache(make_config(out, teacher_dir, data_file))
    assert result.finalized and result.shards_written == [0, 1, 2, 3, 4]
    return str(out)


def test_resume_after_interruption_gives_identical_cache(tmp_path, teacher_dir, data_file, reference_cache):
    out = tmp_path / "cache"
    config = make_config(out, teacher_dir, data_file)
    first = build_cache(config, stop_after_shards=2)
    assert first.shards_written == [0, 1] and not first.finalized
    assert not (out / "manifest.json").exists()
    with pytest.raises(CacheFormatError, match="unfinished cache"):
        CacheReader(str(out))
    # What a kill in the middle of shard 2 leaves: a staging folder and a shard folder with no commit record.
    (out / "shards" / ".tmp-00002-deadbeef" / "tokens.zarr").mkdir(parents=True)
    (out / "shards" / "00002").mkdir()
    (out / "shards" / "00002" / "records.parquet").write_bytes(b"half a file")
    second = build_cache(config)
    assert second.shards_skipped == [0, 1] and second.shards_written == [2, 3, 4] and second.finalized
    assert _manifest(out) == _manifest(reference_cache)
    assert not list((out / "shards").glob(".tmp-*"))
    assert verify_cache(str(out)).ok


@pytest.mark.slow
def test_killed_cli_build_resumes_to_identical_cache(tmp_path, teacher_dir, data_file, reference_cache):
    """A real SIGKILL of `kdcache cache build` after its first shard, then the same command again."""
    out = tmp_path / "cache"
    command = [
        sys.executable, "-m", "kdcache.cli", "cache", "build", "--output", str(out), "--teacher", teacher_dir,
        "--data", data_file, "--prompt", PROMPT, "--target", TARGET, "--id-field", "id",
        "--label-field", "relevant", "--label-field", "gs_paper", "--shard-size", "5", "--k", "16",
        "--batch-size", "3", "--set", "teacher.chunk_size=7", "--no-progress",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "shards" / "00000.commit.json").exists():
        assert process.poll() is None, "build ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists()
    finished = subprocess.run(command, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert re.search(r"wrote [1-4] shards, [1-4] already done", finished.stdout), finished.stdout
    assert _manifest(out) == _manifest(reference_cache)


def test_two_workers_plus_finalize_equal_one_worker(tmp_path, teacher_dir, data_file, reference_cache):
    out = tmp_path / "cache"
    worker0 = build_cache(make_config(out, teacher_dir, data_file, "num_workers=2", "worker_index=0"))
    assert worker0.shards_written == [0, 2, 4] and not worker0.finalized
    with pytest.raises(CacheFormatError, match=r"2 of 5 shards are not written yet \(shard 1, 3\)"):
        finalize(CacheLocation(str(out)))
    worker1 = build_cache(make_config(out, teacher_dir, data_file, "num_workers=2", "worker_index=1"))
    assert worker1.shards_written == [1, 3] and worker1.finalized  # the last worker writes the manifest
    assert _manifest(out) == _manifest(reference_cache)
    (out / "manifest.json").unlink()
    finalize(CacheLocation(str(out)))  # the explicit finalize step gives the same manifest
    assert _manifest(out) == _manifest(reference_cache)


def test_resume_with_other_settings_is_refused(tmp_path, teacher_dir, data_file):
    out = tmp_path / "cache"
    build_cache(make_config(out, teacher_dir, data_file), stop_after_shards=1)
    with pytest.raises(IncompatibleCacheError, match=r"sparsifier.k: cache has 16, this job has 8"):
        build_cache(make_config(out, teacher_dir, data_file, "sparsifier.k=8"))


@pytest.fixture()
def damaged(tmp_path, reference_cache) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(reference_cache, copy)
    return copy


def _largest_chunk(cache: Path, shard: str) -> Path:
    chunks = [p for p in (cache / "shards" / shard / "tokens.zarr").rglob("*") if p.is_file() and "/c/" in str(p)]
    return max(chunks, key=lambda p: p.stat().st_size)


def test_verify_passes_on_a_good_cache(reference_cache):
    report = verify_cache(reference_cache)
    assert report.ok and report.shards_checked == 5


def test_verify_finds_a_flipped_byte(damaged):
    chunk = _largest_chunk(damaged, "00003")
    content = bytearray(chunk.read_bytes())
    content[len(content) // 2] ^= 0x01
    chunk.write_bytes(bytes(content))
    report = verify_cache(str(damaged))
    assert not report.ok
    assert report.first_problem.startswith("shard 00003:") and "sha256" in report.first_problem


def test_verify_finds_a_missing_shard(damaged):
    shutil.rmtree(damaged / "shards" / "00001")
    report = verify_cache(str(damaged))
    assert not report.ok and report.first_problem.startswith("shard 00001:") and "missing" in report.first_problem
    (damaged / "shards" / "00001.commit.json").unlink()
    assert "no commit record" in verify_cache(str(damaged)).first_problem


def test_verify_finds_a_truncated_array(damaged):
    chunk = _largest_chunk(damaged, "00002")
    chunk.write_bytes(chunk.read_bytes()[:-10])
    report = verify_cache(str(damaged))
    assert not report.ok and report.first_problem.startswith("shard 00002:") and "truncated" in report.first_problem


def test_verify_finds_a_wrong_manifest_count(damaged):
    manifest = _manifest(damaged)
    manifest["counts"]["num_targets"] += 1
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    report = verify_cache(str(damaged))
    assert not report.ok and "counts.num_targets" in report.first_problem
    manifest["counts"]["num_targets"] -= 1
    manifest["shards"][4]["num_examples"] += 1
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    assert verify_cache(str(damaged)).first_problem.startswith("manifest counts.num_examples")


def test_verify_finds_arrays_that_break_invariants_even_with_matching_checksums(damaged):
    """A shard rewritten consistently (checksums recomputed) but with wrong content is still caught."""
    from kdcache.store.writer import _checksums

    shard = damaged / "shards" / "00000"
    data = read_shard_files(str(shard))
    data.tail_logmass = data.tail_logmass + 1.0  # mass no longer sums to one
    shutil.rmtree(shard)
    shard.mkdir()
    write_shard_files(str(shard), data, LogprobEncoding.of(Manifest.from_dict(_manifest(damaged)).sparsifier))
    manifest = _manifest(damaged)
    manifest["shards"][0]["files"] = _checksums(str(shard))
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    commit = json.loads((damaged / "shards" / "00000.commit.json").read_text())
    commit["files"] = manifest["shards"][0]["files"]
    (damaged / "shards" / "00000.commit.json").write_text(json.dumps(commit))
    report = verify_cache(str(damaged))
    assert not report.ok and "differs from 1" in report.first_problem


def test_verify_never_changes_the_cache(damaged):
    chunk = _largest_chunk(damaged, "00001")
    chunk.write_bytes(chunk.read_bytes()[:-3])
    before = {p: p.read_bytes() for p in damaged.rglob("*") if p.is_file()}
    verify_cache(str(damaged))
    assert before == {p: p.read_bytes() for p in damaged.rglob("*") if p.is_file()}


def test_reader_refuses_another_tokenizer(reference_cache, tokenizer):
    other = build_tokenizer(["a completely different corpus of words"] * 10, vocab_size=300)
    with pytest.raises(IncompatibleCacheError, match="was built with tokenizer .* token ids would mean different"):
        CacheReader(reference_cache, tokenizer=other)
    CacheReader(reference_cache, tokenizer=tokenizer)  # the right one is accepted


def test_reader_refuses_an_unknown_format_version(damaged):
    manifest = _manifest(damaged)
    manifest["format_version"] = 99
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheFormatError, match="format version 99; this kdcache .* reads format versions 1, 2"):
        CacheReader(str(damaged))
    assert "format version 99" in verify_cache(str(damaged)).first_problem


def test_reader_names_a_corrupt_shard(damaged):
    chunk = _largest_chunk(damaged, "00004")
    chunk.write_bytes(b"\x00" * 5)
    reader = CacheReader(str(damaged))
    list(reader.iter_examples(shards=[0, 1, 2, 3]))
    with pytest.raises(CacheFormatError, match="shard 00004 of .* cannot be read"):
        list(reader.iter_examples(shards=[4]))


def test_cache_written_and_read_through_an_fsspec_url(tmp_path, teacher_dir, data_file, reference_cache):
    """A `memory://` cache exercises the non-local path: staging elsewhere, upload, then the commit record."""
    url = f"memory://kdcache-test-{os.getpid()}/cache"
    build_cache(make_config(url, teacher_dir, data_file))
    remote = _manifest_from(url)
    assert [s["files"] for s in remote["shards"]] == [s["files"] for s in _manifest(reference_cache)["shards"]]
    assert verify_cache(url).ok
    local = list(CacheReader(reference_cache).iter_examples())
    for a, b in zip(CacheReader(url).iter_examples(), local):
        np.testing.assert_array_equal(a.sparse_logprobs, b.sparse_logprobs)


def _manifest_from(url: str) -> dict:
    import fsspec

    with fsspec.open(f"{url}/manifest.json", "rt") as handle:
        return json.load(handle)
