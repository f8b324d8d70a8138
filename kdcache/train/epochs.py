"""`num_epochs`: how many optimizer steps a number of passes over a cache's train split is, counted exactly as the
loader cuts its batches, from each shard's records (example indices and lengths) without reading token arrays."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq

from kdcache.config import TrainConfig
from kdcache.errors import BadInputError
from kdcache.store.shard import RECORDS_FILE
from kdcache.train.batching import buffer_order
from kdcache.train.loader import CacheDataset

DEFAULT_MAX_STEPS = 100


def count_batches(dataset: CacheDataset) -> int:
    """The batches `dataset` (its split, rank and settings) yields in its current epoch."""
    plan, s = dataset.epoch_plan(), dataset.settings
    location = dataset.reader.location
    total = 0
    for b, shards in enumerate(plan.buffers):
        indices, lengths, keys = [], [], []
        for shard in shards:
            size = dataset.manifest.shards[shard].files[RECORDS_FILE].bytes
            raw = location.read_bytes(f"{location.shard_path(shard)}/{RECORDS_FILE}", size)
            records = pq.ParquetFile(pa.BufferReader(raw))
            # the held-out split hashes split_key (augmented rows: their source id); older caches: the row index
            key = "split_key" if "split_key" in records.schema_arrow.names else "example_index"
            table = records.read(columns=sorted({"example_index", "num_tokens", key}))
            indices.extend(table.column("example_index").to_pylist())
            lengths.extend(table.column("num_tokens").to_pylist())
            keys.extend(table.column(key).to_pylist())
        order = buffer_order(keys, plan=plan, buffer=b, rank=s.rank, split=s.split,
                             heldout_fraction=s.heldout_fraction, split_seed=s.split_seed, shuffle=s.shuffle,
                             seed=s.seed, epoch=dataset.epoch)
        total += len(dataset.batch_groups([lengths[i] for i in order], [indices[i] for i in order], b))
    return total


def planned_steps(config: TrainConfig, train_data, all_ranks_sum=None) -> int:
    """The run's optimizer steps: `max_steps`, or ceil(num_epochs * batches per epoch / grad_accum) (under DDP the
    mean of the ranks' batch counts, `all_ranks_sum` adding a float over ranks), or 100 when neither is set. Both set
    must agree (a saved train_config.json holds both).

    train_data: a CacheDataset, or a :class:`kdcache.train.mixing.CacheMixture` (several caches), whose epoch is as
    many batches as its caches' train splits hold together (which cache each comes from is still drawn by weight)."""
    if config.num_epochs is None:
        return DEFAULT_MAX_STEPS if config.max_steps is None else config.max_steps
    if not config.num_epochs > 0:
        raise BadInputError(f"num_epochs must be a positive number, got {config.num_epochs}")
    batches = float(sum(count_batches(d) for d in getattr(train_data, "datasets", [train_data])))
    if all_ranks_sum is not None:
        batches = all_ranks_sum(batches) / train_data.settings.world_size
    if batches == 0:
        raise BadInputError(f"the train split of {train_data.url} has no batches, so num_epochs gives no steps: "
                            "lower heldout_fraction or use a larger cache")
    steps = max(1, math.ceil(config.num_epochs * batches / config.grad_accum))
    if config.max_steps is not None and config.max_steps != steps:
        raise BadInputError(f"max_steps={config.max_steps} and num_epochs={config.num_epochs} (= {steps} steps: {batches:g} "
                            f"batches per epoch, grad_accum {config.grad_accum}) disagree: give one of them")
    return steps
