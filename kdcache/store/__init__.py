"""The cache format: manifest, atomic shard writer, streaming reader, verification. Spec: docs/format.md."""

FORMAT_VERSION = 2  # 2: topk caches store the tail's log-partition at sparsifier.tail_temperatures
#: Versions this kdcache reads: v1 caches (no tail temperatures) are read as before, at T = 1 exactly.
READABLE_FORMAT_VERSIONS = (1, 2)
