"""The cache loader: exact targets, every example once per epoch, deterministic order, exact resume, budgets."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import make_config

from kdcache.errors import CacheFormatError
from kdcache.store.reader import CacheReader
from kdcache.teacher.build import build_cache
from kdcache.train.loader import CacheBatch, CacheDataLoader, CacheDataset, LoaderSettings, LoaderState, heldout_mask


@pytest.fixture(scope="module")
def cache(tmp_path_factory, teacher_dir, data_file) -> str:
    """24 examples in 5 shards (5, 5, 5, 5, 4), top-16 targets."""
    path = tmp_path_factory.mktemp("loader") / "cache"
    build_cache(make_config(path, teacher_dir, data_file))
    return str(path)


@pytest.fixture(scope="module")
def examples(cache) -> dict:
    return {e.index: e for e in CacheReader(cache).iter_examples()}


def indices(batches: list[CacheBatch]) -> list[tuple[int, ...]]:
    return [tuple(b.example_indices.tolist()) for b in batches]


def flat(batches: list[CacheBatch]) -> list[int]:
    return [i for b in batches for i in b.example_indices.tolist()]


def test_batches_carry_the_cached_targets(cache, examples):
    dataset = CacheDataset(cache, batch_size=3, split="all", seed=1)
    pad = dataset.manifest.tokenizer.eos_token_id
    batches = list(dataset)
    assert sorted(flat(batches)) == sorted(examples)
    for batch in batches:
        rows, cols = batch.target_mask.nonzero(as_tuple=True)
        assert batch.targets.ids.shape == (len(rows), 16) and batch.targets.ids.dtype == torch.long
        assert batch.targets.logprobs.dtype == torch.float32 and batch.targets.tail_logmass.shape == (len(rows),)
        assert batch.targets.counts is None
        assert torch.equal(batch.labels, batch.input_ids[rows, cols])
        start = 0
        for row, index in enumerate(batch.example_indices.tolist()):
            e = examples[index]
            n, t = len(e.input_ids), e.sparse_ids.shape[0]
            assert batch.attention_mask[row].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
            assert batch.input_ids[row, :n].tolist() == e.input_ids.tolist()
            assert torch.all(batch.input_ids[row, n:] == pad)
            assert batch.target_mask[row, :n].tolist() == e.target_mask.tolist()
            assert not batch.target_mask[row, n:].any()
            assert torch.all(rows[start : start + t] == row)  # row-major order
            np.testing.assert_array_equal(batch.targets.ids[start : start + t].numpy(), e.sparse_ids)
            np.testing.assert_array_equal(batch.targets.logprobs[start : start + t].numpy(), e.sparse_logprobs)
            np.testing.assert_array_equal(batch.targets.tail_logmass[start : start + t].numpy(), e.tail_logmass)
            start += t
        assert start == batch.num_targets
    assert dataset.stats.batches == len(batches) and dataset.stats.examples == len(examples)
    assert dataset.stats.load_seconds > 0 and dataset.stats.targets == sum(b.num_targets for b in batches)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_train_example_once_per_epoch_across_ranks_and_workers(cache, examples, num_workers):
    train = {i for i in examples if not heldout_mask([i], 0.25)[0]}
    per_epoch = []
    for epoch in (0, 1) if num_workers == 0 else (0,):
        seen, batch_sets = [], []
        for rank in (0, 1):
            dataset = CacheDataset(cache, batch_size=2, rank=rank, world_size=2, heldout_fraction=0.25, seed=3)
            loader = CacheDataLoader(dataset, num_workers=num_workers)
            loader.set_epoch(epoch)
            batches = list(loader)
            seen += flat(batches)
            batch_sets.append(sorted(indices(batches)))
            assert loader.stats.batches == len(batches)
        assert sorted(seen) == sorted(train)  # exactly once: no duplicates, nothing missing, nothing held out
        per_epoch.append(batch_sets)
    assert num_workers or per_epoch[0] != per_epoch[1]


def test_more_ranks_than_shards_split_examples(cache, examples):
    seen = [flat(list(CacheDataset(cache, batch_size=2, split="all", rank=r, world_size=6))) for r in range(6)]
    assert all(seen) and sorted(i for part in seen for i in part) == sorted(examples)


def test_batches_do_not_depend_on_num_workers(cache):
    def batch_set(num_workers):
        dataset = CacheDataset(cache, max_tokens=700, seed=5)
        return sorted(indices(list(CacheDataLoader(dataset, num_workers=num_workers))))

    assert batch_set(0) == batch_set(2)


def test_order_is_deterministic_in_seed_and_epoch(cache):
    def run(seed, epoch, rank=0):
        dataset = CacheDataset(cache, batch_size=3, seed=seed, rank=rank, world_size=2)
        dataset.set_epoch(epoch)
        return indices(list(dataset))

    base = run(0, 0)
    assert run(0, 0) == base
    assert run(0, 1) != base
    assert run(1, 0) != base
    assert run(0, 0, rank=1) == run(0, 0, rank=1) != base
    fixed = CacheDataset(cache, batch_size=100, shuffle=False, buffer_shards=10)
    assert flat(list(fixed)) == sorted(flat(list(fixed)))  # stored order


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_exactly_the_remaining_batches(cache, num_workers):
    def loader(state=None, epoch=1):
        dataset = CacheDataset(cache, batch_size=2, seed=11, buffer_shards=1)
        dataset.set_epoch(epoch)
        if state is not None:
            dataset.load_state_dict(state)
        return CacheDataLoader(dataset, num_workers=num_workers)

    full = indices(list(loader()))
    assert len(full) > 12
    # Interrupt after 5 batches, resume and interrupt after 12 (with 2 workers, worker 1 has run out by then: 5
    # shards, buffers 0, 2, 4 vs 1, 3), resume again and finish; each resume starts from a fresh dataset.
    got, state = [], None
    for stop in (5, 12, None):
        current = loader(state, epoch=1 if state is None else 0)  # load_state_dict sets the epoch
        for batch in current:
            got.append(tuple(batch.example_indices.tolist()))
            if len(got) == stop:
                break
        state = current.state_dict()
        assert state["epoch"] == 1 and state["batches"] == len(got)
        assert got == full[: len(got)]
    assert got == full


def test_resume_refuses_other_settings(cache):
    dataset = CacheDataset(cache, batch_size=2)
    next(iter(dataset))
    state = dataset.state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        CacheDataset(cache, batch_size=3).load_state_dict(state)
    other = CacheDataset(cache, batch_size=2)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers"):
        next(iter(CacheDataLoader(other, num_workers=2)))


def test_set_epoch_to_another_epoch_drops_resume_state(cache):
    dataset = CacheDataset(cache, batch_size=2)
    full = indices(list(dataset))
    state = {**dataset.state_dict(), "batches": 3, "worker_batches": [3]}
    dataset.load_state_dict(state)
    dataset.set_epoch(0)  # the same epoch: still resuming
    assert indices(list(dataset)) == full[3:]
    assert indices(list(dataset)) == full  # a second pass over the epoch is whole again
    dataset.load_state_dict(state)
    dataset.set_epoch(1)
    assert sorted(flat(list(dataset))) == sorted(i for batch in full for i in batch)  # all of epoch 1


def test_heldout_and_train_are_disjoint_and_cover_everything(cache, examples):
    def split(name, seed=0):
        return flat(list(CacheDataset(cache, batch_size=4, split=name, heldout_fraction=0.3, seed=seed)))

    train, heldout = split("train"), split("heldout")
    assert len(train) == len(set(train)) and len(heldout) == len(set(heldout))
    assert heldout and not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(examples)
    assert set(split("heldout", seed=9)) == set(heldout)  # the shuffle seed does not move examples across splits
    assert set(flat(list(CacheDataset(cache, batch_size=4, split="heldout", heldout_fraction=0.0)))) == set()


@pytest.mark.parametrize("multiple", [1, 8])
def test_token_budget_is_respected(cache, examples, multiple):
    longest = max(len(e.input_ids) for e in examples.values())
    budget = 3 * longest
    dataset = CacheDataset(cache, max_tokens=budget, split="all", pad_to_multiple_of=multiple, buffer_shards=2)
    batches = list(dataset)
    assert sorted(flat(batches)) == sorted(examples)
    for batch in batches:
        b, length = batch.input_ids.shape
        assert b * length <= budget and length % multiple == 0
        assert length - int(batch.attention_mask.sum(1).max()) < multiple
    assert max(b.input_ids.shape[0] for b in batches) > 1
    capped = list(CacheDataset(cache, max_tokens=10 * budget, batch_size=2, split="all"))
    assert max(b.input_ids.shape[0] for b in capped) == 2
    with pytest.raises(ValueError, match="max_tokens"):
        list(CacheDataset(cache, max_tokens=longest - 1, split="all"))


def test_k_prime_folds_dropped_mass_into_the_tail(cache):
    full = next(iter(CacheDataset(cache, batch_size=4, seed=2)))
    cut = next(iter(CacheDataset(cache, batch_size=4, seed=2, k_prime=5)))
    assert cut.targets.ids.shape[1] == 5 and torch.equal(cut.targets.ids, full.targets.ids[:, :5])
    assert torch.equal(cut.targets.logprobs, full.targets.logprobs[:, :5])
    expected = torch.logsumexp(torch.cat([full.targets.tail_logmass[:, None], full.targets.logprobs[:, 5:]], 1), 1)
    torch.testing.assert_close(cut.targets.tail_logmass, expected)
    with pytest.raises(ValueError, match="k_prime"):
        CacheDataset(cache, batch_size=4, k_prime=17)


def _damaged_copy(cache, tmp_path, how) -> str:
    target = tmp_path / "damaged"
    shutil.copytree(cache, target)
    tokens = target / "shards" / "00002" / "tokens.zarr"
    if how == "flip":
        chunk = tokens / "sparse_ids" / "c" / "0" / "0"
        data = bytearray(chunk.read_bytes())
        for i in range(16, len(data), 7):
            data[i] ^= 0xFF
        chunk.write_bytes(bytes(data))
    else:
        shutil.rmtree(tokens)
    return str(target)


@pytest.mark.parametrize("how", ["flip", "delete"])
def test_corrupt_shard_raises_cache_format_error_naming_it(cache, tmp_path, how):
    damaged = _damaged_copy(cache, tmp_path, how)
    with pytest.raises(CacheFormatError, match="shard 00002 of"):
        list(CacheDataset(damaged, batch_size=2, split="all"))
    if how == "flip":
        with pytest.raises(CacheFormatError, match="shard 00002 of"):  # also from a worker process
            list(CacheDataLoader(CacheDataset(damaged, batch_size=2, split="all"), num_workers=2))


# ---------------------------------------------------------------- settings and the saved state

# What a loader state records as its settings: checkpoints written before LoaderSettings existed hold these keys.
RECORDED_SETTINGS = {"seed", "shuffle", "rank", "world_size", "batch_size", "max_tokens", "buffer_shards", "split",
                     "heldout_fraction", "split_seed", "pad_to_multiple_of", "drop_last", "k_prime"}


def test_settings_record_the_same_keys_as_before():
    settings = LoaderSettings(batch_size=2, rank=0, world_size=1)
    assert set(settings.to_dict()) == RECORDED_SETTINGS
    assert LoaderSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(ValueError, match="pad_id is not a loader setting"):
        LoaderSettings.from_dict({**settings.to_dict(), "pad_id": 0})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "give batch_size, max_tokens"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"batch_size": True}, "batch_size must be a positive integer, got True"),
        ({"max_tokens": 1.5}, "max_tokens must be a positive integer, got 1.5"),
        ({"batch_size": 2, "k_prime": 0}, "k_prime must be a positive integer, got 0"),
        ({"batch_size": 2, "buffer_shards": 0}, "buffer_shards must be >= 1, got 0"),
        ({"batch_size": 2, "pad_to_multiple_of": 0}, "pad_to_multiple_of must be >= 1, got 0"),
        ({"batch_size": 2, "split": "test"}, "split must be one of train, heldout, all, got 'test'"),
        ({"batch_size": 2, "heldout_fraction": 1.5}, r"heldout_fraction must be in \[0, 1\], got 1.5"),
        ({"batch_size": 2, "world_size": 0}, "world_size must be >= 1, got 0"),
        ({"batch_size": 2, "rank": 2, "world_size": 2}, "rank must be >= 0 and below world_size=2, got 2"),
        ({"batch_size": 2, "rank": -1}, "rank must be >= 0, got -1"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(options, message):
    with pytest.raises(ValueError, match=message):
        LoaderSettings(**options)


def test_settings_are_normalised_and_placed():
    settings = LoaderSettings(batch_size=2, seed=np.int64(3), heldout_fraction=0, shuffle=1)
    assert (type(settings.seed), settings.heldout_fraction, settings.shuffle) == (int, 0.0, True)
    assert (settings.rank, settings.world_size) == (None, None)
    assert (settings.placed().rank, settings.placed().world_size) == (0, 1)  # torch.distributed is not initialised
    assert LoaderSettings(batch_size=2, rank=1, world_size=3).placed().rank == 1


def test_dataset_takes_settings_or_their_fields(cache):
    settings = LoaderSettings(max_tokens=700, seed=5, split="all")
    by_settings, by_keywords = CacheDataset(cache, settings), CacheDataset(cache, max_tokens=700, seed=5, split="all")
    assert by_settings.settings == by_keywords.settings == settings.placed()
    assert indices(list(by_settings)) == indices(list(by_keywords))
    assert by_settings.state_dict() == by_keywords.state_dict()
    with pytest.raises(TypeError, match="not both"):
        CacheDataset(cache, settings, seed=1)
    assert CacheDataset(cache, settings, pad_id=7).pad_id == 7


def test_a_state_written_before_loader_settings_still_loads(cache):
    old = {"epoch": 1, "batches": 3, "num_workers": 1, "worker_batches": [3], "next_worker": 0,
           "settings": {"seed": 11, "shuffle": True, "rank": 0, "world_size": 1, "batch_size": 2, "max_tokens": None,
                        "buffer_shards": 1, "split": "train", "heldout_fraction": 0.0, "split_seed": 0,
                        "pad_to_multiple_of": 1, "drop_last": False, "k_prime": None}}
    dataset = CacheDataset(cache, batch_size=2, seed=11)
    dataset.set_epoch(1)
    full = indices(list(dataset))
    resumed = CacheDataset(cache, batch_size=2, seed=11)
    resumed.load_state_dict(old)
    assert resumed.state_dict() == old
    assert indices(list(resumed)) == full[3:]
    bare = CacheDataset(cache, batch_size=2, seed=11)
    bare.load_state_dict({"epoch": 1, "batches": 3})  # a single-process state without per-worker counts
    assert indices(list(bare)) == full[3:]


def test_loader_state_round_trips_and_rotates_workers():
    settings = LoaderSettings(batch_size=2, rank=0, world_size=1)
    state = LoaderState.start(2, num_workers=3)
    for worker in (0, 1, 2, 0):
        state.note(worker)
    assert (state.worker_batches, state.next_worker, state.batches) == ([2, 1, 1], 1, 4)
    saved = state.to_dict(settings)
    assert saved == {"epoch": 2, "batches": 4, "num_workers": 3, "worker_batches": [2, 1, 1], "next_worker": 1,
                     "settings": settings.to_dict()}
    back = LoaderState.from_dict(saved)
    assert back == state and [back.logical_worker(w) for w in range(3)] == [1, 2, 0]
    with pytest.raises(ValueError, match="2 worker counts for 3 workers"):
        LoaderState.from_dict({**saved, "worker_batches": [1, 1]})
