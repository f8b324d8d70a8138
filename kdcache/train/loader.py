"""Stream training batches from a finished cache: sharded across ranks and workers, shuffled, resumable.

* :class:`LoaderSettings`: what decides a rank's batches of an epoch, validated when made; a saved state records
  its ``to_dict`` and is only loaded into a dataset with the same settings.
* :mod:`kdcache.train.batching`: the plan of an epoch, pure functions of the settings: the shards are permuted with
  ``(seed, epoch)``, rank ``r`` of ``world_size`` takes ``order[r::world_size]`` (with fewer shards than ranks every
  rank reads every shard and keeps every ``world_size``-th example), in buffers of ``buffer_shards`` (buffer ``b``
  from DataLoader worker ``b % num_workers``); a buffer's examples are filtered by ``split``, shuffled, and cut into
  batches of ``batch_size`` or packed to a ``max_tokens`` budget.
* :class:`CacheDataset` reads the shards, collates (:mod:`kdcache.train.collate`) and keeps its position in the
  epoch (:class:`LoaderState`).

The set of batches a rank yields in an epoch does not depend on ``num_workers`` (only their interleaving does).
Ranks may yield different numbers of batches (shards hold different numbers of tokens): a DDP training loop must
handle uneven inputs (e.g. stop every rank when the first runs out, or ``Join``).

Resuming: :meth:`CacheDataset.state_dict` records the epoch and how many batches each (logical) worker has delivered
to the consumer; after :meth:`CacheDataset.load_state_dict` the next iteration skips exactly those batches (shards are
still read, but skipped batches are not collated) and yields the rest in the same order as an uninterrupted run.
With ``num_workers > 0`` the consumer-side bookkeeping needs :class:`CacheDataLoader` (a ``DataLoader`` that tells
the dataset which batches reached the training loop); with ``num_workers=0`` plain iteration of the dataset, or any
``DataLoader``, tracks itself.
"""

from __future__ import annotations

import time
from typing import Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kdcache.config import ConfigValueError
from kdcache.store.reader import CachedExample, CacheReader, split_examples
from kdcache.train.batching import (EpochPlan, ExampleTooLong, batch_positions, buffer_order, heldout_mask,
                                    plan_epoch)
from kdcache.train.collate import CacheBatch, LoaderStats, collate_examples
from kdcache.train.loader_state import LoaderSettings, LoaderState, check_num_workers

__all__ = ["CacheBatch", "CacheDataLoader", "CacheDataset", "LoaderSettings", "LoaderState", "LoaderStats",
           "collate_examples", "heldout_mask"]


# --------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------


class CacheDataset(IterableDataset):
    """Batches of a cache, as an ``IterableDataset`` (use ``DataLoader(dataset, batch_size=None)`` or
    :class:`CacheDataLoader`; the dataset batches by itself).

    cache: path or fsspec URL of a finished cache. settings: a :class:`LoaderSettings`, or give its fields as keyword
    arguments instead (``CacheDataset(url, batch_size=8, split="heldout")``).
    pad_id: the id in padded positions; defaults to the cache tokenizer's eos id (0 if it has none).
    tokenizer: if given, it must match the cache's. storage_options: for fsspec.
    student_tokenizer: instead of ``tokenizer``, a student's tokenizer other than the cache's: every example is
    re-tokenised with it and its target positions aligned to the teacher's rows by character offsets
    (:class:`kdcache.train.crosstok.StudentView`; for ``loss.kind=uld``); with ``map_vocabulary`` the teacher's
    entries also get the student's ids (for ``loss.vocab_map``, :mod:`kdcache.train.vocabmap`).
    verify_checksums: check each shard file's sha256 as it is read (the default); False for a cache verified once.
    """

    def __init__(self, cache: str, settings: LoaderSettings | None = None, *, pad_id: int | None = None,
                 tokenizer=None, storage_options: dict | None = None, verify_checksums: bool = True,
                 student_tokenizer=None, map_vocabulary: bool = False, **options):
        super().__init__()
        if settings is None:
            settings = LoaderSettings(**options)
        elif options:
            raise TypeError(f"give settings or their fields as keywords, not both (got {', '.join(sorted(options))})")
        self.settings = settings.placed()
        self.url = cache
        self.storage_options = storage_options
        self.verify_checksums = verify_checksums
        reader = CacheReader(cache, tokenizer=tokenizer, storage_options=storage_options,
                             verify_checksums=verify_checksums)
        self.manifest = reader.manifest
        self._reader: CacheReader | None = reader
        k_prime, sparsifier = self.settings.k_prime, self.manifest.sparsifier
        if k_prime is not None:
            if sparsifier.kind != "topk":
                raise ValueError(f"k_prime applies to topk caches; this cache is '{sparsifier.kind}'")
            if k_prime > sparsifier.k:
                raise ConfigValueError("k_prime", f"an integer in [1, {sparsifier.k}] (the cache's k)", k_prime)
        eos = self.manifest.tokenizer.eos_token_id
        self.view = None  # a student with another tokenizer: kdcache.train.crosstok
        if student_tokenizer is not None:
            from kdcache.train.crosstok import StudentView

            self.view = StudentView(self.manifest, student_tokenizer, cache_tokenizer=tokenizer,
                                    map_vocabulary=map_vocabulary)
            eos = self.view.pad_id
        self.pad_id = int(pad_id if pad_id is not None else (eos if eos is not None else 0))

        self.stats = LoaderStats()
        self._epoch = 0
        self._resume: LoaderState | None = None  # loaded by load_state_dict, applied by the next iteration
        self._progress = LoaderState()  # of the current (or last) iteration, kept on the consumer's side

    # ---------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (pass it to the student loss to drop embedding padding rows): the
        student's when examples are re-tokenised for it, else the cache's."""
        return self.view.vocab_size if self.view is not None else self.manifest.tokenizer.vocab_size

    @property
    def num_shards(self) -> int:
        return self.manifest.num_shards

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def reader(self) -> CacheReader:
        if self._reader is None:  # opened lazily in worker processes
            self._reader = CacheReader(self.url, storage_options=self.storage_options,
                                       verify_checksums=self.verify_checksums)
        return self._reader

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_reader"] = None
        return state

    # ---------------------------------------------------------------- epochs and resuming

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate next (changes the order). A loaded resume state for another epoch is dropped."""
        self._epoch = int(epoch)
        if self._resume is not None and self._resume.epoch != self._epoch:
            self._resume = None

    def state_dict(self) -> dict:
        """Epoch and batches delivered so far in it (total and per logical worker), plus the settings they refer to."""
        if self._resume is not None:
            position = self._resume
        elif self._progress.epoch == self._epoch:
            position = self._progress
        else:  # nothing iterated yet in this epoch
            position = LoaderState.start(self._epoch)
        return position.to_dict(self.settings)

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration is of ``state['epoch']`` and skips the batches it says were delivered."""
        saved = state.get("settings")
        diffs = [] if saved is None else self.settings.differences(saved)
        if diffs:
            raise ValueError("the loader state was saved with other settings, so its batch counts do not apply: "
                             + "; ".join(diffs))
        self._resume = LoaderState.from_dict(state)
        self._epoch = self._resume.epoch

    def _active_resume(self) -> LoaderState | None:
        """The loaded resume state if it applies to this epoch and skips anything."""
        r = self._resume
        return r if r is not None and r.epoch == self._epoch and r.batches > 0 else None

    def _begin_iteration(self, num_workers: int) -> LoaderState | None:
        """Consumer side: start bookkeeping for an iteration with ``num_workers`` workers; returns the resume used."""
        num_workers = max(1, num_workers)
        resume = self._active_resume()
        check_num_workers(resume, num_workers)
        self._progress = resume.copy() if resume is not None else LoaderState.start(self._epoch, num_workers)
        return resume

    def _note_consumed(self, batch: CacheBatch, wait_seconds: float) -> None:
        self._progress.note(batch.worker)
        self.stats.add(batch, wait_seconds)

    # ---------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[CacheBatch]:
        info = get_worker_info()
        if info is None:  # iterated in this process: track consumption here
            resume = self._begin_iteration(1)
            self._resume = None
            return self._tracked(self._produce(0, 1, resume))
        # A worker: the consumer side (CacheDataLoader) tracks; the resume state came with the pickled dataset.
        resume = self._active_resume()
        check_num_workers(resume, info.num_workers)
        return self._produce(info.id, info.num_workers, resume)

    def _tracked(self, batches: Iterator[CacheBatch]) -> Iterator[CacheBatch]:
        for batch in batches:
            self._note_consumed(batch, batch.load_seconds)
            yield batch

    def epoch_plan(self) -> EpochPlan:
        s = self.settings
        sizes = [self.manifest.shards[shard].num_examples for shard in range(self.num_shards)]
        return plan_epoch(sizes, seed=s.seed, epoch=self._epoch, shuffle=s.shuffle, rank=s.rank,
                          world_size=s.world_size, buffer_shards=s.buffer_shards)

    def _produce(self, worker: int, num_workers: int, resume: LoaderState | None) -> Iterator[CacheBatch]:
        """Worker ``worker`` of ``num_workers``'s batches of the epoch, less those ``resume`` says were delivered."""
        position = resume if resume is not None else LoaderState.start(self._epoch, num_workers)
        logical = position.logical_worker(worker)
        skip = position.worker_batches[logical]
        plan = self.epoch_plan()
        s = self.settings
        produced = 0
        t0 = time.perf_counter()
        for b in plan.buffers_of(logical, num_workers):
            for group in self._buffer_batches(plan, b):
                if produced < skip:
                    produced += 1
                    continue
                batch = collate_examples(group, self.pad_id, s.k_prime, s.pad_to_multiple_of,
                                         self.manifest.sparsifier.tail_temperatures or ())
                batch.epoch, batch.worker = self._epoch, logical
                batch.load_seconds = time.perf_counter() - t0
                produced += 1
                yield batch
                t0 = time.perf_counter()

    def _buffer_batches(self, plan: EpochPlan, b: int) -> list[list[CachedExample]]:
        """Read buffer ``b``'s shards and cut the rank's examples into batches (see :mod:`kdcache.train.batching`)."""
        s = self.settings
        stored: list[CachedExample] = []
        for shard in plan.buffers[b]:
            stored.extend(split_examples(self.reader.read_shard(shard)))  # CacheFormatError propagates as is
        if self.view is not None:  # the student's own tokens, aligned to the teacher's rows (kdcache.train.crosstok)
            stored = [self.view(e) for e in stored]
        order = buffer_order([e.split_key for e in stored], plan=plan, buffer=b, rank=s.rank, split=s.split,
                             heldout_fraction=s.heldout_fraction, split_seed=s.split_seed, shuffle=s.shuffle,
                             seed=s.seed, epoch=self._epoch)
        examples = [stored[i] for i in order]
        groups = self.batch_groups([len(e.input_ids) for e in examples], [e.index for e in examples], b)
        return [[examples[i] for i in group] for group in groups]

    def batch_groups(self, lengths: list[int], indices: list[int], b: int) -> list[list[int]]:
        """Buffer ``b``'s batches as positions into its ordered examples (``lengths``, ``indices``: int [n])."""
        s = self.settings
        try:
            return batch_positions(lengths, batch_size=s.batch_size, max_tokens=s.max_tokens,
                                   pad_to_multiple_of=s.pad_to_multiple_of, drop_last=s.drop_last, shuffle=s.shuffle,
                                   seed=s.seed, epoch=self._epoch, rank=s.rank, buffer=b)
        except ExampleTooLong as exc:
            raise ValueError(
                f"example {indices[exc.position]} of {self.url} has {exc.length} tokens (padded to "
                f"{exc.padded}), more than max_tokens={exc.max_tokens}; raise max_tokens to at least the cache's "
                f"max_length ({self.manifest.max_length})"
            ) from None


class CacheDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`CacheDataset` that keeps the dataset's resume state and stats up to date.

    Batching is the dataset's (``batch_size=None`` here). Every batch handed to the training loop is recorded, so
    ``dataset.state_dict()`` (also ``loader.state_dict()``) is exact with any ``num_workers``; ``loader.stats`` holds
    the time the loop waited for batches. ``persistent_workers`` is not supported (workers must see ``set_epoch``).
    """

    def __init__(self, dataset: CacheDataset, num_workers: int = 0, **kwargs):
        if not isinstance(dataset, CacheDataset):
            raise TypeError(f"CacheDataLoader needs a CacheDataset, got {type(dataset).__name__}")
        if kwargs.get("persistent_workers"):
            raise ValueError("persistent_workers=True would keep each worker's old epoch and resume state")
        if kwargs.pop("batch_size", None) is not None:
            raise ValueError("CacheDataset batches by itself; set batch_size/max_tokens on the dataset")
        super().__init__(dataset, batch_size=None, num_workers=num_workers, **kwargs)

    @property
    def stats(self) -> LoaderStats:
        return self.dataset.stats

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[CacheBatch]:
        dataset: CacheDataset = self.dataset
        if self.num_workers == 0:  # the dataset iterates in this process and tracks itself
            yield from super().__iter__()
            return
        dataset._begin_iteration(self.num_workers)  # checks the resume state against num_workers
        iterator = super().__iter__()  # starts the workers, each with a copy holding the resume state
        dataset._resume = None
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            dataset._note_consumed(batch, time.perf_counter() - t0)
            yield batch
