"""Stream training batches from a finished cache: sharded across ranks and workers, shuffled, resumable.

Plan of one epoch (all of it a pure function of seed, epoch, rank, world size and the options, so every run with the
same settings sees the same batches):

1. The shards are permuted with ``(seed, epoch)`` (``shuffle=False``: stored order).
2. Rank ``r`` of ``world_size`` takes every ``world_size``-th shard of that order (``order[r::world_size]``). With
   fewer shards than ranks every rank reads every shard and keeps every ``world_size``-th example of the shard
   stream instead.
3. The rank's shards are grouped into buffers of ``buffer_shards`` consecutive shards; buffer ``b`` is produced by
   DataLoader worker ``b % num_workers``. Each buffer's examples are filtered by ``split``, shuffled with
   ``(seed, epoch, rank, b)``, and cut into batches: a fixed ``batch_size``, or, with ``max_tokens``, greedily packed
   after sorting the buffer by length so that each batch's padded size ``B * L <= max_tokens`` (the batch order is then
   shuffled again, so long and short batches alternate at random).

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
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kdcache.store.reader import CacheReader, CachedExample, split_examples
from kdcache.targets import SparseTargets
from kdcache.train.losses import top_k_truncate

__all__ = [
    "CacheBatch",
    "CacheDataLoader",
    "CacheDataset",
    "LoaderStats",
    "collate_examples",
    "heldout_mask",
]

SPLITS = ("train", "heldout", "all")
_STATE_KEYS = ("seed", "shuffle", "rank", "world_size", "batch_size", "max_tokens", "buffer_shards", "split",
               "heldout_fraction", "split_seed", "pad_to_multiple_of", "drop_last")


# --------------------------------------------------------------------------------------
# Batches and statistics
# --------------------------------------------------------------------------------------


@dataclass
class CacheBatch:
    """A padded batch with the teacher's targets for its target positions.

    Target rows are in row-major order of ``target_mask`` (example by example, positions ascending), i.e. the order of
    ``target_mask.nonzero()``; ``labels[i]`` is the token at the i-th target position, whose distribution the student
    reads from the position before it.
    """

    input_ids: Tensor  # long [B, L], right-padded with pad_id
    attention_mask: Tensor  # long [B, L]
    target_mask: Tensor  # bool [B, L]
    targets: SparseTargets  # ids long [N, k], logprobs float32 [N, k], tail_logmass float32 [N] | None, counts | None
    labels: Tensor  # long [N]
    example_indices: Tensor  # long [B]: the examples' row indices in the source data
    epoch: int = 0
    worker: int = 0  # the logical worker that produced the batch (resume bookkeeping)
    load_seconds: float = 0.0  # time the producer spent reading shards, decoding and collating for this batch

    @property
    def num_targets(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens."""
        return int(self.attention_mask.sum())

    def _map(self, fn) -> "CacheBatch":
        return CacheBatch(
            input_ids=fn(self.input_ids),
            attention_mask=fn(self.attention_mask),
            target_mask=fn(self.target_mask),
            targets=self.targets.map(fn),
            labels=fn(self.labels),
            example_indices=fn(self.example_indices),
            epoch=self.epoch,
            worker=self.worker,
            load_seconds=self.load_seconds,
        )

    def to(self, device, non_blocking: bool = False) -> "CacheBatch":
        return self._map(lambda x: x.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "CacheBatch":  # called by DataLoader(pin_memory=True)
        return self._map(lambda x: x.pin_memory())


@dataclass
class LoaderStats:
    """Counters for logging, accumulated on the consumer's side.

    ``wait_seconds``: time the training loop was blocked waiting for a batch (the stall that matters);
    ``load_seconds``: time producers spent reading shards, decoding and collating (summed over workers; with
    ``num_workers=0`` the two are the same).
    """

    wait_seconds: float = 0.0
    load_seconds: float = 0.0
    batches: int = 0
    examples: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    targets: int = 0

    def add(self, batch: CacheBatch, wait_seconds: float) -> None:
        self.wait_seconds += wait_seconds
        self.load_seconds += batch.load_seconds
        self.batches += 1
        self.examples += int(batch.input_ids.shape[0])
        self.tokens += batch.num_tokens
        self.padded_tokens += int(batch.input_ids.numel())
        self.targets += batch.num_targets

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def reset(self) -> None:
        for name, value in asdict(LoaderStats()).items():
            setattr(self, name, value)


# --------------------------------------------------------------------------------------
# Held-out split
# --------------------------------------------------------------------------------------


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, element-wise on uint64 (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def heldout_mask(example_indices, fraction: float, split_seed: int = 0) -> np.ndarray:
    """Which examples (by source row index) are held out: a hash of (split_seed, index) below ``fraction``.

    Independent of the shuffling seed, the shard layout and everything else, so the held-out set stays the same
    across runs, rebuilds with other shard sizes, and ranks.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {fraction}")
    indices = np.asarray(example_indices, dtype=np.int64).astype(np.uint64)
    key = _mix64(np.array([split_seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    h = _mix64(indices ^ key)
    u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return u < fraction


# --------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------


def collate_examples(
    examples: list[CachedExample], pad_id: int = 0, k_prime: int | None = None, pad_to_multiple_of: int = 1,
    tail_temperatures: tuple[float, ...] = (),
) -> CacheBatch:
    """Right-pad examples into a :class:`CacheBatch` (``k_prime``: keep the first k' entries, tail folded exactly;
    ``tail_temperatures``: the cache's, naming the columns of the examples' ``tail_tempered``)."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    lengths = [len(e.input_ids) for e in examples]
    length = _round_up(max(lengths), pad_to_multiple_of)
    b = len(examples)
    input_ids = np.full((b, length), pad_id, dtype=np.int64)
    attention = np.zeros((b, length), dtype=np.int64)
    target = np.zeros((b, length), dtype=bool)
    labels = []
    for row, (e, n) in enumerate(zip(examples, lengths)):
        input_ids[row, :n] = e.input_ids
        attention[row, :n] = 1
        target[row, :n] = e.target_mask
        labels.append(np.asarray(e.input_ids)[np.asarray(e.target_mask, dtype=bool)])
        if int(np.count_nonzero(e.target_mask)) != e.sparse_ids.shape[0]:
            raise ValueError(
                f"example {e.index} has {int(np.count_nonzero(e.target_mask))} target positions but "
                f"{e.sparse_ids.shape[0]} cached target rows"
            )

    def cat(arrays, dtype) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays, axis=0), dtype=dtype))

    tail = None if examples[0].tail_logmass is None else cat([e.tail_logmass for e in examples], np.float32)
    counts = None if examples[0].sample_counts is None else cat([e.sample_counts for e in examples], np.int64)
    grid = None
    if tail_temperatures and examples[0].tail_tempered is not None:
        grid = cat([e.tail_tempered for e in examples], np.float32)
    targets = SparseTargets(
        ids=cat([e.sparse_ids for e in examples], np.int64),
        logprobs=cat([e.sparse_logprobs for e in examples], np.float32),
        tail_logmass=tail,
        counts=counts,
        tail_grid=grid,
        tail_temperatures=tuple(tail_temperatures) if grid is not None else (),
    )
    if k_prime is not None and k_prime < targets.ids.shape[1]:
        targets = top_k_truncate(targets, k_prime).map(Tensor.contiguous)
    return CacheBatch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention),
        target_mask=torch.from_numpy(target),
        targets=targets,
        labels=cat(labels, np.int64),
        example_indices=torch.tensor([e.index for e in examples], dtype=torch.long),
    )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# --------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------


@dataclass
class _Resume:
    epoch: int
    num_workers: int
    worker_batches: list[int]
    next_worker: int


@dataclass
class _Progress:
    epoch: int = 0
    num_workers: int = 1
    worker_batches: list[int] = field(default_factory=lambda: [0])
    next_worker: int = 0


class CacheDataset(IterableDataset):
    """Batches of a cache, as an ``IterableDataset`` (use ``DataLoader(dataset, batch_size=None)`` or
    :class:`CacheDataLoader`; the dataset batches by itself).

    cache: path or fsspec URL of a finished cache. storage_options: for fsspec. tokenizer: if given, it must match
    the cache's.
    batch_size: examples per batch; with ``max_tokens`` it is an upper bound on the examples per batch.
    max_tokens: token budget: each batch's padded ``B * L`` (L rounded up to ``pad_to_multiple_of``) is at most this;
        an example longer than the budget is an error.
    seed, shuffle: shuffling of shards, buffers and batches; ``set_epoch`` changes the order every epoch.
    buffer_shards: shards read together and shuffled as one buffer (more = better mixing, more memory).
    rank, world_size: DDP placement (default: from ``torch.distributed`` if initialised, else 0 of 1).
    split: 'train' (examples not held out), 'heldout', or 'all'; heldout_fraction, split_seed: see :func:`heldout_mask`.
    k_prime: use only the first k' <= k cached entries per position (topk caches), their mass folded into the tail.
    pad_id: defaults to the cache tokenizer's eos id (0 if it has none).
    drop_last: drop the final partial batch of each buffer (fixed batch size only).
    """

    def __init__(
        self,
        cache: str,
        *,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        buffer_shards: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        split: str = "train",
        heldout_fraction: float = 0.0,
        split_seed: int = 0,
        k_prime: int | None = None,
        pad_id: int | None = None,
        pad_to_multiple_of: int = 1,
        drop_last: bool = False,
        tokenizer=None,
        storage_options: dict | None = None,
    ):
        super().__init__()
        if batch_size is None and max_tokens is None:
            raise ValueError("give batch_size, max_tokens (a token budget per batch), or both")
        for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if buffer_shards < 1:
            raise ValueError(f"buffer_shards must be >= 1, got {buffer_shards}")
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if not 0.0 <= heldout_fraction <= 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
        if rank is None or world_size is None:
            dist_rank, dist_world = _distributed_placement()
            rank = dist_rank if rank is None else rank
            world_size = dist_world if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")

        self.url = cache
        self.storage_options = storage_options
        reader = CacheReader(cache, tokenizer=tokenizer, storage_options=storage_options)
        self.manifest = reader.manifest
        self._reader: CacheReader | None = reader
        sparsifier = self.manifest.sparsifier
        if k_prime is not None:
            if sparsifier.kind != "topk":
                raise ValueError(f"k_prime applies to topk caches; this cache is '{sparsifier.kind}'")
            if isinstance(k_prime, bool) or not isinstance(k_prime, int) or not 1 <= k_prime <= sparsifier.k:
                raise ValueError(
                    f"k_prime must be an integer in [1, {sparsifier.k}] (the cache's k), got {k_prime!r}"
                )

        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.buffer_shards = int(buffer_shards)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.split = split
        self.heldout_fraction = float(heldout_fraction)
        self.split_seed = int(split_seed)
        self.k_prime = k_prime
        eos = self.manifest.tokenizer.eos_token_id
        self.pad_id = int(pad_id if pad_id is not None else (eos if eos is not None else 0))
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        self.drop_last = bool(drop_last)

        self.stats = LoaderStats()
        self._epoch = 0
        self._resume: _Resume | None = None
        self._progress = _Progress()

    # ---------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (pass it to the student loss to drop embedding padding rows)."""
        return self.manifest.tokenizer.vocab_size

    @property
    def num_shards(self) -> int:
        return self.manifest.num_shards

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def reader(self) -> CacheReader:
        if self._reader is None:  # opened lazily in worker processes
            self._reader = CacheReader(self.url, storage_options=self.storage_options)
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
            p = _Progress(self._resume.epoch, self._resume.num_workers, list(self._resume.worker_batches),
                          self._resume.next_worker)
        elif self._progress.epoch == self._epoch:
            p = self._progress
        else:  # nothing iterated yet in this epoch
            p = _Progress(self._epoch, 1, [0], 0)
        return {
            "epoch": p.epoch,
            "batches": int(sum(p.worker_batches)),
            "num_workers": p.num_workers,
            "worker_batches": [int(n) for n in p.worker_batches],
            "next_worker": int(p.next_worker),
            "settings": self._settings(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration is of ``state['epoch']`` and skips the batches it says were delivered."""
        saved = state.get("settings")
        if saved is not None:
            diffs = [f"{k}: state has {saved.get(k)!r}, this dataset has {v!r}"
                     for k, v in self._settings().items() if saved.get(k) != v]
            if diffs:
                raise ValueError("the loader state was saved with other settings, so its batch counts do not apply: "
                                 + "; ".join(diffs))
        num_workers = int(state.get("num_workers", 1))
        worker_batches = [int(n) for n in state.get("worker_batches", [int(state["batches"])])]
        if len(worker_batches) != num_workers:
            raise ValueError(f"bad loader state: {len(worker_batches)} worker counts for {num_workers} workers")
        self._epoch = int(state["epoch"])
        self._resume = _Resume(self._epoch, num_workers, worker_batches, int(state.get("next_worker", 0)) % num_workers)

    def _settings(self) -> dict:
        return {key: getattr(self, key) for key in _STATE_KEYS} | {"k_prime": self.k_prime}

    def _active_resume(self) -> _Resume | None:
        """The loaded resume state if it applies to this epoch and skips anything."""
        r = self._resume
        return r if r is not None and r.epoch == self._epoch and sum(r.worker_batches) > 0 else None

    def _begin_iteration(self, num_workers: int) -> _Resume | None:
        """Consumer side: start bookkeeping for an iteration with ``num_workers`` workers; returns the resume used."""
        num_workers = max(1, num_workers)
        resume = self._active_resume()
        if resume is not None and resume.num_workers != num_workers:
            raise ValueError(
                f"the loader state was saved with {resume.num_workers} DataLoader worker(s) but this loader has "
                f"{num_workers}; resume with the same num_workers (the split of shards between workers depends on it)"
            )
        if resume is not None:
            self._progress = _Progress(self._epoch, num_workers, list(resume.worker_batches), resume.next_worker)
        else:
            self._progress = _Progress(self._epoch, num_workers, [0] * num_workers, 0)
        return resume

    def _note_consumed(self, batch: CacheBatch, wait_seconds: float) -> None:
        p = self._progress
        if batch.worker < len(p.worker_batches):
            p.worker_batches[batch.worker] += 1
            p.next_worker = (batch.worker + 1) % p.num_workers
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
        if resume is not None and resume.num_workers != info.num_workers:
            raise ValueError(
                f"the loader state was saved with {resume.num_workers} DataLoader worker(s) but this loader has "
                f"{info.num_workers}; resume with the same num_workers"
            )
        return self._produce(info.id, info.num_workers, resume)

    def _tracked(self, batches: Iterator[CacheBatch]) -> Iterator[CacheBatch]:
        for batch in batches:
            self._note_consumed(batch, batch.load_seconds)
            yield batch

    def _plan(self) -> tuple[list[list[int]], list[int], int | None]:
        """This rank's buffers (lists of shard indices) for the current epoch, the number of examples stored before
        each buffer in the rank's shard stream, and the example stride across ranks (None: shards are split)."""
        order = np.arange(self.num_shards)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self._epoch, 0]).permutation(self.num_shards)
        if self.num_shards >= self.world_size:
            mine, stride = order[self.rank :: self.world_size], None
        else:  # fewer shards than ranks: everyone reads every shard and keeps every world_size-th example
            mine, stride = order, self.world_size
        mine = [int(s) for s in mine]
        buffers = [mine[i : i + self.buffer_shards] for i in range(0, len(mine), self.buffer_shards)]
        sizes = [sum(self.manifest.shards[s].num_examples for s in buffer) for buffer in buffers]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist() if buffers else []
        return buffers, offsets, stride

    def _produce(self, worker: int, num_workers: int, resume: _Resume | None) -> Iterator[CacheBatch]:
        logical = worker if resume is None else (worker + resume.next_worker) % num_workers
        skip = 0 if resume is None else resume.worker_batches[logical]
        buffers, offsets, stride = self._plan()
        produced = 0
        t0 = time.perf_counter()
        for b in range(logical, len(buffers), num_workers):
            examples = self._buffer_examples(b, buffers[b], offsets[b], stride)
            for group in self._batches(b, examples):
                if produced < skip:
                    produced += 1
                    continue
                batch = collate_examples(group, self.pad_id, self.k_prime, self.pad_to_multiple_of,
                                         self.manifest.sparsifier.tail_temperatures or ())
                batch.epoch, batch.worker = self._epoch, logical
                batch.load_seconds = time.perf_counter() - t0
                produced += 1
                yield batch
                t0 = time.perf_counter()

    def _buffer_examples(self, b: int, shards: list[int], offset: int, stride: int | None) -> list[CachedExample]:
        examples: list[CachedExample] = []
        for shard in shards:
            examples.extend(split_examples(self.reader.read_shard(shard)))  # CacheFormatError propagates as is
        if stride is not None:  # example j of the (shared) shard stream belongs to rank j % world_size
            examples = examples[(self.rank - offset) % stride :: stride]
        if self.split != "all" and examples:
            held = heldout_mask([e.index for e in examples], self.heldout_fraction, self.split_seed)
            keep = held if self.split == "heldout" else ~held
            examples = [e for e, k in zip(examples, keep) if k]
        if self.shuffle and examples:
            rng = np.random.default_rng([self.seed, self._epoch, 1, self.rank, b])
            examples = [examples[i] for i in rng.permutation(len(examples))]
        return examples

    def _batches(self, b: int, examples: list[CachedExample]) -> list[list[CachedExample]]:
        if not examples:
            return []
        if self.max_tokens is None:
            groups = [examples[i : i + self.batch_size] for i in range(0, len(examples), self.batch_size)]
            if self.drop_last and len(groups[-1]) < self.batch_size:
                groups.pop()
            return groups
        lengths = np.array([len(e.input_ids) for e in examples])
        groups, current, width = [], [], 0
        for i in np.argsort(lengths, kind="stable"):  # shuffled first, so equal lengths come in random order
            padded = _round_up(int(lengths[i]), self.pad_to_multiple_of)
            if padded > self.max_tokens:
                raise ValueError(
                    f"example {examples[i].index} of {self.url} has {int(lengths[i])} tokens (padded to {padded}), "
                    f"more than max_tokens={self.max_tokens}; raise max_tokens to at least the cache's max_length "
                    f"({self.manifest.max_length})"
                )
            full = self.batch_size is not None and len(current) >= self.batch_size
            if current and (full or (len(current) + 1) * max(width, padded) > self.max_tokens):
                groups.append(current)
                current, width = [], 0
            current.append(examples[i])
            width = max(width, padded)
        groups.append(current)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self._epoch, 2, self.rank, b])
            groups = [groups[i] for i in rng.permutation(len(groups))]
        return groups


def _distributed_placement() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
