"""`kdcache cache build`: plan the shards, score this worker's pending shards with a teacher, commit, finalize.

Shard i holds source rows [i * shard_size, (i + 1) * shard_size); worker w of N owns the shards with i % N == w.
Everything a shard holds depends only on the plan and its rows, so a resumed or split build equals a single run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from kdcache.config import CacheBuildConfig
from kdcache.data.chat import check_chat_tokenizer, resolve_conversations
from kdcache.data.sources import BadRow, Row, read_rows
from kdcache.data.templates import warn_literal_newlines
from kdcache.errors import BadInputError
from kdcache.modeling import check_model_source, load_tokenizer
from kdcache.outputs import check_output_folder, storage_errors
from kdcache.store.encoding import LogprobEncoding
from kdcache.store.location import CacheLocation
from kdcache.store.lock import ShardClaims
from kdcache.store.manifest import Manifest, committed_shards, finalize, read_commit, write_or_check_plan
from kdcache.store.plan import make_plan, tail_route_stores_no_grid
from kdcache.store.shard import ShardData
from kdcache.store.writer import commit_shard
from kdcache.targets import SparseTargets
from kdcache.teacher.backend import TEACHER_BACKENDS, TeacherBackend
from kdcache.teacher.generate import check_generate_config, generate_answers, stop_token_ids
from kdcache.teacher.hidden import HiddenPlan, check_hidden_config, plan_hidden
from kdcache.teacher.rows import Prepared, _records_table, check_ids, prepare_rows, with_char_spans
from kdcache.teacher.sparsify import example_uniforms, sample_with_counts, topk_with_tail

log = logging.getLogger("kdcache.build")

# Row preparation lives in rows.py; its names stay importable from here (benchmarks and tests use them).
__all__ = ["BuildResult", "Prepared", "ShardScorer", "build_cache", "check_ids", "make_backend", "prepare_rows"]


@dataclass
class BuildResult:
    output: str
    shards_written: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)
    bad_rows: list[BadRow] = field(default_factory=list)
    finalized: bool = False
    manifest: Manifest | None = None
    wall_s: float = 0.0  # this invocation, start to end (a resumed build counts its own shards only)
    tokens_written: int = 0  # tokens of the shards written by this invocation
    targets_written: int = 0  # target tokens among them (the positions the teacher scored)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens_written / self.wall_s if self.wall_s > 0 else None


class ShardScorer:
    """Runs a backend over one shard's examples in length-sorted batches and assembles the shard's arrays."""

    def __init__(self, config: CacheBuildConfig, backend: TeacherBackend, progress=None,
                 hidden: HiddenPlan | None = None):
        self.config = config
        self.backend = backend
        self.progress = progress
        self.hidden = hidden
        self.hidden_rows: list[np.ndarray] = []  # with `hidden`: each example's reduced rows, of the last shard scored
        # The plan's tail temperatures (none on a route that cannot compute them, see store.plan).
        no_grid = config.sparsifier.kind != "topk" or tail_route_stores_no_grid(config)
        self.tail_temperatures: tuple[float, ...] = () if no_grid else tuple(config.sparsifier.tail_temperatures)

    def _sparsifier(self, uniforms: torch.Tensor | None):
        spec = self.config.sparsifier
        if spec.kind == "topk":
            temperatures = self.tail_temperatures
            return lambda logits, rows: topk_with_tail(logits, spec.k, temperatures)
        return lambda logits, rows: sample_with_counts(logits, uniforms[rows], spec.temperature)

    def decode_sparsifier(self):
        """What a decode may apply to its logits so that generated answers need no teacher-forced pass
        (`kdcache.teacher.generate_batch.StepSparsifier`): the top-k sparsifier of :meth:`score_shard`; None when the
        targets need more than the logits (hidden states), or draws seeded per example (the sampled sparsifier)."""
        if self.hidden is not None or self.config.sparsifier.kind != "topk":
            return None
        sparsify = self._sparsifier(None)
        return lambda logits: sparsify(logits, slice(0, logits.shape[0]))

    def score_shard(self, examples: list[Prepared],
                    known: list[SparseTargets | None] | None = None) -> list[SparseTargets]:
        """The SparseTargets of each example, in the order given; an example whose `known[i]` is given (its targets
        taken from the decode that wrote it) keeps those and is not run through the teacher."""
        spec = self.config.sparsifier
        per_example: list[SparseTargets | None] = list(known) if known is not None else [None] * len(examples)
        per_hidden: list[np.ndarray | None] = [None] * len(examples)
        given = [i for i, targets in enumerate(per_example) if targets is not None]
        if given and self.progress is not None:
            self.progress.update(len(given), sum(len(examples[i].encoded.input_ids) for i in given),
                                 sum(per_example[i].num_rows for i in given))
        order = sorted((i for i, targets in enumerate(per_example) if targets is None),
                       key=lambda i: -len(examples[i].encoded.input_ids))
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
            if self.hidden is None:
                chunks = self.backend.score(ids, masks, self._sparsifier(uniforms))
            else:
                info = self.hidden.info
                chunks, rows = self.backend.score_with_hidden(ids, masks, self._sparsifier(uniforms), info.layers,
                                                              info.positions, self.hidden.reduce)
                sizes = counts if info.positions == "target" else [len(x) for x in ids]
                split = np.split(torch.cat(rows).numpy() if rows else np.zeros((0,)), np.cumsum(sizes)[:-1])
                for i, part in zip(batch, split):
                    per_hidden[i] = part.reshape(-1, len(info.layers), info.dim)
            merged = SparseTargets.cat(chunks)
            offset = 0
            for i, n in zip(batch, counts):
                per_example[i] = merged[offset : offset + n]
                offset += n
            if self.progress is not None:
                self.progress.update(len(batch), sum(len(x) for x in ids), sum(counts))
        self.hidden_rows = per_hidden if self.hidden is not None else []
        return per_example

    def with_hidden(self, data: ShardData) -> ShardData:
        """`data` with the hidden states of the shard last scored (itself when the plan stores none)."""
        if self.hidden is None:
            return data
        return dataclasses.replace(data, **self.hidden.shard_arrays(self.hidden_rows))

    def assemble(self, examples: list[Prepared], sparse: list[SparseTargets]) -> ShardData:
        spec = self.config.sparsifier
        lengths = [len(e.encoded.input_ids) for e in examples]
        targets = [s.num_rows for s in sparse]
        merged = SparseTargets.cat(sparse) if sparse else None
        k = spec.k
        # Kept in float32 for the offsets encoding, which rounds them itself when the shard is written.
        plain = LogprobEncoding.of(spec).step is None
        logprob_dtype = np.float16 if spec.logprob_dtype == "float16" and plain else np.float32
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
    check_output_folder(config.output, "--output")
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
    check_hidden_config(config)


def _full_disk_advice(location: CacheLocation, num_shards: int) -> str:
    done = len(committed_shards(location, num_shards))
    return (f"then run the same command again: it resumes after the last complete shard ({done} of {num_shards} "
            "shards are complete and kept)")


def build_cache(config: CacheBuildConfig, backend: TeacherBackend | None = None, tokenizer=None,
                stop_after_shards: int | None = None) -> BuildResult:
    """Build (or resume) this worker's shards and finalize when every shard of the plan is committed.

    `backend` and `tokenizer` may be passed in (tests, benchmarks); `stop_after_shards` ends the run early as a
    kill would, for tests of resumption.
    """
    started = time.perf_counter()
    check_build_config(config)
    warn_literal_newlines(prompt=config.template.prompt, target=config.template.target, system=config.template.system)
    if backend is None:
        check_model_source(config.teacher.model, "teacher")
    tokenizer = tokenizer or load_tokenizer(config.tokenizer or config.teacher.model, config.teacher.revision,
                                            config.teacher.trust_remote_code)
    rows, unparsed = read_rows(config.data)
    if unparsed and not config.skip_bad_rows:
        raise BadInputError(f"bad row: {unparsed[0]}. Fix the row, or pass --skip-bad-rows to skip such rows")
    if not rows:
        raise BadInputError(f"no rows found in {', '.join(config.data.paths)}")
    check_ids(config, rows)
    config = dataclasses.replace(config, template=resolve_conversations(config.template, rows[0]))
    if config.template.messages is not None:
        check_chat_tokenizer(config.template, tokenizer)
    stop_ids = None
    if config.generate.enabled:
        stop_ids = stop_token_ids(tokenizer, config.teacher.model, config.teacher.revision)
    location = CacheLocation(config.output)
    hidden = None
    if config.hidden.layers:  # before the plan, which records the reduction's basis (pca loads the teacher here)
        if config.hidden.reduction == "pca":
            backend = backend or make_backend(config, len(tokenizer))
        first, _ = prepare_rows(dataclasses.replace(config, skip_bad_rows=True), tokenizer,
                                rows[: config.shard_size], 0)
        with storage_errors(f"writing the hidden-state basis of {config.output}"):
            hidden = plan_hidden(config, location, backend, [e.encoded.input_ids for e in first])
    plan = make_plan(config, tokenizer, rows, len(unparsed), stop_ids, hidden.info if hidden else None)
    with storage_errors(f"writing the plan of {config.output}"):
        hashed = write_or_check_plan(location, plan)  # refuses a cache (or a worker's) with other settings
    result = BuildResult(output=config.output, bad_rows=list(unparsed))
    mine = [i for i in range(plan.num_shards) if i % config.num_workers == config.worker_index]
    done = set(committed_shards(location, plan.num_shards))
    pending = [i for i in mine if i not in done]
    result.shards_skipped = [i for i in mine if i in done]
    if pending:
        writer = _ShardWriter(config, tokenizer, rows, backend, stop_ids, location, plan.num_shards, pending, hashed,
                              hidden)
        # Each shard is claimed before it is built (a second build of it is refused, see store.lock), and the next
        # one before this one is let go, so a build started meanwhile meets a claim before it writes anything.
        with ShardClaims(location) as claims, writer:
            claims.claim(pending[0])
            for position, index in enumerate(pending):
                if stop_after_shards is not None and len(result.shards_written) >= stop_after_shards:
                    break
                if location.exists(location.commit_path(index)):  # committed by another build meanwhile
                    result.shards_skipped.append(index)
                else:
                    result.bad_rows.extend(writer.write(index))
                    result.shards_written.append(index)
                try:
                    if position + 1 < len(pending):
                        claims.claim(pending[position + 1])
                finally:
                    claims.release(index, committed=True)
    if len(committed_shards(location, plan.num_shards)) == plan.num_shards:
        with storage_errors(f"writing the manifest of {config.output}",
                            f"then run `kdcache cache finalize {config.output}`"):
            result.manifest = finalize(location)
        result.finalized = True
    for index in result.shards_written:
        record = read_commit(location, index)
        result.tokens_written += record.num_tokens
        result.targets_written += record.num_targets
    result.wall_s = time.perf_counter() - started
    return result


class _ShardWriter:
    """Builds and commits one shard at a time; the teacher is loaded when the first shard's rows are ready."""

    def __init__(self, config: CacheBuildConfig, tokenizer, rows: list[Row], backend: TeacherBackend | None,
                 stop_ids, location: CacheLocation, num_shards: int, pending: list[int], plan_hash: str,
                 hidden: HiddenPlan | None = None):
        self.config, self.tokenizer, self.rows, self.backend, self.stop_ids = config, tokenizer, rows, backend, stop_ids
        self.hidden = hidden
        self.location, self.num_shards, self.plan_hash = location, num_shards, plan_hash
        self.encoding = LogprobEncoding.of(config.sparsifier)
        self.answers_per_row = config.generate.num_samples if config.generate.enabled else 1
        self.todo_rows = sum(len(rows[i * config.shard_size : (i + 1) * config.shard_size]) for i in pending)
        self.progress: BuildProgress | None = None
        self.scorer: ShardScorer | None = None

    def write(self, index: int) -> list[BadRow]:
        """Build and commit shard `index`; returns its bad rows (skipped with skip_bad_rows)."""
        config = self.config
        start = index * config.shard_size
        shard_rows = self.rows[start : start + config.shard_size]
        examples, bad = prepare_rows(config, self.tokenizer, shard_rows, start)  # before loading the teacher
        if self.scorer is None:
            self.backend = self.backend or make_backend(config, len(self.tokenizer))
            self.progress = BuildProgress(self.todo_rows * self.answers_per_row, config.progress)
            self.scorer = ShardScorer(config, self.backend, self.progress, self.hidden)
        known = None  # per example: its targets from the decode (no teacher-forced pass), or None
        if config.generate.enabled:
            self.progress.bar.set_description("teacher answering")
            examples, known = generate_answers(config, self.tokenizer, self.backend, examples, self.stop_ids,
                                               self.scorer.decode_sparsifier())
            self.progress.bar.set_description("cache build")
        examples = [with_char_spans(self.tokenizer, e) for e in examples]
        data = self.scorer.with_hidden(self.scorer.assemble(examples, self.scorer.score_shard(examples, known)))
        self.progress.bar.update(len(bad) * self.answers_per_row)
        size = sum(a.nbytes for a in data.arrays().values()) + data.records.nbytes
        with storage_errors(f"writing shard {index} ({size / 1e6:.1f} MB before compression) of {config.output}",
                            lambda: _full_disk_advice(self.location, self.num_shards)):
            commit_shard(self.location, index, data, {"rows": [start, start + len(shard_rows)],
                                                      "skipped_rows": len(bad), "plan_hash": self.plan_hash},
                         self.encoding)
        return bad

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.close()
