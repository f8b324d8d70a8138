"""The cache format: manifest, atomic shard writer, streaming reader, verification. Spec: docs/format.md."""

FORMAT_VERSION = 1
