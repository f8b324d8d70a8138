"""Read example rows from JSONL, CSV, Parquet files (or globs of them), `datasets` folders and hub datasets (local
paths or fsspec URLs; kdcache.data.hub for the `datasets` routes)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Any

import fsspec

from kdcache.config import DataConfig
from kdcache.errors import BadInputError


@dataclass(frozen=True)
class Row:
    """One raw input row and where it came from (file and 1-based row/line number), for error messages."""

    source: str
    row: int
    fields: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.source}, row {self.row}"


class BadRow(Exception):
    """A row that cannot become an example; carries the file, row and field for the report."""

    def __init__(self, row: Row, reason: str, field: str | None = None):
        self.row = row
        self.reason = reason
        self.field = field
        where = f"{row.where}" + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {reason}")


_SUFFIXES = ((".jsonl", "jsonl"), (".json", "jsonl"), (".csv", "csv"), (".parquet", "parquet"))
_GLOB_CHARS = set("*?[")


def _suffix_format(path: str) -> str | None:
    lowered = path.split("#", 1)[0].rstrip("/").lower()
    return next((fmt for suffix, fmt in _SUFFIXES if lowered.endswith(suffix)), None)


def detect_format(path: str) -> str:
    """The format a path implies: its suffix; a `save_to_disk` folder is "datasets"; another folder, or a name
    spelled like a hub id that is not a local path, is "hub" (read with `datasets.load_dataset`)."""
    from kdcache.data.hub import is_saved_folder, looks_like_hub_id

    fmt = _suffix_format(path)
    if fmt is not None:
        return fmt
    base = path.split("#", 1)[0].rstrip("/")
    fs, fs_path = fsspec.core.url_to_fs(base)
    if fs.isdir(fs_path):
        return "datasets" if is_saved_folder(fs, fs_path) else "hub"
    if not fs.exists(fs_path) and looks_like_hub_id(path):
        return "hub"
    raise BadInputError(
        f"cannot tell the format of {path}: name it .jsonl, .csv or .parquet, pass a folder or a hub dataset id, "
        "or set data.format"
    )


def expand_glob(path: str) -> list[str]:
    """The files a glob pattern (`data/*.parquet`, `s3://bucket/part-*.jsonl`) matches, sorted; a path without
    glob characters is returned as it is."""
    if not _GLOB_CHARS & set(path):
        return [path]
    fs, pattern = fsspec.core.url_to_fs(path)
    matches = sorted(fs.glob(pattern))
    if not matches:
        raise BadInputError(f"{path} matches no file: check the pattern (globs are expanded by fsspec)")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return [match if protocol in ("file", "local") else f"{protocol}://{match}" for match in matches]


def _not_utf8(exc: UnicodeDecodeError) -> str:
    return (f"is not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at byte {exc.start + 1} of the line); "
            "re-encode the file as UTF-8")


def _read_jsonl(path: str, bad: list[BadRow]) -> list[Row]:
    rows = []
    with fsspec.open(path, "rb") as handle:  # bytes, decoded line by line: a line that is not UTF-8 is a bad row
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad.append(BadRow(Row(path, number, {}), f"line {_not_utf8(exc)}"))
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.append(BadRow(Row(path, number, {}), f"line does not parse as JSON ({exc.msg})"))
                continue
            if not isinstance(value, dict):
                bad.append(BadRow(Row(path, number, {}), "line is JSON but not an object"))
                continue
            rows.append(Row(path, number, value))
    return rows


def _read_csv(path: str, bad: list[BadRow]) -> list[Row]:
    rows = []
    with fsspec.open(path, "rb") as handle:
        # Bytes that are not UTF-8 become lone surrogates, so the rows they are in can be found and skipped alone.
        text = handle.read().decode("utf-8", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return rows
    if _surrogate(header) is not None:
        raise BadInputError(f"the header of {path} (its first line) is not valid UTF-8: re-encode the file as UTF-8")
    for number, values in enumerate(reader, start=2):
        if not values:
            continue
        column = _surrogate(values)
        if column is not None:
            byte = ord(values[column][_surrogate_at(values[column])]) - 0xDC00
            bad.append(BadRow(Row(path, number, {}), f"is not valid UTF-8 (byte 0x{byte:02x} in column "
                              f"'{header[column] if column < len(header) else column + 1}'); re-encode the file "
                              "as UTF-8"))
            continue
        if len(values) != len(header):
            bad.append(
                BadRow(Row(path, number, {}), f"has {len(values)} columns but the header has {len(header)}")
            )
            continue
        rows.append(Row(path, number, dict(zip(header, values))))
    return rows


def _surrogate_at(value: str) -> int:
    return next((i for i, char in enumerate(value) if "\udc80" <= char <= "\udcff"), -1)


def _surrogate(values: list[str]) -> int | None:
    """The index of the first value holding a byte that was not UTF-8 (see `_read_csv`), or None."""
    return next((i for i, value in enumerate(values) if _surrogate_at(value) >= 0), None)


def _read_parquet(path: str) -> list[Row]:
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as handle:
        table = pq.read_table(handle)
    return [Row(path, number, value) for number, value in enumerate(table.to_pylist(), start=1)]


def _read_file(path: str, fmt: str, bad: list[BadRow]) -> list[Row]:
    fs, fs_path = fsspec.core.url_to_fs(path.split("#", 1)[0])
    if not fs.exists(fs_path):
        raise BadInputError(f"data file {path} does not exist")
    if fmt == "jsonl":
        return _read_jsonl(path, bad)
    if fmt == "csv":
        return _read_csv(path, bad)
    if fmt == "parquet":
        return _read_parquet(path)
    from kdcache.data.hub import read_saved_folder

    return read_saved_folder(path)


def _read_source(path: str, config: DataConfig, bad: list[BadRow], room: int | None) -> list[Row]:
    """The rows of one entry of `data.paths` (a file, a glob of files, a folder or a hub id)."""
    if config.format == "hub" or (config.format == "auto" and config.data_files):
        from kdcache.data.hub import iter_hub_rows

        return list(iter_hub_rows(path, config, room))
    rows: list[Row] = []
    for file in expand_glob(path):
        fmt = config.format if config.format != "auto" else detect_format(file)
        if fmt == "hub":
            from kdcache.data.hub import iter_hub_rows

            rows.extend(iter_hub_rows(file, config, None if room is None else room - len(rows)))
        else:
            rows.extend(_read_file(file, fmt, bad))
        if room is not None and len(rows) >= room:
            break
    return rows


def read_rows(config: DataConfig) -> tuple[list[Row], list[BadRow]]:
    """All rows of all configured sources in order, and the rows that did not parse."""
    if not config.paths:
        raise BadInputError("no data given: set data.paths (a JSONL, CSV or Parquet file or glob, a `datasets` "
                            "folder, or a hub dataset id)")
    rows: list[Row] = []
    bad: list[BadRow] = []
    for path in config.paths:
        room = None if config.limit is None else config.limit - len(rows)
        rows.extend(_read_source(path, config, bad, room))
        if config.limit is not None and len(rows) >= config.limit:
            rows = rows[: config.limit]
            break
    return rows, bad
