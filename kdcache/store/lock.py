"""Claims on the shards a build is writing, so that two builds never write the same shard at once.

Locally a claim on shard i is an exclusive `flock` on ``shards/.lock-NNNNN``, taken without waiting: a second build
that wants the shard (the same --worker-index started twice, or overlapping worker layouts) is refused, naming the
process that holds it. The OS drops the lock when its holder exits or is killed, so a leftover lock file blocks
nobody; the file is removed once its shard is committed. A build claims its next shard before it lets go of the
last one, so a second build started at any moment meets a claimed shard before it can write anything.

On object stores there is no lock: fsspec has no portable exclusive create, so claims are no-ops there and two
builds of the same shard both write it. A shard's files depend only on the plan and its rows, and its commit record
is written last, so two such builds with the same settings write the same bytes; it is still wasted work, and the
job launcher must run each --worker-index once.
"""

from __future__ import annotations

import os
import socket

from kdcache.errors import OutputBusyError
from kdcache.store.location import SHARDS_DIR, CacheLocation, shard_name

try:
    import fcntl
except ImportError:  # Windows: no flock, no claims
    fcntl = None


def lock_path(location: CacheLocation, index: int) -> str:
    return location.path(SHARDS_DIR, f".lock-{shard_name(index)}")


class ShardClaims:
    """The shards this process has claimed in one cache (see the module docstring); use as a context manager."""

    def __init__(self, location: CacheLocation):
        self.location = location
        self.enabled = location.is_local and fcntl is not None
        self.held: dict[int, int] = {}  # shard index -> file descriptor of its lock file

    def claim(self, index: int) -> None:
        """Claim shard `index`, or raise OutputBusyError when another process holds it."""
        if not self.enabled or index in self.held:
            return
        path = lock_path(self.location, index)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise OutputBusyError(
                f"shard {index} of {self.location.url} is being written by {holder}: another build with the same "
                "--worker-index (or --num-workers layout) is running on this output. Let it finish, or stop it "
                "and run this command again (it resumes); give each worker its own --worker-index"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        self.held[index] = fd

    def release(self, index: int, committed: bool) -> None:
        """Let go of shard `index`; its lock file is removed once the shard is committed (else it stays, unlocked)."""
        fd = self.held.pop(index, None)
        if fd is None:
            return
        if committed:
            try:
                os.unlink(lock_path(self.location, index))
            except FileNotFoundError:
                pass
        os.close(fd)

    def close(self) -> None:
        for index in list(self.held):
            self.release(index, committed=False)

    def __enter__(self) -> ShardClaims:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
