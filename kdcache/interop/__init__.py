"""Cache interop: `kdcache cache import` from other tools' top-k files, `kdcache cache export` to them.

Import (each into a normal cache, through the store's commit protocol: kdcache.interop.writer):

* ``vllm``: users' dumps of vLLM ``prompt_logprobs`` (JSONL/Parquet), kdcache.interop.vllm;
* ``axolotl``: Axolotl's KD rows (``target_token_ids``/``target_logprobs``/``target_mask``), kdcache.interop.axolotl;
* ``distillkit``: DistillKit's compressed logit datasets, decoded by DistillKit's codec, kdcache.interop.distillkit.

None of them holds an exact tail: it is derived as log(1 - sum p_topk) and the plan is marked as vLLM's
prompt_logprobs route marks it (kdcache.store.imported). Export: ``axolotl``, ``distillkit``, and ``parquet`` (a
plain per-position table, kdcache.interop.parquet). docs/interop.md lists what each direction keeps and drops.
"""

from __future__ import annotations

from kdcache.errors import BadInputError
from kdcache.store.imported import IMPORT_FORMATS

__all__ = ["EXPORT_FORMATS", "IMPORT_FORMATS", "export_cache", "import_cache"]

EXPORT_FORMATS = ("axolotl", "distillkit", "parquet")


def import_cache(fmt: str, paths: list[str], output: str, tokenizer, tokenizer_name: str, *, k: int | None = None,
                 compression_config: str | None = None, teacher: str = "unknown", teacher_dtype: str = "bfloat16",
                 shard_size: int = 1000, progress: bool = True):
    """Read `paths` in format `fmt` and write them as a finished cache at `output`; returns its Manifest."""
    import dataclasses

    from kdcache.interop.writer import write_imported_cache

    if fmt == "vllm":
        from kdcache.interop.vllm import vllm_source

        source = vllm_source(paths, k)
    elif fmt == "axolotl":
        from kdcache.interop.axolotl import axolotl_source

        source = axolotl_source(paths)
    elif fmt == "distillkit":
        from kdcache.interop.distillkit import distillkit_source

        source = distillkit_source(paths, compression_config)
    else:
        raise BadInputError(f"--format must be one of {', '.join(IMPORT_FORMATS)}, got {fmt!r}")
    if k is not None and fmt != "vllm":
        read = source.read
        source = dataclasses.replace(source, read=lambda: (_keep_top(example, k) for example in read()))
    return write_imported_cache(source, output, tokenizer, tokenizer_name, teacher=teacher,
                                teacher_dtype=teacher_dtype, shard_size=shard_size, progress=progress)


def _keep_top(example, k: int):
    """The example with only the k largest entries of each row (`--k`)."""
    import numpy as np

    if example.ids.shape[1] < k:
        raise BadInputError(f"--k {k} but {example.source} row {example.source_row} holds {example.ids.shape[1]} "
                            "entries per position")
    order = np.argsort(-example.logprobs, axis=1, kind="stable")[:, :k]
    example.ids = np.take_along_axis(example.ids, order, axis=1)
    example.logprobs = np.take_along_axis(example.logprobs, order, axis=1)
    return example


def export_cache(cache: str, fmt: str, output: str, *, renormalize: bool = False,
                 compression_config: str | None = None, verify_checksums: bool = True) -> int:
    """Write the cache at `cache` in format `fmt` to `output`; returns the rows written."""
    from kdcache.store.reader import CacheReader

    if fmt not in EXPORT_FORMATS:
        raise BadInputError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    reader = CacheReader(cache, verify_checksums=verify_checksums)
    if fmt != "parquet" and reader.sparsifier.kind != "topk":
        raise BadInputError(f"--format {fmt} holds a teacher's top-k, but {cache} is a sample cache (sampled tokens "
                            "with counts); export it with --format parquet, or build a topk cache")
    if fmt == "axolotl":
        from kdcache.interop.axolotl import write_axolotl

        return write_axolotl(reader, output, renormalize)
    if fmt == "distillkit":
        from kdcache.interop.distillkit import _read_config, write_distillkit

        config = _read_config([output], compression_config)[0] if compression_config else None
        return write_distillkit(reader, output, config)
    from kdcache.interop.parquet import write_parquet

    if not output.endswith(".parquet"):
        raise BadInputError(f"--format parquet writes one file: give an output ending in .parquet, got {output}")
    return write_parquet(reader, output)
