"""The plan's `imported` record: a cache written by `kdcache cache import` from another tool's top-k files.

Such a cache has no exact tail: the files hold top-k log-probs only, so its tail is derived as log(1 - sum p_topk)
and its plan is marked the way vLLM's prompt_logprobs route marks it (``teacher.vllm.scoring: prompt_logprobs``,
no ``sparsifier.tail_temperatures``), so the refusals for losses that need an exact tail apply (see
kdcache.train.objective.check_loss_for_cache). `tail` says what the derived tail is worth: ``derived`` (the files
keep the teacher's unnormalised top-k, so 1 - sum p is the tail mass, to float32 rounding) or ``none`` (the top-k
were renormalised to sum to 1, as Axolotl's datasets are: no tail mass is known at all, and the stored tail is the
float32-eps floor). A plan without `imported` was built by a teacher run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kdcache.store.schema import Record, omitted_when_none

__all__ = ["IMPORT_FORMATS", "ImportInfo"]

IMPORT_FORMATS = ("vllm", "axolotl", "distillkit")


@dataclass(frozen=True, kw_only=True)
class ImportInfo(Record):
    """Where an imported cache's top-k came from, and what its tail is."""

    format: Literal["vllm", "axolotl", "distillkit"]
    sources: tuple[str, ...]  # the files read, as given
    tail: Literal["derived", "none"]  # derived: log(1 - sum p_topk); none: renormalised top-k, no tail mass known
    compression: dict | None = omitted_when_none()  # distillkit: its DistributionQuantizationConfig, as read
