"""Turn full-vocabulary teacher logits (a chunk of target positions) into what the cache keeps.

Both work on one chunk of rows at a time, so at most [chunk, vocab] floats exist at once, and return the chunk's
SparseTargets on the CPU: int32 ids and counts, float32 log-probabilities and tail (the cache's dtypes).
"""

from __future__ import annotations

import torch

from kdcache.targets import SparseTargets


def topk_with_tail(logits: torch.Tensor, k: int) -> SparseTargets:
    """Top-k token ids and log-probabilities of softmax(logits), and the exact log of the mass outside the top-k.

    The tail is logsumexp over the logits not in the top-k minus logsumexp over all of them, which stays exact
    when the top-k holds almost all the mass (unlike log1p(-sum(p_topk))). One topk of k + 1 gives both the top-k
    and the largest logit outside it, so the tail needs a single in-place pass. With k = vocab, the tail is -inf.
    `logits` is consumed (overwritten) when it is already float32.
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    if k >= vocab:
        values, ids = torch.topk(logits, vocab, dim=-1)
        lse = torch.logsumexp(values, dim=-1, keepdim=True)
        tail = torch.full((logits.shape[0],), float("-inf"), device=logits.device)
        return SparseTargets(ids.to(torch.int32).cpu(), (values - lse).cpu(), tail_logmass=tail.cpu())
    values, ids = torch.topk(logits, k + 1, dim=-1)
    rest_max = values[:, k:]
    values, ids = values[:, :k], ids[:, :k]
    rest = logits.scatter_(-1, ids, float("-inf")).sub_(rest_max).exp_().sum(dim=-1)
    lse_rest = rest_max.squeeze(-1) + rest.log()
    lse = torch.logaddexp(torch.logsumexp(values, dim=-1), lse_rest)
    return SparseTargets(ids.to(torch.int32).cpu(), (values - lse[:, None]).cpu(), tail_logmass=(lse_rest - lse).cpu())


def example_uniforms(seed: int, example_index: int, num_targets: int, num_samples: int) -> torch.Tensor:
    """Uniform draws for one example's target rows, seeded by (seed, example) so batching never changes them."""
    generator = torch.Generator().manual_seed(((seed & 0xFFFFFFFF) << 31) ^ example_index)
    return torch.rand((num_targets, num_samples), generator=generator, dtype=torch.float64)


def sample_with_counts(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float) -> SparseTargets:
    """Draw tokens per row from softmax(logits / temperature) by inverse CDF of `uniforms` [n, draws]; keep each
    distinct token and its count.

    Rows are padded with id -1 and count 0 where fewer distinct tokens were drawn. `logprobs` are the teacher's
    log-probabilities at T = 1 of the kept ids, so a trainer can reweight draws made at another temperature.
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
