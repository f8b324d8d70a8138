"""Read a finished cache: check its format and tokenizer, then load shards or stream examples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from kdcache.errors import CacheFormatError, IncompatibleCacheError
from kdcache.store.fingerprint import tokenizer_fingerprint
from kdcache.store.location import CacheLocation
from kdcache.store.manifest import Manifest, read_manifest
from kdcache.store.plan import SparsifierInfo, TokenizerInfo
from kdcache.store.integrity import ShardDamaged, load_shard
from kdcache.store.shard import ShardData


@dataclass
class CachedExample:
    """One example's tokens and the teacher's sparse targets at its target positions (rows in token order)."""

    index: int  # the example's row index in the source data
    input_ids: np.ndarray  # int32 [tokens]
    target_mask: np.ndarray  # bool [tokens]
    sparse_ids: np.ndarray  # int32 [targets, k]
    sparse_logprobs: np.ndarray  # [targets, k]
    tail_logmass: np.ndarray | None  # [targets]
    sample_counts: np.ndarray | None  # [targets, k]
    record: dict
    tail_tempered: np.ndarray | None = None  # [targets, G]: the tail's log-partition at the cache's tail temperatures
    prompt_length: int | None = None  # tokens before the target text (set for re-tokenised examples; None: unknown)
    hidden_states: np.ndarray | None = None  # [targets or tokens, C, dim] as stored (kdcache.store.hidden)
    hidden_scale: np.ndarray | None = None  # [targets or tokens, C]: int8 hidden states' scales

    @property
    def key(self) -> tuple[int, int]:
        """(row index, answer number): unique in a cache, also when the teacher wrote several answers per row."""
        return self.index, int(self.record.get("sample_index") or 0)

    @property
    def split_key(self) -> int:
        """What the held-out split hashes: the row index, or for an augmented row a hash of its source id (the
        records' `split_key`; caches built before it have the row index)."""
        value = self.record.get("split_key")
        return self.index if value is None else int(value)


def check_tokenizer(cached: TokenizerInfo, tokenizer, where: str) -> None:
    """Refuse a tokenizer other than the cache's; a different embedding size with the same tokenizer is fine."""
    expected = cached.fingerprint
    actual = tokenizer_fingerprint(tokenizer)
    if actual != expected:
        raise IncompatibleCacheError(
            f"the cache {where} was built with tokenizer '{cached.name}' "
            f"({cached.vocab_size} tokens, fingerprint {expected[:19]}...), but this "
            f"tokenizer '{getattr(tokenizer, 'name_or_path', '?')}' has {len(tokenizer)} tokens and fingerprint "
            f"{actual[:19]}...; token ids would mean different tokens. Use a student with the teacher's tokenizer, "
            "or set loss.kind=uld (Universal Logit Distillation) or loss.vocab_map=hybrid (TRL GOLD's vocabulary "
            "mapping), the cross-tokenizer losses"
        )


class CacheReader:
    """A finished cache opened for reading; `tokenizer`, when given, must match the cache's.

    Every shard read is checked (kdcache.store.integrity): its commit record is present and equals the manifest's
    entry, its files are read from inside the cache and no longer than recorded, and each file's sha256 is checked
    over the bytes that are then decoded. `verify_checksums=False` skips only the sha256, for a cache that
    `kdcache cache verify` has checked once and that nobody can change since.
    """

    def __init__(self, url: str, tokenizer=None, storage_options: dict | None = None, verify_checksums: bool = True):
        self.location = CacheLocation(url, storage_options)
        self.verify_checksums = verify_checksums
        self.manifest: Manifest = read_manifest(self.location)
        if tokenizer is not None:
            check_tokenizer(self.manifest.tokenizer, tokenizer, url)

    @property
    def num_shards(self) -> int:
        return self.manifest.num_shards

    @property
    def sparsifier(self) -> SparsifierInfo:
        return self.manifest.sparsifier

    def read_shard(self, index: int) -> ShardData:
        """Load shard `index`; a missing, damaged or uncommitted shard is reported by name."""
        expected = self.manifest.shards[index]
        name = expected.name
        try:
            data = load_shard(self.location, expected, self.verify_checksums)
        except ShardDamaged as exc:
            raise CacheFormatError(
                f"shard {name} of {self.location.url} cannot be read ({exc.problem}); "
                f"run `kdcache cache verify {self.location.url}` and rebuild the damaged shard"
            ) from None
        if data.num_examples != expected.num_examples or data.num_targets != expected.num_targets:
            raise CacheFormatError(
                f"shard {name} of {self.location.url} holds {data.num_examples} examples and {data.num_targets} "
                f"targets but the manifest says {expected.num_examples} and {expected.num_targets}; "
                f"run `kdcache cache verify {self.location.url}`"
            )
        return data

    def iter_examples(self, shards: list[int] | None = None) -> Iterator[CachedExample]:
        """Examples shard by shard, in stored order."""
        for index in range(self.num_shards) if shards is None else shards:
            data = self.read_shard(index)
            yield from split_examples(data)


def split_examples(data: ShardData) -> Iterator[CachedExample]:
    """Cut a shard's flat arrays into per-example views."""
    records = data.records.to_pylist()
    # Hidden rows are one per target, or one per token (positions: all); position 0 is never a target, so a shard
    # with tokens never has as many targets as tokens and the row count tells which.
    hidden_by_token = data.hidden_states is not None and data.num_tokens > 0 and (
        data.hidden_states.shape[0] == data.num_tokens)
    for e in range(data.num_examples):
        t0, t1 = int(data.offsets[e]), int(data.offsets[e + 1])
        s0, s1 = int(data.target_offsets[e]), int(data.target_offsets[e + 1])
        h0, h1 = (t0, t1) if hidden_by_token else (s0, s1)
        yield CachedExample(
            index=int(records[e]["example_index"]),
            input_ids=data.input_ids[t0:t1],
            target_mask=data.target_mask[t0:t1],
            sparse_ids=data.sparse_ids[s0:s1],
            sparse_logprobs=data.sparse_logprobs[s0:s1],
            tail_logmass=None if data.tail_logmass is None else data.tail_logmass[s0:s1],
            sample_counts=None if data.sample_counts is None else data.sample_counts[s0:s1],
            record=records[e],
            tail_tempered=None if data.tail_tempered is None else data.tail_tempered[s0:s1],
            hidden_states=None if data.hidden_states is None else data.hidden_states[h0:h1],
            hidden_scale=None if data.hidden_scale is None else data.hidden_scale[h0:h1],
        )
