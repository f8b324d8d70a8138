"""Read example rows from JSONL, CSV, Parquet files or `datasets` folders (local paths or fsspec URLs)."""

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


def detect_format(path: str) -> str:
    """The format a path's name implies; a folder without a known suffix is taken as a `datasets` folder."""
    base = path.split("#", 1)[0].rstrip("/")
    lowered = base.lower()
    for suffix, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".csv", "csv"), (".parquet", "parquet")):
        if lowered.endswith(suffix):
            return fmt
    fs, fs_path = fsspec.core.url_to_fs(base)
    if fs.isdir(fs_path):
        return "datasets"
    raise BadInputError(
        f"cannot tell the format of {path}: name it .jsonl, .csv or .parquet, pass a `datasets` folder, "
        "or set data.format"
    )


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


def _read_datasets_folder(path: str) -> list[Row]:
    import datasets

    folder, _, split = path.partition("#")
    try:
        loaded = datasets.load_from_disk(folder)
    except FileNotFoundError as exc:
        raise BadInputError(f"{folder} is not a folder written by `datasets` save_to_disk ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if not split:
            raise BadInputError(
                f"{folder} holds several splits ({', '.join(loaded)}): name one as {folder}#SPLIT"
            )
        if split not in loaded:
            raise BadInputError(f"{folder} has no split '{split}'; it has {', '.join(loaded)}")
        loaded = loaded[split]
    return [Row(path, number, dict(value)) for number, value in enumerate(loaded, start=1)]


def read_rows(config: DataConfig) -> tuple[list[Row], list[BadRow]]:
    """All rows of all configured sources in order, and the rows that did not parse."""
    if not config.paths:
        raise BadInputError("no data given: set data.paths (a JSONL, CSV or Parquet file, or a `datasets` folder)")
    rows: list[Row] = []
    bad: list[BadRow] = []
    for path in config.paths:
        fmt = config.format if config.format != "auto" else detect_format(path)
        fs, fs_path = fsspec.core.url_to_fs(path.split("#", 1)[0])
        if not fs.exists(fs_path):
            raise BadInputError(f"data file {path} does not exist")
        if fmt == "jsonl":
            rows.extend(_read_jsonl(path, bad))
        elif fmt == "csv":
            rows.extend(_read_csv(path, bad))
        elif fmt == "parquet":
            rows.extend(_read_parquet(path))
        else:
            rows.extend(_read_datasets_folder(path))
        if config.limit is not None and len(rows) >= config.limit:
            rows = rows[: config.limit]
            break
    return rows, bad
