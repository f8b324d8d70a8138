"""Where a cache lives (a local folder or any fsspec URL), the names of the files inside it, and how they are read
and written: small files atomically, the plan by exclusive creation, every read confined to the cache and bounded."""

from __future__ import annotations

import json
import os
import re
import stat
import time
import uuid

import fsspec

from kdcache.errors import CacheFormatError

MANIFEST_FILE = "manifest.json"
PLAN_FILE = "plan.json"
SHARDS_DIR = "shards"
COMMIT_SUFFIX = ".commit.json"

#: The largest JSON file (plan, manifest, commit record) read: far above any real one (a manifest takes about
#: 3 KB per shard), so that a file swapped for /dev/zero or a huge file is refused instead of exhausting memory.
MAX_JSON_BYTES = 1 << 30

_COMMIT_NAME = re.compile(r"^([0-9]{5,})" + re.escape(COMMIT_SUFFIX) + "$")


def shard_name(index: int) -> str:
    return f"{index:05d}"


def committed_index(filename: str) -> int | None:
    """The shard index of a commit record's file name ("00012.commit.json" -> 12), else None."""
    match = _COMMIT_NAME.match(filename)
    if match is None or shard_name(int(match.group(1))) != match.group(1):
        return None
    return int(match.group(1))


class UnreadableFile(CacheFormatError):
    """A file of the cache that is missing, lies outside the cache, is not a regular file, or is larger than allowed.

    `problem` says which, without the cache's URL ("is missing", "has 12 bytes, expected at most 10")."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"{path} {problem}")


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
        return self.path(SHARDS_DIR, shard_name(index) + COMMIT_SUFFIX)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def committed(self, num_shards: int | None = None) -> list[int]:
        """The shards (in [0, num_shards) when given) that have a commit record, from one listing of shards/ (not one
        existence check per shard: a damaged plan's num_shards cannot make this loop)."""
        folder = self.path(SHARDS_DIR)
        if self.is_local:
            names = os.listdir(folder) if os.path.isdir(folder) else []
        else:
            self.fs.invalidate_cache(folder)  # other workers commit while this one runs
            try:
                names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in self.fs.ls(folder, detail=False)]
            except FileNotFoundError:
                names = []
        found = (committed_index(name) for name in names)
        return sorted(i for i in found if i is not None and (num_shards is None or i < num_shards))

    # ---------------------------------------------------------------- reading

    def read_bytes(self, path: str, max_bytes: int) -> bytes:
        """A file's bytes, refused (UnreadableFile) when missing, outside the cache, not a regular file, or longer than
        `max_bytes`; never more than max_bytes + 1 bytes are read."""
        if self.is_local:
            return self._read_local(path, max_bytes)
        try:
            content = self.fs.cat_file(path, start=0, end=max_bytes + 1)
        except FileNotFoundError:
            raise UnreadableFile(path, "is missing") from None
        if len(content) > max_bytes:
            raise UnreadableFile(path, f"has more bytes than the {max_bytes} expected")
        return content

    def read_many(self, paths: list[str], max_bytes: list[int]) -> list[bytes | UnreadableFile]:
        """read_bytes over several files (concurrently on object stores); a failed file gives its UnreadableFile."""
        if self.is_local:
            out: list[bytes | UnreadableFile] = []
            for path, limit in zip(paths, max_bytes):
                try:
                    out.append(self._read_local(path, limit))
                except UnreadableFile as exc:
                    out.append(exc)
            return out
        contents = self.fs.cat_ranges(paths, [0] * len(paths), [limit + 1 for limit in max_bytes], on_error="return")
        out = []
        for path, limit, content in zip(paths, max_bytes, contents):
            if isinstance(content, FileNotFoundError):
                out.append(UnreadableFile(path, "is missing"))
            elif isinstance(content, BaseException):
                out.append(UnreadableFile(path, f"cannot be read ({type(content).__name__}: {content})"))
            elif len(content) > limit:
                out.append(UnreadableFile(path, f"has more bytes than the {limit} expected"))
            else:
                out.append(content)
        return out

    def _read_local(self, path: str, max_bytes: int) -> bytes:
        root = os.path.realpath(self.root)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:  # a symlink (or a name) that leads out of the cache
            raise UnreadableFile(path, "resolves outside the cache")
        try:
            # no following a link swapped in since realpath; no waiting on a FIFO for a writer (it is refused below)
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise UnreadableFile(path, "is missing") from None
        except OSError as exc:
            raise UnreadableFile(path, f"cannot be read ({exc.strerror})") from None
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):  # a device (/dev/zero), a pipe: never read
                raise UnreadableFile(path, "is not a regular file")
            if info.st_size > max_bytes:
                raise UnreadableFile(path, f"has {info.st_size} bytes, more than the {max_bytes} expected")
            content = handle.read(max_bytes + 1)
        if len(content) > max_bytes:  # grew while being read
            raise UnreadableFile(path, f"has more bytes than the {max_bytes} expected")
        return content

    def read_json(self, path: str) -> dict:
        return json.loads(self.read_bytes(path, MAX_JSON_BYTES).decode("utf-8"))

    # ---------------------------------------------------------------- writing

    @staticmethod
    def _payload(value: dict) -> bytes:
        return (json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    def _write_temp(self, path: str, payload: bytes) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        return tmp

    def write_json(self, path: str, value: dict) -> None:
        """Write JSON so a reader sees the old file or the whole new one, never a part."""
        payload = self._payload(value)
        if self.is_local:
            os.replace(self._write_temp(path, payload), path)
        else:
            self.fs.pipe_file(path, payload)

    def create_json(self, path: str, value: dict) -> bool:
        """Write JSON only if `path` does not exist yet; False when it did (then nothing is written).

        Locally this is atomic: the whole file is written under a temporary name and hard-linked into place, which
        fails if the name exists (where hard links are unsupported, O_CREAT | O_EXCL is used: still exclusive, but a
        reader may then see the file half written, see `read_created_json`). On other filesystems it is fsspec's
        `pipe_file(mode="create")`: a conditional put where the implementation has one, else a check then a write,
        which two writers can both pass; callers re-read the file to catch that.
        """
        payload = self._payload(value)
        if not self.is_local:
            try:
                self.fs.pipe_file(path, payload, mode="create")
            except FileExistsError:
                return False
            return True
        tmp = self._write_temp(path, payload)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this filesystem
            return self._create_exclusive(path, payload)
        finally:
            os.unlink(tmp)

    @staticmethod
    def _create_exclusive(path: str, payload: bytes) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def read_created_json(self, path: str, attempts: int = 20) -> dict:
        """read_json of a file that `create_json` may still be writing (only where it falls back to O_EXCL)."""
        for attempt in range(attempts):
            try:
                return self.read_json(path)
            except ValueError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.05)
        raise AssertionError("unreachable")

