"""Fingerprints that tie a cache to its tokenizer and its data, so mismatches are refused rather than trained on."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal bytes (and so equal hashes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary (token -> id) and the added tokens; the model's embedding size is not part of it.

    Roles such as eos/pad/unk are left out: a base and an instruct model share token ids but may name another EOS.

    Qwen2.5-72B pads its embedding to 152,064 rows and Qwen2.5-1.5B to 151,936, with one tokenizer: both
    get the same fingerprint, because only the tokenizer is hashed.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    added = sorted(
        (int(index), token.content, bool(token.special)) for index, token in tokenizer.added_tokens_decoder.items()
    )
    digest = hashlib.sha256()
    digest.update(canonical_json({"vocab": vocab, "added_tokens": added}).encode("utf-8"))
    return "sha256:" + digest.hexdigest()


def rows_fingerprint(rows: Iterable[dict]) -> str:
    """sha256 over the rows' field values in order (not over file bytes, so JSONL and Parquet of one table agree)."""
    digest = hashlib.sha256()
    for fields in rows:
        digest.update(canonical_json(fields).encode("utf-8"))
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
