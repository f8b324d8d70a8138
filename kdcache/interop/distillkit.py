"""DistillKit's compressed logit datasets (arcee-ai/DistillKit), both ways, through DistillKit's own codec.

A dataset, as its `sample_logits_vllm` writes it: a folder with ``compression_config.yaml`` (its
``DistributionQuantizationConfig``, or a ``LegacyLogitCompressionConfig``) and Parquet files whose rows hold
``input_ids`` [L] and, per position t = 1..L-1 (vLLM's prompt_logprobs, the first position skipped), the packed
top-k of token t: ``compressed_logprobs`` [L-1][bytes] and ``bytepacked_indices`` [L-1][bytes] (legacy:
``packed_indices``, ``exact_values``, ``coeffs``). Every position after the first is a target: the format has no
mask. Decompression is DistillKit's `LogprobCompressor.decompress_to_sparse`, so an import carries its quantisation
error (none for values kept exact, the polynomial fit's for the rest); the tail is derived from the decoded top-k.

DistillKit is not on PyPI: it is imported as installed (`pip install git+https://github.com/arcee-ai/DistillKit`), or
from the folder named by $KDCACHE_DISTILLKIT_PATH, or from the unmodified copy beside this checkout
(../shared/peers/distillkit-a61c2e7), as benchmarks/storage_peer.py does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from kdcache.errors import BadInputError
from kdcache.interop.files import RowWriter, expand_paths, read_rows
from kdcache.interop.writer import ImportedExample, ImportSource

__all__ = ["CONFIG_FILE", "distillkit_compressor", "distillkit_source", "write_distillkit"]

CONFIG_FILE = "compression_config.yaml"
_PEER = Path(__file__).resolve().parents[3] / "shared" / "peers" / "distillkit-a61c2e7"
#: DistillKit's published Parquet schema (distillkit.sample_common.compressed_logit_schema).
SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.uint64())),
    ("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
    ("bytepacked_indices", pa.list_(pa.list_(pa.uint8()))),
])


def _import_distillkit():
    try:
        import distillkit.compression as compression
        return compression
    except ImportError:
        pass
    for folder in (os.environ.get("KDCACHE_DISTILLKIT_PATH"), str(_PEER)):
        if folder and os.path.isdir(folder):
            if folder not in sys.path:
                sys.path.insert(0, folder)
            try:
                import distillkit.compression as compression
                return compression
            except ImportError as exc:
                raise BadInputError(f"DistillKit in {folder} cannot be imported ({exc}); it needs torch and "
                                    "pydantic") from None
    raise BadInputError("DistillKit is not installed: `pip install git+https://github.com/arcee-ai/DistillKit`, or "
                        "set KDCACHE_DISTILLKIT_PATH to a folder holding its distillkit/ package")


def distillkit_compressor(config: dict):
    """DistillKit's LogprobCompressor for a compression config mapping (legacy configs have `polynomial_degree`)."""
    compression = _import_distillkit()
    try:
        if "polynomial_degree" in config:
            return compression.LogprobCompressor(
                legacy_config=compression.LegacyLogitCompressionConfig(**config))
        return compression.LogprobCompressor(config=compression.DistributionQuantizationConfig.model_validate(config))
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        first = str(exc).splitlines()[0]
        raise BadInputError(f"the DistillKit compression config is not valid ({first})") from None


def _read_config(paths: list[str], config_path: str | None) -> tuple[dict, str]:
    import yaml

    if config_path is None:
        folders = [p if os.path.isdir(p) else os.path.dirname(p) for p in paths]
        candidates = [os.path.join(f, CONFIG_FILE) for f in folders if os.path.isfile(os.path.join(f, CONFIG_FILE))]
        if not candidates:
            raise BadInputError(f"no {CONFIG_FILE} beside {paths[0]}: pass --compression-config (the yaml DistillKit "
                                "wrote the dataset with)")
        config_path = candidates[0]
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as exc:
        raise BadInputError(f"cannot read {config_path} ({exc})") from None
    if not isinstance(config, dict):
        raise BadInputError(f"{config_path} is not a mapping of DistillKit compression settings")
    return config, config_path


def distillkit_source(paths: list[str], config_path: str | None = None) -> ImportSource:
    """A DistillKit dataset as an import source, decompressed with DistillKit's codec (see the module docstring)."""
    config, _ = _read_config(paths, config_path)
    compressor = distillkit_compressor(config)
    files = [p for p in expand_paths(paths) if p.endswith(".parquet")]
    if not files:
        raise BadInputError(f"no .parquet files in {', '.join(paths)}")

    def read():
        for source, index, row in read_rows(files):
            yield _decoded(compressor, source, index, row)

    return ImportSource(format="distillkit", paths=tuple(paths), read=read, compression=config)


def _decoded(compressor, source: str, index: int, row: dict) -> ImportedExample:
    import torch

    where = f"{source} row {index}"
    if row.get("input_ids") is None:
        raise BadInputError(f"{where} has no input_ids")
    packed = {key: value for key, value in row.items() if key != "input_ids" and value is not None}
    tokens = np.array(row["input_ids"], dtype=np.int64)
    n = len(tokens)
    try:
        tensors = {key: torch.as_tensor(np.array(value, dtype=np.uint8 if key in _BYTES else None))
                   for key, value in packed.items()}
        ids, logprobs = compressor.decompress_to_sparse(tensors)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise BadInputError(f"{where} cannot be decompressed with this compression config "
                            f"({str(exc).splitlines()[0]})") from None
    ids, logprobs = ids.numpy().astype(np.int64), logprobs.float().numpy().astype(np.float64)
    if ids.shape[0] != n - 1:
        raise BadInputError(f"{where} holds {ids.shape[0]} packed positions for {n} input_ids; DistillKit writes "
                            "one per token after the first")
    mask = np.ones(n, dtype=bool)
    mask[0] = False
    return ImportedExample(tokens, mask, ids, logprobs, source, index, {})


_BYTES = ("compressed_logprobs", "bytepacked_indices")
_TARGET_ONLY = ("DistillKit's format has teacher top-k at every position after the first, but this cache stores "
                "some positions without (distill=target); export it with --format axolotl (which has a mask), or "
                "rebuild the cache with --distill all")


def lossless_config(k: int, vocab: int) -> dict:
    """A DistillKit config that keeps all k log-probs exact in float32 (no polynomial): the default export."""
    return {"d": vocab, "k": k, "exact_k": k, "exact_dtype": "float32", "polynomial_terms": None,
            "term_dtype": "float32", "residual_bins": [], "delta_encoding": False, "error_diffusion": False}


def write_distillkit(reader, folder: str, config: dict | None = None) -> int:
    """Write an every-token cache as a DistillKit dataset folder (compression_config.yaml + data_0.parquet),
    compressed with DistillKit's codec; `config` defaults to `lossless_config`. Returns the rows written."""
    import yaml

    manifest = reader.manifest
    k = manifest.sparsifier.k
    config = dict(config or lossless_config(k, manifest.tokenizer.vocab_size))
    if config.get("k", k) > k:
        raise BadInputError(f"the compression config's k = {config['k']} is more than the cache's k = {k}; set k <= {k}")
    compressor = distillkit_compressor(config)
    if compressor.config is not None:  # written as DistillKit writes it (sample_logits_vllm)
        config = compressor.config.model_dump(mode="json")
    width = config.get("k", k)
    if manifest.template.distill != "all":
        raise BadInputError(_TARGET_ONLY)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle)
    schema = None if compressor.legacy_compressor is not None else SCHEMA
    with RowWriter(os.path.join(folder, "data_0.parquet"), schema) as writer:
        for shard in range(reader.num_shards):
            writer.write([_packed(compressor, example, width) for example in reader.iter_examples([shard])
                          if len(example.input_ids) >= 2])
    return writer.rows


def _packed(compressor, example, width: int) -> dict:
    """One DistillKit row of an every-token cache example (refusing a target-only one)."""
    import torch

    if not example.target_mask[1:].all():
        raise BadInputError(_TARGET_ONLY)
    packed = compressor.compress_from_sparse(torch.as_tensor(example.sparse_ids[:, :width], dtype=torch.long),
                                             torch.as_tensor(example.sparse_logprobs[:, :width], dtype=torch.float32))
    return {"input_ids": example.input_ids.astype(np.uint64).tolist(),
            **{key: value.to(torch.uint8).numpy().tolist() for key, value in packed.items()}}
