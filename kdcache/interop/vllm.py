"""Import vLLM ``prompt_logprobs`` as users dump them: one row per request, in JSONL or Parquet.

vLLM's ``RequestOutput.prompt_logprobs`` (``SamplingParams(prompt_logprobs=k)``) is a list over the prompt's
positions: ``None`` at position 0 (nothing predicts the first token), then for each position t a mapping
``{token_id: Logprob(logprob, rank, decoded_token)}`` (vllm.logprobs.Logprob) holding the k entries of ranks 1..k
plus the actual token t (one more entry, of its own rank, when it is not among them). Dumped to JSON the ids become
strings and each Logprob its fields (``dataclasses.asdict``); a row is

    {"prompt_token_ids": [...], "prompt_logprobs": [null, {"17": {"logprob": -0.3, "rank": 1, ...}, ...}, ...]}

Accepted per position: such a mapping, a mapping to bare floats (ranked by value), a list of
``{"token_id", "logprob", "rank"}`` objects, or a list of (id, value) pairs (what Parquet gives back for a map
column). The token ids may sit under ``prompt_token_ids``, ``input_ids`` or ``token_ids``. k is the largest rank r
such that every target position has all ranks 1..r (or `k` when given): the actual token's extra entry is dropped.
Targets are every position after the first, or where a ``labels`` column is not -100 (or ``target_mask`` is set).
The tail is vLLM's prompt_logprobs route's (kdcache.teacher.vllm.teacher.prompt_logprob_targets): derived as
log(1 - sum p_topk).
"""

from __future__ import annotations

import numpy as np

from kdcache.errors import BadInputError
from kdcache.interop.files import read_rows
from kdcache.interop.writer import ImportedExample, ImportSource

__all__ = ["vllm_source"]

_IDS_KEYS = ("prompt_token_ids", "input_ids", "token_ids")
_EXTRA_FIELDS = ("id", "messages", "prompt", "text")


def _entries(position, where: str) -> list[tuple[int, float, int | None]]:
    """(token id, log-prob, rank or None) of one position's entries, in any of the accepted shapes."""
    if isinstance(position, dict):
        items = list(position.items())
    elif isinstance(position, list):
        items = []
        for entry in position:
            if isinstance(entry, dict) and "token_id" in entry:
                items.append((entry["token_id"], entry))
            elif isinstance(entry, (list, tuple)) and len(entry) == 2:
                items.append((entry[0], entry[1]))
            else:
                raise BadInputError(f"{where}: a position's entries must be {{token_id: Logprob}} or "
                                    f"[{{token_id, logprob, rank}}], got {str(entry)[:60]}")
    else:
        raise BadInputError(f"{where}: a position must be a mapping {{token_id: Logprob}} or null, got "
                            f"{type(position).__name__}")
    out = []
    for key, value in items:
        try:
            token = int(key)
            if isinstance(value, dict):
                out.append((token, float(value["logprob"]), None if value.get("rank") is None else int(value["rank"])))
            else:
                out.append((token, float(value), None))
        except (KeyError, TypeError, ValueError):
            raise BadInputError(f"{where}: entry {str(key)[:20]!r} has no numeric 'logprob' (vLLM's Logprob fields: "
                                "logprob, rank, decoded_token)") from None
    return out


def _contiguous_ranks(entries: list[tuple[int, float, int | None]]) -> int:
    """How many of ranks 1, 2, ... the entries hold without a gap (entries without ranks: their count)."""
    ranks = {rank for _, _, rank in entries if rank is not None}
    if not ranks:
        return len(entries)
    r = 0
    while r + 1 in ranks:
        r += 1
    return r


def _top(entries: list[tuple[int, float, int | None]], k: int, actual: int) -> tuple[list[int], list[float]]:
    """The k entries of ranks 1..k, by rank (without ranks: the k largest). vLLM ranks the actual token by how many
    log-probs exceed it, so when it ties with a top-k entry outside the top-k it shares that entry's rank: one entry
    per rank is kept, the top-k's own rather than the actual token's."""
    if not any(rank is not None for _, _, rank in entries):
        ranked = sorted(entries, key=lambda e: -e[1])[:k]
        return [e[0] for e in ranked], [e[1] for e in ranked]
    by_rank: dict[int, tuple[int, float, int | None]] = {}
    for entry in sorted(entries, key=lambda e: e[0] == actual):  # the actual token's entry last
        if entry[2] is not None and 1 <= entry[2] <= k:
            by_rank.setdefault(entry[2], entry)
    ranked = [by_rank[r] for r in sorted(by_rank)]
    return [e[0] for e in ranked], [e[1] for e in ranked]


def _targets(row: dict, n: int, where: str) -> np.ndarray:
    mask = np.ones(n, dtype=bool)
    if row.get("labels") is not None:
        labels = row["labels"]
        if len(labels) != n:
            raise BadInputError(f"{where}: labels has {len(labels)} entries for {n} tokens")
        mask = np.array([label != -100 for label in labels], dtype=bool)
    elif row.get("target_mask") is not None:
        if len(row["target_mask"]) != n:
            raise BadInputError(f"{where}: target_mask has {len(row['target_mask'])} entries for {n} tokens")
        mask = np.array([bool(m) for m in row["target_mask"]], dtype=bool)
    mask[0] = False
    return mask


def _parse(source: str, index: int, row: dict):
    """(tokens, target mask, entries of each target position, kept fields) of one dumped request."""
    where = f"{source} row {index}"
    ids_key = next((key for key in _IDS_KEYS if row.get(key) is not None), None)
    if ids_key is None or row.get("prompt_logprobs") is None:
        raise BadInputError(f"{where} has no prompt_logprobs beside prompt_token_ids (or input_ids); dump "
                            "RequestOutput.prompt_token_ids and .prompt_logprobs of SamplingParams(prompt_logprobs=k)")
    tokens, positions = [int(t) for t in row[ids_key]], row["prompt_logprobs"]
    if len(positions) != len(tokens):
        raise BadInputError(f"{where}: prompt_logprobs has {len(positions)} positions for {len(tokens)} tokens "
                            "(vLLM gives one per prompt token, the first null)")
    mask = _targets(row, len(tokens), where)
    entries = []
    for t in np.flatnonzero(mask):
        if positions[t] is None:
            raise BadInputError(f"{where}: position {t} has no logprobs (only position 0 may be null)")
        entries.append(_entries(positions[t], f"{where} position {t}"))
    fields = {key: row[key] for key in _EXTRA_FIELDS if key in row}
    return np.array(tokens, dtype=np.int64), mask, entries, fields


def vllm_source(paths: list[str], k: int | None = None) -> ImportSource:
    """vLLM prompt_logprobs dumps as an import source (see the module docstring for the accepted shapes); k is
    settled by a first pass over the files."""
    available = min((_contiguous_ranks(e) for source, index, row in read_rows(paths)
                     for e in _parse(source, index, row)[2]), default=0)
    if k is None:
        k = available
    elif k > available:
        raise BadInputError(f"--k {k} but some positions hold only {available} ranked entries; use --k {available} "
                            "or less")
    if k < 1:
        raise BadInputError("the dump holds no ranked entries (rank 1 missing somewhere); dump prompt_logprobs with "
                            "their ranks")

    def read():
        for source, index, row in read_rows(paths):
            tokens, mask, entries, fields = _parse(source, index, row)
            tops = [_top(e, k, int(tokens[t])) for e, t in zip(entries, np.flatnonzero(mask))]
            ids = np.array([t[0] for t in tops], dtype=np.int64).reshape(len(tops), k)
            logprobs = np.array([t[1] for t in tops], dtype=np.float64).reshape(len(tops), k)
            yield ImportedExample(tokens, mask, ids, logprobs, source, index, fields)

    return ImportSource(format="vllm", paths=tuple(paths), read=read)
