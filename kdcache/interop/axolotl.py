"""Axolotl's offline KD dataset format (axolotl.integrations.kd), both ways.

A row, as Axolotl's KD trainer reads it (its kd/README.md, "Target alignment"): ``input_ids`` [L], ``labels`` [L]
(-100: no loss), and per position j the teacher's top-k over the *next* token ``input_ids[j + 1]``:
``target_token_ids`` [L][k], ``target_logprobs`` [L][k] and ``target_mask`` [L][k] (0 where ``labels[j + 1]`` is
-100; the last row, and rows before the teacher's coverage, are padding with mask 0). ``messages`` may sit beside
them. Axolotl's own producers renormalise the top-k to sum to 1 (``kd_normalize_topk``, default true, does it again at
training), so such a dataset carries **no tail mass**: imported, its tail is marked ``none`` (the stored tail is the
float32-eps floor) and a warning says so. A dataset of unnormalised top-k (what `kdcache cache export --format
axolotl` writes unless --renormalize) keeps 1 - sum p, imported as a derived tail.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from kdcache.errors import BadInputError
from kdcache.interop.files import RowWriter, read_rows
from kdcache.interop.writer import ImportedExample, ImportSource

__all__ = ["PAD_LOGPROB", "axolotl_rows", "axolotl_source", "write_axolotl"]

#: The log-prob of padded slots (mask 0), "a large negative logprob" as Axolotl's README asks: finite, so JSONL holds it.
PAD_LOGPROB = -1e9
_REQUIRED = ("input_ids", "target_token_ids", "target_logprobs")


def _row_mask(row: dict, n: int, where: str) -> np.ndarray:
    """bool [L]: which tokens are targets (token j + 1 is one when target row j is not masked)."""
    mask = np.zeros(n, dtype=bool)
    if row.get("target_mask") is not None:
        rows = row["target_mask"]
        on = [bool(np.any(np.asarray(m))) for m in rows[: n - 1]]
    elif row.get("labels") is not None:
        on = [label != -100 for label in row["labels"][1:n]]
    else:
        on = [bool(np.all(np.isfinite(lp))) and min(lp) > PAD_LOGPROB / 2 for lp in row["target_logprobs"][: n - 1]]
    if len(on) != n - 1:
        raise BadInputError(f"{where}: target_mask/labels cover {len(on)} of the {n - 1} positions that predict a token")
    mask[1:] = on
    return mask


def _example(source: str, index: int, row: dict) -> ImportedExample:
    where = f"{source} row {index}"
    missing = [key for key in _REQUIRED if row.get(key) is None]
    if missing:
        raise BadInputError(f"{where} has no {', '.join(missing)}: an Axolotl KD row holds input_ids, "
                            "target_token_ids and target_logprobs (tokenized by Axolotl's kd chat_template)")
    tokens = np.array(row["input_ids"], dtype=np.int64)
    n = len(tokens)
    if len(row["target_token_ids"]) != n or len(row["target_logprobs"]) != n:
        raise BadInputError(f"{where}: target_token_ids/target_logprobs have {len(row['target_token_ids'])}/"
                            f"{len(row['target_logprobs'])} rows for {n} input_ids (Axolotl: one row per token)")
    mask = _row_mask(row, n, where)
    rows = np.flatnonzero(mask[1:])  # target row j predicts token j + 1
    try:
        ids = np.array([row["target_token_ids"][j] for j in rows], dtype=np.int64)
        logprobs = np.array([row["target_logprobs"][j] for j in rows], dtype=np.float64)
    except ValueError:
        raise BadInputError(f"{where}: target rows have different k; every row must hold the same k") from None
    k = len(row["target_token_ids"][0]) if n else 0
    fields = {key: row[key] for key in ("id", "messages") if key in row}
    return ImportedExample(tokens, mask, ids.reshape(len(rows), k), logprobs.reshape(len(rows), k), source, index,
                           fields)


def axolotl_source(paths: list[str]) -> ImportSource:
    """Axolotl KD rows as an import source (see the module docstring); when every top-k sums to 1 the import
    records tail ``none`` and warns (kdcache.interop.writer)."""
    return ImportSource(format="axolotl", paths=tuple(paths), renormalised_means_no_tail=True,
                        read=lambda: (_example(source, index, row) for source, index, row in read_rows(paths)))


def axolotl_rows(reader, renormalize: bool = False):
    """Axolotl KD rows of a cache (kdcache.store.reader.CacheReader), one per example, in cache order; the top-k as
    stored (or renormalised to sum to 1), padded rows with ids 0..k-1, PAD_LOGPROB and mask 0."""
    k = reader.sparsifier.k
    for example in reader.iter_examples():
        n = len(example.input_ids)
        ids = np.tile(np.arange(k, dtype=np.int64), (n, 1))
        logprobs = np.full((n, k), PAD_LOGPROB, dtype=np.float64)
        target_rows = np.flatnonzero(example.target_mask) - 1
        values = example.sparse_logprobs.astype(np.float64)
        if renormalize and len(values):
            values = values - np.logaddexp.reduce(values, axis=-1, keepdims=True)
        ids[target_rows] = example.sparse_ids
        logprobs[target_rows] = values
        mask = np.zeros((n, k), dtype=np.int64)
        mask[target_rows] = 1
        labels = np.where(example.target_mask, example.input_ids, -100)
        row = {
            "input_ids": example.input_ids.astype(np.int64).tolist(),
            "attention_mask": [1] * n,
            "labels": labels.astype(np.int64).tolist(),
            "target_token_ids": ids.tolist(),
            "target_logprobs": logprobs.tolist(),
            "target_mask": mask.tolist(),
        }
        messages = _messages(example.record)
        if messages is not None:
            row["messages"] = messages
        yield row


def _messages(record: dict):
    import json

    try:
        return json.loads(record.get("fields") or "{}").get("messages")
    except ValueError:
        return None


AXOLOTL_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int64())),
    ("attention_mask", pa.list_(pa.int64())),
    ("labels", pa.list_(pa.int64())),
    ("target_token_ids", pa.list_(pa.list_(pa.int64()))),
    ("target_logprobs", pa.list_(pa.list_(pa.float32()))),
    ("target_mask", pa.list_(pa.list_(pa.int64()))),
])


def write_axolotl(reader, path: str, renormalize: bool = False) -> int:
    """Write a cache as an Axolotl KD dataset (.parquet or .jsonl), shard by shard; returns the rows written.
    Parquet gets AXOLOTL_SCHEMA (plus `messages`, typed from the first shard's rows, when they have them)."""
    import itertools

    rows = axolotl_rows(reader, renormalize)
    first = list(itertools.islice(rows, 256))
    schema = None if any("messages" in row for row in first) else AXOLOTL_SCHEMA
    with RowWriter(path, schema) as writer:
        writer.write(first)
        while batch := list(itertools.islice(rows, 256)):
            writer.write(batch)
    return writer.rows
