"""The teacher's tail at other temperatures: stored values and interpolation pinned to a dense reference."""

from __future__ import annotations

import pytest
import torch

from kdcache.tempering import (
    TemperatureNotCached,
    interpolation_bound,
    single_atom_tail,
    tail_at_temperature,
    tail_log_partitions,
)

GRID = (0.5, 0.7, 1.5, 2.0, 3.0, 4.0)


def zipf_logits(n: int, vocab: int, seed: int, peak: float = 6.0) -> torch.Tensor:
    """Peaked teachers with a Zipf-like tail, rows in random token order (float64)."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    base = -1.1 * ranks.log()
    base[0] += peak
    rows = []
    for _ in range(n):
        noise = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.5
        rows.append((base + noise)[torch.randperm(vocab, generator=g)])
    return torch.stack(rows)


def dense_tail(logits: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """tau(1/T) = log sum over the non-top-k tokens of q_v^(1/T), straight from the definition (float64)."""
    lp = torch.log_softmax(logits.double(), -1)
    order = lp.argsort(-1, descending=True)
    rest = lp.gather(1, order[:, k:])
    return torch.logsumexp(rest / temperature, -1)


def stored(logits: torch.Tensor, k: int, temperatures=GRID):
    """What a build stores: tau(1) and the grid, from the shifted tail as tail_log_partitions takes it."""
    x = logits.float()
    lse = torch.logsumexp(x, -1)
    top = x.topk(k, -1).indices
    tail = x.scatter(1, top, float("-inf"))
    rest_max = tail.amax(-1)
    grid = tail_log_partitions(tail - rest_max[:, None], rest_max - lse, temperatures)
    tau1 = torch.logsumexp(tail, -1) - lse
    return tau1, grid


@pytest.mark.parametrize("temperature", GRID)
def test_stored_grid_equals_the_dense_definition(temperature):
    logits = zipf_logits(8, 3000, seed=1)
    tau1, grid = stored(logits, 16)
    got = tail_at_temperature(tau1, grid, GRID, temperature)
    torch.testing.assert_close(got.double(), dense_tail(logits, 16, temperature), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(tau1.double(), dense_tail(logits, 16, 1.0), atol=2e-5, rtol=1e-5)


def test_single_atom_is_far_off_for_a_peaked_teacher_with_a_large_vocabulary():
    logits = zipf_logits(4, 20000, seed=2)
    tau1, grid = stored(logits, 64)
    exact = tail_at_temperature(tau1, grid, GRID, 2.0)
    assert float((exact - single_atom_tail(tau1, 2.0)).abs().min()) > 1.0  # nats: the defect the grid removes


def test_off_grid_temperature_is_refused_in_exact_mode_and_names_the_cached_ones():
    tau1, grid = stored(zipf_logits(2, 500, seed=3), 8)
    with pytest.raises(TemperatureNotCached, match=r"T = 0.5, 0.7, 1, 1.5, 2, 3, 4 only, not at T = 2.5"):
        tail_at_temperature(tau1, grid, GRID, 2.5)
    with pytest.raises(TemperatureNotCached, match="single_atom"):  # a v1 cache offers the old approximation
        tail_at_temperature(tau1, None, (), 2.0)


@pytest.mark.parametrize("temperature", [0.6, 0.85, 1.2, 1.75, 2.5, 3.5, 6.0, 50.0])
def test_interpolation_lies_within_its_bound(temperature):
    vocab, k = 3000, 16
    logits = zipf_logits(16, vocab, seed=4)
    tau1, grid = stored(logits, k)
    n_tail = torch.full((16,), float(vocab - k))
    got = tail_at_temperature(tau1, grid, GRID, temperature, mode="interpolate", num_tail_tokens=n_tail)
    bound = interpolation_bound(tau1, grid, GRID, temperature, n_tail)
    error = (got.double() - dense_tail(logits, k, temperature)).abs()
    assert bool((error <= bound.double() + 1e-4).all()), (error, bound)
    assert float(bound.max()) < 0.5  # the grid is dense enough for the bound to mean something


def test_interpolation_below_the_grid_is_refused():
    tau1, grid = stored(zipf_logits(2, 500, seed=5), 8)
    n_tail = torch.full((2,), 492.0)
    with pytest.raises(TemperatureNotCached, match="below the smallest cached temperature"):
        tail_at_temperature(tau1, grid, GRID, 0.3, mode="interpolate", num_tail_tokens=n_tail)


def test_empty_tail_stays_empty_at_every_temperature():
    tau1 = torch.full((3,), float("-inf"))
    grid = torch.full((3, len(GRID)), float("-inf"))
    for mode in ("exact", "interpolate", "single_atom"):
        out = tail_at_temperature(tau1, grid, GRID, 2.5 if mode != "exact" else 2.0, mode=mode,
                                  num_tail_tokens=torch.zeros(3))
        assert torch.isneginf(out).all()
    assert torch.isneginf(tail_at_temperature(tau1, None, (), 3.0)).all()  # k = V needs no grid


def test_rows_without_a_finite_tail_get_minus_inf():
    tail = torch.full((2, 5), float("-inf"))
    out = tail_log_partitions(tail, torch.full((2,), float("-inf")), (2.0,))
    assert torch.isneginf(out).all() and not torch.isnan(out).any()


def test_configured_grid_is_validated_sorted_and_excludes_one():
    from kdcache.config import ConfigValueError, SparsifierConfig

    assert SparsifierConfig(tail_temperatures=[4, 2.0, 1.0, 2.0, 0.7]).tail_temperatures == [0.7, 2.0, 4.0]
    for bad in (0, -1, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ConfigValueError, match="tail_temperatures must be a list of positive finite numbers"):
            SparsifierConfig(tail_temperatures=[bad])
