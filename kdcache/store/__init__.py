"""The cache format: manifest, atomic shard writer, streaming reader, verification. Spec: docs/format.md."""

FORMAT_VERSION = 3  # 2: topk caches store the tail's log-partition at sparsifier.tail_temperatures
#                    3: commit records and the manifest carry the plan's hash (workers of other plans are refused);
#                       sparsifier.logprob_step: top-k log-probs as quantised offsets (absent: plain, as before),
#                       sparsifier.logprob_growth: the offsets' step growing with depth (absent: uniform)
#: Versions this kdcache reads: v1 caches (no tail temperatures) are read as before, at T = 1 exactly; v1 and v2
#: caches carry no plan hashes.
READABLE_FORMAT_VERSIONS = (1, 2, 3)
