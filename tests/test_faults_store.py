"""The fault and tamper suite (issue 11, "trust nothing on disk"): every case is refused with a one-line reason, or
resumes identical, and nothing is read from outside the cache.

Organised by the issue's sections; each section's cases go under its heading.
  1. workers started together with different settings
  4. paths in a manifest that would escape the cache, counts that would make a loop run forever
  5. readers check each shard's commit record and checksums on every read (with an explicit opt-out)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import PROMPT, TARGET, make_config

from kdcache.cli import main
from kdcache.data.sources import read_rows
from kdcache.errors import CacheFormatError, IncompatibleCacheError
from kdcache.store.location import PLAN_FILE, CacheLocation
from kdcache.store.manifest import finalize, read_plan, write_or_check_plan
from kdcache.store.plan import make_plan, plan_hash
from kdcache.store.reader import CacheReader
from kdcache.store.shard import read_shard_files
from kdcache.store.verify import verify_cache
from kdcache.store.writer import commit_shard
from kdcache.teacher.build import build_cache
from kdcache.tiny import build_qwen2, save_model

# ----------------------------------------------------------------------------------------------------------------
# shared helpers


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_dir, data_file) -> Path:
    """An uninterrupted one-worker build: 24 rows in 5 shards."""
    out = tmp_path_factory.mktemp("faults-ref") / "cache"
    assert build_cache(make_config(out, teacher_dir, data_file)).finalized
    return out


@pytest.fixture()
def cache(tmp_path, reference) -> Path:
    """A copy of the reference cache to damage, at tmp_path/cache (tmp_path itself is outside the cache)."""
    copy = tmp_path / "cache"
    shutil.copytree(reference, copy)
    return copy


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory, tokenizer) -> str:
    """A second teacher over the same tokenizer, with other weights."""
    model = build_qwen2(len(tokenizer), hidden_size=64, layers=2, heads=2, seed=2)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("other-teacher"))


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _write(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True))


def _edit_shard_record(cache: Path, index: int, change) -> None:
    """Apply `change` to shard `index`'s record in its commit file and in the manifest alike (a consistent edit)."""
    commit = cache / "shards" / f"{index:05d}.commit.json"
    record = _json(commit)
    change(record)
    _write(commit, record)
    manifest = _json(cache / "manifest.json")
    manifest["shards"][index] = record
    _write(cache / "manifest.json", manifest)


def _chunk(cache: Path, shard: str, array: str) -> Path:
    return cache / "shards" / shard / "tokens.zarr" / array / "c" / ("0/0" if array.startswith("sparse") or array == "logprob_offsets" else "0")


_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # permanent once added, so it records only inside `opened_files()`


@contextlib.contextmanager
def opened_files():
    """Every path this process opens meanwhile (Python's audit hook sees open() and os.open())."""
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def _info(path: Path, *options: str):
    return CliRunner().invoke(main, ["cache", "info", str(path), *options])


# ----------------------------------------------------------------------------------------------------------------
# 1. Workers started together with different settings


def test_workers_started_together_with_other_teachers_one_is_refused(tmp_path, teacher_dir, other_teacher, data_file,
                                                                     monkeypatch):
    """Both workers find no plan.json and create theirs at the same moment (a barrier holds each at the create):
    exactly one wins, the other is refused with the differences, and the cache holds one teacher's shards only."""
    out = tmp_path / "cache"
    teachers = [teacher_dir, other_teacher]
    barrier = threading.Barrier(2, timeout=120)
    create = CacheLocation.create_json

    def create_together(self, path, value):
        barrier.wait()
        return create(self, path, value)

    monkeypatch.setattr(CacheLocation, "create_json", create_together)
    outcomes: dict[int, object] = {}

    def worker(index: int) -> None:
        config = make_config(out, teachers[index], data_file, "num_workers=2", f"worker_index={index}")
        try:
            outcomes[index] = build_cache(config)
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test looks at
            outcomes[index] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    refused = [i for i, outcome in outcomes.items() if isinstance(outcome, Exception)]
    assert len(refused) == 1, outcomes
    loser = refused[0]
    winner = 1 - loser
    error = outcomes[loser]
    assert isinstance(error, IncompatibleCacheError), error
    assert f"teacher.model: cache has {teachers[winner]!r}, this job has {teachers[loser]!r}" in str(error)
    assert outcomes[winner].shards_written == [s for s in range(5) if s % 2 == winner]

    location = CacheLocation(str(out))
    plan = read_plan(location)
    assert plan.teacher.model == teachers[winner]  # the plan was never replaced
    hashed = plan_hash(plan)
    for commit in (out / "shards").glob("*.commit.json"):
        assert _json(commit)["plan_hash"] == hashed
    # The refused worker, re-run with the cache's settings, completes it: equal to one worker with that teacher.
    monkeypatch.undo()
    done = build_cache(make_config(out, teachers[winner], data_file, "num_workers=2", f"worker_index={loser}"))
    assert done.finalized and verify_cache(str(out)).ok
    ref = tmp_path / "ref"
    build_cache(make_config(ref, teachers[winner], data_file))
    assert _json(out / "manifest.json") == _json(ref / "manifest.json")


@pytest.mark.slow
def test_two_cli_workers_started_at_once_with_other_teachers(tmp_path, teacher_dir, other_teacher, data_file):
    """The issue's repro as it was reported: two `kdcache cache build` processes started at the same moment."""
    out = tmp_path / "cache"
    teachers = [teacher_dir, other_teacher]

    def command(index: int) -> list[str]:
        return [
            sys.executable, "-m", "kdcache.cli", "cache", "build", "--output", str(out), "--teacher", teachers[index],
            "--data", data_file, "--prompt", PROMPT, "--target", TARGET, "--id-field", "id", "--shard-size", "5",
            "--k", "16", "--num-workers", "2", "--worker-index", str(index), "--no-progress",
        ]

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    processes = [subprocess.Popen(command(i), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for i in (0, 1)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in processes]
    codes = [code for code, _, _ in results]
    assert sorted(codes) == [0, 2], results
    loser = codes.index(2)
    stderr = results[loser][2]
    assert "already holds a cache built with other settings" in stderr and "teacher.model: cache has" in stderr
    assert "Traceback" not in stderr
    plan = read_plan(CacheLocation(str(out)))
    assert plan.teacher.model == teachers[1 - loser]
    commits = list((out / "shards").glob("*.commit.json"))
    assert commits and all(_json(c)["plan_hash"] == plan_hash(plan) for c in commits)


def test_other_settings_are_refused_even_before_the_first_shard_is_committed(tmp_path, teacher_dir, other_teacher,
                                                                             data_file):
    """plan.json is never replaced, even while no shard is committed: another worker may be writing its first one."""
    out = tmp_path / "cache"
    build_cache(make_config(out, teacher_dir, data_file), stop_after_shards=0)
    before = (out / PLAN_FILE).read_bytes()
    with pytest.raises(IncompatibleCacheError, match=r"(?s)teacher\.model: cache has .*no shard is committed under "
                                                     r"that plan yet.*remove .*plan\.json to start it over"):
        build_cache(make_config(out, other_teacher, data_file))
    assert (out / PLAN_FILE).read_bytes() == before


def test_a_plan_replaced_under_a_running_worker_stops_its_commit(tmp_path, reference, teacher_dir, data_file):
    """On a store without exclusive creation a second writer can replace plan.json; the first worker then commits
    nothing more (the plan is checked just before each commit record)."""
    out = tmp_path / "cache"
    build_cache(make_config(out, teacher_dir, data_file), stop_after_shards=1)
    location = CacheLocation(str(out))
    own_hash = plan_hash(read_plan(location))
    replaced = _json(out / PLAN_FILE)
    replaced["teacher"]["model"] = "another/teacher"
    _write(out / PLAN_FILE, replaced)
    data = read_shard_files(str(reference / "shards" / "00001"))
    with pytest.raises(IncompatibleCacheError, match="changed while this build ran"):
        commit_shard(location, 1, data, {"rows": [5, 10], "skipped_rows": 0, "plan_hash": own_hash})
    assert not (out / "shards" / "00001.commit.json").exists()


def test_finalize_verify_and_readers_refuse_shards_of_another_plan(cache):
    foreign = "sha256:" + "ab" * 32
    commit = cache / "shards" / "00003.commit.json"
    record = _json(commit)
    record["plan_hash"] = foreign  # what a worker of another plan leaves when the plan race is not exclusive
    _write(commit, record)
    (cache / "manifest.json").unlink()
    with pytest.raises(IncompatibleCacheError, match=r"1 shards were written under another plan .*\(shard 3; "
                                                     r"their plan hash sha256:abab"):
        finalize(CacheLocation(str(cache)))
    assert not (cache / "manifest.json").exists()


def test_a_manifest_mixing_plans_is_refused_by_verify_and_readers(cache):
    _edit_shard_record(cache, 2, lambda record: record.update(plan_hash="sha256:" + "cd" * 32))
    problem = verify_cache(str(cache)).first_problem
    assert "manifest.json is damaged: shards[2].plan_hash must be sha256:" in problem
    with pytest.raises(CacheFormatError, match=r"shards\[2\]\.plan_hash must be"):
        CacheReader(str(cache))
    manifest = _json(cache / "manifest.json")
    manifest["teacher"]["model"] = "someone/else"  # the plan part no longer matches its hash
    _write(cache / "manifest.json", manifest)
    assert "plan_hash must be sha256:" in verify_cache(str(cache)).first_problem


def test_verify_refuses_a_plan_file_of_another_plan(cache):
    plan = _json(cache / PLAN_FILE)
    plan["max_length"] += 1
    _write(cache / PLAN_FILE, plan)
    assert verify_cache(str(cache)).first_problem.startswith("plan.json is another plan than the manifest's")


def test_caches_without_plan_hashes_still_read_verify_and_finalize(cache, reference):
    """Format 1 and 2 caches carry no plan hash: they are read, verified and finalized as before."""
    for path in [cache / "manifest.json", cache / PLAN_FILE, *(cache / "shards").glob("*.commit.json")]:
        data = _json(path)
        data.pop("plan_hash", None)
        for record in data.get("shards", []):
            del record["plan_hash"]
        if "format_version" in data:
            data["format_version"] = 2
        _write(path, data)
    reader = CacheReader(str(cache))
    assert reader.manifest.format_version == 2 and reader.manifest.plan_hash is None
    assert len(list(reader.iter_examples())) == 24
    assert verify_cache(str(cache)).ok
    stripped = _json(cache / "manifest.json")
    (cache / "manifest.json").unlink()
    assert finalize(CacheLocation(str(cache))).to_dict() == stripped
    # A format 3 manifest must carry its plan hash: stripping it is refused.
    manifest = _json(reference / "manifest.json")
    del manifest["plan_hash"]
    _write(cache / "manifest.json", manifest)
    assert "plan_hash must be sha256:" in verify_cache(str(cache)).first_problem


def test_the_plan_is_created_exclusively_on_fsspec_stores_too(teacher_dir, other_teacher, data_file, tokenizer):
    url = f"memory://kdcache-faults-{os.getpid()}/cache"
    location = CacheLocation(url)
    plans = []
    for teacher in (teacher_dir, other_teacher):
        config = make_config(url, teacher, data_file)
        plans.append(make_plan(config, tokenizer, read_rows(config.data)[0]))
    assert location.create_json(location.path("x.json"), {"a": 1})
    assert not location.create_json(location.path("x.json"), {"a": 2})
    assert location.read_json(location.path("x.json")) == {"a": 1}
    assert write_or_check_plan(location, plans[0]) == plan_hash(plans[0])
    with pytest.raises(IncompatibleCacheError, match="teacher.model: cache has"):
        write_or_check_plan(location, plans[1])
    assert read_plan(location) == plans[0]


# ----------------------------------------------------------------------------------------------------------------
# 4. Paths in a manifest that escape the cache, counts that do not fit


def test_a_file_key_leading_out_of_the_cache_is_refused_unread(cache, tmp_path):
    """`../../../secret` from shards/00001/ is tmp_path/secret: verify would have hashed it (a hash oracle)."""
    secret = tmp_path / "secret"
    secret.write_text("the admin password")
    _edit_shard_record(cache, 1, lambda record: record["files"].update(
        {"../../../secret": {"sha256": "0" * 64, "bytes": 18}}))
    with opened_files() as opened:
        problem = verify_cache(str(cache)).first_problem
        with pytest.raises(CacheFormatError, match=r"shards\[1\]\.files must be keyed by records\.parquet or "
                                                   r"tokens\.zarr/.*got '\.\./\.\./\.\./secret'"):
            CacheReader(str(cache))
        assert _info(cache).exit_code == 2
    assert "manifest.json is damaged: shards[1].files must be keyed by" in problem
    assert str(secret) not in opened


@pytest.mark.parametrize("target", ["/dev/zero", "outside"])
def test_a_file_linked_out_of_the_cache_is_refused_unread(cache, tmp_path, target):
    """A chunk replaced by a symlink to /dev/zero (read without bound before) or to a file outside the cache."""
    if target == "outside":
        target = str(tmp_path / "secret")
        Path(target).write_bytes(b"x" * 100)
    chunk = _chunk(cache, "00002", "input_ids")
    chunk.unlink()
    chunk.symlink_to(target)
    with opened_files() as opened:
        start = time.perf_counter()
        problem = verify_cache(str(cache)).first_problem
        with pytest.raises(CacheFormatError, match=r"shard 00002 of .* cannot be read \(file tokens\.zarr/input_ids/c/0 "
                                                   r"resolves outside the cache\)"):
            CacheReader(str(cache)).read_shard(2)
        assert time.perf_counter() - start < 30
    assert problem == "shard 00002: file tokens.zarr/input_ids/c/0 resolves outside the cache"
    assert target not in opened


def test_a_fifo_or_an_oversized_file_inside_the_cache_is_refused_without_reading(cache):
    chunk = _chunk(cache, "00001", "input_ids")
    chunk.unlink()
    os.mkfifo(chunk)  # opening it for reading would wait forever for a writer
    assert verify_cache(str(cache)).first_problem == "shard 00001: file tokens.zarr/input_ids/c/0 is not a regular file"
    chunk.unlink()
    with open(chunk, "wb") as handle:
        handle.truncate(1 << 40)  # a sparse 1 TiB file: refused by its size, before any read
    expected = _json(cache / "shards" / "00001.commit.json")["files"]["tokens.zarr/input_ids/c/0"]["bytes"]
    assert verify_cache(str(cache)).first_problem == (
        f"shard 00001: file tokens.zarr/input_ids/c/0 has {1 << 40} bytes, more than the {expected} expected")
    with pytest.raises(CacheFormatError, match="more than the"):
        CacheReader(str(cache)).read_shard(1)


def test_a_manifest_linked_to_a_device_is_refused(cache):
    (cache / "manifest.json").unlink()
    (cache / "manifest.json").symlink_to("/dev/zero")
    with pytest.raises(CacheFormatError, match="manifest.json resolves outside the cache"):
        CacheReader(str(cache))
    assert "resolves outside the cache" in verify_cache(str(cache)).first_problem


def test_a_shard_named_out_of_the_cache_is_refused_unread(cache, tmp_path):
    outside = tmp_path / "outside_shard"
    shutil.copytree(cache / "shards" / "00000", outside)
    _edit_shard_record(cache, 0, lambda record: record.update(name="../../../outside_shard"))
    with opened_files() as opened:
        problem = verify_cache(str(cache)).first_problem
        with pytest.raises(CacheFormatError, match=r"shards\[0\]\.name must be '00000' \(the name of shard 0\), "
                                                   r"got '\.\./\.\./\.\./outside_shard'"):
            CacheReader(str(cache))
        result = _info(cache)
    assert result.exit_code == 2 and "shards[0].name must be '00000'" in result.output
    assert "manifest.json is damaged: shards[0].name" in problem
    assert not [path for path in opened if str(outside) in path]


@pytest.mark.parametrize("change, message", [
    (lambda m: m["shards"].pop(), r"shards lists 4 commit records but num_shards is 5"),
    (lambda m: m["shards"][1].update(shard=4, name="00004"), r"shards\[1\]\.shard must be 1, got 4"),
    (lambda m: m["shards"][2].update(rows=[10, 20]), r"shards\[2\]\.rows must be \[10, 15\] \(shard 2 of 24 rows"),
    (lambda m: m.update(num_shards=100_000_000), r"num_shards must be 5 \(dataset\.num_rows / shard_size"),
], ids=["too-few-shards", "shard-index", "rows", "num-shards"])
def test_counts_that_disagree_with_the_plan_are_refused_before_any_loop(cache, change, message):
    manifest = _json(cache / "manifest.json")
    change(manifest)
    _write(cache / "manifest.json", manifest)
    with pytest.raises(CacheFormatError, match=message):
        CacheReader(str(cache))
    assert "manifest.json is damaged: " in verify_cache(str(cache)).first_problem


def test_a_plan_claiming_1e8_shards_costs_finalize_one_listing(cache, monkeypatch):
    plan = _json(cache / PLAN_FILE)
    plan["num_shards"] = 100_000_000  # inconsistent with num_rows: refused as damaged
    _write(cache / PLAN_FILE, plan)
    (cache / "manifest.json").unlink()
    with pytest.raises(CacheFormatError, match=r"plan\.json is damaged: num_shards must be 5"):
        finalize(CacheLocation(str(cache)))
    plan["dataset"]["num_rows"], plan["shard_size"] = 100_000_000, 1  # consistent, and 1e8 shards
    _write(cache / PLAN_FILE, plan)
    calls = []
    exists = CacheLocation.exists
    monkeypatch.setattr(CacheLocation, "exists", lambda self, path: calls.append(path) or exists(self, path))
    start = time.perf_counter()
    with pytest.raises(CacheFormatError, match=r"99999995 of 100000000 shards are not written yet "
                                               r"\(shard 5, 6, 7, 8, 9, 10, 11, 12, 13, 14 \.\.\.\)"):
        finalize(CacheLocation(str(cache)))
    with pytest.raises(CacheFormatError, match=r"unfinished cache \(5 of 100000000 shards written"):
        CacheReader(str(cache))
    assert time.perf_counter() - start < 10 and len(calls) < 10


# ----------------------------------------------------------------------------------------------------------------
# 5. Readers check commit records and checksums on every read


def _rewrite_with_valid_values(cache: Path, shard: str) -> None:
    """Swap the first two target rows of the sparse arrays: still a valid top-k distribution, wrong targets. The
    records keep the old sha256 but get the new sizes (as if the new chunks had happened to keep theirs), so that
    only the checksum can tell."""
    import zarr

    for name in ("sparse_ids", "logprob_top", "logprob_offsets", "tail_logmass", "tail_tempered"):
        array = zarr.open_array(str(cache / "shards" / shard / "tokens.zarr" / name), mode="r+")
        values = array[...]
        values[[0, 1]] = values[[1, 0]]
        array[...] = values
    folder = cache / "shards" / shard

    def new_sizes(record: dict) -> None:
        for key, entry in record["files"].items():
            entry["bytes"] = (folder / key).stat().st_size

    _edit_shard_record(cache, int(shard), new_sizes)


def test_a_chunk_rewritten_with_valid_values_is_refused_by_every_reader(cache):
    _rewrite_with_valid_values(cache, "00001")
    reader = CacheReader(str(cache))
    list(reader.iter_examples(shards=[0, 2, 3, 4]))
    with pytest.raises(CacheFormatError, match=r"shard 00001 of .* cannot be read \(file tokens\.zarr/logprob_offsets/c/0/0 "
                                               r"fails its sha256 checksum \(corrupted\)\)"):
        reader.read_shard(1)
    result = _info(cache)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.count("\n") == 1 and "shard 00001 of" in result.output
    # The opt-out reads it: for caches verified once, at the user's word.
    altered = CacheReader(str(cache), verify_checksums=False).read_shard(1)
    original = read_shard_files(str(cache / "shards" / "00001"))
    np.testing.assert_array_equal(altered.sparse_ids, original.sparse_ids)
    assert _info(cache, "--no-verify-checksums").exit_code == 0


def test_a_changed_byte_of_the_same_size_fails_the_checksum_on_read(cache):
    chunk = _chunk(cache, "00004", "logprob_offsets")
    content = bytearray(chunk.read_bytes())
    content[len(content) // 2] ^= 0x01
    chunk.write_bytes(bytes(content))
    with pytest.raises(CacheFormatError, match=r"shard 00004 of .* cannot be read \(file tokens\.zarr/logprob_offsets/"
                                               r"c/0/0 fails its sha256 checksum \(corrupted\)\)"):
        CacheReader(str(cache)).read_shard(4)


def test_a_shard_without_its_commit_record_is_refused_by_every_reader(cache):
    (cache / "shards" / "00003.commit.json").unlink()
    reader = CacheReader(str(cache))
    with pytest.raises(CacheFormatError, match=r"shard 00003 of .* cannot be read \(has no commit record"):
        list(reader.iter_examples())
    with pytest.raises(CacheFormatError, match="has no commit record"):
        CacheReader(str(cache), verify_checksums=False).read_shard(3)  # the opt-out skips hashing only
    result = _info(cache, "--no-verify-checksums")
    assert result.exit_code == 2 and "has no commit record" in result.output


def test_training_reads_only_verified_shards_unless_told(cache, tmp_path, teacher_dir):
    from kdcache.config import TrainConfig, load_config
    from kdcache.train.trainer import train

    for shard in range(5):  # whichever shards the first batches come from
        _rewrite_with_valid_values(cache, f"{shard:05d}")

    def run(out: str, *overrides: str):
        return train(load_config(TrainConfig, None, [
            f"cache={cache}", f"student={teacher_dir}", f"out={tmp_path / out}", "profile=cpu", "batch_size=4",
            "lora.enabled=false", "heldout_fraction=0.25", "eval_every=100", "save_every=100", "max_steps=2",
            "progress=false", "tensorboard=false", *overrides]))

    with pytest.raises(CacheFormatError, match=r"shard 0000\d of .* fails its sha256 checksum"):
        run("checked")
    assert run("unchecked", "verify_checksums=false").step == 2
