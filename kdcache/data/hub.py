"""Rows through the `datasets` library: hub ids (with a config and a split), hub-layout folders, `data_files`, and
folders written by `save_to_disk`.

A hub id is read from the local Hugging Face cache without the network when `HF_DATASETS_OFFLINE=1` (or
`HF_HUB_OFFLINE=1`) is set, as `datasets` itself does. Each row keeps its number in the split (1-based) and a
source that names the dataset, its config and split, so errors point at the row.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from kdcache.config import DataConfig
from kdcache.data.sources import Row
from kdcache.errors import BadInputError

#: `owner/name` or `name` as the hub spells dataset ids (no scheme, no file suffix).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
#: What `save_to_disk` writes at the top of its folder (a Dataset, or a DatasetDict).
SAVED_MARKERS = ("state.json", "dataset_dict.json")


def looks_like_hub_id(path: str) -> bool:
    """Whether `path` (without a `#split` suffix) is spelled like a hub dataset id."""
    return bool(_HUB_ID.fullmatch(path.split("#", 1)[0]))


def is_saved_folder(fs, fs_path: str) -> bool:
    """Whether a folder was written by `datasets` `save_to_disk` (else it is read with `load_dataset`)."""
    return any(fs.exists(f"{fs_path.rstrip('/')}/{marker}") for marker in SAVED_MARKERS)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_saved_folder(path: str) -> list[Row]:
    """The rows of a `save_to_disk` folder; `FOLDER#SPLIT` picks a split of a DatasetDict."""
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


def hub_source_name(path: str, config: DataConfig) -> tuple[str, str, str]:
    """(dataset, split, the source name rows carry): `path#split` wins over `data.split`, then 'train'."""
    name, _, split_in_path = path.partition("#")
    split = split_in_path or config.split or "train"
    parts = [f"config {config.config_name}"] if config.config_name else []
    if config.data_files:
        parts.append(f"data_files {', '.join(config.data_files)}")
    parts.append(f"split {split}")
    return name, split, f"{name} ({', '.join(parts)})"


def iter_hub_rows(path: str, config: DataConfig, limit: int | None = None) -> Iterator[Row]:
    """Rows of `datasets.load_dataset(path, config.config_name, split=..., data_files=..., streaming=...)`.

    path: a hub id, a hub-layout folder (data files, optionally a README.md with `configs:`), or a packaged builder
    name (`json`, `csv`, `parquet`) with `data.data_files`. With `data.streaming` rows are read as they come (only
    `limit` of them when set) instead of being converted to Arrow first.
    """
    import datasets

    name, split, source = hub_source_name(path, config)
    kwargs: dict[str, Any] = {"split": split, "streaming": config.streaming}
    if config.data_files:
        kwargs["data_files"] = list(config.data_files)
    try:
        loaded = datasets.load_dataset(name, config.config_name, **kwargs)
    except (datasets.exceptions.DatasetNotFoundError, ConnectionError) as exc:
        raise BadInputError(
            f"dataset {name} is not a local file or folder, and neither the hub nor the local Hugging Face cache "
            f"({datasets.config.HF_DATASETS_CACHE}) has it ({_one_line(exc)}); check the path or id, or load it "
            "once with network access (then HF_DATASETS_OFFLINE=1 reads it from the cache)"
        ) from None
    except (ValueError, FileNotFoundError, OSError) as exc:  # a bad split or config, no files
        raise BadInputError(f"cannot load {source} with `datasets`: {_one_line(exc)}") from None
    for number, value in enumerate(loaded, start=1):
        if limit is not None and number > limit:
            return
        yield Row(source, number, dict(value))
