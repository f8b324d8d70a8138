"""Atomic shard commits: files are written under a temporary name, moved into place, then a commit record is written.

A shard exists for readers only once its commit record does, so a job killed at any moment leaves either a whole
shard or one that the next run (or `verify`) ignores and rebuilds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid

from kdcache.store.encoding import LogprobEncoding
from kdcache.store.fingerprint import file_sha256
from kdcache.store.location import SHARDS_DIR, CacheLocation, shard_name
from kdcache.store.manifest import CommitRecord, check_plan_unchanged
from kdcache.store.shard import ShardData, write_shard_files


def _checksums(local_dir: str) -> dict[str, dict]:
    files = {}
    for folder, _, names in os.walk(local_dir):
        for name in names:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            with open(full, "rb") as handle:
                content = handle.read()
            files[rel] = {"sha256": file_sha256(content), "bytes": len(content)}
    return dict(sorted(files.items()))


def clear_uncommitted(location: CacheLocation, index: int) -> None:
    """Remove the leftovers of an interrupted write of shard `index` (its folder and temporary folders)."""
    if location.exists(location.commit_path(index)):
        return
    if location.exists(location.shard_path(index)):
        location.fs.rm(location.shard_path(index), recursive=True)
    shards = location.path(SHARDS_DIR)
    if location.is_local and os.path.isdir(shards):
        prefix = f".tmp-{shard_name(index)}-"
        for name in os.listdir(shards):
            if name.startswith(prefix):
                shutil.rmtree(os.path.join(shards, name), ignore_errors=True)


def commit_shard(location: CacheLocation, index: int, data: ShardData, info: dict,
                 encoding: LogprobEncoding | None = None) -> CommitRecord:
    """Write shard `index` atomically and return its commit record: the counts, `info` (the build's part:
    `{"rows": [start, stop], "skipped_rows": n, "plan_hash": "sha256:..."}`), and every file's sha256.
    `encoding` is how the top-k log-probs are stored (the plan's, `LogprobEncoding.of(plan.sparsifier)`; default
    plain).

    With a plan hash, plan.json is checked just before the commit record is written, so a worker whose plan was
    replaced under it (only possible on a store without exclusive creation) commits nothing."""
    clear_uncommitted(location, index)
    final = location.shard_path(index)
    if location.is_local:
        os.makedirs(location.path(SHARDS_DIR), exist_ok=True)
        staging = location.path(SHARDS_DIR, f".tmp-{shard_name(index)}-{uuid.uuid4().hex[:8]}")
        os.makedirs(staging)
    else:
        staging = tempfile.mkdtemp(prefix=f"kdcache-{shard_name(index)}-")
    try:
        write_shard_files(staging, data, encoding)
        files = _checksums(staging)
        if location.is_local:
            os.rename(staging, final)
        else:
            location.fs.put(staging.rstrip("/") + "/", final, recursive=True)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
    record = CommitRecord.from_dict({
        "shard": index,
        "name": shard_name(index),
        "num_examples": data.num_examples,
        "num_tokens": data.num_tokens,
        "num_targets": data.num_targets,
        **info,
        "files": files,
    })
    if record.plan_hash is not None:
        check_plan_unchanged(location, record.plan_hash)
    location.write_json(location.commit_path(index), record.to_dict())
    return record
