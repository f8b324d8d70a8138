"""Where two caches of the same data differ (teachers, backends, dtypes, quantizations, k): `kdcache cache diff`.

Examples are matched by their source row index (`example_index`, with `sample_index` when the teacher wrote several
answers per row), wherever their shards put them. For each example
present in both, the token ids and target masks must be equal (otherwise the example is counted as a token
mismatch and not compared further); then, target row by target row:

* top-1: the first cached id (the teacher's argmax for `topk`, the most-drawn id for `sample`) is the same;
* top-k overlap: |ids_A ∩ ids_B| / k (valid ids only);
* log-probability difference: max |logprob_A(t) - logprob_B(t)| over the ids t present in both rows;
* tail difference (`topk`): max |tail_A - tail_B|.

Caches with different k are compared on the first min(k) entries, the rest being folded exactly into the tail
(logaddexp), so a k = 64 cache can be checked against a k = 16 one. Caches built with different tokenizers are not
compared entry by entry: their ids mean different tokens.
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np

from kdcache.store.manifest import Manifest
from kdcache.store.reader import CacheReader, CachedExample
from kdcache.store.schema import dump_value

_SETTINGS = ("teacher", "tokenizer", "dataset", "template", "sparsifier", "generate", "max_length")


@dataclass
class DiffReport:
    a: str
    b: str
    settings: list[str] = field(default_factory=list)  # manifest differences, as "key: A -> B"
    comparable: bool = True  # False when the tokenizers differ
    kind: str = "topk"
    k: int = 0  # entries compared per row (min of both caches' k)
    examples_a: int = 0
    examples_b: int = 0
    examples_compared: int = 0
    only_in_a: list = field(default_factory=list)  # example indices, "row#answer" past answer 0 (first 20)
    only_in_b: list = field(default_factory=list)
    num_only_in_a: int = 0
    num_only_in_b: int = 0
    token_mismatches: int = 0  # examples whose input_ids or target_mask differ
    first_token_mismatches: list = field(default_factory=list)
    targets_compared: int = 0
    top1_disagreements: int = 0
    first_top1_disagreements: list[dict] = field(default_factory=list)
    mean_topk_overlap: float | None = None
    max_logprob_diff: float = 0.0
    max_logprob_diff_at: dict | None = None
    mean_logprob_diff: float | None = None
    max_tail_diff: float | None = None
    identical: bool = True  # every compared array equal bit for bit

    @property
    def top1_agreement(self) -> float | None:
        return None if not self.targets_compared else 1 - self.top1_disagreements / self.targets_compared

    @property
    def nothing_compared(self) -> bool:
        """No target row was compared (no example in both caches with the same tokens, or none with targets): the
        zeros of the other figures then say nothing about agreement."""
        return self.comparable and self.targets_compared == 0

    def agrees(self, atol: float = 1e-3) -> bool:
        """Same examples and tokens, same top-1 everywhere, log-probabilities (and tails) within `atol`, and at
        least one target row compared."""
        return (
            self.comparable
            and not self.nothing_compared
            and self.num_only_in_a == 0
            and self.num_only_in_b == 0
            and self.token_mismatches == 0
            and self.top1_disagreements == 0
            and self.max_logprob_diff <= atol
            and (self.max_tail_diff is None or self.max_tail_diff <= atol)
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "top1_agreement": self.top1_agreement, "nothing_compared": self.nothing_compared}

    def _why_nothing_compared(self) -> str:
        if not self.examples_compared:
            return "no example is in both caches (they are matched by source row index)"
        if self.token_mismatches == self.examples_compared:
            return "every example in both caches has other tokens or another target mask in each"
        return "the examples in both caches have no target rows"

    def summary(self, atol: float = 1e-3) -> str:
        def fmt(value, spec=".3e"):
            return "n/a" if value is None else format(value, spec)

        lines = [f"A  {self.a}", f"B  {self.b}"]
        if self.settings:
            lines.append("settings that differ:")
            lines += [f"  {line}" for line in self.settings]
        if not self.comparable:
            lines.append("not compared entry by entry: the caches use different tokenizers")
            return "\n".join(lines)
        lines += [
            f"examples        A {self.examples_a}, B {self.examples_b}, compared {self.examples_compared}"
            + (f", only in A {self.num_only_in_a} (e.g. {self.only_in_a[:5]})" if self.num_only_in_a else "")
            + (f", only in B {self.num_only_in_b} (e.g. {self.only_in_b[:5]})" if self.num_only_in_b else ""),
            f"token mismatch  {self.token_mismatches} examples"
            + (f" (e.g. example {self.first_token_mismatches[:5]})" if self.token_mismatches else ""),
        ]
        if self.nothing_compared:
            lines += [f"targets         0 compared: {self._why_nothing_compared()}",
                      "verdict         NOTHING COMPARED: no top-1, top-k or log-probability figure could be measured"]
            return "\n".join(lines)
        lines += [
            f"targets         {self.targets_compared} compared ({self.kind}, first {self.k} entries)",
            f"top-1 agreement {fmt(self.top1_agreement, '.6f')} ({self.top1_disagreements} rows differ)",
            f"top-k overlap   {fmt(self.mean_topk_overlap, '.4f')} (mean |A ∩ B| / k)",
            f"logprob diff    max {fmt(self.max_logprob_diff)}, mean {fmt(self.mean_logprob_diff)} (ids in both rows)",
        ]
        if self.max_logprob_diff_at:
            lines.append(f"  worst at       {self.max_logprob_diff_at}")
        if self.max_tail_diff is not None:
            lines.append(f"tail diff       max {fmt(self.max_tail_diff)}")
        for row in self.first_top1_disagreements[:5]:
            lines.append(f"  top-1 differs  {row}")
        verdict = "identical" if self.identical and self.agrees(atol) else (
            f"agree (same top-1, within {atol:g})" if self.agrees(atol) else f"DIFFER (beyond top-1 / {atol:g})")
        lines.append(f"verdict         {verdict}")
        return "\n".join(lines)


def _flatten(prefix: str, value) -> dict:
    if isinstance(value, dict):
        out = {}
        for key, sub in value.items():
            out.update(_flatten(f"{prefix}.{key}" if prefix else key, sub))
        return out
    return {prefix: value}


def _setting_differences(ma: Manifest, mb: Manifest) -> list[str]:
    fa = _flatten("", {key: dump_value(getattr(ma, key)) for key in _SETTINGS})
    fb = _flatten("", {key: dump_value(getattr(mb, key)) for key in _SETTINGS})
    keys = sorted(set(fa) | set(fb))
    return [f"{key}: {fa.get(key)!r} -> {fb.get(key)!r}" for key in keys if fa.get(key) != fb.get(key)]


class _ShardIndex:
    """Find a cache's example by source row index, reading (and keeping) one shard at a time."""

    def __init__(self, reader: CacheReader):
        self.reader = reader
        self.starts = [entry.rows[0] for entry in reader.manifest.shards]
        self.current: int | None = None
        self.examples: dict[tuple[int, int], CachedExample] = {}

    def get(self, key: tuple[int, int]) -> CachedExample | None:
        shard = bisect.bisect_right(self.starts, key[0]) - 1
        if shard < 0:
            return None
        if shard != self.current:
            self.examples = {e.key: e for e in self.reader.iter_examples([shard])}
            self.current = shard
        return self.examples.get(key)

    def all_keys(self) -> set[tuple[int, int]]:
        out = set()
        for shard in range(self.reader.num_shards):
            records = self.reader.read_shard(shard).records
            samples = (records.column("sample_index").to_pylist() if "sample_index" in records.column_names
                       else [0] * records.num_rows)
            out.update(zip((int(v) for v in records.column("example_index").to_pylist()), map(int, samples)))
        return out


def _name(key: tuple[int, int]):
    """An example as reports show it: the row index, or "row#answer" for a teacher's second and later answers."""
    return key[0] if key[1] == 0 else f"{key[0]}#{key[1]}"


class _Rows(NamedTuple):
    """One example's target rows cut to the k entries compared: ids, log-probabilities, tails (None without)."""

    ids: np.ndarray  # [n, k] int64, -1 where a row has fewer entries
    logprobs: np.ndarray  # [n, k] float64
    tail: np.ndarray | None  # [n] float64, with the entries past k folded in


def _truncate(example: CachedExample, k: int, kind: str) -> _Rows:
    ids = example.sparse_ids.astype(np.int64)
    logprobs = example.sparse_logprobs.astype(np.float64)
    tail = None
    if kind == "topk" and example.tail_logmass is not None:
        tail = example.tail_logmass.astype(np.float64)
        if ids.shape[1] > k:
            tail = np.logaddexp.reduce(np.concatenate([tail[:, None], logprobs[:, k:]], axis=1), axis=1)
    return _Rows(ids[:, :k], logprobs[:, :k], tail)


@dataclass
class _Sums:
    """Running sums over the compared rows, turned into the report's means at the end."""

    overlap: float = 0.0  # sum over rows of |A ∩ B| / k
    diff: float = 0.0  # sum of |logprob_A - logprob_B| over ids in both rows
    diff_count: int = 0
    tail_max: float | None = None  # None when tails are not compared


def diff_caches(a: str, b: str, max_examples: int = 10) -> DiffReport:
    """Compare two finished caches (paths or fsspec URLs); see the module docstring for what is measured."""
    ra, rb = CacheReader(a), CacheReader(b)
    report = _start_report(a, b, ra.manifest, rb.manifest)
    if not report.comparable:
        return report
    kind = _compared_kind(ra.manifest, rb.manifest)
    sums = _Sums(tail_max=0.0 if kind == "topk" else None)
    index_b = _ShardIndex(rb)
    seen_b: set[tuple[int, int]] = set()
    for example in ra.iter_examples():
        other = index_b.get(example.key)
        if other is None:
            report.num_only_in_a += 1
            if len(report.only_in_a) < 20:
                report.only_in_a.append(_name(example.key))
            continue
        seen_b.add(example.key)
        _compare_example(report, sums, example, other, kind, max_examples)
    _finish(report, sums, index_b, seen_b)
    return report


def _start_report(a: str, b: str, ma: Manifest, mb: Manifest) -> DiffReport:
    """The report before any example is read: settings that differ, counts, k; not comparable across tokenizers."""
    report = DiffReport(a=a, b=b, settings=_setting_differences(ma, mb))
    report.examples_a, report.examples_b = ma.counts.num_examples, mb.counts.num_examples
    if ma.tokenizer.fingerprint != mb.tokenizer.fingerprint:
        report.comparable = False
        report.identical = False
        return report
    kind_a, kind_b = ma.sparsifier.kind, mb.sparsifier.kind
    report.kind = kind_a if kind_a == kind_b else f"{kind_a}/{kind_b}"
    report.k = min(ma.sparsifier.k, mb.sparsifier.k)
    if report.settings:
        report.identical = False
    return report


def _compared_kind(ma: Manifest, mb: Manifest) -> str:
    """The sparsifier kind rows are compared as: mixed kinds are compared as `sample` (no tails)."""
    return ma.sparsifier.kind if ma.sparsifier.kind == mb.sparsifier.kind else "sample"


def _compare_example(report: DiffReport, sums: _Sums, example: CachedExample, other: CachedExample, kind: str,
                     max_examples: int) -> None:
    """One example present in both caches: its tokens, then its target rows (top-1, entries, tails)."""
    report.examples_compared += 1
    if not (np.array_equal(example.input_ids, other.input_ids)
            and np.array_equal(example.target_mask, other.target_mask)):
        report.token_mismatches += 1
        report.identical = False
        if len(report.first_token_mismatches) < 20:
            report.first_token_mismatches.append(_name(example.key))
        return
    rows_a, rows_b = _truncate(example, report.k, kind), _truncate(other, report.k, kind)
    if report.identical:
        report.identical = _bitwise_equal(example, other)
    n = rows_a.ids.shape[0]
    report.targets_compared += n
    if n == 0:
        return
    positions = np.nonzero(example.target_mask)[0]
    _compare_top1(report, example, rows_a, rows_b, positions, max_examples)
    _compare_entries(report, sums, example.key, rows_a, rows_b, positions)
    if sums.tail_max is not None and rows_a.tail is not None and rows_b.tail is not None:
        sums.tail_max = max(sums.tail_max, _max_tail_diff(rows_a.tail, rows_b.tail))


def _bitwise_equal(example: CachedExample, other: CachedExample) -> bool:
    """Every cached array of the two examples equal bit for bit."""
    return bool(np.array_equal(example.sparse_ids, other.sparse_ids)
                and np.array_equal(example.sparse_logprobs, other.sparse_logprobs)
                and np.array_equal(example.tail_logmass, other.tail_logmass)
                and np.array_equal(example.sample_counts, other.sample_counts))


def _compare_top1(report: DiffReport, example: CachedExample, a: _Rows, b: _Rows, positions: np.ndarray,
                  max_examples: int) -> None:
    """Count the rows whose first cached id differs, and keep the first `max_examples` of them."""
    top1_differs = np.nonzero(a.ids[:, 0] != b.ids[:, 0])[0]
    report.top1_disagreements += len(top1_differs)
    for row in top1_differs:
        if len(report.first_top1_disagreements) >= max_examples:
            break
        report.first_top1_disagreements.append({
            "example": _name(example.key), "id": example.record.get("id"), "position": int(positions[row]),
            "a": [int(a.ids[row, 0]), round(float(a.logprobs[row, 0]), 6)],
            "b": [int(b.ids[row, 0]), round(float(b.logprobs[row, 0]), 6)],
        })


def _compare_entries(report: DiffReport, sums: _Sums, key: tuple[int, int], a: _Rows, b: _Rows,
                     positions: np.ndarray) -> None:
    """Top-k overlap and log-probability differences over the ids both rows hold; the worst one is kept."""
    valid_a, valid_b = a.ids >= 0, b.ids >= 0
    match = (a.ids[:, :, None] == b.ids[:, None, :]) & valid_a[:, :, None] & valid_b[:, None, :]  # [n, k, k]
    common = match.any(axis=2)  # entries of A whose id is in B's row
    counts = np.maximum(np.minimum(valid_a.sum(1), valid_b.sum(1)), 1)
    sums.overlap += float((common.sum(1) / counts).sum())
    partner = match.argmax(axis=2)
    delta = np.abs(a.logprobs - np.take_along_axis(b.logprobs, partner, axis=1))
    delta = np.where(common, delta, 0.0)
    if not common.any():
        return
    sums.diff += float(delta[common].sum())
    sums.diff_count += int(common.sum())
    worst = np.unravel_index(int(np.argmax(delta)), delta.shape)
    if delta[worst] > report.max_logprob_diff:
        report.max_logprob_diff = float(delta[worst])
        report.max_logprob_diff_at = {
            "example": _name(key), "position": int(positions[worst[0]]), "token": int(a.ids[worst]),
            "a": float(a.logprobs[worst]), "b": float(b.logprobs[worst[0], partner[worst]]),
        }


def _max_tail_diff(tail_a: np.ndarray, tail_b: np.ndarray) -> float:
    """max |tail_A - tail_B|, where two empty tails (-inf) agree and a NaN counts as infinitely far."""
    both_inf = np.isneginf(tail_a) & np.isneginf(tail_b)
    with np.errstate(invalid="ignore"):
        tail_delta = np.where(both_inf, 0.0, np.abs(tail_a - tail_b))
    return float(np.nan_to_num(tail_delta, nan=np.inf, posinf=np.inf).max())


def _finish(report: DiffReport, sums: _Sums, index_b: _ShardIndex, seen_b: set[tuple[int, int]]) -> None:
    """What only B holds, and the means."""
    report.num_only_in_b = report.examples_b - len(seen_b)
    if report.num_only_in_b:  # rare: only then read B's records again to name them
        report.only_in_b = [_name(key) for key in sorted(index_b.all_keys() - seen_b)[:20]]
    if report.num_only_in_a or report.num_only_in_b:
        report.identical = False
    if report.targets_compared:
        report.mean_topk_overlap = sums.overlap / report.targets_compared
    report.mean_logprob_diff = sums.diff / sums.diff_count if sums.diff_count else None
    report.max_tail_diff = sums.tail_max
