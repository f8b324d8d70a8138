"""`kdcache cache export --format parquet`: a cache as one plain per-position table, readable by anything.

One row per token of every example, in cache order:

| column          | type                 | meaning                                                                      |
| --------------- | -------------------- | ---------------------------------------------------------------------------- |
| example_index   | int64                | the example's index in the cache (records' `example_index`)                  |
| position        | int32                | the token's position in its sequence (0 = first)                             |
| token_id        | int32                | the token                                                                    |
| is_target       | bool                 | whether the teacher's distribution over this token is stored                 |
| topk_ids        | list<int32> [k]      | the teacher's top-k over this token (predicted from position - 1); null else |
| topk_logprobs   | list<float32> [k]    | their log-probabilities, descending (sample caches: as drawn); null else     |
| tail_logmass    | float32              | log of the probability mass outside the top-k (topk caches); null else       |
| tail_tempered   | list<float32> [G]    | the tail's log-partition at the plan's tail temperatures (when stored)        |

The file's metadata holds the cache's plan (``kdcache.plan``, JSON) so the tokenizer, k and tail temperatures travel
with it. Dropped: spans, sample counts, hidden states and the records' other columns.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["write_parquet"]


def _table(examples, grid: bool) -> pa.Table:
    columns: dict[str, list] = {name: [] for name in ("example_index", "position", "token_id", "is_target",
                                                       "topk_ids", "topk_logprobs", "tail_logmass", "tail_tempered")}
    for example in examples:
        n = len(example.input_ids)
        rows = np.full(n, -1)
        rows[example.target_mask] = np.arange(int(example.target_mask.sum()))
        columns["example_index"].extend([example.index] * n)
        columns["position"].extend(range(n))
        columns["token_id"].extend(example.input_ids.tolist())
        columns["is_target"].extend(example.target_mask.tolist())
        for r in rows.tolist():
            target = r >= 0
            columns["topk_ids"].append(example.sparse_ids[r].tolist() if target else None)
            columns["topk_logprobs"].append(example.sparse_logprobs[r].astype(np.float32).tolist() if target else None)
            tail = example.tail_logmass
            columns["tail_logmass"].append(float(tail[r]) if target and tail is not None else None)
            tempered = example.tail_tempered
            columns["tail_tempered"].append(tempered[r].tolist() if target and tempered is not None else None)
    types = {"example_index": pa.int64(), "position": pa.int32(), "token_id": pa.int32(), "is_target": pa.bool_(),
             "topk_ids": pa.list_(pa.int32()), "topk_logprobs": pa.list_(pa.float32()),
             "tail_logmass": pa.float32(), "tail_tempered": pa.list_(pa.float32())}
    if not grid:
        del columns["tail_tempered"]
    return pa.table({name: pa.array(values, types[name]) for name, values in columns.items()})


def write_parquet(reader, path: str) -> int:
    """Write the cache behind `reader` (a CacheReader) as one Parquet table at `path`; returns the rows written."""
    manifest = reader.manifest
    grid = bool(manifest.sparsifier.tail_temperatures)
    metadata = {b"kdcache.plan": json.dumps(manifest.plan.to_dict()).encode("utf-8")}
    writer = None
    rows = 0
    try:
        for shard in range(reader.num_shards):
            table = _table(reader.iter_examples([shard]), grid)
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression="zstd")
            writer.write_table(table)
            rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    return rows
