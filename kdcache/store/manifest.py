"""The manifest (written last, from committed shards) and the shards' commit records, as typed records; and the
life of a cache's JSON files: the plan is written first and checked by every worker, the manifest when all shards
are committed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

from kdcache.errors import CacheFormatError, IncompatibleCacheError
from kdcache.store import FORMAT_VERSION, READABLE_FORMAT_VERSIONS
from kdcache.store.fingerprint import canonical_json
from kdcache.store.location import MANIFEST_FILE, PLAN_FILE, CacheLocation
from kdcache.store.plan import Plan
from kdcache.store.schema import FieldError, Record, check_at_least

COUNT_FIELDS = ("num_examples", "num_tokens", "num_targets", "skipped_rows")


@dataclass(frozen=True, kw_only=True)
class FileEntry(Record):
    """One file of a committed shard, by its path inside the shard folder."""

    sha256: str  # hex digest of the file's bytes
    bytes: int


@dataclass(frozen=True, kw_only=True)
class CommitRecord(Record):
    """shards/NNNNN.commit.json: written after the shard's files, so a shard exists for readers once this does."""

    shard: int  # the shard's index
    name: str  # the shard's folder under shards/
    num_examples: int
    num_tokens: int
    num_targets: int
    rows: tuple[int, ...]  # [start, stop): the source rows the shard was built from
    skipped_rows: int  # rows in that range that could not become examples (--skip-bad-rows)
    files: dict[str, FileEntry]

    def __post_init__(self) -> None:
        if len(self.rows) != 2:
            raise FieldError("rows", "[start, stop]", list(self.rows))
        for name in ("shard", *COUNT_FIELDS):
            check_at_least(self, name, 0)


@dataclass(frozen=True, kw_only=True)
class Counts(Record):
    """Totals over a cache's shards."""

    num_examples: int
    num_tokens: int
    num_targets: int
    skipped_rows: int

    @classmethod
    def total(cls, shards: Iterable[CommitRecord]) -> Counts:
        shards = list(shards)
        return cls(**{name: sum(getattr(shard, name) for shard in shards) for name in COUNT_FIELDS})


@dataclass(frozen=True, kw_only=True)
class Manifest(Plan):
    """manifest.json: the plan, the totals, and every shard's commit record (shards[i] is shard i's).

    Whether the totals and records agree with each other and with the files is `kdcache cache verify`'s job.
    """

    counts: Counts
    shards: tuple[CommitRecord, ...]

    @classmethod
    def of(cls, plan: Plan, shards: Iterable[CommitRecord]) -> Manifest:
        """The manifest of a plan whose shards are all committed (`shards` in shard order)."""
        shards = tuple(shards)
        return cls(**_plan_fields(plan), counts=Counts.total(shards), shards=shards)

    @property
    def plan(self) -> Plan:
        return Plan(**_plan_fields(self))


def _plan_fields(plan: Plan) -> dict[str, Any]:
    return {f.name: getattr(plan, f.name) for f in dataclasses.fields(Plan)}


R = TypeVar("R", bound=Record)


def _read_record(cls: type[R], location: CacheLocation, path: str, fix: str,
                 check: Callable[[Any], None] | None = None) -> R:
    """Read one of the cache's JSON files as record `cls`; a damaged file is refused in one line saying `fix`.

    `check`, when given, sees the parsed JSON first (to refuse another format version before any field)."""
    try:
        data = location.read_json(path)
    except ValueError as exc:
        raise CacheFormatError(f"{path} is not valid JSON ({exc}); {fix}") from None
    if check is not None:
        check(data)
    try:
        return cls.from_dict(data)
    except CacheFormatError as exc:
        raise CacheFormatError(f"{path} is damaged: {exc}; {fix}") from None


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_differences(a, b, path + "."))
        elif canonical_json(a) != canonical_json(b):
            out.append(f"{path}: cache has {a!r}, this job has {b!r}")
    return out


def write_or_check_plan(location: CacheLocation, plan: Plan) -> None:
    """Record the plan of a new build, or check that a resumed/parallel build follows the same plan."""
    path = location.path(PLAN_FILE)
    new = plan.to_dict()
    if not location.exists(path):
        location.write_json(path, new)
        return
    existing = location.read_json(path)  # compared as JSON, not parsed: any other plan is reported key by key
    if canonical_json(existing) != canonical_json(new):
        if not committed_shards(location, existing.get("num_shards", 0)):
            location.write_json(path, new)  # nothing was written under the old plan: nothing to protect
            return
        diffs = _differences(existing, new)
        raise IncompatibleCacheError(
            f"{location.url} already holds a cache built with other settings; to resume it, use the same settings, "
            "or write to another output. Differences:\n  " + "\n  ".join(diffs[:20])
        )


def read_plan(location: CacheLocation) -> Plan:
    path = location.path(PLAN_FILE)
    if not location.exists(path):
        raise CacheFormatError(f"{location.url} is not a kdcache cache (no {PLAN_FILE} or {MANIFEST_FILE})")
    return _read_record(Plan, location, path, "rebuild the cache into a new output",
                        check=lambda data: _check_format(location, data))


def committed_shards(location: CacheLocation, num_shards: int) -> list[int]:
    return [i for i in range(num_shards) if location.exists(location.commit_path(i))]


def read_commit(location: CacheLocation, index: int) -> CommitRecord:
    """Shard `index`'s commit record (the shard must be committed)."""
    fix = "remove it and re-run the same `kdcache cache build` to write that shard again"
    return _read_record(CommitRecord, location, location.commit_path(index), fix)


def finalize(location: CacheLocation) -> Manifest:
    """Write manifest.json from the plan and every shard's commit record; refuse while shards are missing."""
    plan = read_plan(location)
    done = set(committed_shards(location, plan.num_shards))
    missing = [i for i in range(plan.num_shards) if i not in done]
    if missing:
        shown = ", ".join(str(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise CacheFormatError(
            f"cannot finalize {location.url}: {len(missing)} of {plan.num_shards} shards are not written yet "
            f"(shard {shown}); run the workers that own them (shard i belongs to worker i % num_workers), "
            "then finalize again"
        )
    manifest = Manifest.of(plan, (read_commit(location, i) for i in range(plan.num_shards)))
    location.write_json(location.path(MANIFEST_FILE), manifest.to_dict())
    return manifest


def read_manifest(location: CacheLocation) -> Manifest:
    """The manifest of a finished cache, refusing unknown formats, unfinished builds and damaged files with what
    to do."""
    path = location.path(MANIFEST_FILE)
    if not location.exists(path):
        if location.exists(location.path(PLAN_FILE)):
            plan = read_plan(location)
            done = len(committed_shards(location, plan.num_shards))
            raise CacheFormatError(
                f"{location.url} is an unfinished cache ({done} of {plan.num_shards} shards written, no "
                f"{MANIFEST_FILE}); finish the build (re-run the same `kdcache cache build`), then "
                "`kdcache cache finalize` it"
            )
        raise CacheFormatError(f"{location.url} is not a kdcache cache: it has no {MANIFEST_FILE}")
    fix = f"`kdcache cache finalize {location.url}` writes it again from the plan and the shards' commit records"
    return _read_record(Manifest, location, path, fix, check=lambda data: _check_format(location, data))


def _check_format(location: CacheLocation, data: Any) -> None:
    version = data.get("format_version") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != "kdcache" or version not in READABLE_FORMAT_VERSIONS:
        readable = ", ".join(str(v) for v in READABLE_FORMAT_VERSIONS)
        raise CacheFormatError(
            f"{location.url} has cache format version {version!r}; this kdcache (version "
            f"{__import__('kdcache').__version__}) reads format versions {readable} only (it writes "
            f"{FORMAT_VERSION}). Rebuild the cache with this version, or use the kdcache version that wrote it"
        )
