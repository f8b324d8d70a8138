"""Training from several caches in one run (``TrainConfig.caches``): which cache each batch comes from, the checks
that the caches can train one student, and the mixed stream's resumable position.

Mixing is per batch. Batch ``n`` of the run (counted over micro-batches, from 0) comes from cache ``i`` with
probability ``w_i / sum(w)``, drawn by :func:`mixture_sources` from a generator seeded with the run's ``seed`` and
``n``'s block, so a seed gives the same sequence of caches in every run, and a resume needs only the number of
batches drawn. Each cache keeps its own :class:`~kdcache.train.loader.CacheDataset` (its own shuffled order, epochs,
held-out split and resume position), so a batch is one cache's: one ``k``, one grid of tail temperatures, one kind of
target, exactly as a single-cache run collates it. Why per batch rather than per example: the caches need not share
``k``, tail temperatures or hidden states' presence (a batch's targets carry their own), every single-cache guarantee
(buffers, token budgets, exact resume) holds unchanged, and over the many batches of a run the share of each cache is
the same in expectation; the cost is that one step's gradient sees one cache (``grad_accum`` > 1 mixes within steps).

A weight is a share of *batches*, not of examples or tokens: with ``max_tokens`` batches of long and short examples
hold different numbers of examples.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Sequence

import numpy as np

from kdcache.errors import BadInputError, IncompatibleCacheError
from kdcache.train.loader import CacheBatch, CacheDataset, LoaderSettings

__all__ = ["CacheMixture", "EndlessBatches", "cache_labels", "check_caches_agree", "check_loss_for_caches",
           "mixture_sources"]

#: Draws per generator block: batch n's draw is number n % MIX_BLOCK of block n // MIX_BLOCK.
MIX_BLOCK = 1024
_MIX_STREAM = 0x6D6978  # "mix": keeps these draws apart from any other stream seeded with the run's seed


def mixture_sources(weights: Sequence[float], seed: int, start: int, count: int) -> np.ndarray:
    """Which cache batches ``start .. start + count - 1`` of a mixed stream come from: int64 ``[count]`` in
    ``[0, len(weights))``, cache ``i`` with probability ``weights[i] / sum(weights)``.

    Batch ``n``'s draw is a uniform number from numpy's PCG64 seeded with ``(seed, stream, n // MIX_BLOCK)``, mapped
    through the weights' cumulative sum: any position is reached without drawing the ones before it (resuming costs
    one block), and the sequence depends on nothing but the weights, the seed and ``n``.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(w > 0) or not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be a non-empty list of positive finite numbers, got {list(weights)!r}")
    if start < 0 or count < 0:
        raise ValueError(f"start and count must be >= 0, got {start}, {count}")
    cdf = np.cumsum(w / w.sum())
    out = np.empty(count, dtype=np.int64)
    filled = 0
    while filled < count:
        block, offset = divmod(start + filled, MIX_BLOCK)
        take = min(MIX_BLOCK - offset, count - filled)
        u = np.random.default_rng([seed % 2**63, _MIX_STREAM, block]).random(MIX_BLOCK)[offset:offset + take]
        out[filled:filled + take] = np.minimum(np.searchsorted(cdf, u, side="right"), len(w) - 1)
        filled += take
    return out


def cache_labels(paths: Sequence[str]) -> list[str]:
    """Short names for the caches in held-out figures: each path's last folder name, or the whole paths when two
    last names are the same."""
    names = [PurePosixPath(str(p).rstrip("/")).name or str(p) for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


def check_caches_agree(named: Sequence[tuple[str, object]], hidden: bool) -> None:
    """Refuse caches that cannot train one student, in one line naming both caches and the field.

    named: ``(path, manifest)`` per cache, the first being the reference. They must share the tokenizer (its
    vocabulary size and fingerprint: token ids must mean the same tokens) and, with a hidden-state term (``hidden``),
    the stored hidden states (layers, positions, reduction and dimension: one projector serves every batch). ``k``,
    the sparsifier and the tail temperatures may differ: each batch holds one cache's targets.
    """
    first_path, first = named[0]
    for path, manifest in named[1:]:
        fields = [("tokenizer vocab_size", first.tokenizer.vocab_size, manifest.tokenizer.vocab_size),
                  ("tokenizer fingerprint", first.tokenizer.fingerprint, manifest.tokenizer.fingerprint)]
        if hidden:
            fields.append(("hidden states (manifest 'hidden')", _hidden_text(first.hidden),
                           _hidden_text(manifest.hidden)))
        for name, a, b in fields:
            if a != b:
                raise IncompatibleCacheError(
                    f"caches {first_path} and {path} differ in {name} ({a} vs {b}): one student trains from caches "
                    "built with one tokenizer" + (" and the same hidden-state settings" if hidden else "")
                    + "; rebuild one of them to match the other, or train from them in separate runs")


#: What makes two caches' hidden states one space (the storage dtype does not: rows are decoded to float32).
_HIDDEN_KEYS = ("layers", "num_layers", "hidden_size", "positions", "reduction", "dim", "seed", "basis_sha256")


def _hidden_text(info) -> str:
    if info is None:
        return "none"
    return ", ".join(f"{k}={getattr(info, k)}" for k in _HIDDEN_KEYS if getattr(info, k, None) is not None)


def check_loss_for_caches(loss, named: Sequence[tuple[str, object]]) -> None:
    """:func:`~kdcache.train.objective.check_loss_for_cache` and the hidden-state check for every cache, the refusal
    prefixed with the cache it is about when there are several."""
    from kdcache.train.hidden import check_hidden_for_cache
    from kdcache.train.objective import check_loss_for_cache

    for path, manifest in named:
        try:
            check_loss_for_cache(loss, manifest)
            check_hidden_for_cache(loss, manifest)
        except BadInputError as exc:
            if len(named) == 1:
                raise
            raise type(exc)(f"cache {path}: {exc}") from None


# --------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------


class EndlessBatches:
    """A dataset's batches without end: when an epoch runs out, the next one starts (``dataset.set_epoch``).

    Made after any ``load_state_dict``, so its first epoch resumes where the state says."""

    def __init__(self, dataset: CacheDataset):
        self.dataset = dataset
        self.iterator = iter(dataset)

    def next(self) -> CacheBatch:
        try:
            return next(self.iterator)
        except StopIteration:
            self.dataset.set_epoch(self.dataset.epoch + 1)
            self.iterator = iter(self.dataset)
        try:
            return next(self.iterator)
        except StopIteration:
            raise BadInputError(f"the train split of {self.dataset.url} has no batches on this rank: lower "
                                "heldout_fraction, or use a larger cache") from None


class CacheMixture:
    """The training batches of several caches, mixed per batch by weight (see the module docstring).

    datasets: one :class:`CacheDataset` per cache (their train splits, same settings); weights: their positive
    sampling weights; paths: the caches as the config names them; seed: the run's seed.
    Stands where a single-cache run uses its ``CacheDataset``: :meth:`next` for batches, ``state_dict`` /
    ``load_state_dict`` for checkpoints (each cache's loader position, plus the batches drawn so far), ``manifest``
    and ``vocab_size`` (the first cache's; :func:`check_caches_agree` makes them everyone's).
    """

    def __init__(self, datasets: Sequence[CacheDataset], weights: Sequence[float], paths: Sequence[str], seed: int):
        if not (len(datasets) == len(weights) == len(paths) >= 1):
            raise ValueError("give one weight and one path per dataset")
        self.datasets, self.weights, self.paths = list(datasets), [float(w) for w in weights], [str(p) for p in paths]
        self.labels = cache_labels(self.paths)
        self.seed = int(seed)
        self.draws = 0  # batches drawn so far in the run (all epochs)
        self.drawn = [0] * len(self.datasets)  # of which from each cache
        self._streams: list[EndlessBatches] | None = None
        self._block: tuple[int, np.ndarray] | None = None

    @property
    def manifest(self):
        return self.datasets[0].manifest

    @property
    def vocab_size(self) -> int:
        return self.datasets[0].vocab_size

    @property
    def settings(self) -> LoaderSettings:
        return self.datasets[0].settings

    @property
    def url(self) -> str:
        return " + ".join(self.paths)

    def source(self, n: int) -> int:
        """The cache batch ``n`` of the run comes from (:func:`mixture_sources`, a block at a time)."""
        block = n // MIX_BLOCK
        if self._block is None or self._block[0] != block:
            self._block = (block, mixture_sources(self.weights, self.seed, block * MIX_BLOCK, MIX_BLOCK))
        return int(self._block[1][n % MIX_BLOCK])

    def next(self) -> CacheBatch:
        """The run's next batch: from the cache drawn for it, that cache's next batch (its epochs roll over)."""
        if self._streams is None:  # after any load_state_dict, so each cache resumes where it was
            self._streams = [EndlessBatches(d) for d in self.datasets]
        i = self.source(self.draws)
        batch = self._streams[i].next()
        self.draws += 1
        self.drawn[i] += 1
        return batch

    def state_dict(self) -> dict:
        """The batches drawn so far (in all and per cache), each cache's loader position, and what they refer to."""
        return {"mixture": {"paths": list(self.paths), "weights": list(self.weights), "seed": self.seed,
                            "draws": self.draws, "drawn": list(self.drawn)},
                "caches": [d.state_dict() for d in self.datasets]}

    def load_state_dict(self, state: dict) -> None:
        """Resume: each cache at its saved position, the draws at the saved count. The weights and seed may have
        changed (a resume with allow_config_change); the caches may not."""
        mixture = state.get("mixture") if isinstance(state, dict) else None
        if mixture is None:
            raise BadInputError("the checkpoint was written by a run over one cache, so it holds no position in a "
                                "mixture of caches: resume with `cache` as before, or train into a new --out")
        if list(mixture["paths"]) != self.paths:
            raise BadInputError(f"the checkpoint was written by a run over the caches {mixture['paths']}, not "
                                f"{self.paths}: resume with the same caches in the same order, or train into a new "
                                "--out")
        for dataset, saved in zip(self.datasets, state["caches"]):
            dataset.load_state_dict(saved)
        self.draws, self.drawn = int(mixture["draws"]), [int(n) for n in mixture["drawn"]]
        self._streams = None

    def summary(self) -> list[dict]:
        """One line per cache for run_summary.json: path, label, weight, its expected and drawn share of batches."""
        total = sum(self.weights)
        return [{"path": p, "label": label, "weight": w, "share_expected": w / total, "batches_drawn": n,
                 "share_drawn": n / self.draws if self.draws else None}
                for p, label, w, n in zip(self.paths, self.labels, self.weights, self.drawn)]


# --------------------------------------------------------------------------------------
# Opening a run's caches
# --------------------------------------------------------------------------------------


def named_manifests(train_data: CacheDataset | CacheMixture) -> list[tuple[str, object]]:
    """``(path, manifest)`` of each cache a run trains from."""
    if isinstance(train_data, CacheMixture):
        return [(p, d.manifest) for p, d in zip(train_data.paths, train_data.datasets)]
    return [(train_data.url, train_data.manifest)]


def open_train_data(config, tokenizer, common: dict) -> CacheDataset | CacheMixture:
    """The train split of the run's cache (a :class:`CacheDataset`), or of its caches (a :class:`CacheMixture`, after
    :func:`check_caches_agree`). ``common``: the loader options every dataset of the run shares."""
    from kdcache.store.reader import CacheReader

    sources = config.sources()
    if len(sources) > 1:  # each cache's manifest against the first's, before the student's tokenizer is checked
        check_caches_agree([(s.path, CacheReader(s.path, verify_checksums=False).manifest) for s in sources],
                           hidden=config.loss.hidden_weight > 0)
    datasets = [CacheDataset(s.path, split="train", **common, **_role(config, s.path, tokenizer)) for s in sources]
    if len(datasets) == 1:
        return datasets[0]
    return CacheMixture(datasets, [s.weight for s in sources], [s.path for s in sources], config.seed)


def open_heldout(config, tokenizer, common: dict) -> CacheDataset | list[tuple[str, CacheDataset]]:
    """What a run is evaluated on: every example of ``heldout_cache``; else the held-out split of its cache, or of
    each of its caches as ``(label, dataset)`` pairs (figures per cache and over all of them)."""
    if config.heldout_cache:  # every example of another cache; the caches keep their heldout_fraction split
        return CacheDataset(config.heldout_cache, split="all", shuffle=False, **common,
                            **_role(config, config.heldout_cache, tokenizer))
    sources = config.sources()
    datasets = [CacheDataset(s.path, split="heldout", shuffle=False, **common, **_role(config, s.path, tokenizer))
                for s in sources]
    if len(datasets) == 1:
        return datasets[0]
    return list(zip(cache_labels([s.path for s in sources]), datasets))


def _role(config, path: str, tokenizer) -> dict:
    from kdcache.train.crosstok import tokenizer_role

    return tokenizer_role(config.loss, path, tokenizer, config.verify_checksums)
