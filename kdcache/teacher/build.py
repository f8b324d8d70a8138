"""`kdcache cache build`: plan the shards, score this worker's pending shards with a teacher, commit, finalize.

Shard i holds source rows [i * shard_size, (i + 1) * shard_size); worker w of N owns the shards with i % N == w.
Everything a shard holds depends only on the plan and its rows, so a resumed or split build equals a single run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from kdcache.config import CacheBuildConfig
from kdcache.data.encode import Encoded, encode, encode_prompt
from kdcache.data.sources import BadRow, Row, read_rows
from kdcache.data.templates import render, render_prompt
from kdcache.errors import BadInputError
from kdcache.modeling import load_tokenizer
from kdcache.store.location import CacheLocation
from kdcache.store.manifest import Manifest, committed_shards, finalize, write_or_check_plan
from kdcache.store.plan import make_plan, tail_route_stores_no_grid
from kdcache.store.shard import ShardData
from kdcache.store.writer import commit_shard
from kdcache.targets import SparseTargets
from kdcache.teacher.backend import TEACHER_BACKENDS, TeacherBackend
from kdcache.teacher.generate import check_generate_config, generate_answers, stop_token_ids
from kdcache.teacher.sparsify import example_uniforms, sample_with_counts, topk_with_tail

log = logging.getLogger("kdcache.build")


@dataclass
class Prepared:
    """A row that became an example: its tokens and everything its Parquet record holds."""

    row_index: int
    row: Row
    prompt: str
    target: str  # the given target text; with teacher-generated answers, the row's reference if it has one
    encoded: Encoded
    sample_index: int = 0  # which of the teacher's answers to this row (teacher-generated targets)
    teacher_text: str | None = None  # the teacher's answer (teacher-generated targets), else None
    teacher_stopped: bool | None = None  # whether that answer ended with a stop token (else it hit max_new_tokens)


@dataclass
class BuildResult:
    output: str
    shards_written: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)
    bad_rows: list[BadRow] = field(default_factory=list)
    finalized: bool = False
    manifest: Manifest | None = None


def prepare_rows(config: CacheBuildConfig, tokenizer, rows: list[Row], start: int) -> tuple[list[Prepared], list[BadRow]]:
    """Render and tokenise rows; bad rows stop the job unless skip_bad_rows, in which case they are returned."""
    good, bad = [], []
    generate = config.generate.enabled
    for offset, row in enumerate(rows):
        try:
            if generate:  # the teacher writes the target later; a reference target is kept when the row has one
                prompt, target = render_prompt(config.template, row)
                room = config.max_length - config.generate.max_new_tokens
                encoded = encode_prompt(config.template, tokenizer, prompt, room)
            else:
                prompt, target = render(config.template, row)
                encoded = encode(config.template, tokenizer, row, prompt, target, config.max_length)
        except BadRow as exc:
            if not config.skip_bad_rows:
                raise BadInputError(f"bad row: {exc}. Fix the row, or pass --skip-bad-rows to skip such rows") from None
            bad.append(exc)
            continue
        good.append(Prepared(start + offset, row, prompt, target, encoded))
    return good, bad


def _records_table(config: CacheBuildConfig, examples: list[Prepared], targets: list[int]) -> pa.Table:
    def label(example: Prepared, name: str):
        value = example.row.fields.get(name)
        return None if value is None else str(value)

    columns = {
        "example_index": pa.array([e.row_index for e in examples], pa.int64()),
        "sample_index": pa.array([e.sample_index for e in examples], pa.int64()),
        "id": pa.array(
            [str(e.row.fields.get(config.data.id_field, e.row_index)) if config.data.id_field else str(e.row_index)
             for e in examples],
            pa.string(),
        ),
        "source": pa.array([e.row.source for e in examples], pa.string()),
        "source_row": pa.array([e.row.row for e in examples], pa.int64()),
        "prompt": pa.array([e.prompt for e in examples], pa.string()),
        "target": pa.array([e.target for e in examples], pa.string()),
        "fields": pa.array([json.dumps(e.row.fields, sort_keys=True, default=str) for e in examples], pa.string()),
        "num_tokens": pa.array([len(e.encoded.input_ids) for e in examples], pa.int64()),
        "num_targets": pa.array(targets, pa.int64()),
        "prompt_truncated": pa.array([e.encoded.prompt_truncated for e in examples], pa.int64()),
        "teacher_text": pa.array([e.teacher_text for e in examples], pa.string()),
        "teacher_stopped": pa.array([e.teacher_stopped for e in examples], pa.bool_()),
    }
    for name in config.data.label_fields:
        columns[f"label_{name}"] = pa.array([label(e, name) for e in examples], pa.string())
    return pa.table(columns)


class ShardScorer:
    """Runs a backend over one shard's examples in length-sorted batches and assembles the shard's arrays."""

    def __init__(self, config: CacheBuildConfig, backend: TeacherBackend, progress=None):
        self.config = config
        self.backend = backend
        self.progress = progress
        # The plan's tail temperatures (none on a route that cannot compute them, see store.plan).
        no_grid = config.sparsifier.kind != "topk" or tail_route_stores_no_grid(config)
        self.tail_temperatures: tuple[float, ...] = () if no_grid else tuple(config.sparsifier.tail_temperatures)

    def _sparsifier(self, uniforms: torch.Tensor | None):
        spec = self.config.sparsifier
        if spec.kind == "topk":
            temperatures = self.tail_temperatures
            return lambda logits, rows: topk_with_tail(logits, spec.k, temperatures)
        return lambda logits, rows: sample_with_counts(logits, uniforms[rows], spec.temperature)

    def score_shard(self, examples: list[Prepared]) -> list[SparseTargets]:
        """The SparseTargets of each example, in the order given."""
        spec = self.config.sparsifier
        per_example: list[SparseTargets | None] = [None] * len(examples)
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i].encoded.input_ids))
        for start in range(0, len(order), self.config.teacher.batch_size):
            batch = order[start : start + self.config.teacher.batch_size]
            ids = [examples[i].encoded.input_ids for i in batch]
            masks = [examples[i].encoded.target_mask for i in batch]
            counts = [sum(m) for m in masks]
            uniforms = None
            if spec.kind == "sample":
                uniforms = torch.cat(
                    [example_uniforms(spec.seed, examples[i].row_index, n, spec.k) for i, n in zip(batch, counts)]
                )
            chunks = self.backend.score(ids, masks, self._sparsifier(uniforms))
            merged = SparseTargets.cat(chunks)
            offset = 0
            for i, n in zip(batch, counts):
                per_example[i] = merged[offset : offset + n]
                offset += n
            if self.progress is not None:
                self.progress.update(len(batch), sum(len(x) for x in ids), sum(counts))
        return per_example

    def assemble(self, examples: list[Prepared], sparse: list[SparseTargets]) -> ShardData:
        spec = self.config.sparsifier
        lengths = [len(e.encoded.input_ids) for e in examples]
        targets = [s.num_rows for s in sparse]
        merged = SparseTargets.cat(sparse) if sparse else None
        k = spec.k
        logprob_dtype = np.float16 if spec.logprob_dtype == "float16" else np.float32
        empty_ids = np.zeros((0, k), np.int32)
        return ShardData(
            input_ids=np.array([t for e in examples for t in e.encoded.input_ids], dtype=np.int32),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            target_mask=np.array([m for e in examples for m in e.encoded.target_mask], dtype=bool),
            target_offsets=np.concatenate([[0], np.cumsum(targets)]).astype(np.int64),
            sparse_ids=merged.ids.numpy() if merged is not None else empty_ids,
            sparse_logprobs=(merged.logprobs.numpy() if merged is not None else empty_ids).astype(logprob_dtype),
            tail_logmass=(
                (merged.tail_logmass.numpy() if merged is not None else np.zeros(0)).astype(np.float32)
                if spec.kind == "topk" else None
            ),
            sample_counts=(
                (merged.counts.numpy() if merged is not None else empty_ids).astype(np.uint16)
                if spec.kind == "sample" else None
            ),
            tail_tempered=(
                (merged.tail_grid.numpy() if merged is not None else np.zeros((0, len(self.tail_temperatures))))
                .astype(np.float32) if spec.kind == "topk" and self.tail_temperatures else None
            ),
            records=_records_table(self.config, examples, targets),
        )


class BuildProgress:
    """A tqdm bar over sequences that also shows tokens, target tokens and tokens/s."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="seq", desc="cache build", disable=not enabled, dynamic_ncols=True)
        self.tokens = 0
        self.targets = 0
        self.start = time.perf_counter()

    def update(self, sequences: int, tokens: int, targets: int) -> None:
        self.tokens += tokens
        self.targets += targets
        rate = self.tokens / max(1e-9, time.perf_counter() - self.start)
        self.bar.set_postfix(tokens=self.tokens, targets=self.targets, tok_s=f"{rate:,.0f}", refresh=False)
        self.bar.update(sequences)

    def close(self) -> None:
        self.bar.close()


def make_backend(config: CacheBuildConfig, vocab_size: int) -> TeacherBackend:
    """The teacher backend that `teacher.backend` names, loaded (vocab_size: the tokenizer's size)."""
    if config.teacher.backend == "hf":
        from kdcache.teacher.hf import HFTeacher

        return HFTeacher(config.teacher, vocab_size)
    if config.teacher.backend == "vllm":
        from kdcache.teacher.vllm import make_vllm_backend

        return make_vllm_backend(config, vocab_size)
    raise BadInputError(f"teacher.backend must be one of {list(TEACHER_BACKENDS)}, got {config.teacher.backend!r}")


def check_build_config(config: CacheBuildConfig) -> None:
    if not config.output:
        raise BadInputError("no output given: set --output (a folder or fsspec URL for the cache)")
    if not config.teacher.model:
        raise BadInputError("no teacher given: set --teacher (a local model folder or a hub id)")
    if config.num_workers < 1 or not 0 <= config.worker_index < config.num_workers:
        raise BadInputError(
            f"--worker-index must be in [0, --num-workers); got {config.worker_index} of {config.num_workers}"
        )
    for name in ("shard_size", "max_length"):
        if getattr(config, name) < 1:
            raise BadInputError(f"{name} must be at least 1")
    if config.teacher.batch_size < 1 or config.teacher.chunk_size < 1:
        raise BadInputError("teacher.batch_size and teacher.chunk_size must be at least 1")
    check_generate_config(config)


def build_cache(config: CacheBuildConfig, backend: TeacherBackend | None = None, tokenizer=None,
                stop_after_shards: int | None = None) -> BuildResult:
    """Build (or resume) this worker's shards and finalize when every shard of the plan is committed.

    `backend` and `tokenizer` may be passed in (tests, benchmarks); `stop_after_shards` ends the run early as a
    kill would, for tests of resumption.
    """
    check_build_config(config)
    tokenizer = tokenizer or load_tokenizer(config.tokenizer or config.teacher.model, config.teacher.revision,
                                            config.teacher.trust_remote_code)
    rows, unparsed = read_rows(config.data)
    if unparsed and not config.skip_bad_rows:
        raise BadInputError(f"bad row: {unparsed[0]}. Fix the row, or pass --skip-bad-rows to skip such rows")
    if not rows:
        raise BadInputError(f"no rows found in {', '.join(config.data.paths)}")
    stop_ids = None
    if config.generate.enabled:
        stop_ids = stop_token_ids(tokenizer, config.teacher.model, config.teacher.revision)
    plan = make_plan(config, tokenizer, rows, len(unparsed), stop_ids)
    location = CacheLocation(config.output)
    hashed = write_or_check_plan(location, plan)  # refuses a cache (or a worker's) with other settings
    result = BuildResult(output=config.output, bad_rows=list(unparsed))
    mine = [i for i in range(plan.num_shards) if i % config.num_workers == config.worker_index]
    done = set(committed_shards(location, plan.num_shards))
    pending = [i for i in mine if i not in done]
    result.shards_skipped = [i for i in mine if i in done]
    if pending:
        todo_rows = sum(len(rows[i * config.shard_size : (i + 1) * config.shard_size]) for i in pending)
        answers_per_row = config.generate.num_samples if config.generate.enabled else 1
        progress = None
        try:
            for index in pending:
                if stop_after_shards is not None and len(result.shards_written) >= stop_after_shards:
                    break
                start = index * config.shard_size
                shard_rows = rows[start : start + config.shard_size]
                examples, bad = prepare_rows(config, tokenizer, shard_rows, start)  # before loading the teacher
                if progress is None:
                    backend = backend or make_backend(config, len(tokenizer))
                    progress = BuildProgress(todo_rows * answers_per_row, config.progress)
                    scorer = ShardScorer(config, backend, progress)
                result.bad_rows.extend(bad)
                if config.generate.enabled:
                    progress.bar.set_description("teacher answering")
                    examples = generate_answers(config, tokenizer, backend, examples, stop_ids)
                    progress.bar.set_description("cache build")
                data = scorer.assemble(examples, scorer.score_shard(examples))
                progress.bar.update(len(bad) * answers_per_row)
                info = {"rows": [start, start + len(shard_rows)], "skipped_rows": len(bad), "plan_hash": hashed}
                commit_shard(location, index, data, info)
                result.shards_written.append(index)
        finally:
            if progress is not None:
                progress.close()
    if len(committed_shards(location, plan.num_shards)) == plan.num_shards:
        result.manifest = finalize(location)
        result.finalized = True
    return result
