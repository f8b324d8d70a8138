"""Statistics for `kdcache cache info`: sizes, bytes per target token, top-k mass and teacher entropy."""

from __future__ import annotations

import numpy as np

from kdcache.store.reader import CacheReader


def cache_stats(reader: CacheReader, max_shards: int | None = None) -> dict:
    """Counts from the manifest; mass and entropy from the shards' arrays (all of them unless `max_shards`)."""
    manifest = reader.manifest
    counts = manifest.counts
    total_bytes = sum(f.bytes for shard in manifest.shards for f in shard.files.values())
    kind = manifest.sparsifier.kind
    mass_sum = entropy_sum = 0.0
    seen = 0
    for index in range(reader.num_shards if max_shards is None else min(max_shards, reader.num_shards)):
        data = reader.read_shard(index)
        if data.num_targets == 0:
            continue
        logprobs = data.sparse_logprobs.astype(np.float64)
        if kind == "topk":
            probs = np.exp(logprobs)
            tail = data.tail_logmass.astype(np.float64)
            tail_p = np.exp(tail)
            mass_sum += probs.sum()
            # Entropy of the (k+1)-bucket distribution {top-k, tail}: a lower bound of the full entropy.
            bucket_entropy = -(probs * logprobs).sum(axis=1) - np.where(tail_p > 0, tail_p * tail, 0.0)
            entropy_sum += bucket_entropy.sum()
        else:
            weights = data.sample_counts.astype(np.float64) / manifest.sparsifier.k
            mass_sum += (np.where(data.sparse_ids >= 0, np.exp(logprobs), 0.0)).sum()
            # Monte-Carlo estimate of the entropy: mean of -log p over the draws (exact in expectation at T = 1).
            entropy_sum += -(weights * logprobs).sum()
        seen += data.num_targets
    stats = {
        "examples": counts.num_examples,
        "skipped_rows": counts.skipped_rows,
        "tokens": counts.num_tokens,
        "target_tokens": counts.num_targets,
        "shards": manifest.num_shards,
        "bytes": total_bytes,
        "bytes_per_target_token": total_bytes / max(1, counts.num_targets),
        "mean_sparse_mass": mass_sum / seen if seen else None,
        "mean_teacher_entropy": entropy_sum / seen if seen else None,
        "targets_in_stats": seen,
    }
    return stats
