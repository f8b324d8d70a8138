"""What a cache build asks of a teacher backend: `TeacherBackend`, which `HFTeacher` and `VLLMTeacher` implement.

A backend scores batches of sequences teacher-forced (`score`) and, for teacher-generated targets, writes answers
(`generate`). The build owns everything else (rows, batching, the sparsifier, shards), so any object with these two
methods can fill a cache; `kdcache.teacher.build.make_backend` picks one by `teacher.backend`.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

from kdcache.config import GenerateConfig
from kdcache.targets import SparseTargets

TEACHER_BACKENDS = ("hf", "vllm")  # the values of teacher.backend

# A sparsifier: (logits [R, V] of R target rows, the slice of those rows among the batch's target rows) -> the
# SparseTargets of the R rows. The slice lets a sampling sparsifier pick each row's own uniforms.
Sparsifier = Callable[[torch.Tensor, slice], SparseTargets]


@runtime_checkable
class TeacherBackend(Protocol):
    """A teacher that fills a cache: teacher-forced scoring, and answers for teacher-generated targets."""

    def score(self, batch_ids: list[list[int]], batch_masks: list[list[bool]],
              sparsify: Sparsifier) -> list[SparseTargets]:
        """Sparse targets for every target row of the batch, in (example, position) order, as a list of chunks.

        batch_ids[i]: the token ids of sequence i; batch_masks[i][t]: whether token t is a target (its distribution is
        read at position t - 1, so batch_masks[i][0] is False). The chunks concatenated hold sum(mask) rows per
        example, example after example; how the rows are split into chunks is the backend's choice.
        """
        ...

    def generate(self, prompts: list[list[int]], settings: GenerateConfig, seeds: list[int],
                 stop_ids: list[int]) -> list[list[list[int]]]:
        """The teacher's answers: per prompt, `settings.num_samples` lists of token ids (stop token included).

        An answer depends only on its prompt and seed (not on which prompts share a call), and never holds an id past
        the tokenizer's vocabulary.
        """
        ...


__all__ = ["TEACHER_BACKENDS", "Sparsifier", "TeacherBackend"]
