"""User-facing errors: each says what is wrong and what to do, and the CLI prints it without a traceback."""


class KdcacheError(Exception):
    """Base class for errors caused by the user's input, files or environment (not by a bug in kdcache)."""


class BadInputError(KdcacheError):
    """A data row, file or option that cannot be used as given."""


class CacheFormatError(KdcacheError):
    """A cache that is missing, corrupt, incomplete, or of a format this version cannot read."""


class IncompatibleCacheError(KdcacheError):
    """A cache that is valid but does not fit what it is used with (another tokenizer, another build plan)."""


class StorageError(KdcacheError, OSError):
    """An output that cannot be written: a full disk or quota, a read-only filesystem, no permission, a file in the
    way. Also an OSError (with the original `errno`), so code that catches OSError still does."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class OutputBusyError(KdcacheError):
    """An output that another process is writing right now (a shard claimed by another build)."""


def friendly_errors(func):
    """CLI decorator: print a KdcacheError as one clear line (no traceback) and exit with status 2.

    An OSError that says the output cannot be written (a full disk, a read-only filesystem, no permission, a file
    in the way) and that no command turned into a StorageError with its own advice is printed the same way."""
    import functools
    import sys

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (KdcacheError, OSError) as exc:
            import click

            from kdcache.outputs import storage_error

            if not isinstance(exc, KdcacheError):
                exc = storage_error(exc)
                if exc is None:
                    raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper
