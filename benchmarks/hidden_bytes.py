"""Bytes per stored row of teacher hidden states, for each reduction and dtype, measured on built caches.

Builds one cache per setting from the same randomly initialised Qwen2 teacher (hidden size --hidden-size, so a
reduction to --dim is a real one) over the UPSC sample with `template.distill=all`, and reads the bytes of each
shard's files from the commit records (after Blosc/zstd compression, as on disk). Prints, per setting, the hidden
arrays' bytes per row (per target; per token for positions=all) and per layer, the raw (uncompressed) figure, and the
ratio to the logits' bytes per target (sparse ids, log-probs, tail and tail grid) of the same cache.

    python benchmarks/hidden_bytes.py --rows 64 --hidden-size 1024 --dim 256 --layers 2
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import PROMPT, TARGET, cpu_name, upsc_rows, write_data
from kdcache.config import CacheBuildConfig, load_config
from kdcache.hidden import bytes_per_row
from kdcache.store.reader import CacheReader
from kdcache.teacher.build import build_cache
from kdcache.tiny import build_qwen2, build_tokenizer, save_model

SETTINGS = [  # (reduction, dtype)
    ("none", "float16"), ("none", "int8"), ("random", "float16"), ("random", "int8"), ("pca", "float16"),
    ("pca", "int8"),
]


def _bytes(manifest, prefix: str) -> int:
    return sum(entry.bytes for shard in manifest.shards for key, entry in shard.files.items()
               if key.startswith(prefix))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2, help="teacher blocks; every block's output is stored")
    parser.add_argument("--k", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = upsc_rows()
        write_data(tmp / "data.jsonl", rows, args.rows)
        tokenizer = build_tokenizer([f"{r['title']} {r['text']} {r['gs_paper']}" for r in rows], vocab_size=1024)
        teacher = build_qwen2(len(tokenizer), hidden_size=args.hidden_size, layers=args.layers, heads=8, seed=0)
        folder = save_model(teacher, tokenizer, tmp / "teacher")
        layers = list(range(1, args.layers + 1))
        print(f"teacher: Qwen2, {args.layers} blocks, hidden size {args.hidden_size}; {args.rows} UPSC rows, "
              f"k={args.k}; layers stored {layers}; torch {torch.__version__}; {cpu_name()} ({platform.machine()})")
        print("| reduction | dtype | dim | bytes/target (on disk) | per layer | raw per layer | x logits |")
        print("|---|---|---|---|---|---|---|")
        for reduction, dtype in SETTINGS:
            out = tmp / f"cache-{reduction}-{dtype}"
            overrides = [f"output={out}", f"teacher.model={folder}", f"data.paths=[{tmp / 'data.jsonl'}]",
                         f"template.prompt={json.dumps(PROMPT)}", f"template.target={json.dumps(TARGET)}",
                         "template.distill=all", "shard_size=32", f"sparsifier.k={args.k}", "progress=false",
                         f"hidden.layers={layers}", f"hidden.reduction={reduction}", f"hidden.dim={args.dim}",
                         f"hidden.dtype={dtype}", "hidden.pca_rows=2048"]
            started = time.perf_counter()
            build_cache(load_config(CacheBuildConfig, None, overrides))
            seconds = time.perf_counter() - started
            manifest = CacheReader(str(out)).manifest
            targets = manifest.counts.num_targets
            hidden = _bytes(manifest, "tokens.zarr/hidden_")
            logits = sum(_bytes(manifest, f"tokens.zarr/{name}/") for name in
                         ("sparse_ids", "sparse_logprobs", "tail_logmass", "tail_tempered"))
            dim = manifest.hidden.dim
            per_target = hidden / targets
            print(f"| {reduction} | {dtype} | {dim} | {per_target:,.0f} | {per_target / len(layers):,.0f} | "
                  f"{bytes_per_row(dim, 1, dtype):,} | {hidden / logits:.2f} |", flush=True)
            del seconds
        print(f"logits (k={args.k}, tail grid): {logits / targets:,.0f} bytes/target on disk")


if __name__ == "__main__":
    main()
