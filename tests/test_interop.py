"""Cache interop: `kdcache cache import` from vLLM prompt_logprobs dumps, Axolotl KD rows and DistillKit compressed
datasets, and `kdcache cache export` to Axolotl, DistillKit and a plain Parquet table; round trips against the
cache they came from. DistillKit's files are written and read by its published code (../shared/peers)."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from conftest import make_config

from kdcache.cli import main
from kdcache.config import TrainConfig, load_config
from kdcache.errors import BadInputError
from kdcache.interop import export_cache, import_cache
from kdcache.interop.distillkit import SCHEMA, _import_distillkit, distillkit_compressor
from kdcache.store.reader import CacheReader
from kdcache.store.verify import verify_cache
from kdcache.teacher.build import build_cache
from kdcache.teacher.vllm import derived_tail
from kdcache.train.losses import LossConfig
from kdcache.train.objective import check_loss_for_cache


def _examples(path):
    return list(CacheReader(path).iter_examples())


def _same_topk(original, imported, by_id=False):
    """The same tokens, targets, top-k ids and (exactly) log-probs; `by_id`: tied values may come in another order."""
    a, b = _examples(original), _examples(imported)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.target_mask, y.target_mask)
        if by_id:
            assert np.array_equal(y.sparse_logprobs, x.sparse_logprobs)  # sorted values, ties included
            np.testing.assert_array_equal(_lookup(y.sparse_ids, y.sparse_logprobs, x.sparse_ids), x.sparse_logprobs)
        else:
            assert np.array_equal(x.sparse_ids, y.sparse_ids)
            np.testing.assert_array_equal(y.sparse_logprobs, x.sparse_logprobs)
    return a, b


def _marked_derived(path, tail="derived"):
    manifest = CacheReader(path).manifest
    assert manifest.imported is not None and manifest.imported.tail == tail
    assert manifest.teacher.vllm == {"scoring": "prompt_logprobs"} and manifest.sparsifier.tail_temperatures == ()
    with pytest.raises(BadInputError, match=f"exact tail.*imported from {manifest.imported.format} top-k files"):
        check_loss_for_cache(LossConfig(kind="reverse_kl"), manifest)
    with pytest.raises(BadInputError, match="derives its tail"):
        check_loss_for_cache(LossConfig(kind="forward_kl", temperature=2.0), manifest)
    assert verify_cache(path).ok
    return manifest


@pytest.fixture(scope="module")
def target_cache(tmp_path_factory, teacher_dir, data_file) -> str:
    """A cache of target tokens only (the template's answer), k = 16."""
    out = tmp_path_factory.mktemp("interop") / "cache"
    assert build_cache(make_config(out, teacher_dir, data_file)).finalized
    return str(out)


# ---------------------------------------------------------------------------------------------------- Axolotl


@pytest.mark.parametrize("suffix", ["parquet", "jsonl"])
def test_axolotl_round_trip_keeps_topk_and_marks_the_tail_derived(tmp_path, target_cache, tokenizer, suffix):
    rows_file = str(tmp_path / f"kd.{suffix}")
    assert export_cache(target_cache, "axolotl", rows_file) == 24
    rows = pq.read_table(rows_file).to_pylist() if suffix == "parquet" else [
        json.loads(line) for line in open(rows_file)]
    first, example = rows[0], _examples(target_cache)[0]
    # Axolotl's alignment: row j is the distribution over input_ids[j + 1], masked where labels[j + 1] == -100.
    j = int(np.flatnonzero(example.target_mask)[0]) - 1
    assert first["target_token_ids"][j] == example.sparse_ids[0].tolist()
    assert first["labels"][j + 1] == first["input_ids"][j + 1] and first["labels"][j] == -100
    assert first["target_mask"][j] == [1] * 16 and first["target_mask"][j - 1] == [0] * 16
    assert len(first["target_logprobs"]) == len(first["input_ids"])

    out = str(tmp_path / "imported")
    import_cache("axolotl", [rows_file], out, tokenizer, "tok", progress=False)
    original, imported = _same_topk(target_cache, out)  # float32 values travel exactly
    _marked_derived(out)
    for x, y in zip(original, imported):  # the tail is 1 - sum(top-k), close to the exact one where it has mass
        np.testing.assert_allclose(y.tail_logmass, derived_tail(x.sparse_logprobs), atol=1e-5)
        big = x.tail_logmass > np.log(1e-3)
        np.testing.assert_allclose(y.tail_logmass[big], x.tail_logmass[big], atol=2e-3)


def test_renormalised_axolotl_rows_have_no_tail_mass(tmp_path, target_cache, tokenizer, caplog):
    rows_file = str(tmp_path / "kd.parquet")
    export_cache(target_cache, "axolotl", rows_file, renormalize=True)
    out = str(tmp_path / "imported")
    with caplog.at_level(logging.WARNING, logger="kdcache.interop"):
        import_cache("axolotl", [rows_file], out, tokenizer, "tok", progress=False)
    assert "no tail mass" in caplog.text
    _marked_derived(out, tail="none")
    for x, y in zip(_examples(target_cache), _examples(out)):
        renormalised = x.sparse_logprobs - np.logaddexp.reduce(x.sparse_logprobs.astype(np.float64), axis=-1,
                                                               keepdims=True)
        np.testing.assert_allclose(y.sparse_logprobs, renormalised, atol=1e-6)
        assert np.all(y.tail_logmass <= np.log(2e-6))  # the float32-eps floor, not a tail


# ---------------------------------------------------------------------------------------------------- vLLM


def _teacher_positions(model, input_ids: list[int], k: int):
    """vLLM's prompt_logprobs for one prompt, as its output types hold them: None, then per position t a dict
    {token_id: Logprob(logprob, rank, decoded_token)} with ranks 1..k plus the actual token t (its own rank)."""
    from vllm.logprobs import Logprob

    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([input_ids])).logits[0].double(), -1)
    positions = [None]
    for t in range(1, len(input_ids)):
        row = logprobs[t - 1]
        order = torch.argsort(row, descending=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(1, len(row) + 1)
        actual = input_ids[t]
        entry = {actual: Logprob(float(row[actual]), int(ranks[actual]), None)}
        for r, token in enumerate(order[:k].tolist()):
            entry[token] = Logprob(float(row[token]), r + 1, None)
        positions.append(entry)
    return positions


@pytest.fixture(scope="module")
def vllm_dump(tmp_path_factory, teacher_dir, tokenizer, data_file):
    pytest.importorskip("vllm.logprobs", reason="needs vllm (for its Logprob output type)")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    rows = [json.loads(line) for line in open(data_file)][:6]
    folder = tmp_path_factory.mktemp("dump")
    jsonl, parquet = folder / "dump.jsonl", folder / "dump.parquet"
    table = []
    with open(jsonl, "w") as handle:
        for row in rows:
            ids = tokenizer(row["title"] + " " + row["text"])["input_ids"][:40]
            positions = _teacher_positions(model, ids, 8)
            # As users dump it: json.dumps of the ids and the Logprob dataclasses (keys become strings).
            handle.write(json.dumps({"prompt_token_ids": ids, "prompt_logprobs": [
                None if p is None else {str(t): dataclasses.asdict(lp) for t, lp in p.items()} for p in positions]})
                + "\n")
            table.append({"input_ids": ids, "prompt_logprobs": [
                None if p is None else [{"token_id": t, **dataclasses.asdict(lp)} for t, lp in p.items()]
                for p in positions]})
    pq.write_table(pa.Table.from_pylist(table), parquet)
    return str(jsonl), str(parquet)


def trains_three_steps(cache: str, student_dir: str, out) -> None:
    """A full fine-tune of `student_dir` on `cache` runs 3 steps with finite losses (an imported cache trains)."""
    from kdcache.train.trainer import train

    result = train(load_config(TrainConfig, None, [
        f"cache={cache}", f"student={student_dir}", f"out={out}", "profile=cpu", "batch_size=2",
        "lora.enabled=false", "heldout_fraction=0", "max_steps=3", "save_every=100", "eval_every=100",
        "chunk_size=64", "progress=false"]))
    assert result.step == 3
    losses = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert losses and all(np.isfinite(r["loss"]) for r in losses)


def test_vllm_dump_imports_in_both_file_types_and_trains(tmp_path, vllm_dump, tokenizer, teacher_dir, student_dir):
    jsonl, parquet = vllm_dump
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    import_cache("vllm", [jsonl], a, tokenizer, "tok", shard_size=4, progress=False)
    import_cache("vllm", [parquet], b, tokenizer, "tok", shard_size=4, progress=False)
    _same_topk(a, b)
    manifest = _marked_derived(a)
    assert manifest.sparsifier.k == 8 and manifest.num_shards == 2 and manifest.template.distill == "all"
    example = _examples(a)[0]
    assert example.sparse_ids.shape == (len(example.input_ids) - 1, 8)  # the actual token's extra entry dropped
    assert np.all(np.diff(example.sparse_logprobs, axis=1) <= 0)
    np.testing.assert_allclose(example.tail_logmass, derived_tail(example.sparse_logprobs), atol=1e-6)

    trains_three_steps(a, student_dir, tmp_path / "run")


def test_vllm_dump_k_and_bad_files_are_one_line_errors(tmp_path, vllm_dump, tokenizer):
    jsonl, _ = vllm_dump
    out = str(tmp_path / "k4")
    import_cache("vllm", [jsonl], out, tokenizer, "tok", k=4, progress=False)
    assert CacheReader(out).manifest.sparsifier.k == 4
    with pytest.raises(BadInputError, match="--k 9 but some positions hold only 8"):
        import_cache("vllm", [jsonl], str(tmp_path / "k9"), tokenizer, "tok", k=9, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt_token_ids": [1, 2, 3], "prompt_logprobs": [None, {"5": {"logprob": -1}}]}))
    with pytest.raises(BadInputError, match="2 positions for 3 tokens"):
        import_cache("vllm", [str(bad)], str(tmp_path / "x"), tokenizer, "tok", progress=False)
    bad.write_text(json.dumps({"text": "no logprobs"}))
    result = CliRunner().invoke(main, ["cache", "import", str(bad), "--format", "vllm", "-o", str(tmp_path / "y"),
                                       "--tokenizer", "/nonexistent-tokenizer"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    bad.write_text("{not json")
    with pytest.raises(BadInputError, match="line 1 is not JSON"):
        import_cache("vllm", [str(bad)], str(tmp_path / "z"), tokenizer, "tok", progress=False)


# ---------------------------------------------------------------------------------------------------- DistillKit


RECOMMENDED_LIKE = {"k": 32, "exact_k": 8, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, 2, "sqrt"],
                    "term_dtype": "float32", "residual_bins": [], "delta_encoding": False, "error_diffusion": False}


def _lookup(ids: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """[T, k] values of rows (ids, values) at the ids `query` [T, q] (every queried id is in its row)."""
    order = np.argsort(ids, axis=1)
    sorted_ids = np.take_along_axis(ids, order, axis=1)
    at = np.stack([np.searchsorted(row, q) for row, q in zip(sorted_ids, query)])
    assert np.array_equal(np.take_along_axis(sorted_ids, at, axis=1), query)
    return np.take_along_axis(np.take_along_axis(values, order, axis=1), at, axis=1)



def _distillkit_or_skip() -> None:
    """DistillKit's published code is not on PyPI: it is read from ../shared/peers beside the checkout (or
    $KDCACHE_DISTILLKIT_PATH, or an installed distillkit). Where none is there, its tests are skipped, saying so."""
    try:
        _import_distillkit()
    except BadInputError as exc:
        pytest.skip(f"DistillKit's code is not beside this checkout: {exc}")

def test_distillkit_dataset_imports_within_its_quantisation_error(tmp_path, sharp_cache, tokenizer):
    _distillkit_or_skip()
    """A dataset written as DistillKit's sample_logits_vllm writes it (its compressor, its schema, its yaml)."""
    import yaml

    config = {"d": len(tokenizer), **RECOMMENDED_LIKE}
    compressor = distillkit_compressor(config)
    folder = tmp_path / "dk"
    folder.mkdir()
    (folder / "compression_config.yaml").write_text(yaml.safe_dump(compressor.config.model_dump(mode="json")))
    rows, decoded = [], []
    for example in _examples(sharp_cache):
        packed = compressor.compress_from_sparse(torch.as_tensor(example.sparse_ids[None], dtype=torch.long),
                                                 torch.as_tensor(example.sparse_logprobs[None]))
        rows.append({"input_ids": example.input_ids.tolist(),
                     **{key: value.squeeze(0).tolist() for key, value in packed.items()}})
        decoded.append(compressor.decompress_to_sparse({key: value.squeeze(0) for key, value in packed.items()}))
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), folder / "data_0.parquet")

    out = str(tmp_path / "imported")
    import_cache("distillkit", [str(folder)], out, tokenizer, "tok", progress=False)
    manifest = _marked_derived(out)
    assert manifest.imported.compression["exact_k"] == 8 and manifest.template.distill == "all"
    worst = 0.0
    for x, y, (ids, values) in zip(_examples(sharp_cache), _examples(out), decoded):
        # the same ids per row; each id's value exactly DistillKit's decoding (clipped at 0; rows re-sorted by value,
        # since its polynomial tail need not decrease, and ties may come in another order), within its error of the
        # original
        assert np.array_equal(np.sort(y.sparse_ids), np.sort(x.sparse_ids))
        ours = _lookup(y.sparse_ids, y.sparse_logprobs, x.sparse_ids)  # in the original's order
        theirs = _lookup(ids.numpy(), values.float().numpy(), x.sparse_ids)
        np.testing.assert_allclose(ours, np.minimum(theirs, 0), atol=1e-6)
        np.testing.assert_allclose(ours[:, :8], x.sparse_logprobs[:, :8], rtol=1e-2, atol=1e-2)  # bf16 exact values
        worst = max(worst, float(np.abs(ours - x.sparse_logprobs).max()))
    assert 0 < worst < 1.0  # the polynomial tail is approximate, and not wildly so


def test_distillkit_export_is_lossless_by_default_and_refuses_target_only_caches(tmp_path, sharp_cache,
                                                                                   target_cache, tokenizer):
    _distillkit_or_skip()
    folder = str(tmp_path / "dk")
    assert export_cache(sharp_cache, "distillkit", folder) == 24
    out = str(tmp_path / "imported")
    import_cache("distillkit", [folder], out, tokenizer, "tok", progress=False)
    _same_topk(sharp_cache, out, by_id=True)  # DistillKit sorts each row itself: ties may change places
    with pytest.raises(BadInputError, match="distill=target"):
        export_cache(target_cache, "distillkit", str(tmp_path / "no"))


# ---------------------------------------------------------------------------------------------------- Parquet


def test_parquet_export_is_one_row_per_token(tmp_path, target_cache):
    path = str(tmp_path / "cache.parquet")
    result = CliRunner().invoke(main, ["cache", "export", target_cache, "--format", "parquet", "-o", path])
    assert result.exit_code == 0, result.output
    table = pq.read_table(path)
    examples = _examples(target_cache)
    assert table.num_rows == sum(len(e.input_ids) for e in examples)
    assert json.loads(table.schema.metadata[b"kdcache.plan"])["sparsifier"]["k"] == 16
    first = [r for r in table.to_pylist() if r["example_index"] == examples[0].index]
    targets = [r for r in first if r["is_target"]]
    assert [r["token_id"] for r in first] == examples[0].input_ids.tolist()
    assert [r["topk_ids"] for r in targets] == examples[0].sparse_ids.tolist()
    np.testing.assert_allclose([r["tail_logmass"] for r in targets], examples[0].tail_logmass)
    assert all(r["topk_ids"] is None for r in first if not r["is_target"])
    assert len(targets[0]["tail_tempered"]) == len(CacheReader(target_cache).manifest.sparsifier.tail_temperatures)


def test_cli_export_then_import_then_info(tmp_path, target_cache, teacher_dir):
    rows_file, out = str(tmp_path / "kd.jsonl"), str(tmp_path / "imported")
    runner = CliRunner()
    result = runner.invoke(main, ["cache", "export", target_cache, "--format", "axolotl", "-o", rows_file])
    assert result.exit_code == 0 and "wrote 24 rows (axolotl)" in result.output, result.output
    result = runner.invoke(main, ["cache", "import", rows_file, "--format", "axolotl", "--tokenizer", teacher_dir,
                                  "--teacher", "tiny-teacher", "--shard-size", "10", "-o", out, "--no-progress"])
    assert result.exit_code == 0 and "imported 24 sequences" in result.output and "tail: derived" in result.output
    manifest = CacheReader(out).manifest
    assert manifest.num_shards == 3 and manifest.teacher.model == "tiny-teacher"
    assert manifest.tokenizer.fingerprint == CacheReader(target_cache).manifest.tokenizer.fingerprint
    info = runner.invoke(main, ["cache", "info", out])
    assert "imported        from axolotl (tail: derived" in info.output, info.output
    # An import killed after shard 0 (shard 1's commit and the manifest missing) resumes to the same cache; another
    # import into it with other settings is refused by the plan check.
    from kdcache.store.location import CacheLocation

    before = json.loads((tmp_path / "imported" / "manifest.json").read_text())
    location = CacheLocation(out)
    for path in (location.commit_path(1), location.commit_path(2), location.path("manifest.json")):
        location.fs.rm(path)
    assert runner.invoke(main, ["cache", "import", rows_file, "--format", "axolotl", "--tokenizer", teacher_dir,
                                "--teacher", "tiny-teacher", "--shard-size", "10", "-o", out]).exit_code == 0
    assert json.loads((tmp_path / "imported" / "manifest.json").read_text()) == before
    refused = runner.invoke(main, ["cache", "import", rows_file, "--format", "axolotl", "--tokenizer", teacher_dir,
                                   "-o", out])
    assert refused.exit_code == 2 and "already holds a cache built with other settings" in refused.output
    # The same file with one log-prob changed is other data: resuming into this cache is refused too.
    rows = [json.loads(line) for line in open(rows_file)]
    j = rows[0]["target_mask"].index([1] * 16)
    rows[0]["target_logprobs"][j][0] -= 0.5
    with open(rows_file, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    refused = runner.invoke(main, ["cache", "import", rows_file, "--format", "axolotl", "--tokenizer", teacher_dir,
                                   "--teacher", "tiny-teacher", "--shard-size", "10", "-o", out])
    assert refused.exit_code == 2 and "dataset.fingerprint" in refused.output, refused.output


def test_vllm_positions_keep_ranks_one_to_k_whatever_the_shape():
    from kdcache.interop.vllm import _contiguous_ranks, _entries, _top

    # The actual token (7) outside the top-2 but tied with rank 2: vLLM gives it rank 2 as well.
    position = {"7": {"logprob": -1.5, "rank": 2}, "3": {"logprob": -0.5, "rank": 1}, "9": {"logprob": -1.5, "rank": 2}}
    entries = _entries(position, "x")
    assert _contiguous_ranks(entries) == 2 and _top(entries, 2, actual=7) == ([3, 9], [-0.5, -1.5])
    # Outside with its own rank; a Parquet map column's (id, value) pairs; bare floats ranked by value.
    entries = _entries([{"token_id": 7, "logprob": -6.0, "rank": 40}, {"token_id": 3, "logprob": -0.1, "rank": 1}],
                       "x")
    assert _contiguous_ranks(entries) == 1 and _top(entries, 1, actual=7) == ([3], [-0.1])
    assert _top(_entries([(4, -2.0), (5, -0.2), (6, -1.0)], "x"), 2, actual=4) == ([5, 6], [-0.2, -1.0])
    with pytest.raises(BadInputError, match="no numeric 'logprob'"):
        _entries({"3": {"rank": 1}}, "row 0 position 1")
