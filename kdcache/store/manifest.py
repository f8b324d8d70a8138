"""The build plan (written first, shared by all workers) and the manifest (written last, from committed shards)."""

from __future__ import annotations

from kdcache.errors import CacheFormatError, IncompatibleCacheError
from kdcache.store import FORMAT_VERSION
from kdcache.store.fingerprint import canonical_json
from kdcache.store.location import MANIFEST_FILE, PLAN_FILE, CacheLocation


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


def write_or_check_plan(location: CacheLocation, plan: dict) -> None:
    """Record the plan of a new build, or check that a resumed/parallel build follows the same plan."""
    path = location.path(PLAN_FILE)
    if not location.exists(path):
        location.write_json(path, plan)
        return
    existing = location.read_json(path)
    if canonical_json(existing) != canonical_json(plan):
        if not committed_shards(location, existing.get("num_shards", 0)):
            location.write_json(path, plan)  # nothing was written under the old plan: nothing to protect
            return
        diffs = _differences(existing, plan)
        raise IncompatibleCacheError(
            f"{location.url} already holds a cache built with other settings; to resume it, use the same settings, "
            "or write to another output. Differences:\n  " + "\n  ".join(diffs[:20])
        )


def read_plan(location: CacheLocation) -> dict:
    path = location.path(PLAN_FILE)
    if not location.exists(path):
        raise CacheFormatError(f"{location.url} is not a kdcache cache (no {PLAN_FILE} or {MANIFEST_FILE})")
    return location.read_json(path)


def committed_shards(location: CacheLocation, num_shards: int) -> list[int]:
    return [i for i in range(num_shards) if location.exists(location.commit_path(i))]


def finalize(location: CacheLocation) -> dict:
    """Write manifest.json from the plan and every shard's commit record; refuse while shards are missing."""
    plan = read_plan(location)
    num_shards = plan["num_shards"]
    done = set(committed_shards(location, num_shards))
    missing = [i for i in range(num_shards) if i not in done]
    if missing:
        shown = ", ".join(str(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise CacheFormatError(
            f"cannot finalize {location.url}: {len(missing)} of {num_shards} shards are not written yet "
            f"(shard {shown}); run the workers that own them (shard i belongs to worker i % num_workers), "
            "then finalize again"
        )
    shards = [location.read_json(location.commit_path(i)) for i in range(num_shards)]
    counts = {
        key: sum(shard[key] for shard in shards)
        for key in ("num_examples", "num_tokens", "num_targets", "skipped_rows")
    }
    manifest = {**plan, "counts": counts, "shards": shards}
    location.write_json(location.path(MANIFEST_FILE), manifest)
    return manifest


def read_manifest(location: CacheLocation) -> dict:
    """The manifest of a finished cache, refusing unknown formats and unfinished builds with what to do."""
    path = location.path(MANIFEST_FILE)
    if not location.exists(path):
        if location.exists(location.path(PLAN_FILE)):
            plan = read_plan(location)
            done = len(committed_shards(location, plan["num_shards"]))
            raise CacheFormatError(
                f"{location.url} is an unfinished cache ({done} of {plan['num_shards']} shards written, no "
                f"{MANIFEST_FILE}); finish the build (re-run the same `kdcache cache build`), then "
                "`kdcache cache finalize` it"
            )
        raise CacheFormatError(f"{location.url} is not a kdcache cache: it has no {MANIFEST_FILE}")
    try:
        manifest = location.read_json(path)
    except ValueError as exc:
        raise CacheFormatError(f"{path} is not valid JSON ({exc}); the manifest is damaged") from None
    version = manifest.get("format_version")
    if manifest.get("format") != "kdcache" or version != FORMAT_VERSION:
        raise CacheFormatError(
            f"{location.url} has cache format version {version!r}; this kdcache (version "
            f"{__import__('kdcache').__version__}) reads format version {FORMAT_VERSION} only. Rebuild the cache "
            "with this version, or use the kdcache version that wrote it"
        )
    return manifest
