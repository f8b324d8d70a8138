"""Write imported top-k into a kdcache cache through the store's own commit protocol (plan, atomic shards, manifest).

An imported cache is planned, committed shard by shard and finalized exactly as a built one (kdcache.store.manifest,
kdcache.store.writer), so `kdcache cache verify`, resuming an interrupted import, and `kdcache train` work on it as
on any cache. What differs is recorded in its plan: `imported` (kdcache.store.imported), and, since the files hold no
exact tail, the mark of vLLM's prompt_logprobs route (``teacher.backend: vllm``, ``teacher.vllm.scoring:
prompt_logprobs``, no tail temperatures), under which losses that need the exact tail are refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from kdcache.errors import BadInputError
from kdcache.store import FORMAT_VERSION
from kdcache.store.fingerprint import rows_fingerprint, tokenizer_fingerprint
from kdcache.store.imported import ImportInfo
from kdcache.store.location import CacheLocation
from kdcache.store.manifest import Manifest, committed_shards, finalize, write_or_check_plan
from kdcache.store.plan import DatasetInfo, Plan, SparsifierInfo, TeacherInfo, TemplateInfo, TokenizerInfo
from kdcache.store.shard import ShardData
from kdcache.store.writer import commit_shard

log = logging.getLogger("kdcache.interop")

__all__ = ["ImportedExample", "import_plan", "write_imported_cache"]

#: The plan's record of the route that produced the top-k: vLLM's prompt_logprobs (the tail derived, no grid), which
#: is what the published producers of all three formats run (DistillKit's sample_logits_vllm, Axolotl's vLLM step).
IMPORTED_VLLM_SETTINGS = {"scoring": "prompt_logprobs"}


@dataclass
class ImportedExample:
    """One sequence read from another tool's file: its tokens, which of them are targets, and their top-k.

    input_ids: int [L]; target_mask: bool [L] (never position 0: nothing predicts it); ids, logprobs: [T, k] for the
    T target tokens in order (row i: the distribution over the i-th target token, predicted from the token before
    it), any order within a row (sorted on writing); fields: what is kept in the records' ``fields`` (messages, ...).
    """

    input_ids: np.ndarray
    target_mask: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    source: str
    source_row: int
    fields: dict = field(default_factory=dict)


def _checked(example: ImportedExample, k: int, vocab: int, where: str) -> ImportedExample:
    """The example with each row sorted by descending log-prob; refuses shapes and ids the cache cannot hold."""
    n, targets = len(example.input_ids), int(np.sum(example.target_mask))
    if n == 0:
        raise BadInputError(f"{where} has no tokens; remove the row")
    if example.target_mask[0]:
        raise BadInputError(f"{where}: the first token cannot be a target (nothing predicts it)")
    if example.ids.shape != (targets, k) or example.logprobs.shape != (targets, k):
        raise BadInputError(f"{where} has top-k rows of shape {tuple(example.ids.shape)}, expected ({targets}, {k}) "
                            "(one row of k entries per target token); every row must have the same k")
    if n and (example.input_ids.min() < 0 or example.input_ids.max() >= vocab):
        raise BadInputError(f"{where} has token ids outside [0, {vocab}): pass the tokenizer the file was made with "
                            "(--tokenizer)")
    if targets and (example.ids.min() < 0 or example.ids.max() >= vocab):
        raise BadInputError(f"{where} has top-k ids outside [0, {vocab}) (past the tokenizer's vocabulary, e.g. "
                            "LM-head padding rows): pass the tokenizer the file was made with (--tokenizer)")
    if targets and not np.all(np.isfinite(example.logprobs)):
        raise BadInputError(f"{where} has a non-finite log-prob at a target position; such rows cannot be imported")
    if targets and np.any(example.logprobs > 1e-3):
        raise BadInputError(f"{where} has a log-prob above 0 ({example.logprobs.max():g}): these are not "
                            "log-probabilities")
    order = np.argsort(-example.logprobs, axis=1, kind="stable")
    example.ids = np.take_along_axis(example.ids, order, axis=1)
    example.logprobs = np.minimum(np.take_along_axis(example.logprobs, order, axis=1), 0.0)
    return example


def import_plan(examples: list[ImportedExample], tokenizer, tokenizer_name: str, info: ImportInfo, k: int,
                teacher: str, teacher_dtype: str, shard_size: int) -> Plan:
    """The plan of an imported cache (its dataset fingerprint is over the imported token ids and fields)."""
    every_token = all(bool(e.target_mask[1:].all()) for e in examples)
    return Plan(
        format="kdcache",
        format_version=FORMAT_VERSION,
        teacher=TeacherInfo(model=teacher, revision=None, dtype=teacher_dtype, backend="vllm",
                            vllm=dict(IMPORTED_VLLM_SETTINGS)),
        tokenizer=TokenizerInfo(name=tokenizer_name, fingerprint=tokenizer_fingerprint(tokenizer),
                                vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id),
        dataset=DatasetInfo(
            fingerprint=rows_fingerprint({"input_ids": e.input_ids.tolist(), "target_mask": e.target_mask.tolist(),
                                          "fields": e.fields} for e in examples),
            sources=info.sources, num_rows=len(examples), unparsed_rows=0, id_field=None, label_fields=()),
        template=TemplateInfo(prompt="", target="", system=None, chat="no", distill="all" if every_token else "target",
                              add_eos=False, chat_template_used=False),
        sparsifier=SparsifierInfo(kind="topk", k=k, logprob_dtype="float32", tail_temperatures=()),
        max_length=max(1, max((len(e.input_ids) for e in examples), default=1)),
        shard_size=shard_size,
        num_shards=max(1, -(-len(examples) // shard_size)),
        imported=info,
    )


def _records(examples: list[ImportedExample], start: int, targets: list[int]) -> pa.Table:
    """records.parquet of imported examples: the columns a built cache has, prompt/target empty (no template)."""
    n = len(examples)
    ids = [str(e.fields.get("id", start + i)) for i, e in enumerate(examples)]
    return pa.table({
        "example_index": pa.array(range(start, start + n), pa.int64()),
        "sample_index": pa.array([0] * n, pa.int64()),
        "id": pa.array(ids, pa.string()),
        "source": pa.array([e.source for e in examples], pa.string()),
        "source_row": pa.array([e.source_row for e in examples], pa.int64()),
        "prompt": pa.array([""] * n, pa.string()),
        "target": pa.array([""] * n, pa.string()),
        "fields": pa.array([json.dumps(e.fields, sort_keys=True, default=str) for e in examples], pa.string()),
        "num_tokens": pa.array([len(e.input_ids) for e in examples], pa.int64()),
        "num_targets": pa.array(targets, pa.int64()),
        "prompt_truncated": pa.array([0] * n, pa.int64()),
        "teacher_text": pa.array([None] * n, pa.string()),
        "teacher_stopped": pa.array([None] * n, pa.bool_()),
        "source_id": pa.array([None] * n, pa.string()),
        "augmentation": pa.array([None] * n, pa.string()),
        "split_key": pa.array(range(start, start + n), pa.int64()),
    })


def _shard(examples: list[ImportedExample], start: int, k: int, vocab: int) -> ShardData:
    from kdcache.teacher.vllm.teacher import prompt_logprob_targets

    targets = [int(e.target_mask.sum()) for e in examples]
    ids = np.concatenate([e.ids for e in examples]) if examples else np.zeros((0, k), np.int64)
    logprobs = np.concatenate([e.logprobs for e in examples]) if examples else np.zeros((0, k))
    # vLLM's prompt_logprobs reading, shared: the tail derived as log(1 - sum p) (floored at float32 eps).
    sparse = prompt_logprob_targets(ids, logprobs.astype(np.float64), vocab, "pass the teacher's tokenizer (--tokenizer)")
    return ShardData(
        input_ids=np.concatenate([e.input_ids for e in examples]).astype(np.int32),
        offsets=np.concatenate([[0], np.cumsum([len(e.input_ids) for e in examples])]).astype(np.int64),
        target_mask=np.concatenate([e.target_mask for e in examples]).astype(bool),
        target_offsets=np.concatenate([[0], np.cumsum(targets)]).astype(np.int64),
        sparse_ids=sparse.ids.numpy(),
        sparse_logprobs=sparse.logprobs.numpy(),
        tail_logmass=sparse.tail_logmass.numpy(),
        sample_counts=None,
        records=_records(examples, start, targets),
    )


def write_imported_cache(examples: list[ImportedExample], output: str, tokenizer, tokenizer_name: str,
                         info: ImportInfo, *, teacher: str = "unknown", teacher_dtype: str = "bfloat16",
                         shard_size: int = 1000, progress: bool = True) -> Manifest:
    """Commit `examples` as a cache at `output` (resuming an interrupted import of the same files) and finalize it."""
    from tqdm import tqdm

    if not examples:
        raise BadInputError(f"no sequences found in {', '.join(info.sources)}")
    if shard_size < 1:
        raise BadInputError(f"--shard-size must be at least 1, got {shard_size}")
    k = examples[0].ids.shape[1] if examples[0].ids.ndim == 2 else 0
    if k < 1:
        raise BadInputError(f"{info.sources[0]} row 0 has no top-k entries; nothing to import")
    vocab = len(tokenizer)
    examples = [_checked(e, k, vocab, f"{e.source} row {e.source_row}") for e in examples]
    plan = import_plan(examples, tokenizer, tokenizer_name, info, k, teacher, teacher_dtype, shard_size)
    location = CacheLocation(output)
    hashed = write_or_check_plan(location, plan)
    done = set(committed_shards(location, plan.num_shards))
    for index in tqdm(range(plan.num_shards), desc="cache import", unit="shard", disable=not progress):
        if index in done:
            continue
        start, stop = plan.shard_rows(index)
        commit_shard(location, index, _shard(examples[start:stop], start, k, vocab),
                     {"rows": [start, stop], "skipped_rows": 0, "plan_hash": hashed})
    return finalize(location)
