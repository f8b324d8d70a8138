"""User-facing errors: each says what is wrong and what to do, and the CLI prints it without a traceback."""


class KdcacheError(Exception):
    """Base class for errors caused by the user's input, files or environment (not by a bug in kdcache)."""


class BadInputError(KdcacheError):
    """A data row, file or option that cannot be used as given."""


class CacheFormatError(KdcacheError):
    """A cache that is missing, corrupt, incomplete, or of a format this version cannot read."""


class IncompatibleCacheError(KdcacheError):
    """A cache that is valid but does not fit what it is used with (another tokenizer, another build plan)."""


def friendly_errors(func):
    """CLI decorator: print a KdcacheError as one clear line (no traceback) and exit with status 2."""
    import functools
    import sys

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except KdcacheError as exc:
            import click

            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper
