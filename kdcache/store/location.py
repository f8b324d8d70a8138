"""Where a cache lives (a local folder or any fsspec URL) and the names of the files inside it."""

from __future__ import annotations

import json
import os
import uuid

import fsspec

from kdcache.store.fingerprint import canonical_json

MANIFEST_FILE = "manifest.json"
PLAN_FILE = "plan.json"
SHARDS_DIR = "shards"


def shard_name(index: int) -> str:
    return f"{index:05d}"


class CacheLocation:
    """A cache root on some filesystem, with atomic small-file writes (rename locally, one PUT on object stores)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def path(self, *parts: str) -> str:
        """A path inside the cache, in the filesystem's own terms."""
        return "/".join([self.root, *parts])

    def child_url(self, *parts: str) -> str:
        """A URL (or local path) inside the cache, for libraries that open by URL (zarr, pyarrow)."""
        return self.path(*parts) if self.is_local else "/".join([self.url, *parts])

    def shard_path(self, index: int) -> str:
        return self.path(SHARDS_DIR, shard_name(index))

    def commit_path(self, index: int) -> str:
        return self.path(SHARDS_DIR, shard_name(index) + ".commit.json")

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def read_json(self, path: str) -> dict:
        with self.fs.open(path, "rb") as handle:
            return json.loads(handle.read().decode("utf-8"))

    def write_json(self, path: str, value: dict) -> None:
        """Write JSON so a reader sees the old file or the whole new one, never a part."""
        payload = (json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, payload)

    def same_json(self, path: str, value: dict) -> bool:
        return canonical_json(self.read_json(path)) == canonical_json(json.loads(json.dumps(value)))
