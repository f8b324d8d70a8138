"""One shard's content in memory, and its on-disk form: a Zarr v3 group of per-token arrays plus a Parquet table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdcache.store.encoding import (GROWTH_ATTRIBUTE, OFFSETS_ARRAY, STEP_ATTRIBUTE, TOP_ARRAY, LogprobEncoding,
                                    decode_offsets, encode_offsets, float_dtype)

TOKENS_DIR = "tokens.zarr"
RECORDS_FILE = "records.parquet"

# Elements per Zarr chunk (about 4 MB of int32/float32): big enough for fast sequential reads, small enough to stream.
_CHUNK_ELEMENTS = 1 << 20


@dataclass
class ShardData:
    """Columnar content of one shard.

    Token arrays are flat over the shard's examples (`offsets[e]:offsets[e+1]` is example e); sparse arrays have
    one row per target token (`target_offsets[e]:target_offsets[e+1]` are example e's target rows, in order).
    """

    input_ids: np.ndarray  # int32 [tokens]
    offsets: np.ndarray  # int64 [examples + 1]
    target_mask: np.ndarray  # bool [tokens]
    target_offsets: np.ndarray  # int64 [examples + 1]
    sparse_ids: np.ndarray  # int32 [targets, k]
    sparse_logprobs: np.ndarray  # float32 or float16 [targets, k]
    tail_logmass: np.ndarray | None  # float32 [targets]; topk sparsifier
    sample_counts: np.ndarray | None  # uint16 [targets, k]; sample sparsifier
    records: pa.Table  # one row per example
    tail_tempered: np.ndarray | None = None  # float32 [targets, G]: the tail's log-partition at each tail temperature
    hidden_states: np.ndarray | None = None  # float16 or int8 [targets or tokens, C, dim] (kdcache.store.hidden)
    hidden_scale: np.ndarray | None = None  # float32 [targets or tokens, C]: int8 hidden states' per-row scale
    # Set when read: the step (nats) the log-probs were stored at (offsets encoding, kdcache.store.encoding), or None
    # (plain). Writers ignore it: the encoding is the plan's (write_shard_files' `encoding`).
    logprob_step: float | None = None
    logprob_growth: float | None = None  # set when read: the offsets' growth (nats), or None (uniform steps)

    @property
    def num_examples(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_targets(self) -> int:
        return int(self.sparse_ids.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-token arrays by their on-disk names (absent optional arrays left out)."""
        named = {
            "input_ids": self.input_ids,
            "offsets": self.offsets,
            "target_mask": self.target_mask,
            "target_offsets": self.target_offsets,
            "sparse_ids": self.sparse_ids,
            "sparse_logprobs": self.sparse_logprobs,
            "tail_logmass": self.tail_logmass,
            "sample_counts": self.sample_counts,
            "tail_tempered": self.tail_tempered,
            "hidden_states": self.hidden_states,
            "hidden_scale": self.hidden_scale,
        }
        return {name: value for name, value in named.items() if value is not None}


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    row_elements = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    rows = max(1, _CHUNK_ELEMENTS // max(1, row_elements))
    return (rows,) + tuple(max(1, s) for s in shape[1:])


def disk_arrays(data: ShardData, encoding: LogprobEncoding) -> dict[str, tuple[np.ndarray, dict]]:
    """The arrays a shard stores, by on-disk name, each with its Zarr attributes: ``data.arrays()`` as they are
    (plain encoding), or with ``sparse_logprobs`` replaced by ``logprob_top`` + ``logprob_offsets`` and the tails
    cast to ``encoding.dtype`` (offsets encoding, kdcache.store.encoding)."""
    arrays = {name: (value, {}) for name, value in data.arrays().items()}
    if encoding.step is None:
        return arrays
    dtype = float_dtype(encoding.dtype)
    top, deltas = encode_offsets(data.sparse_logprobs, encoding.step, dtype, encoding.growth)
    out = {}
    for name, entry in arrays.items():
        if name == "sparse_logprobs":
            out[TOP_ARRAY] = (top, {})
            attributes = {STEP_ATTRIBUTE: encoding.step}
            if encoding.growth is not None:
                attributes[GROWTH_ATTRIBUTE] = encoding.growth
            out[OFFSETS_ARRAY] = (deltas, attributes)
        elif name in ("tail_logmass", "tail_tempered"):
            out[name] = (entry[0].astype(dtype), {})
        else:
            out[name] = entry
    return out


def write_shard_files(local_dir: str, data: ShardData, encoding: LogprobEncoding | None = None) -> None:
    """Write a shard's files into an empty local folder (the caller makes it visible atomically); `encoding`
    (default: plain) is how the top-k log-probs are stored."""
    import zarr

    group = zarr.open_group(f"{local_dir}/{TOKENS_DIR}", mode="w", zarr_format=3)
    byte_shuffled = zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
    bit_shuffled = zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    for name, (value, attributes) in disk_arrays(data, encoding or LogprobEncoding()).items():
        compressor = bit_shuffled if name in _BIT_SHUFFLED else byte_shuffled
        group.create_array(name, data=np.ascontiguousarray(value), chunks=_chunks(value.shape),
                           compressors=compressor, attributes=attributes or None)
    pq.write_table(data.records, f"{local_dir}/{RECORDS_FILE}", compression="zstd")


# Arrays of small integers in wide words: bit-shuffling puts their zero high bits together.
_BIT_SHUFFLED = frozenset({OFFSETS_ARRAY})


def read_shard_files(shard_url: str, storage_options: dict | None = None) -> ShardData:
    """Load a shard folder's arrays and records fully into memory, trusting whatever files it holds (tests and
    tools; readers of a cache load a committed shard from its recorded files: kdcache.store.integrity)."""
    import fsspec
    import zarr

    group = zarr.open_group(f"{shard_url}/{TOKENS_DIR}", mode="r", storage_options=storage_options or None)
    with fsspec.open(f"{shard_url}/{RECORDS_FILE}", "rb", **(storage_options or {})) as handle:
        records = pq.read_table(handle)
    return _shard_data(group, records)


def decode_shard_files(files: Mapping[str, bytes]) -> ShardData:
    """A shard from its files' bytes, keyed by their paths in the shard folder ("records.parquet",
    "tokens.zarr/input_ids/c/0", ...): only these bytes are decoded, so a caller that checked them checked all."""
    import zarr
    from zarr.core.buffer import cpu
    from zarr.storage import MemoryStore

    prefix = TOKENS_DIR + "/"
    store = MemoryStore({key[len(prefix):]: cpu.Buffer.from_bytes(value) for key, value in files.items()
                         if key.startswith(prefix)}, read_only=True)
    group = zarr.open_group(store=store, mode="r", zarr_format=3)
    records = pq.read_table(pa.BufferReader(files[RECORDS_FILE]))
    return _shard_data(group, records)


def _shard_data(group, records: pa.Table) -> ShardData:
    names = set(group.array_keys())

    def get(name: str) -> np.ndarray | None:
        return group[name][...] if name in names else None

    logprobs, step, growth = get("sparse_logprobs"), None, None
    tail_logmass, tail_tempered = get("tail_logmass"), get("tail_tempered")
    if OFFSETS_ARRAY in names:  # the offsets encoding: decoded to what the losses read (float32)
        offsets = group[OFFSETS_ARRAY]
        step = float(offsets.attrs[STEP_ATTRIBUTE])
        growth = offsets.attrs.get(GROWTH_ATTRIBUTE)
        growth = None if growth is None else float(growth)
        logprobs = decode_offsets(get(TOP_ARRAY), offsets[...], step, growth)
        tail_logmass = None if tail_logmass is None else tail_logmass.astype(np.float32)
        tail_tempered = None if tail_tempered is None else tail_tempered.astype(np.float32)
    return ShardData(
        input_ids=get("input_ids"),
        offsets=get("offsets"),
        target_mask=get("target_mask"),
        target_offsets=get("target_offsets"),
        sparse_ids=get("sparse_ids"),
        sparse_logprobs=logprobs,
        tail_logmass=tail_logmass,
        sample_counts=get("sample_counts"),
        records=records,
        tail_tempered=tail_tempered,
        hidden_states=get("hidden_states"),
        hidden_scale=get("hidden_scale"),
        logprob_step=step,
        logprob_growth=growth,
    )
