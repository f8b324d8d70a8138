"""What decides a rank's batches (:class:`LoaderSettings`) and how far into an epoch a dataset has got
(:class:`LoaderState`): the two records a training checkpoint saves for :class:`kdcache.train.loader.CacheDataset`
to resume exactly. Split from loader.py, which streams the batches."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kdcache.config import ConfigValueError
from kdcache.train.batching import SPLITS

__all__ = ["LoaderSettings", "LoaderState", "check_num_workers"]


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LoaderSettings:
    """What decides a rank's batches of an epoch: which examples, grouped how, in which order, with which targets.

    batch_size: examples per batch; with ``max_tokens`` it is an upper bound on the examples per batch.
    max_tokens: token budget: each batch's padded ``B * L`` (L rounded up to ``pad_to_multiple_of``) is at most this;
        an example longer than the budget is an error.
    seed, shuffle: shuffling of shards, buffers and batches; ``set_epoch`` changes the order every epoch.
    buffer_shards: shards read together and shuffled as one buffer (more = better mixing, more memory).
    rank, world_size: DDP placement; None: from ``torch.distributed`` if initialised, else 0 of 1 (:meth:`placed`).
    split: 'train' (examples not held out), 'heldout', or 'all'; heldout_fraction, split_seed: see :func:`heldout_mask`.
    k_prime: use only the first k' <= k cached entries per position (topk caches), their mass folded into the tail.
    pad_to_multiple_of: round each batch's length up to a multiple of this.
    drop_last: drop the final partial batch of each buffer (fixed batch size only).

    The padding id is not a setting (it changes no batch but for the value in padded positions): it is
    :class:`CacheDataset`'s ``pad_id``. Bad values raise ``ValueError`` ("X must be Y, got Z").
    """

    batch_size: int | None = None
    max_tokens: int | None = None
    seed: int = 0
    shuffle: bool = True
    buffer_shards: int = 1
    rank: int | None = None
    world_size: int | None = None
    split: str = "train"
    heldout_fraction: float = 0.0
    split_seed: int = 0
    k_prime: int | None = None
    pad_to_multiple_of: int = 1
    drop_last: bool = False

    def __post_init__(self) -> None:
        if self.batch_size is None and self.max_tokens is None:
            raise ValueError("give batch_size, max_tokens (a token budget per batch), or both")
        for name in ("batch_size", "max_tokens", "k_prime"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigValueError(name, "a positive integer", value)
        if self.buffer_shards < 1:
            raise ConfigValueError("buffer_shards", ">= 1", self.buffer_shards)
        if self.pad_to_multiple_of < 1:
            raise ConfigValueError("pad_to_multiple_of", ">= 1", self.pad_to_multiple_of)
        if self.split not in SPLITS:
            raise ConfigValueError("split", f"one of {', '.join(SPLITS)}", self.split)
        if not 0.0 <= self.heldout_fraction <= 1.0:
            raise ConfigValueError("heldout_fraction", "in [0, 1]", self.heldout_fraction)
        if self.world_size is not None and self.world_size < 1:
            raise ConfigValueError("world_size", ">= 1", self.world_size)
        if self.rank is not None and (self.rank < 0 or self.world_size is not None and self.rank >= self.world_size):
            bound = "" if self.world_size is None else f" and below world_size={self.world_size}"
            raise ConfigValueError("rank", f">= 0{bound}", self.rank)
        for name, kind in (("seed", int), ("shuffle", bool), ("buffer_shards", int), ("heldout_fraction", float),
                           ("split_seed", int), ("pad_to_multiple_of", int), ("drop_last", bool),
                           ("rank", int), ("world_size", int)):
            if getattr(self, name) is not None:  # numpy scalars, 0/1 for bools: what the state records is plain
                object.__setattr__(self, name, kind(getattr(self, name)))

    def placed(self) -> LoaderSettings:
        """These settings with ``rank`` and ``world_size`` given, those left None taken from ``torch.distributed``
        (0 of 1 when it is not initialised)."""
        if self.rank is not None and self.world_size is not None:
            return self
        rank, world_size = _distributed_placement()
        return dataclasses.replace(self, rank=rank if self.rank is None else self.rank,
                                   world_size=world_size if self.world_size is None else self.world_size)

    def to_dict(self) -> dict[str, Any]:
        """The settings by name: what a loader state records (``state_dict()['settings']``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoaderSettings:
        """The settings :meth:`to_dict` gave (an unknown key is a ``ValueError``)."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{unknown[0]} is not a loader setting; the settings are {', '.join(known)}")
        return cls(**data)

    def differences(self, saved: dict[str, Any]) -> list[str]:
        """How settings recorded in a loader state (``saved``) differ from these, one line per setting."""
        return [f"{name}: state has {saved.get(name)!r}, this dataset has {value!r}"
                for name, value in self.to_dict().items() if saved.get(name) != value]


def _distributed_placement() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# --------------------------------------------------------------------------------------
# Position in an epoch
# --------------------------------------------------------------------------------------


@dataclass
class LoaderState:
    """How far an epoch has got: the batches each logical worker has delivered to the training loop.

    One record for both uses: the position kept while iterating, and a loaded resume point.
    epoch: the epoch it refers to.
    num_workers: DataLoader workers (1 when iterating in-process); the split of buffers between workers depends on it.
    worker_batches: ``[num_workers]``, batches each logical worker has delivered.
    next_worker: the logical worker whose batch comes next. A DataLoader asks its workers round-robin from worker 0,
        so on resuming, worker ``i`` plays logical worker ``(i + next_worker) % num_workers`` (:meth:`logical_worker`)
        and skips the batches that one had delivered.
    """

    epoch: int = 0
    num_workers: int = 1
    worker_batches: list[int] = field(default_factory=lambda: [0])
    next_worker: int = 0

    @classmethod
    def start(cls, epoch: int, num_workers: int = 1) -> LoaderState:
        """Nothing delivered yet in ``epoch``."""
        return cls(epoch, num_workers, [0] * num_workers, 0)

    @property
    def batches(self) -> int:
        return int(sum(self.worker_batches))

    def copy(self) -> LoaderState:
        return LoaderState(self.epoch, self.num_workers, list(self.worker_batches), self.next_worker)

    def logical_worker(self, worker: int) -> int:
        return (worker + self.next_worker) % self.num_workers

    def note(self, worker: int) -> None:
        """Logical worker ``worker`` has delivered a batch."""
        if worker < len(self.worker_batches):
            self.worker_batches[worker] += 1
            self.next_worker = (worker + 1) % self.num_workers

    def to_dict(self, settings: LoaderSettings) -> dict[str, Any]:
        """The saved form (``CacheDataset.state_dict()``), with the settings the counts refer to."""
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "num_workers": self.num_workers,
            "worker_batches": [int(n) for n in self.worker_batches],
            "next_worker": int(self.next_worker),
            "settings": settings.to_dict(),
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> LoaderState:
        """Read a saved state (its settings are checked by the dataset); ``num_workers``, ``worker_batches`` and
        ``next_worker`` may be missing (states of a single process: ``batches`` is then the count)."""
        num_workers = int(state.get("num_workers", 1))
        worker_batches = [int(n) for n in state.get("worker_batches", [int(state["batches"])])]
        if len(worker_batches) != num_workers:
            raise ValueError(f"bad loader state: {len(worker_batches)} worker counts for {num_workers} workers")
        return cls(int(state["epoch"]), num_workers, worker_batches, int(state.get("next_worker", 0)) % num_workers)


def check_num_workers(resume: LoaderState | None, num_workers: int) -> None:
    if resume is not None and resume.num_workers != num_workers:
        raise ValueError(
            f"the loader state was saved with {resume.num_workers} DataLoader worker(s) but this loader has "
            f"{num_workers}; resume with the same num_workers (the split of shards between workers depends on it)"
        )
