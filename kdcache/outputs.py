"""Outputs that can be written: checked before the work starts, and the OS's write errors as one line each.

`check_output_folder` refuses, before a teacher or student is loaded, an output path that is a file, lies below a
file, is on a read-only filesystem or cannot be written by this user (local paths only: an object store has no
folders to check, and says no on the first write instead). `storage_error` turns an OSError from a write (a full
disk or quota, a read-only filesystem, no permission, a file in the way) into a StorageError that says what
happened, where, and what to do; `storage_errors` does that for a block of code.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from kdcache.errors import BadInputError, StorageError

FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left, disk quota exceeded
READ_ONLY = (errno.EROFS,)
NO_PERMISSION = (errno.EACCES, errno.EPERM)
IN_THE_WAY = (errno.EEXIST, errno.ENOTDIR, errno.EISDIR)  # a file where a folder must go, or the other way round
STORAGE_ERRNOS = FULL + READ_ONLY + NO_PERMISSION + IN_THE_WAY


def local_path(url: str) -> str | None:
    """The local path of an output given as a path or a file:// URL; None for any other URL (an object store)."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url or "::" in url else url


def check_output_folder(url: str, option: str) -> None:
    """Refuse a local output folder that cannot be created or written, naming `option` (e.g. "--output").

    The folder itself may be missing (it is created later); the first of it and its parents that exists must be
    a folder this process can write to.
    """
    path = local_path(url)
    if path is None or not path:
        return
    target = existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        if existing == target:
            raise BadInputError(f"{option} {url} is a file, not a folder: give a folder's path (it is created when "
                                "missing), or move the file away")
        raise BadInputError(f"{option} {url} lies below {existing}, which is a file, not a folder: give a path whose "
                            "parents are folders")
    if not _writable(existing):
        if _read_only_filesystem(existing):
            raise StorageError(f"{option} {url} is on a read-only filesystem ({existing}): write to a writable "
                               "location", errno.EROFS)
        raise StorageError(f"{option} {url} cannot be written: {existing} is not writable by this user (permission "
                           "denied); make it writable, or write to another location", errno.EACCES)


def _writable(folder: str) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _read_only_filesystem(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows)
        return False


Advice = str | Callable[[], str]


def storage_error(exc: OSError, doing: str | None = None, when_full: Advice = "then run the same command again"
                  ) -> StorageError | None:
    """`exc` as one line: what the OS said, while `doing` what, where, and what to do; None when `exc` is not about
    storage (then it stays what it is). `when_full` is the advice for a full disk after "free space there, " (or a
    function that gives it, called only then: e.g. how many shards are complete)."""
    if isinstance(exc, StorageError):
        return exc
    if exc.errno not in STORAGE_ERRNOS:
        return None
    said = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    during = f" while {doing}" if doing else ""
    if exc.errno in FULL:
        fix = f"free space there, {when_full() if callable(when_full) else when_full}"
    elif exc.errno in READ_ONLY:
        fix = "that filesystem is read-only: write to a writable location"
    elif exc.errno in NO_PERMISSION:
        fix = "this user may not use that path: fix its permissions, or use another location"
    else:
        fix = "a file is where a folder must go (or the other way round): move it away, or use another path"
    return StorageError(f"{said}{during}{where}: {fix}", exc.errno)


@contextmanager
def storage_errors(doing: str, when_full: Advice = "then run the same command again") -> Iterator[None]:
    """Turn an OSError about storage raised in the block into a StorageError (see `storage_error`)."""
    try:
        yield
    except OSError as exc:
        error = storage_error(exc, doing, when_full)
        if error is None:
            raise
        if error is exc:
            raise
        raise error from exc
