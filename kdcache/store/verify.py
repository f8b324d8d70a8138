"""`kdcache cache verify`: check every checksum and invariant of a cache, read-only, and name the first bad shard.

A reader checks each shard's commit record, file sizes and sha256 on every read too (kdcache.store.integrity);
verify adds the plan file, the manifest's totals and the arrays' invariants."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from kdcache.errors import CacheFormatError
from kdcache.store.hidden import check_hidden_arrays, read_basis
from kdcache.store.integrity import ShardDamaged, load_shard
from kdcache.store.location import PLAN_FILE, CacheLocation
from kdcache.store.manifest import COUNT_FIELDS, CommitRecord, Manifest, read_manifest, read_plan
from kdcache.store.plan import PLAN_HASH_VERSION, plan_hash
from kdcache.store.shard import ShardData


@dataclass
class VerifyReport:
    ok: bool
    shards_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def first_problem(self) -> str | None:
        return self.problems[0] if self.problems else None


def _check_arrays(manifest: Manifest, entry: CommitRecord, data: ShardData) -> str | None:
    """Structural invariants: offsets, masks, counts, id ranges, and probability sums."""
    k = manifest.sparsifier.k
    vocab = manifest.tokenizer.vocab_size
    checks: list[tuple[bool, str]] = [
        (data.num_examples == entry.num_examples, f"holds {data.num_examples} examples, commit says {entry.num_examples}"),
        (data.num_tokens == entry.num_tokens, f"holds {data.num_tokens} tokens, commit says {entry.num_tokens}"),
        (data.num_targets == entry.num_targets, f"holds {data.num_targets} targets, commit says {entry.num_targets}"),
        (data.records.num_rows == data.num_examples, "records.parquet row count differs from the example count"),
        (data.offsets[0] == 0 and data.offsets[-1] == data.num_tokens and np.all(np.diff(data.offsets) > 0),
         "token offsets are not increasing from 0 to the token count"),
        (data.target_mask.shape[0] == data.num_tokens, "target_mask length differs from input_ids"),
        (int(data.target_mask.sum()) == data.num_targets, "target_mask marks another number of targets than stored"),
        (data.target_offsets[0] == 0 and data.target_offsets[-1] == data.num_targets
         and np.all(np.diff(data.target_offsets) >= 0), "target offsets are not increasing to the target count"),
        (data.sparse_ids.shape == (data.num_targets, k) and data.sparse_logprobs.shape == (data.num_targets, k),
         f"sparse arrays are not [targets, k={k}]"),
        (data.num_tokens == 0 or (data.input_ids.min() >= 0 and data.input_ids.max() < vocab),
         f"input_ids outside [0, {vocab})"),
        ((data.logprob_step, data.logprob_growth) == (manifest.sparsifier.logprob_step,
                                                      manifest.sparsifier.logprob_growth),
         f"log-probs are stored {_encoding(data.logprob_step, data.logprob_growth)} but the plan says "
         f"{_encoding(manifest.sparsifier.logprob_step, manifest.sparsifier.logprob_growth)}"),
    ]
    for good, message in checks:
        if not good:
            return message
    problem = check_hidden_arrays(manifest.hidden, data)
    if problem:
        return problem
    per_example = np.add.reduceat(data.target_mask.astype(np.int64), data.offsets[:-1]) if data.num_examples else []
    if data.num_examples and not np.array_equal(per_example, np.diff(data.target_offsets)):
        return "per-example target counts disagree between target_mask and target_offsets"
    if data.num_targets == 0:
        return None
    logprobs = data.sparse_logprobs.astype(np.float64)
    if manifest.sparsifier.kind == "topk":
        ids = data.sparse_ids
        if ids.min() < 0 or ids.max() >= vocab:
            return f"top-k ids outside [0, {vocab})"
        if np.any(logprobs > 1e-4) or np.any(np.diff(logprobs, axis=1) > 1e-3):
            return "top-k log-probabilities are positive or not sorted in descending order"
        total = np.logaddexp(np.logaddexp.reduce(logprobs, axis=1), data.tail_logmass.astype(np.float64))
        tolerance = 1e-2 if manifest.sparsifier.logprob_dtype == "float16" else 1e-3
        # Each entry within step/2 (kdcache.store.encoding); with a growth the deeper entries' errors are larger in
        # nats but weighted by their (small) probabilities in the mass, within the float16 tolerance above.
        tolerance += (data.logprob_step or 0.0) / 2
        if np.any(np.abs(total) > tolerance):
            return f"top-k mass plus tail mass differs from 1 (worst log-sum {np.abs(total).max():.2e})"
        problem = _check_tail_tempered(data, manifest.sparsifier.tail_temperatures)
        if problem:
            return problem
    else:
        counts = data.sample_counts.astype(np.int64)
        if np.any(counts.sum(axis=1) != k):
            return f"sample counts do not add up to the {k} draws per position"
        if np.any((counts > 0) != (data.sparse_ids >= 0)):
            return "sampled ids and counts disagree on which entries are padding"
    return None


def _encoding(step: float | None, growth: float | None = None) -> str:
    if step is None:
        return "plainly"
    return f"as offsets in steps of {step:g} nats" + ("" if growth is None else f" growing e-fold every {growth:g} nats")


def _check_tail_tempered(data, temperatures) -> str | None:
    """The tail's log-partition tau(1/T) per target: one column per cached temperature, no NaN, and decreasing in
    1/T (tail log-probs are <= 0, so a lower temperature can only shrink each term): tau(1/T) >= tau(1) for T > 1."""
    grid = data.tail_tempered
    if not temperatures:
        return None if grid is None else "tail_tempered is stored but the manifest lists no tail temperatures"
    if grid is None or grid.shape != (data.num_targets, len(temperatures)):
        return f"tail_tempered is missing or not [targets, {len(temperatures)}] (one column per tail temperature)"
    if np.isnan(grid).any():
        return "tail_tempered holds NaN"
    b = np.array([1.0] + [1.0 / t for t in temperatures])
    tau = np.concatenate([data.tail_logmass.astype(np.float64)[:, None], grid.astype(np.float64)], axis=1)
    ordered = tau[:, np.argsort(b)]
    finite = np.isfinite(ordered)
    steps = np.diff(np.where(finite, ordered, 0.0), axis=1)
    if np.any(steps[finite[:, 1:] & finite[:, :-1]] > 1e-3):
        return "tail_tempered is not decreasing in 1/T (a tail log-partition grew as the temperature fell)"
    if np.any(finite.any(axis=1) & ~finite.all(axis=1)):
        return "tail_tempered is -inf at some temperatures but not all of a row's"
    return None


def verify_cache(url: str, storage_options: dict | None = None,
                 on_shard: Callable[[int], None] | None = None) -> VerifyReport:
    """Check the manifest (its grammar and plan hash included), plan.json against it, then each shard: commit record,
    files (size, sha256: kdcache.store.integrity) and arrays; stops at the first bad shard."""
    location = CacheLocation(url, storage_options)
    try:
        manifest = read_manifest(location)
        problem = _check_plan_file(location, manifest)
    except CacheFormatError as exc:
        return VerifyReport(ok=False, problems=[str(exc)])
    if problem:
        return VerifyReport(ok=False, problems=[problem])
    if manifest.hidden is not None and manifest.hidden.basis_file is not None:
        try:
            read_basis(location, manifest.hidden)  # present, its sha256 the plan's, its shape the plan's
        except CacheFormatError as exc:
            return VerifyReport(ok=False, problems=[str(exc)])
    report = VerifyReport(ok=True)
    shards = manifest.shards  # as many as num_shards, each at its index: read_manifest checked
    for key in COUNT_FIELDS:
        total = sum(getattr(entry, key) for entry in shards)
        if getattr(manifest.counts, key) != total:
            return VerifyReport(ok=False, problems=[
                f"manifest counts.{key} is {getattr(manifest.counts, key)} but its shards add up to {total}"])
    for position, entry in enumerate(shards):
        try:
            problem = _check_arrays(manifest, entry, load_shard(location, entry, verify_checksums=True))
        except ShardDamaged as exc:
            problem = exc.problem
        report.shards_checked += 1
        if on_shard is not None:
            on_shard(position)
        if problem:
            report.ok = False
            report.problems.append(f"shard {entry.name}: {problem}")
            return report
    return report


def _check_plan_file(location: CacheLocation, manifest: Manifest) -> str | None:
    """Format 3: plan.json, when present (resumed builds and finalize follow it), is the manifest's plan."""
    if manifest.plan_hash is None or manifest.format_version < PLAN_HASH_VERSION:
        return None
    if not location.exists(location.path(PLAN_FILE)):
        return None  # readers need only the manifest; a copy without the plan cannot be resumed, but reads
    found = plan_hash(read_plan(location))
    if found != manifest.plan_hash:
        return f"{PLAN_FILE} is another plan than the manifest's (plan hash {found}, the manifest's {manifest.plan_hash})"
    return None
