"""The offsets encoding of top-k log-probs: its stated error bound, its on-disk form, and a cache built with it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest
from conftest import make_config

from kdcache.config import CacheBuildConfig, load_config
from kdcache.errors import BadInputError
from kdcache.config import DEFAULT_LOGPROB_GROWTH, DEFAULT_LOGPROB_STEP
from kdcache.store.encoding import (MISSING, OFFSETS_ARRAY, TOP_ARRAY, LogprobEncoding, decode_offsets,
                                    encode_offsets, error_bound, growth_error_bound)
from kdcache.store.reader import CacheReader
from kdcache.store.shard import ShardData, read_shard_files, write_shard_files
from kdcache.store.verify import _check_arrays, verify_cache
from kdcache.teacher.build import build_cache
from kdcache.train.collate import collate_examples as collate


def _sorted_logprobs(rng, n: int, k: int, vocab: int = 151_665, scale: float = 3.0) -> np.ndarray:
    """Top-k log-probs [n, k] of random logit rows over `vocab` (float32, sorted descending), like a teacher's."""
    logits = rng.standard_normal((n, vocab), dtype=np.float32) * scale
    top = -np.sort(-logits, axis=1)[:, :k].astype(np.float64)
    lse = np.log(np.exp(logits.astype(np.float64) - top[:, :1]).sum(axis=1)) + top[:, 0]
    return (top - lse[:, None]).astype(np.float32)


@pytest.mark.parametrize("step", [2.0**-5, 2.0**-7, 2.0**-9])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_every_entry_is_within_the_stated_bound(step, dtype):
    rng = np.random.default_rng(0)
    logprobs = _sorted_logprobs(rng, 64, 48, vocab=4096, scale=float(rng.uniform(0.5, 8)))
    logprobs[5, 30:] = -np.inf  # a row with fewer than k finite logits
    logprobs[6] = np.linspace(-13.9, -14.5, 48)  # a flat row far below 0: the anchor's own rounding dominates
    anchor, deltas = encode_offsets(logprobs, step, np.dtype(dtype))
    assert anchor.dtype == np.dtype(dtype) and deltas.dtype == np.uint16
    decoded = decode_offsets(anchor, deltas, step)
    assert decoded.dtype == np.float32
    finite = np.isfinite(logprobs)
    np.testing.assert_array_equal(np.isfinite(decoded), finite)
    error = np.abs(np.where(finite, decoded, 0.0).astype(np.float64) - np.where(finite, logprobs, 0.0))
    bound = error_bound(logprobs[:, 0], step, np.dtype(dtype))[:, None] + 1e-6  # + float32 rounding of the output
    assert np.all(error[finite] <= np.broadcast_to(bound, error.shape)[finite])
    assert error[finite].max() > step / 4  # the bound is not vacuous: errors come close to it
    assert np.all(np.diff(decoded[finite[:, -1]], axis=1) <= 0)  # still sorted


@pytest.mark.parametrize("step,growth", [(2.0**-8, 4.0), (2.0**-6, 4.0), (2.0**-8, 2.0)])
def test_with_a_growth_every_entry_is_within_its_own_bound(step, growth):
    rng = np.random.default_rng(3)
    logprobs = _sorted_logprobs(rng, 64, 48, vocab=4096, scale=float(rng.uniform(2, 12)))
    logprobs[5, 30:] = -np.inf
    logprobs[7, 1:] = logprobs[7, 0] - np.linspace(30, 80, 47)  # entries deeper than the last code
    logprobs[8, 1:] = logprobs[8, 0] - np.linspace(0.1, 20, 47)  # entries at every depth the codes reach
    anchor, deltas = encode_offsets(logprobs, step, np.dtype("float16"), growth)
    decoded = decode_offsets(anchor, deltas, step, growth)
    finite = np.isfinite(logprobs)
    np.testing.assert_array_equal(np.isfinite(decoded), finite)
    error = np.abs(np.where(finite, decoded, 0.0).astype(np.float64) - np.where(finite, logprobs, 0.0))
    half_ulp = error_bound(logprobs[:, 0], 1e-12, np.dtype("float16"))[:, None]  # the anchor's own rounding
    bound = growth_error_bound(decoded, anchor, step, growth) + half_ulp + 1e-5  # + float32 rounding of the output
    assert np.all(error[finite] <= bound[finite])
    deep = np.isinf(bound) & finite
    assert deep[7, 1:].all() and not deep[:7].any()  # only the entries beyond the last code have no bound
    assert np.all(decoded[7, 1:] >= logprobs[7, 1:])  # and they are stored at the deepest code, never above it
    # Entries within the knee (growth / 2 nats of the top-1) keep the uniform step/2 bound; deeper ones get more.
    shallow = finite & ~deep & (anchor.astype(np.float64)[:, None] - decoded < growth / 2 - step)
    assert np.all(error[shallow] <= (step / 2 + half_ulp + 1e-5)[np.nonzero(shallow)[0], 0])
    assert error[8].max() > 4 * step  # and the deep ones do use their larger steps
    assert np.all(np.diff(decoded[finite[:, -1]], axis=1) <= 0)  # still sorted


def test_the_default_growth_spends_bytes_where_the_kl_is():
    """On sharp rows (most mass in a few entries) the default growth keeps the mean bucket KL under 1e-6 in fewer
    compressed bytes than one uniform step as fine as its top step."""
    import numcodecs

    rng = np.random.default_rng(4)
    logprobs = _sorted_logprobs(rng, 256, 64, vocab=8192, scale=6.0).astype(np.float64)
    logprobs[:128] = logprobs[:128] * 3 - np.log(np.exp(logprobs[:128] * 3).sum(axis=1) + 1e-3)[:, None]  # sharper
    tail = np.log1p(-np.exp(logprobs).sum(axis=1))
    tail_hat = tail.astype(np.float16).astype(np.float64)
    blosc = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)

    def kl_and_bytes(growth):
        anchor, deltas = encode_offsets(logprobs.astype(np.float32), DEFAULT_LOGPROB_STEP, np.dtype("float16"), growth)
        decoded = decode_offsets(anchor, deltas, DEFAULT_LOGPROB_STEP, growth).astype(np.float64)
        p = np.exp(np.concatenate([logprobs, tail[:, None]], axis=1))
        q = np.exp(np.concatenate([decoded, tail_hat[:, None]], axis=1))
        return (p * np.log(p / q) - p + q).sum(axis=1).mean(), len(blosc.encode(np.ascontiguousarray(deltas)))

    (kl_growth, bytes_growth), (kl_uniform, bytes_uniform) = kl_and_bytes(DEFAULT_LOGPROB_GROWTH), kl_and_bytes(None)
    assert kl_growth < 1e-6 and kl_uniform < 1e-6
    assert bytes_growth < 0.8 * bytes_uniform, (bytes_growth, bytes_uniform)


def test_codes_are_stored_as_row_differences_and_missing_is_marked():
    logprobs = np.array([[-0.5, -0.5, -1.0, -np.inf]], dtype=np.float32)
    anchor, deltas = encode_offsets(logprobs, 0.25, np.dtype("float16"))
    assert anchor.tolist() == [-0.5]
    codes = np.cumsum(deltas, axis=1, dtype=np.uint16)
    assert codes.tolist() == [[0, 0, 2, int(MISSING)]]
    np.testing.assert_array_equal(decode_offsets(anchor, deltas, 0.25), logprobs)  # values on the grid: exact


def test_bucket_kl_stays_under_the_bound_of_docs_format():
    """KL(float32 buckets || decoded buckets) <= e^eps - 1 - eps with eps the largest log error (format.md)."""
    rng = np.random.default_rng(1)
    step = 2.0**-5
    logprobs = _sorted_logprobs(rng, 32, 64, vocab=8192, scale=2.0).astype(np.float64)
    tail = np.log1p(-np.exp(logprobs).sum(axis=1))
    decoded = decode_offsets(*encode_offsets(logprobs.astype(np.float32), step, np.dtype("float16")), step)
    tail_hat = tail.astype(np.float16).astype(np.float64)
    p = np.exp(np.concatenate([logprobs, tail[:, None]], axis=1))
    q = np.exp(np.concatenate([decoded.astype(np.float64), tail_hat[:, None]], axis=1))
    kl = (p * np.log(p / q) - p + q).sum(axis=1)  # the generalised KL: q need not sum to one exactly
    eps = np.abs(np.log(q / p)).max(axis=1)
    assert np.all(kl <= np.expm1(eps) - eps + 1e-12)
    assert np.all(kl > 0) and kl.mean() < step**2 / 8


def _shard(rng, k: int = 16) -> ShardData:
    logprobs = _sorted_logprobs(rng, 11, k, vocab=1000)
    return ShardData(
        input_ids=rng.integers(0, 1000, 50, dtype=np.int32), offsets=np.array([0, 20, 50], dtype=np.int64),
        target_mask=np.arange(50) % 5 == 0, target_offsets=np.array([0, 4, 10], dtype=np.int64),
        sparse_ids=rng.integers(0, 1000, (11, k), dtype=np.int32), sparse_logprobs=logprobs,
        tail_logmass=np.log1p(-np.exp(logprobs.astype(np.float64)).sum(axis=1)).astype(np.float32),
        sample_counts=None, records=pa.table({"example_index": [0, 1]}),
        tail_tempered=-rng.random((11, 3)).astype(np.float32))


def test_shard_with_offsets_keeps_tails_to_float16_and_says_its_step(tmp_path):
    data = _shard(np.random.default_rng(2))
    write_shard_files(str(tmp_path), data, LogprobEncoding(step=2.0**-7, dtype="float16"))
    names = {p.name for p in (tmp_path / "tokens.zarr").iterdir()}
    assert {TOP_ARRAY, OFFSETS_ARRAY} <= names and "sparse_logprobs" not in names
    meta = json.loads((tmp_path / "tokens.zarr" / OFFSETS_ARRAY / "zarr.json").read_text())
    assert meta["attributes"] == {"step": 2.0**-7}
    back = read_shard_files(str(tmp_path))
    assert back.logprob_step == 2.0**-7 and back.sparse_logprobs.dtype == np.float32
    np.testing.assert_array_equal(back.tail_logmass, data.tail_logmass.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(back.tail_tempered, data.tail_tempered.astype(np.float16).astype(np.float32))
    assert np.abs(back.sparse_logprobs - data.sparse_logprobs).max() <= 2.0**-8 + 1e-6
    np.testing.assert_array_equal(back.sparse_ids, data.sparse_ids)
    write_shard_files(str(tmp_path / "plain"), data)  # the plain encoding reads back bit for bit, as before
    plain = read_shard_files(str(tmp_path / "plain"))
    assert plain.logprob_step is None
    np.testing.assert_array_equal(plain.sparse_logprobs, data.sparse_logprobs)


def test_config_refuses_a_bad_step(tmp_path):
    with pytest.raises(BadInputError, match=r"sparsifier\.logprob_step' must be a number of nats in \(0, 1\]"):
        load_config(CacheBuildConfig, None, ["sparsifier.logprob_step=0"])
    with pytest.raises(BadInputError, match=r"sparsifier\.logprob_growth' must be a number of nats in \[1, 64\]"):
        load_config(CacheBuildConfig, None, ["sparsifier.logprob_growth=0.5"])


def test_default_build_stores_offsets_and_trains_on_values_within_the_bound(tmp_path, teacher_dir, data_file):
    """A default build writes the offsets encoding; the loader's SparseTargets hold the plain float32 build's
    values to within step/2 (top-1 and tails to float16), and verify passes."""
    encoded = tmp_path / "encoded"
    build_cache(make_config(encoded, teacher_dir, data_file))
    build_cache(make_config(tmp_path / "plain", teacher_dir, data_file, "sparsifier.logprob_step=null",
                            "sparsifier.logprob_dtype=float32"))
    plan = json.loads((encoded / "plan.json").read_text())
    assert plan["sparsifier"]["logprob_step"] == DEFAULT_LOGPROB_STEP and plan["sparsifier"]["logprob_dtype"] == "float16"
    assert plan["sparsifier"]["logprob_growth"] == DEFAULT_LOGPROB_GROWTH
    plain_plan = json.loads((tmp_path / "plain" / "plan.json").read_text())["sparsifier"]
    assert "logprob_step" not in plain_plan and "logprob_growth" not in plain_plan
    assert verify_cache(str(encoded)).ok
    a = list(CacheReader(str(encoded)).iter_examples())
    b = list(CacheReader(str(tmp_path / "plain")).iter_examples())
    ta, tb = collate(a).targets, collate(b).targets
    assert ta.logprobs.dtype == tb.logprobs.dtype
    np.testing.assert_array_equal(ta.ids.numpy(), tb.ids.numpy())
    half_ulp = error_bound(tb.logprobs[:, 0].numpy(), 1e-12, np.dtype("float16"))[:, None]
    bound = growth_error_bound(ta.logprobs.numpy(), ta.logprobs[:, 0].numpy(), DEFAULT_LOGPROB_STEP,
                               DEFAULT_LOGPROB_GROWTH) + half_ulp + 1e-5
    finite = np.isfinite(tb.logprobs.numpy())
    assert np.all(np.abs((ta.logprobs - tb.logprobs).numpy())[finite] <= bound[finite])
    np.testing.assert_array_equal(ta.tail_logmass.numpy(), tb.tail_logmass.numpy().astype(np.float16).astype(np.float32))


def test_verify_refuses_a_shard_whose_encoding_is_not_the_plans(tmp_path, teacher_dir, data_file):
    cache = tmp_path / "cache"
    build_cache(make_config(cache, teacher_dir, data_file, "sparsifier.logprob_step=0.125"))
    reader = CacheReader(str(cache))
    data = reader.read_shard(0)
    assert data.logprob_step == 0.125 and data.logprob_growth == DEFAULT_LOGPROB_GROWTH
    assert _check_arrays(reader.manifest, reader.manifest.shards[0], data) is None
    problem = _check_arrays(reader.manifest, reader.manifest.shards[0], dataclasses.replace(data, logprob_step=None))
    assert problem == ("log-probs are stored plainly but the plan says as offsets in steps of 0.125 nats growing "
                       "e-fold every 4 nats")
    problem = _check_arrays(reader.manifest, reader.manifest.shards[0], dataclasses.replace(data, logprob_growth=None))
    assert problem.startswith("log-probs are stored as offsets in steps of 0.125 nats but the plan says")
