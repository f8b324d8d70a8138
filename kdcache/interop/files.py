"""Reading and writing the row files other tools use: JSONL, or Parquet (a file, or a folder of them)."""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from kdcache.errors import BadInputError

__all__ = ["RowWriter", "expand_paths", "read_rows"]

_SUFFIXES = (".jsonl", ".json", ".parquet")


def expand_paths(paths: list[str] | tuple[str, ...]) -> list[str]:
    """The files named by `paths`: files as given, globs expanded, folders to their .parquet/.jsonl files (sorted)."""
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                           if p.endswith(_SUFFIXES) and os.path.isfile(p))
            if not found:
                raise BadInputError(f"{path} holds no .jsonl or .parquet files")
            out.extend(found)
        elif any(ch in path for ch in "*?["):
            found = sorted(glob.glob(path))
            if not found:
                raise BadInputError(f"no file matches {path}")
            out.extend(found)
        elif os.path.isfile(path):
            out.append(path)
        else:
            raise BadInputError(f"{path} does not exist; give a .jsonl or .parquet file, a glob, or a folder")
    return out


def read_rows(paths: list[str]) -> Iterator[tuple[str, int, dict]]:
    """(file, row number, row) for every row of every file (JSONL: one JSON object a line; Parquet: a table)."""
    for path in expand_paths(paths):
        if path.endswith(".parquet"):
            try:
                table = pq.read_table(path)
            except (OSError, pa.ArrowException) as exc:
                raise BadInputError(f"{path} is not a readable Parquet file ({exc})") from None
            for i, row in enumerate(table.to_pylist()):
                yield path, i, row
        elif path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as handle:
                for i, line in enumerate(handle):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as exc:
                        raise BadInputError(f"{path} line {i + 1} is not JSON ({exc}); each line must be one object") \
                            from None
                    if not isinstance(row, dict):
                        raise BadInputError(f"{path} line {i + 1} is not a JSON object")
                    yield path, i, row
        else:
            raise BadInputError(f"{path}: unknown file type; use .jsonl or .parquet")


class RowWriter:
    """Rows appended batch by batch to one Parquet (zstd) or JSONL file, by `path`'s suffix; a context manager.
    Parquet takes its schema from `schema` or the first batch."""

    def __init__(self, path: str, schema: pa.Schema | None = None):
        if not path.endswith((".parquet", ".jsonl", ".json")):
            raise BadInputError(f"{path}: give an output file ending in .parquet or .jsonl")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path, self.schema, self.rows = path, schema, 0
        self._parquet: pq.ParquetWriter | None = None
        self._jsonl = None if path.endswith(".parquet") else open(path, "w", encoding="utf-8")

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.rows += len(rows)
        if self._jsonl is not None:
            for row in rows:
                self._jsonl.write(json.dumps(row) + "\n")
            return
        table = pa.Table.from_pylist(rows, schema=self.schema)
        if self._parquet is None:
            self.schema = table.schema
            self._parquet = pq.ParquetWriter(self.path, table.schema, compression="zstd")
        self._parquet.write_table(table)

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        elif self._parquet is not None:
            self._parquet.close()
        else:  # no rows: an empty table, so the file exists
            pq.write_table(pa.Table.from_pylist([], schema=self.schema or pa.schema([])), self.path)
