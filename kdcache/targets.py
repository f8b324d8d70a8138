"""The sparse teacher targets of a run of positions: the one shape the teacher writes and the trainer reads.

A teacher backend returns them per chunk of scored rows, the cache build concatenates and cuts them per example, the
loader collates them per batch and the student loss slices them per chunk of LM-head rows. Every one of those steps is
a method here (``cat``, ``targets[a:b]``, ``to``), so no module repacks the four tensors by hand.

``topk`` targets carry ``tail_logmass``; ``sample`` targets carry ``counts`` (see :mod:`kdcache.train.losses` for what
the values mean). The dtypes are whatever the producer gave (int32 ids from the teacher, int64 from the loader, ...):
no method here changes an integer tensor's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["SparseTargets"]


@dataclass
class SparseTargets:
    """Cached teacher targets for N positions.

    ``ids`` [N, k] int (``-1`` = padding), ``logprobs`` [N, k] teacher log-probs at
    T = 1, ``tail_logmass`` [N] (topk targets; ``None`` = derive it as
    ``log(1 - sum exp(logprobs))``, less accurate than a cached one), ``counts``
    [N, k] int (sample targets only; its presence marks the targets as sampled), ``tail_grid`` [N, G] the tail's
    log-partition at each of the G ``tail_temperatures`` (see :mod:`kdcache.tempering`; ``None`` = none stored).
    """

    ids: Tensor
    logprobs: Tensor
    tail_logmass: Tensor | None = None
    counts: Tensor | None = None
    tail_grid: Tensor | None = None
    tail_temperatures: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.ids.dim() != 2:
            raise ValueError(f"SparseTargets.ids must be [N, k], got shape {tuple(self.ids.shape)}")
        if self.logprobs.shape != self.ids.shape:
            raise ValueError(
                f"SparseTargets.logprobs shape {tuple(self.logprobs.shape)} != ids shape {tuple(self.ids.shape)}"
            )
        if self.tail_logmass is not None and self.tail_logmass.shape != self.ids.shape[:1]:
            raise ValueError(
                f"SparseTargets.tail_logmass must be [N] = [{self.ids.shape[0]}], "
                f"got shape {tuple(self.tail_logmass.shape)}"
            )
        if self.tail_grid is not None and self.tail_grid.shape != (self.ids.shape[0], len(self.tail_temperatures)):
            raise ValueError(
                f"SparseTargets.tail_grid must be [N, G] = [{self.ids.shape[0]}, {len(self.tail_temperatures)}] "
                f"(one column per tail temperature), got shape {tuple(self.tail_grid.shape)}"
            )
        if self.counts is not None and self.counts.shape != self.ids.shape:
            raise ValueError(
                f"SparseTargets.counts shape {tuple(self.counts.shape)} != ids shape {tuple(self.ids.shape)}"
            )

    @property
    def is_sampled(self) -> bool:
        """Sample targets (with counts), as opposed to topk targets."""
        return self.counts is not None

    @property
    def num_rows(self) -> int:
        """N, the number of positions."""
        return int(self.ids.shape[0])

    def map(self, fn: Callable[[Tensor], Tensor]) -> SparseTargets:
        """``fn`` applied to every tensor present (absent ones stay ``None``)."""
        return SparseTargets(**{f.name: fn(v) if isinstance(v := getattr(self, f.name), Tensor) else v
                                for f in fields(self)})

    def to(self, device: torch.device | str | None = None, *, non_blocking: bool = False) -> SparseTargets:
        """Every tensor on ``device`` (dtypes unchanged)."""
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def __getitem__(self, rows: slice) -> SparseTargets:
        """The targets of positions ``rows`` (a slice: ``targets[a:b]``; views, no copy)."""
        if not isinstance(rows, slice):
            raise TypeError(f"SparseTargets index must be a slice of positions, got {type(rows).__name__}")
        return self.map(lambda t: t[rows])

    @staticmethod
    def cat(parts: Sequence[SparseTargets]) -> SparseTargets:
        """The positions of ``parts`` one after the other (all topk, or all sampled, with the same k)."""
        if not parts:
            raise ValueError("SparseTargets.cat needs at least one part, got none")

        temperatures = {p.tail_temperatures for p in parts}
        if len(temperatures) > 1:
            raise ValueError(f"SparseTargets.cat parts must have the same tail temperatures, got {sorted(temperatures)}")

        def joined(name: str) -> Tensor | tuple | None:
            values = [getattr(p, name) for p in parts]
            if name == "tail_temperatures":
                return values[0]
            present = [v is not None for v in values]
            if any(present) != all(present):
                raise ValueError(f"SparseTargets.cat parts must all have {name} or all lack it, got a mix")
            return torch.cat(values) if present[0] else None

        return SparseTargets(**{f.name: joined(f.name) for f in fields(SparseTargets)})
