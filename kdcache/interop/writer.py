"""Write imported top-k into a kdcache cache through the store's own commit protocol (plan, atomic shards, manifest).

An imported cache is planned, committed shard by shard and finalized exactly as a built one (kdcache.store.manifest,
kdcache.store.writer), so `kdcache cache verify`, resuming an interrupted import, and `kdcache train` work on it as
on any cache. What differs is recorded in its plan: `imported` (kdcache.store.imported), and, since the files hold no
exact tail, the mark of vLLM's prompt_logprobs route (``teacher.backend: vllm``, ``teacher.vllm.scoring:
prompt_logprobs``, no tail temperatures), under which losses that need the exact tail are refused.

The files are read twice, one sequence at a time: a first pass for what the plan needs (the count, k, the
fingerprint, the longest sequence, whether every top-k is renormalised), a second to write the shards; so an import
holds one shard in memory, not the dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

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

__all__ = ["ImportSource", "ImportedExample", "import_plan", "write_imported_cache"]

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


@dataclass(frozen=True)
class ImportSource:
    """Files in one of the import formats: `read()` yields their sequences (a new pass each call, same order)."""

    format: str  # kdcache.store.imported.IMPORT_FORMATS
    paths: tuple[str, ...]
    read: Callable[[], Iterable[ImportedExample]]
    compression: dict | None = None  # distillkit: its config, recorded in the plan
    renormalised_means_no_tail: bool = False  # axolotl: top-k summing to 1 were renormalised (tail: none)


def renormalised(logprobs: np.ndarray, atol: float = 1e-3) -> bool:
    """Whether every row of [T, k] log-probs sums (as probabilities) to 1 within `atol`: a top-k without tail."""
    mass = np.exp(np.logaddexp.reduce(logprobs.astype(np.float64), axis=-1))
    return bool(np.all(np.abs(mass - 1.0) <= atol))


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


@dataclass
class _Survey:
    """What the first pass learns: the plan's counts and fingerprint, and whether every top-k is renormalised."""

    k: int = 0
    count: int = 0
    max_length: int = 1
    every_token: bool = True
    all_renormalised: bool = True
    targets: int = 0
    fingerprint: str = ""

    def rows(self, examples: Iterator[ImportedExample]) -> Iterator[dict]:
        """The fingerprinted fields of each example, noting the rest on the way."""
        for example in examples:
            self.count += 1
            self.max_length = max(self.max_length, len(example.input_ids))
            self.every_token &= bool(example.target_mask[1:].all())
            self.targets += len(example.logprobs)
            if len(example.logprobs):
                self.all_renormalised &= renormalised(example.logprobs)
            topk = hashlib.sha256(np.ascontiguousarray(example.ids, dtype=np.int64).tobytes())
            topk.update(np.ascontiguousarray(example.logprobs, dtype=np.float64).tobytes())
            yield {"input_ids": example.input_ids.tolist(), "target_mask": example.target_mask.tolist(),
                   "fields": example.fields, "topk": topk.hexdigest()}


def import_plan(survey: _Survey, tokenizer, tokenizer_name: str, info: ImportInfo, teacher: str,
                teacher_dtype: str, shard_size: int) -> Plan:
    """The plan of an imported cache (its dataset fingerprint is over the imported token ids, masks, fields and
    top-k, so a resumed import of other log-probs for the same tokens is refused)."""
    return Plan(
        format="kdcache",
        format_version=FORMAT_VERSION,
        teacher=TeacherInfo(model=teacher, revision=None, dtype=teacher_dtype, backend="vllm",
                            vllm=dict(IMPORTED_VLLM_SETTINGS)),
        tokenizer=TokenizerInfo(name=tokenizer_name, fingerprint=tokenizer_fingerprint(tokenizer),
                                vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id),
        dataset=DatasetInfo(fingerprint=survey.fingerprint, sources=info.sources, num_rows=survey.count,
                            unparsed_rows=0, id_field=None, label_fields=()),
        template=TemplateInfo(prompt="", target="", system=None, chat="no",
                              distill="all" if survey.every_token else "target", add_eos=False,
                              chat_template_used=False),
        sparsifier=SparsifierInfo(kind="topk", k=survey.k, logprob_dtype="float32", tail_temperatures=()),
        max_length=survey.max_length,
        shard_size=shard_size,
        num_shards=max(1, -(-survey.count // shard_size)),
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


def _checked_stream(source: ImportSource, k: int | None, vocab: int) -> Iterator[ImportedExample]:
    """One pass over the source's sequences, each checked and sorted; k from the first one when not given."""
    for example in source.read():
        if k is None:
            k = example.ids.shape[1] if example.ids.ndim == 2 else 0
            if k < 1:
                raise BadInputError(f"{example.source} row {example.source_row} has no top-k entries; nothing to "
                                    "import")
        yield _checked(example, k, vocab, f"{example.source} row {example.source_row}")


def _shards(examples: Iterator[ImportedExample], shard_size: int) -> Iterator[list[ImportedExample]]:
    shard: list[ImportedExample] = []
    for example in examples:
        shard.append(example)
        if len(shard) == shard_size:
            yield shard
            shard = []
    if shard:
        yield shard


def write_imported_cache(source: ImportSource, output: str, tokenizer, tokenizer_name: str, *,
                         teacher: str = "unknown", teacher_dtype: str = "bfloat16", shard_size: int = 1000,
                         progress: bool = True) -> Manifest:
    """Commit the source's sequences as a cache at `output` (resuming an interrupted import of the same files) and
    finalize it; two passes over the files (see the module docstring)."""
    from tqdm import tqdm

    if shard_size < 1:
        raise BadInputError(f"--shard-size must be at least 1, got {shard_size}")
    vocab = len(tokenizer)
    survey = _Survey()

    def noted(examples: Iterator[ImportedExample], bar) -> Iterator[ImportedExample]:
        for example in examples:
            survey.k = survey.k or example.ids.shape[1]
            bar.update(1)
            yield example

    with tqdm(desc="cache import: reading", unit="seq", disable=not progress) as bar:
        survey.fingerprint = rows_fingerprint(survey.rows(noted(_checked_stream(source, None, vocab), bar)))
    if survey.count == 0:
        raise BadInputError(f"no sequences found in {', '.join(source.paths)}")
    none = source.renormalised_means_no_tail and survey.targets > 0 and survey.all_renormalised
    if none:
        log.warning("these rows hold renormalised top-k (each sums to 1): no tail mass is known, the cache's tail is "
                    "the float32-eps floor (plan: imported.tail = none); forward KL over the top-k is right, losses "
                    "that need the teacher's tail are refused")
    info = ImportInfo(format=source.format, sources=source.paths, tail="none" if none else "derived",
                      compression=source.compression)
    plan = import_plan(survey, tokenizer, tokenizer_name, info, teacher, teacher_dtype, shard_size)
    location = CacheLocation(output)
    hashed = write_or_check_plan(location, plan)
    done = set(committed_shards(location, plan.num_shards))
    shards = _shards(_checked_stream(source, survey.k, vocab), shard_size)
    for index, examples in enumerate(tqdm(shards, total=plan.num_shards, desc="cache import: writing",
                                          unit="shard", disable=not progress)):
        start, stop = plan.shard_rows(index)
        if index in done:
            continue
        if len(examples) != stop - start:
            raise BadInputError(f"{', '.join(source.paths)} changed while being imported; run the import again")
        commit_shard(location, index, _shard(examples, start, survey.k, vocab),
                     {"rows": [start, stop], "skipped_rows": 0, "plan_hash": hashed})
    return finalize(location)
