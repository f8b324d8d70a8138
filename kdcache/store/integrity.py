"""What is checked each time a committed shard is loaded, by a reader (CacheReader: `cache info`, training, diff) and
by `kdcache cache verify` alike.

1. The shard's commit record is on disk and equals the manifest's entry (a shard whose record was removed is not
   read).
2. Each file the record lists is read from the shard's folder, which is named from the shard's index, never from a
   name found in a file; locally the path must resolve inside the cache (no symlink out) to a regular file (no
   device); and no more bytes are read than the record gives (the manifest's grammar has already refused keys
   such as "../x", see kdcache.store.manifest).
3. Unless the caller opts out (`verify_checksums=False`, for caches verified once), each file's sha256 is computed
   over the bytes read and compared with the record.
4. Only those bytes are decoded (kdcache.store.shard.decode_shard_files): what was hashed is what is used.
"""

from __future__ import annotations

from kdcache.errors import CacheFormatError
from kdcache.store.fingerprint import file_sha256
from kdcache.store.location import CacheLocation, UnreadableFile
from kdcache.store.manifest import CommitRecord
from kdcache.store.shard import ShardData, decode_shard_files


class ShardDamaged(CacheFormatError):
    """A committed shard that fails a check; `problem` says which in a few words ("file records.parquet fails its
    sha256 checksum (corrupted)"), for the caller to name the shard and the cache."""

    def __init__(self, problem: str):
        self.problem = problem
        super().__init__(problem)


def check_commit_record(location: CacheLocation, entry: CommitRecord) -> None:
    """The shard's commit record must exist and equal `entry` (the manifest's)."""
    try:
        on_disk = location.read_json(location.commit_path(entry.shard))
    except UnreadableFile as exc:
        if exc.problem == "is missing":
            raise ShardDamaged("has no commit record (it was removed, or never written)") from None
        raise ShardDamaged(f"commit record {exc.problem}") from None
    except ValueError:
        raise ShardDamaged("commit record is not valid JSON") from None
    if on_disk != entry.to_dict():
        raise ShardDamaged("commit record differs from the manifest entry")


def read_shard_bytes(location: CacheLocation, entry: CommitRecord, verify_checksums: bool = True) -> dict[str, bytes]:
    """The bytes of every file `entry` lists, each checked for its size and (unless opted out) its sha256."""
    folder = location.shard_path(entry.shard)
    keys = list(entry.files)
    sizes = [entry.files[key].bytes for key in keys]
    contents = location.read_many([f"{folder}/{key}" for key in keys], sizes)
    out = {}
    for key, size, content in zip(keys, sizes, contents):
        if isinstance(content, UnreadableFile):
            raise ShardDamaged(f"file {key} {content.problem}")
        if len(content) != size:
            raise ShardDamaged(f"file {key} has {len(content)} bytes, expected {size} (truncated or overwritten)")
        if verify_checksums and file_sha256(content) != entry.files[key].sha256:
            raise ShardDamaged(f"file {key} fails its sha256 checksum (corrupted)")
        out[key] = content
    return out


def load_shard(location: CacheLocation, entry: CommitRecord, verify_checksums: bool = True) -> ShardData:
    """A committed shard, after checks 1-3 above; raises ShardDamaged naming the first failed one."""
    check_commit_record(location, entry)
    files = read_shard_bytes(location, entry, verify_checksums)
    try:
        return decode_shard_files(files)
    except Exception as exc:  # zarr/pyarrow errors all mean the same thing to a user: this shard is bad
        raise ShardDamaged(f"cannot be read ({type(exc).__name__}: {exc})") from None
