"""The teacher's tail at any temperature: what a build stores, and how a trainer reads it back exactly.

A top-k cache keeps, per target row, the teacher's T = 1 log-probabilities ``lp`` of the k kept ids ``K`` and the
tail's log-mass ``log sum_{v not in K} q_v``. The tempered teacher ``q_T ∝ q^(1/T)`` over the (k+1) buckets
{id_1, ..., id_k, tail} is::

    log q_T(id_j) = lp_j / T - Z_T        log q_T(tail) = tau(1/T) - Z_T        Z_T = logsumexp([lp / T, tau(1/T)])

where ``tau(b) = log sum_{v not in K} exp(b * lp_v)`` is the tail's log-partition at inverse temperature b. At
T = 1, ``tau(1)`` is the tail log-mass; at any other T it depends on the tail's *shape*, which only the build sees
(tempering the tail as one atom, ``tau(1) / T``, is wrong by orders of magnitude for a peaked teacher with a large
vocabulary). So the build stores ``tau(1 / T)`` for a grid of temperatures (:func:`tail_log_partitions`), and a
trainer at a temperature of the grid is exact (:func:`tail_at_temperature`).

Off the grid, ``tau`` can be interpolated with a guaranteed error bound: ``tau`` is convex in b (a log-partition
function), and ``tau(0) = log(number of tail tokens)`` is known. Linear interpolation between the two neighbouring
known points is an upper bound; the secants of the neighbouring intervals, extended, are lower bounds. Their gap is
:func:`interpolation_bound`. Below the smallest cached temperature (b above the largest known point) there is no
finite upper bound from the grid, so such temperatures are refused.

All functions take and return log-space tensors; shapes are in each docstring.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdcache.config import DEFAULT_TAIL_TEMPERATURES, TAIL_MODES

__all__ = [
    "DEFAULT_TAIL_TEMPERATURES",
    "TAIL_MODES",
    "TemperatureNotCached",
    "interpolation_bound",
    "single_atom_tail",
    "tail_at_temperature",
    "tail_log_partitions",
]

_REL_TOL = 1e-6


class TemperatureNotCached(ValueError):
    """The cache holds no exact tail at the requested temperature (and interpolation was not asked for)."""


def tail_log_partitions(tail_shifted: Tensor, offset: Tensor, temperatures: Sequence[float]) -> Tensor:
    """``tau(1 / T)`` for each T of ``temperatures``, per row: [n, G] float32 (build side).

    tail_shifted: [n, V] the teacher's logits minus each row's largest *tail* logit, with the top-k columns set to
        -inf (so every finite entry is <= 0 and the largest is 0); it is read, not changed.
    offset: [n] the largest tail logit's T = 1 log-probability (largest tail logit minus the row's logsumexp);
        -inf for a row with no finite tail logit.
    Then ``tau(b) = b * offset + log sum_v exp(b * tail_shifted_v)``, whose sum is >= 1 (no underflow to -inf).
    """
    n = tail_shifted.shape[0]
    out = torch.empty((n, len(temperatures)), dtype=torch.float32, device=tail_shifted.device)
    finite = torch.isfinite(offset)
    for j, temperature in enumerate(temperatures):
        b = 1.0 / float(temperature)
        summed = torch.exp(tail_shifted * b).sum(dim=-1)
        value = b * offset.float() + torch.log(summed.float())
        out[:, j] = torch.where(finite, value, torch.full_like(value, float("-inf")))
    return out


def single_atom_tail(tail_logmass: Tensor, temperature: float) -> Tensor:
    """The pre-v2 approximation ``tau(1) / T`` [N]: the tail tempered as if it were one token."""
    return tail_logmass / float(temperature)


def _grid_index(temperatures: Sequence[float], temperature: float) -> int | None:
    for j, t in enumerate(temperatures):
        if abs(t - temperature) <= _REL_TOL * max(1.0, abs(t)):
            return j
    return None


def _known_points(tail_logmass: Tensor, grid: Tensor | None, temperatures: Sequence[float],
                  num_tail_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Known (b, tau(b)) points per row, sorted by b: b [P] and tau [N, P] (b = 0, 1 and the grid's 1/T)."""
    bs = [0.0, 1.0] + [1.0 / float(t) for t in temperatures]
    dtype = tail_logmass.dtype if tail_logmass.dtype == torch.float64 else torch.float32
    zero = torch.log(num_tail_tokens.to(dtype).clamp_min(1.0))
    cols = [zero, tail_logmass.to(dtype)]
    if grid is not None and len(temperatures):
        cols += [grid[:, j].to(dtype) for j in range(len(temperatures))]
    order = sorted(range(len(bs)), key=lambda i: bs[i])
    b = torch.tensor([bs[i] for i in order], dtype=dtype, device=tail_logmass.device)
    tau = torch.stack([cols[i] for i in order], dim=1)
    return b, tau


def _bracket(b: Tensor, beta: float) -> int:
    """Index i with b[i] <= beta <= b[i + 1]."""
    values = b.tolist()
    for i in range(len(values) - 1):
        if values[i] <= beta <= values[i + 1]:
            return i
    raise AssertionError("beta outside the known points")  # callers check the range first


def _interpolate(b: Tensor, tau: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(chord value, lower bound) at ``beta`` for each row of ``tau`` [N, P] known at ``b`` [P]."""
    i = _bracket(b, beta)
    b0, b1 = float(b[i]), float(b[i + 1])
    t0, t1 = tau[:, i], tau[:, i + 1]
    w = (beta - b0) / (b1 - b0) if b1 > b0 else 0.0
    chord = t0 + w * (t1 - t0)
    lower = torch.full_like(chord, float("-inf"))
    if i > 0:  # the left neighbour's secant, extended to the right
        slope = (t0 - tau[:, i - 1]) / (b0 - float(b[i - 1]))
        lower = torch.maximum(lower, t0 + slope * (beta - b0))
    if i + 2 < b.numel():  # the right neighbour's secant, extended to the left
        slope = (tau[:, i + 2] - t1) / (float(b[i + 2]) - b1)
        lower = torch.maximum(lower, t1 + slope * (beta - b1))
    # With no neighbouring interval on either side (only b = 0 and b = 1 known) the bound is -inf.
    return chord, torch.minimum(lower, chord)


def _check_range(temperatures: Sequence[float], temperature: float) -> None:
    smallest = min([1.0, *temperatures])
    if temperature < smallest * (1 - _REL_TOL):
        raise TemperatureNotCached(
            f"temperature {temperature:g} is below the smallest cached temperature ({smallest:g}); below it the "
            f"tail cannot be bounded, so rebuild the cache with sparsifier.tail_temperatures including "
            f"{temperature:g}"
        )


def tail_at_temperature(
    tail_logmass: Tensor,
    grid: Tensor | None,
    temperatures: Sequence[float],
    temperature: float,
    *,
    mode: str = "exact",
    num_tail_tokens: Tensor | None = None,
) -> Tensor:
    """``tau(1 / temperature)`` [N]: the tail's log-partition at the training temperature.

    tail_logmass: [N] ``tau(1)``, the T = 1 tail log-mass (-inf: empty tail, e.g. k = V; then -inf at every T).
    grid: [N, G] ``tau(1 / T_j)`` for ``temperatures`` (G of them), or None (a cache without a grid: format v1).
    mode: see :data:`TAIL_MODES`. ``exact`` refuses a temperature that is neither 1 nor on the grid, with the list
        of cached temperatures; ``interpolate`` needs ``num_tail_tokens`` [N] (vocabulary size minus the kept ids)
        and refuses temperatures below the smallest cached one.
    """
    if mode not in TAIL_MODES:
        raise ValueError(f"tail mode must be one of {', '.join(TAIL_MODES)}, got {mode!r}")
    temperature = float(temperature)
    if abs(temperature - 1.0) <= _REL_TOL:
        return tail_logmass
    empty = torch.isneginf(tail_logmass)
    if mode == "single_atom":
        return single_atom_tail(tail_logmass, temperature)
    j = _grid_index(temperatures, temperature) if grid is not None else None
    if j is not None:
        return torch.where(empty, tail_logmass, grid[:, j].to(tail_logmass.dtype))
    if bool(empty.all()):  # k = V: the tail is empty at every temperature
        return tail_logmass
    cached = ", ".join(f"{t:g}" for t in sorted({1.0, *temperatures})) if grid is not None else "1"
    if mode == "exact":
        raise TemperatureNotCached(
            f"the cache holds the teacher's exact tail at T = {cached} only, not at T = {temperature:g}: train at "
            f"one of those, rebuild the cache with sparsifier.tail_temperatures including {temperature:g}, or set "
            "loss.tail_mode=interpolate (bounded error, docs/losses.md)"
            + ("" if grid is not None else " or loss.tail_mode=single_atom (the old, inexact approximation)")
        )
    if num_tail_tokens is None:
        raise ValueError("tail mode 'interpolate' needs num_tail_tokens (vocabulary size minus the kept ids)")
    _check_range(temperatures if grid is not None else (), temperature)
    b, tau = _known_points(tail_logmass, grid, temperatures if grid is not None else (), num_tail_tokens)
    chord, _ = _interpolate(b, tau, 1.0 / temperature)
    return torch.where(empty, tail_logmass, chord.to(tail_logmass.dtype))


def interpolation_bound(
    tail_logmass: Tensor,
    grid: Tensor | None,
    temperatures: Sequence[float],
    temperature: float,
    num_tail_tokens: Tensor,
) -> Tensor:
    """Per-row bound [N] on ``|interpolated tau - true tau|`` at ``temperature`` (0 on the grid or at T = 1).

    By convexity of tau in b = 1/T the true value lies between the chord (the interpolated value) and the larger of
    the neighbouring secants extended; the bound is their gap (+inf where no neighbouring secant exists).
    """
    temperature = float(temperature)
    temps = temperatures if grid is not None else ()
    if abs(temperature - 1.0) <= _REL_TOL or _grid_index(temps, temperature) is not None:
        return torch.zeros_like(tail_logmass)
    _check_range(temps, temperature)
    b, tau = _known_points(tail_logmass, grid, temps, num_tail_tokens)
    chord, lower = _interpolate(b, tau, 1.0 / temperature)
    gap = chord - lower
    return torch.where(torch.isneginf(tail_logmass), torch.zeros_like(gap), gap)
