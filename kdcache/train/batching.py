"""The loader's plan of an epoch, as pure functions of the settings: which shards a rank reads, in which buffers,
which of their examples it keeps in which order, and how they are cut into batches.

Nothing here reads a cache: the functions take shard sizes, example indices and lengths, and return shard indices and
positions, so every run with the same settings sees the same batches (``kdcache.train.loader`` reads the shards and
collates). Random streams are keyed by ``(seed, epoch, stream, rank, buffer)``:

=======  =====================================================================
stream   what it orders
=======  =====================================================================
0        the shards of the cache (one permutation per ``(seed, epoch)``)
1        the examples of one buffer (after the rank and split filters)
2        the token-budget batches of one buffer (fixed-size batches are not)
=======  =====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "EpochPlan",
    "ExampleTooLong",
    "batch_positions",
    "buffer_order",
    "fixed_size_batches",
    "heldout_mask",
    "plan_epoch",
    "round_up",
    "token_budget_batches",
]

SPLITS = ("train", "heldout", "all")


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is ``>= n``."""
    return -(-n // multiple) * multiple


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

    example_indices: int [n]; returns bool [n]. Independent of the shuffling seed, the shard layout and everything
    else, so the held-out set stays the same across runs, rebuilds with other shard sizes, and ranks.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {fraction}")
    indices = np.asarray(example_indices, dtype=np.int64).astype(np.uint64)
    key = _mix64(np.array([split_seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    h = _mix64(indices ^ key)
    u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return u < fraction


# --------------------------------------------------------------------------------------
# Shards: which a rank reads, grouped into buffers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpochPlan:
    """One rank's shards in one epoch.

    buffers: shard indices, grouped into buffers of ``buffer_shards`` consecutive shards of the rank's order; buffer
        ``b`` is produced by (logical) worker ``b % num_workers``, see :meth:`buffers_of`.
    offsets: ``offsets[b]`` is the number of examples stored in the rank's shard stream before buffer ``b``.
    stride: None when the shards are split between ranks; else (fewer shards than ranks) every rank reads every shard
        and keeps example ``j`` of the stream when ``j % stride == rank`` (``stride`` is the world size).
    """

    buffers: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    stride: int | None

    def buffers_of(self, worker: int, num_workers: int) -> range:
        """The buffers (by number) that worker ``worker`` of ``num_workers`` produces, in order."""
        return range(worker, len(self.buffers), num_workers)


def plan_epoch(shard_sizes: Sequence[int], *, seed: int, epoch: int, shuffle: bool, rank: int, world_size: int,
               buffer_shards: int) -> EpochPlan:
    """Rank ``rank``'s shards of epoch ``epoch``; ``shard_sizes[s]`` is the number of examples stored in shard ``s``.

    1. The shards are permuted with ``(seed, epoch)`` (``shuffle=False``: stored order).
    2. The rank takes every ``world_size``-th shard of that order (``order[rank::world_size]``); with fewer shards
       than ranks it takes them all and the plan's ``stride`` splits their examples instead.
    3. Its shards are grouped into buffers of ``buffer_shards`` consecutive shards (the last one may be shorter).
    """
    num_shards = len(shard_sizes)
    order = np.arange(num_shards)
    if shuffle:
        order = np.random.default_rng([seed, epoch, 0]).permutation(num_shards)
    if num_shards >= world_size:
        mine, stride = order[rank::world_size], None
    else:  # fewer shards than ranks: everyone reads every shard and keeps every world_size-th example
        mine, stride = order, world_size
    mine = [int(s) for s in mine]
    buffers = tuple(tuple(mine[i : i + buffer_shards]) for i in range(0, len(mine), buffer_shards))
    sizes = [sum(int(shard_sizes[s]) for s in buffer) for buffer in buffers]
    offsets = tuple(int(n) for n in np.concatenate([[0], np.cumsum(sizes)[:-1]])) if buffers else ()
    return EpochPlan(buffers, offsets, stride)


# --------------------------------------------------------------------------------------
# Examples of one buffer: which the rank keeps, in which order
# --------------------------------------------------------------------------------------


def buffer_order(example_indices, *, plan: EpochPlan, buffer: int, rank: int, split: str, heldout_fraction: float,
                 split_seed: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """Positions (int [m]) into a buffer's stored examples (whose split keys are ``example_indices``, int [n]: the
    source row index, or for augmented rows a hash of their source id): those the rank keeps, in batch order.

    1. With a plan ``stride``: example ``j`` of the rank's shard stream (``j = plan.offsets[buffer] + position``)
       is kept when ``j % stride == rank``.
    2. ``split``: 'train' keeps the examples :func:`heldout_mask` does not hold out, 'heldout' those it does, 'all'
       every one.
    3. ``shuffle``: the kept examples are permuted with ``(seed, epoch, 1, rank, buffer)``.
    """
    indices = np.asarray(example_indices, dtype=np.int64)
    positions = np.arange(len(indices))
    if plan.stride is not None:  # example j of the (shared) shard stream belongs to rank j % world_size
        positions = positions[(rank - plan.offsets[buffer]) % plan.stride :: plan.stride]
    if split != "all" and len(positions):
        held = heldout_mask(indices[positions], heldout_fraction, split_seed)
        positions = positions[held if split == "heldout" else ~held]
    if shuffle and len(positions):
        positions = positions[np.random.default_rng([seed, epoch, 1, rank, buffer]).permutation(len(positions))]
    return positions


# --------------------------------------------------------------------------------------
# Batches of one buffer
# --------------------------------------------------------------------------------------


class ExampleTooLong(ValueError):
    """An example whose padded length alone is over the token budget (``position`` into the lengths given)."""

    def __init__(self, position: int, length: int, padded: int, max_tokens: int):
        super().__init__(f"example at position {position} has {length} tokens (padded to {padded}), "
                         f"more than max_tokens={max_tokens}")
        self.position, self.length, self.padded, self.max_tokens = position, length, padded, max_tokens


def fixed_size_batches(n: int, batch_size: int, drop_last: bool = False) -> list[list[int]]:
    """Positions ``0 .. n-1`` cut in order into batches of ``batch_size`` (the last one shorter, or dropped)."""
    groups = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    if drop_last and groups and len(groups[-1]) < batch_size:
        groups.pop()
    return groups


def token_budget_batches(lengths: Sequence[int], max_tokens: int, *, max_examples: int | None = None,
                         pad_to_multiple_of: int = 1) -> list[list[int]]:
    """Greedy packing: positions into ``lengths`` (int [n]) in batches whose padded size ``B * L <= max_tokens``.

    ``L`` is the batch's longest length rounded up to ``pad_to_multiple_of``; ``B`` is at most ``max_examples``
    (None: no limit). Examples are taken in ascending length, ties in the order given (a stable sort), and a batch
    is closed when the next example would break the budget or the cap. Batches come shortest-first. Raises
    :class:`ExampleTooLong` for the first example (in that order) that does not fit the budget on its own.
    """
    lengths = np.asarray(lengths)
    groups, current, width = [], [], 0
    for i in np.argsort(lengths, kind="stable"):
        padded = round_up(int(lengths[i]), pad_to_multiple_of)
        if padded > max_tokens:
            raise ExampleTooLong(int(i), int(lengths[i]), padded, max_tokens)
        full = max_examples is not None and len(current) >= max_examples
        if current and (full or (len(current) + 1) * max(width, padded) > max_tokens):
            groups.append(current)
            current, width = [], 0
        current.append(int(i))
        width = max(width, padded)
    if current:
        groups.append(current)
    return groups


def batch_positions(lengths: Sequence[int], *, batch_size: int | None, max_tokens: int | None,
                    pad_to_multiple_of: int, drop_last: bool, shuffle: bool, seed: int, epoch: int, rank: int,
                    buffer: int) -> list[list[int]]:
    """A buffer's batches, as lists of positions into its (ordered) examples, whose lengths are ``lengths`` (int [n]).

    Without ``max_tokens``: :func:`fixed_size_batches` in the given order. With it: :func:`token_budget_batches`
    (``batch_size`` caps the examples per batch), and with ``shuffle`` the batches are permuted with
    ``(seed, epoch, 2, rank, buffer)`` so that long and short batches alternate at random.
    """
    if len(lengths) == 0:
        return []
    if max_tokens is None:
        return fixed_size_batches(len(lengths), batch_size, drop_last)
    groups = token_budget_batches(lengths, max_tokens, max_examples=batch_size, pad_to_multiple_of=pad_to_multiple_of)
    if shuffle:
        rng = np.random.default_rng([seed, epoch, 2, rank, buffer])
        groups = [groups[i] for i in rng.permutation(len(groups))]
    return groups
