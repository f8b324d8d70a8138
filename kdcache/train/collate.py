"""A batch of a cache as tensors: :class:`CacheBatch`, built from cached examples by :func:`collate_examples`, and
the consumer-side counters :class:`LoaderStats`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from kdcache.hidden import decode
from kdcache.store.reader import CachedExample
from kdcache.targets import SparseTargets
from kdcache.train.batching import round_up
from kdcache.train.losses import top_k_truncate

__all__ = ["CacheBatch", "LoaderStats", "collate_examples"]


@dataclass
class CacheBatch:
    """A padded batch with the teacher's targets for its target positions.

    Target rows are in row-major order of ``target_mask`` (example by example, positions ascending), i.e. the order of
    ``target_mask.nonzero()``; ``labels[i]`` is the token at the i-th target position, whose distribution the student
    reads from the position before it.
    """

    input_ids: Tensor  # long [B, L], right-padded with pad_id
    attention_mask: Tensor  # long [B, L]
    target_mask: Tensor  # bool [B, L]
    targets: SparseTargets  # ids long [N, k], logprobs float32 [N, k], tail_logmass float32 [N] | None, counts | None
    labels: Tensor  # long [N]
    example_indices: Tensor  # long [B]: the examples' row indices in the source data
    prompt_lengths: Tensor | None = None  # long [B]: tokens before the target text (an encoder-decoder's encoder input)
    epoch: int = 0
    worker: int = 0  # the logical worker that produced the batch (resume bookkeeping)
    load_seconds: float = 0.0  # time the producer spent reading shards, decoding and collating for this batch
    # float32 [N or real tokens, C, dim]: the teacher's hidden states, decoded (caches that store them), one row per
    # target or per real token in row-major order (of target_mask or attention_mask)
    hidden: Tensor | None = None

    @property
    def num_targets(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens."""
        return int(self.attention_mask.sum())

    def _map(self, fn) -> CacheBatch:
        return CacheBatch(
            input_ids=fn(self.input_ids),
            attention_mask=fn(self.attention_mask),
            target_mask=fn(self.target_mask),
            targets=self.targets.map(fn),
            labels=fn(self.labels),
            example_indices=fn(self.example_indices),
            prompt_lengths=None if self.prompt_lengths is None else fn(self.prompt_lengths),
            epoch=self.epoch,
            worker=self.worker,
            load_seconds=self.load_seconds,
            hidden=None if self.hidden is None else fn(self.hidden),
        )

    def to(self, device, non_blocking: bool = False) -> CacheBatch:
        return self._map(lambda x: x.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> CacheBatch:  # called by DataLoader(pin_memory=True)
        return self._map(lambda x: x.pin_memory())


@dataclass
class LoaderStats:
    """Counters for logging, accumulated on the consumer's side.

    ``wait_seconds``: time the training loop was blocked waiting for a batch (the stall that matters);
    ``load_seconds``: time producers spent reading shards, decoding and collating (summed over workers; with
    ``num_workers=0`` the two are the same).
    """

    wait_seconds: float = 0.0
    load_seconds: float = 0.0
    batches: int = 0
    examples: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    targets: int = 0

    def add(self, batch: CacheBatch, wait_seconds: float) -> None:
        self.wait_seconds += wait_seconds
        self.load_seconds += batch.load_seconds
        self.batches += 1
        self.examples += int(batch.input_ids.shape[0])
        self.tokens += batch.num_tokens
        self.padded_tokens += int(batch.input_ids.numel())
        self.targets += batch.num_targets

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def reset(self) -> None:
        for name, value in asdict(LoaderStats()).items():
            setattr(self, name, value)


def collate_examples(
    examples: list[CachedExample], pad_id: int = 0, k_prime: int | None = None, pad_to_multiple_of: int = 1,
    tail_temperatures: tuple[float, ...] = (),
) -> CacheBatch:
    """Right-pad examples into a :class:`CacheBatch` (``k_prime``: keep the first k' entries, tail folded exactly;
    ``tail_temperatures``: the cache's, naming the columns of the examples' ``tail_tempered``)."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    lengths = [len(e.input_ids) for e in examples]
    length = round_up(max(lengths), pad_to_multiple_of)
    b = len(examples)
    input_ids = np.full((b, length), pad_id, dtype=np.int64)
    attention = np.zeros((b, length), dtype=np.int64)
    target = np.zeros((b, length), dtype=bool)
    labels = []
    for row, (e, n) in enumerate(zip(examples, lengths)):
        input_ids[row, :n] = e.input_ids
        attention[row, :n] = 1
        target[row, :n] = e.target_mask
        labels.append(np.asarray(e.input_ids)[np.asarray(e.target_mask, dtype=bool)])
        if int(np.count_nonzero(e.target_mask)) != e.sparse_ids.shape[0]:
            raise ValueError(
                f"example {e.index} has {int(np.count_nonzero(e.target_mask))} target positions but "
                f"{e.sparse_ids.shape[0]} cached target rows"
            )

    def cat(arrays, dtype) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays, axis=0), dtype=dtype))

    tail = None if examples[0].tail_logmass is None else cat([e.tail_logmass for e in examples], np.float32)
    counts = None if examples[0].sample_counts is None else cat([e.sample_counts for e in examples], np.int64)
    grid = None
    if tail_temperatures and examples[0].tail_tempered is not None:
        grid = cat([e.tail_tempered for e in examples], np.float32)
    targets = SparseTargets(
        ids=cat([e.sparse_ids for e in examples], np.int64),
        logprobs=cat([e.sparse_logprobs for e in examples], np.float32),
        tail_logmass=tail,
        counts=counts,
        tail_grid=grid,
        tail_temperatures=tuple(tail_temperatures) if grid is not None else (),
    )
    if k_prime is not None and k_prime < targets.ids.shape[1]:
        targets = top_k_truncate(targets, k_prime).map(Tensor.contiguous)
    hidden = None
    if examples[0].hidden_states is not None:
        hidden = cat([decode(e.hidden_states, e.hidden_scale) for e in examples], np.float32)
    return CacheBatch(
        hidden=hidden,
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention),
        target_mask=torch.from_numpy(target),
        targets=targets,
        labels=cat(labels, np.int64),
        example_indices=torch.tensor([e.index for e in examples], dtype=torch.long),
        prompt_lengths=torch.tensor([_prompt_length(e) for e in examples], dtype=torch.long),
    )


def _prompt_length(example: CachedExample) -> int:
    """Tokens before the target text: as recorded, else those before the first target position."""
    if example.prompt_length is not None:
        return int(example.prompt_length)
    mask = np.asarray(example.target_mask, dtype=bool)
    return int(np.argmax(mask)) if mask.any() else len(mask)
