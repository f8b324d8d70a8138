"""The manifest (written last, from committed shards) and the shards' commit records, as typed records; and the
life of a cache's JSON files: the plan is created first (exclusively) and checked by every worker, each commit
record carries the plan's hash, and the manifest is written when all shards are committed under that plan.

The records check the format's grammar when parsed, so nothing a damaged or hostile file says can point a reader
outside the cache: a shard's `name` is its index's name, a file key is `records.parquet` or `tokens.zarr/...` with
no `..`, and a manifest's shard list agrees with its plan (count, indices, row ranges, plan hash).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

from kdcache.errors import CacheFormatError, IncompatibleCacheError
from kdcache.store import FORMAT_VERSION, READABLE_FORMAT_VERSIONS
from kdcache.store.fingerprint import canonical_json
from kdcache.store.location import MANIFEST_FILE, PLAN_FILE, CacheLocation, UnreadableFile, shard_name
from kdcache.store.plan import PLAN_HASH_VERSION, Plan, plan_hash
from kdcache.store.schema import FieldError, Record, check_at_least, omitted_when_none

COUNT_FIELDS = ("num_examples", "num_tokens", "num_targets", "skipped_rows")

#: A file key of a commit record: records.parquet, or a path under tokens.zarr/ whose parts start with a letter, a
#: digit or "_" (so never "", "." or ".."), each at most 255 characters, at most 16 deep.
FILE_KEY = re.compile(r"records\.parquet|tokens\.zarr(/[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}){1,16}")
REQUIRED_FILES = ("records.parquet", "tokens.zarr/zarr.json")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PLAN_HASH = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True, kw_only=True)
class FileEntry(Record):
    """One file of a committed shard, by its path inside the shard folder."""

    sha256: str  # hex digest of the file's bytes
    bytes: int  # its size: readers read no more than this

    def __post_init__(self) -> None:
        if not _SHA256.fullmatch(self.sha256):
            raise FieldError("sha256", "64 lowercase hex digits", self.sha256)
        check_at_least(self, "bytes", 0)


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
    plan_hash: str | None = omitted_when_none()  # format 3: plan_hash() of the plan the shard was built under

    def __post_init__(self) -> None:
        if len(self.rows) != 2:
            raise FieldError("rows", "[start, stop]", list(self.rows))
        for name in ("shard", *COUNT_FIELDS):
            check_at_least(self, name, 0)
        if self.name != shard_name(self.shard):
            raise FieldError("name", f"{shard_name(self.shard)!r} (the name of shard {self.shard})", self.name)
        for key in self.files:
            if not FILE_KEY.fullmatch(key):
                raise FieldError("files", "keyed by records.parquet or tokens.zarr/<parts> (letters, digits, _ . -; "
                                 "no part starting with '.')", key)
        for key in REQUIRED_FILES:
            if key not in self.files:
                raise FieldError("files", f"a mapping that lists {key}", sorted(self.files))
        if self.plan_hash is not None and not _PLAN_HASH.fullmatch(self.plan_hash):
            raise FieldError("plan_hash", "'sha256:' and 64 lowercase hex digits", self.plan_hash)


def commit_mismatch(plan: Plan, index: int, record: CommitRecord, expected_hash: str | None) -> FieldError | None:
    """Why `record` cannot be shard `index` of `plan` (built under the plan whose hash is `expected_hash`), or None."""
    if record.shard != index:
        return FieldError("shard", str(index), record.shard)
    if tuple(record.rows) != plan.shard_rows(index):
        rows = list(plan.shard_rows(index))
        return FieldError("rows", f"{rows} (shard {index} of {plan.dataset.num_rows} rows in shards of "
                          f"{plan.shard_size})", list(record.rows))
    if record.plan_hash != expected_hash:
        return FieldError("plan_hash", f"{expected_hash} (the plan's)", record.plan_hash)
    return None


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
    plan_hash: str | None = omitted_when_none()  # format 3: plan_hash(self.plan), also in every commit record

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.shards) != self.num_shards:  # before anything indexes shards by a plan's shard number
            raise CacheFormatError(f"shards lists {len(self.shards)} commit records but num_shards is {self.num_shards}")
        if self.format_version >= PLAN_HASH_VERSION:
            expected = plan_hash(self.plan)
            if self.plan_hash != expected:
                raise FieldError("plan_hash", f"{expected} (the hash of this manifest's plan)", self.plan_hash)
        for index, record in enumerate(self.shards):
            mismatch = commit_mismatch(self, index, record, self.plan_hash)
            if mismatch is not None:
                raise mismatch.under(f"shards[{index}]")

    @classmethod
    def of(cls, plan: Plan, shards: Iterable[CommitRecord]) -> Manifest:
        """The manifest of a plan whose shards are all committed (`shards` in shard order)."""
        shards = tuple(shards)
        hashed = plan_hash(plan) if plan.format_version >= PLAN_HASH_VERSION else None
        return cls(**_plan_fields(plan), counts=Counts.total(shards), shards=shards, plan_hash=hashed)

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
    except UnreadableFile as exc:
        raise CacheFormatError(f"{exc}; {fix}") from None
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


def write_or_check_plan(location: CacheLocation, plan: Plan) -> str:
    """Record the plan of a new build, or check that a resumed or parallel build follows the same plan; returns the
    plan's hash, which every commit record of this build carries.

    plan.json is created exclusively and never replaced (CacheLocation.create_json), then read back and compared:
    of workers started together with different settings, one creates it and every other is refused with the
    differences listed, whichever wins the race.
    """
    path = location.path(PLAN_FILE)
    new = plan.to_dict()
    if not location.exists(path):
        location.create_json(path, new)  # False when another worker got there first: its plan is compared below
    existing = location.read_created_json(path)  # compared as JSON, not parsed: any other plan is reported key by key
    if canonical_json(existing) != canonical_json(new):
        diffs = _differences(existing, new) if isinstance(existing, dict) else [f"{PLAN_FILE} is not a mapping"]
        hint = ""
        if not location.committed():
            hint = (f"\n(no shard is committed under that plan yet: if no other worker is writing to this output, "
                    f"remove {path} to start it over with these settings)")
        raise IncompatibleCacheError(
            f"{location.url} already holds a cache built with other settings; to resume it or to add a worker, use "
            "the same settings, or write to another output. Differences:\n  " + "\n  ".join(diffs[:20]) + hint
        )
    return plan_hash(plan)


def check_plan_unchanged(location: CacheLocation, expected_hash: str) -> None:
    """Refuse to commit under a plan.json that is no longer this build's (a worker with other settings replaced it,
    which only a store without exclusive creation allows)."""
    found = plan_hash(read_plan(location))
    if found != expected_hash:
        raise IncompatibleCacheError(
            f"{location.path(PLAN_FILE)} changed while this build ran (its plan hash is now {found}, this build's is "
            f"{expected_hash}): another worker with other settings wrote to {location.url}. Run every worker with "
            "the same settings, or write to another output"
        )


def read_plan(location: CacheLocation) -> Plan:
    path = location.path(PLAN_FILE)
    if not location.exists(path):
        raise CacheFormatError(f"{location.url} is not a kdcache cache (no {PLAN_FILE} or {MANIFEST_FILE})")
    return _read_record(Plan, location, path, "rebuild the cache into a new output",
                        check=lambda data: _check_format(location, data))


def committed_shards(location: CacheLocation, num_shards: int) -> list[int]:
    return location.committed(num_shards)


def read_commit(location: CacheLocation, index: int) -> CommitRecord:
    """Shard `index`'s commit record (the shard must be committed)."""
    return _read_record(CommitRecord, location, location.commit_path(index), _REWRITE_SHARD)


_REWRITE_SHARD = "remove it and re-run the same `kdcache cache build` to write that shard again"


def _shown(indices: Iterable[int], total: int) -> str:
    return ", ".join(str(i) for i in indices) + (" ..." if total > 10 else "")


def finalize(location: CacheLocation) -> Manifest:
    """Write manifest.json from the plan and every shard's commit record; refuse while shards are missing, and
    shards committed under another plan (format 3: their plan hash is not plan.json's)."""
    plan = read_plan(location)
    done = set(location.committed(plan.num_shards))  # one listing, whatever num_shards says
    if len(done) < plan.num_shards:
        missing = plan.num_shards - len(done)
        first = itertools.islice((i for i in range(plan.num_shards) if i not in done), 10)
        raise CacheFormatError(
            f"cannot finalize {location.url}: {missing} of {plan.num_shards} shards are not written yet "
            f"(shard {_shown(first, missing)}); run the workers that own them (shard i belongs to worker "
            "i % num_workers), then finalize again"
        )
    expected = plan_hash(plan) if plan.format_version >= PLAN_HASH_VERSION else None
    records = [read_commit(location, i) for i in range(plan.num_shards)]
    foreign = [r.shard for r in records if r.plan_hash != expected]
    if foreign:
        others = sorted({str(records[i].plan_hash) for i in foreign})
        raise IncompatibleCacheError(
            f"cannot finalize {location.url}: {len(foreign)} shards were written under another plan than its "
            f"{PLAN_FILE} (shard {_shown(foreign[:10], len(foreign))}; their plan hash {', '.join(others[:3])}, "
            f"{PLAN_FILE}'s {expected}): a worker ran with other settings. Remove those shards' commit records "
            "(shards/NNNNN.commit.json) and re-run their workers with this cache's settings, then finalize again"
        )
    for index, record in enumerate(records):
        mismatch = commit_mismatch(plan, index, record, expected)
        if mismatch is not None:
            raise CacheFormatError(f"{location.commit_path(index)} is damaged: {mismatch}; {_REWRITE_SHARD}")
    manifest = Manifest.of(plan, records)
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
