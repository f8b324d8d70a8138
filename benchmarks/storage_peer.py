"""DistillKit's logit compression, run from its published code (../shared/peers/distillkit-a61c2e7, imported from
there, never copied), on the same teacher positions as kdcache's encodings in benchmarks/storage.py.

Settings are the ones its README gives: "recommended" (k = 128, 16 exact bf16 values, polynomial terms 0-4 + sqrt)
and "budget" (k = 50, 1 exact, terms 0, 1, sqrt). Sizes: the payload (its packed bytes per position) and the same
bytes as a Parquet file (one row per position, two binary columns, zstd), as it would be stored for training.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
import torch

PEER = Path(__file__).resolve().parent.parent.parent / "shared" / "peers" / "distillkit-a61c2e7"

SETTINGS = {
    "recommended": dict(k=128, exact_k=16, exact_dtype="bfloat16", polynomial_terms=[0, 1, 2, 3, 4, "sqrt"],
                        term_dtype="float32", residual_bins=[], delta_encoding=False, error_diffusion=False),
    "budget": dict(k=50, exact_k=1, exact_dtype="bfloat16", polynomial_terms=[0, 1, "sqrt"],
                   term_dtype="float32", residual_bins=[], delta_encoding=False, error_diffusion=False),
}


def available() -> bool:
    return PEER.is_dir()


def run(setting: str, ids: np.ndarray, logprobs: np.ndarray, vocab: int) -> dict:
    """Compress and decompress [N, k>=setting's k] sorted top-k (ids, float32 log-probs) with DistillKit's
    LogprobCompressor; returns its decoded (ids, log-probs) [N, k_setting], payload and Parquet bytes, and times."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if str(PEER) not in sys.path:
        sys.path.insert(0, str(PEER))
    from distillkit.compression import DistributionQuantizationConfig, LogprobCompressor

    spec = SETTINGS[setting]
    k = spec["k"]
    compressor = LogprobCompressor(config=DistributionQuantizationConfig(d=vocab, **spec))
    indices = torch.as_tensor(ids[:, :k], dtype=torch.long)
    values = torch.as_tensor(logprobs[:, :k], dtype=torch.float32)
    start = time.perf_counter()
    packed = compressor.compress_from_sparse(indices, values)
    encode_s = time.perf_counter() - start
    payload = sum(int(t.numel()) for t in packed.values())
    table = pa.table({name: [bytes(row) for row in t.to(torch.uint8).numpy()] for name, t in packed.items()})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    start = time.perf_counter()
    back = pq.read_table(pa.BufferReader(sink.getvalue()))
    row = {name: torch.as_tensor(np.stack([np.frombuffer(b, np.uint8) for b in back[name].to_pylist()]))
           for name in packed}
    decoded_ids, decoded = compressor.decompress_to_sparse(row)
    decode_s = time.perf_counter() - start
    return dict(k=k, ids=decoded_ids.numpy().astype(np.int64), logprobs=decoded.float().numpy(), payload=payload,
                parquet=len(sink.getvalue()), encode_s=encode_s, decode_s=decode_s)
