"""Turn full-vocabulary teacher logits (a chunk of target positions) into what the cache keeps.

Both work on one chunk of rows at a time, so at most [chunk, vocab] floats exist at once, and return the chunk's
SparseTargets on the CPU: int32 ids and counts, float32 log-probabilities and tail (the cache's dtypes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kdcache.targets import SparseTargets
from kdcache.tempering import tail_log_partitions


def topk_with_tail(logits: torch.Tensor, k: int, tail_temperatures: Sequence[float] = ()) -> SparseTargets:
    """Top-k token ids and log-probabilities of softmax(logits) [n, V], the exact log of the mass outside the top-k,
    and (for each of ``tail_temperatures``) the tail's log-partition at that temperature [n, G].

    The tail is logsumexp over the logits not in the top-k minus logsumexp over all of them, which stays exact
    when the top-k holds almost all the mass (unlike log1p(-sum(p_topk))). One topk of k + 1 gives both the top-k
    and the largest logit outside it, so the tail needs one pass (plus one per tail temperature, see
    :func:`kdcache.tempering.tail_log_partitions`). Each row's maximum is subtracted first, so log-probabilities
    keep float32 precision at any logit scale. A row with k or fewer finite logits gets a tail of -inf (no NaN);
    with k = vocab, the tail is -inf. `logits` is consumed (overwritten) when it is already float32.
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    n = logits.shape[0]
    row_max = logits.amax(dim=-1, keepdim=True)
    logits.sub_(torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)))
    if k >= vocab:
        values, ids = torch.topk(logits, vocab, dim=-1)
        lse = torch.logsumexp(values, dim=-1, keepdim=True)
        tail = torch.full((n,), float("-inf"), device=logits.device)
        grid = torch.full((n, len(tail_temperatures)), float("-inf"), device=logits.device)
        return _targets(ids, values - lse, tail, grid if tail_temperatures else None, tail_temperatures)
    values, ids = torch.topk(logits, k + 1, dim=-1)
    rest_max = values[:, k]
    values, ids = values[:, :k], ids[:, :k]
    has_tail = torch.isfinite(rest_max)
    shift = torch.where(has_tail, rest_max, torch.zeros_like(rest_max))
    tail_shifted = logits.scatter_(-1, ids, float("-inf")).sub_(shift[:, None])  # <= 0 on the tail, -inf on top-k
    grid_shifted = None
    if tail_temperatures:  # tau(1/T) relative to the tail's own maximum; the row's normaliser is subtracted below
        grid_shifted = tail_log_partitions(tail_shifted, torch.zeros_like(rest_max), tail_temperatures)
    lse_rest = torch.where(has_tail, rest_max + tail_shifted.exp_().sum(dim=-1).log(), rest_max)
    lse = torch.logaddexp(torch.logsumexp(values, dim=-1), lse_rest)
    grid = None
    if grid_shifted is not None:  # tau(b) = b * (rest_max - lse) + log sum exp(b * tail_shifted)
        inverse = torch.tensor([1.0 / t for t in tail_temperatures], device=logits.device)
        grid = grid_shifted + (rest_max - lse)[:, None] * inverse[None, :]
        grid = torch.where(has_tail[:, None], grid, torch.full_like(grid, float("-inf")))
    return _targets(ids, values - lse[:, None], lse_rest - lse, grid, tail_temperatures)


def _targets(ids, logprobs, tail, grid, tail_temperatures) -> SparseTargets:
    """The cache's dtypes on the CPU: int32 ids, float32 log-probabilities and tails."""
    return SparseTargets(ids.to(torch.int32).cpu(), logprobs.float().cpu(), tail_logmass=tail.float().cpu(),
                         tail_grid=None if grid is None else grid.float().cpu(),
                         tail_temperatures=tuple(float(t) for t in tail_temperatures) if grid is not None else ())


def example_uniforms(seed: int, example_index: int, num_targets: int, num_samples: int) -> torch.Tensor:
    """Uniform draws for one example's target rows, seeded by (seed, example) so batching never changes them."""
    generator = torch.Generator().manual_seed(((seed & 0xFFFFFFFF) << 31) ^ example_index)
    return torch.rand((num_targets, num_samples), generator=generator, dtype=torch.float64)


def sample_with_counts(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float) -> SparseTargets:
    """Draw tokens per row from softmax(logits / temperature) by inverse CDF of `uniforms` [n, draws]; keep each
    distinct token and its count.

    Rows are padded with id -1 and count 0 where fewer distinct tokens were drawn. `logprobs` are the teacher's
    log-probabilities at T = 1 of the kept ids (kept for inspection; no loss reweights draws, so a trainer must
    distil at the sampling temperature, which kdcache enforces).
    """
    logits = logits.float()
    num_samples = uniforms.shape[1]
    vocab = logits.shape[-1]
    logprobs_full = torch.log_softmax(logits, dim=-1)
    cdf = torch.cumsum(torch.softmax(logits.double() / temperature, dim=-1), dim=-1)
    u = uniforms.to(cdf.device) * cdf[:, -1:]
    draws = torch.searchsorted(cdf, u, right=True).clamp_(max=vocab - 1)
    counts_full = torch.zeros_like(logits, dtype=torch.int32).scatter_add_(
        -1, draws, torch.ones_like(draws, dtype=torch.int32)
    )
    # Order by count (descending), ties by id (ascending), so the output is deterministic.
    width = min(num_samples, vocab)
    order_key = counts_full.to(torch.int64) * vocab + (vocab - 1 - torch.arange(vocab, device=logits.device))
    ids = torch.topk(order_key, width, dim=-1).indices
    counts = counts_full.gather(-1, ids)
    picked_logprobs = logprobs_full.gather(-1, ids)
    empty = counts == 0
    ids = ids.masked_fill(empty, -1)
    picked_logprobs = picked_logprobs.masked_fill(empty, 0.0)
    if width < num_samples:
        pad = num_samples - width
        ids = torch.nn.functional.pad(ids, (0, pad), value=-1)
        counts = torch.nn.functional.pad(counts, (0, pad), value=0)
        picked_logprobs = torch.nn.functional.pad(picked_logprobs, (0, pad), value=0.0)
    return SparseTargets(ids.to(torch.int32).cpu(), picked_logprobs.cpu(), counts=counts.to(torch.int32).cpu())
