"""The transformers teacher backend: any AutoModelForCausalLM, scoring target positions only, chunk by chunk."""

from __future__ import annotations

from typing import Callable

import torch

from kdcache.config import GenerateConfig, TeacherConfig
from kdcache.errors import BadInputError
from kdcache.modeling import (layer_hidden_states, load_causal_lm, output_logits, resolve_device, row_chunks,
                              target_hidden_states)
from kdcache.targets import SparseTargets
from kdcache.teacher.backend import Sparsifier
from kdcache.teacher.generate_batch import StepSparsifier


class HFTeacher:
    """A `TeacherBackend` on transformers: hidden states for the batch, then LM head + sparsifier over target rows in
    chunks."""

    def __init__(self, config: TeacherConfig, vocab_size: int):
        self.config = config
        self.device = resolve_device(config.device)
        self.model = load_causal_lm(config.model, config.revision, config.dtype, self.device, config.trust_remote_code)
        self.vocab_size = vocab_size
        rows = self.model.get_output_embeddings().weight.shape[0]
        if rows < vocab_size:
            raise BadInputError(
                f"the teacher's LM head has {rows} rows but the tokenizer has {vocab_size} tokens: they do not belong "
                "together"
            )

    def score(
        self,
        batch_ids: list[list[int]],
        batch_masks: list[list[bool]],
        sparsify: Sparsifier,
    ) -> list[SparseTargets]:
        """Sparse targets for every target row of the batch, in (example, position) order, one chunk at a time.

        Token t is a target when mask[t]; its distribution is read from the hidden state at t - 1. Logits exist only
        for `chunk_size` rows at a time, and columns past the tokenizer's vocabulary (embedding padding) are dropped.
        """
        return self.score_with_hidden(batch_ids, batch_masks, sparsify)[0]

    @torch.inference_mode()
    def score_with_hidden(self, batch_ids: list[list[int]], batch_masks: list[list[bool]], sparsify: Sparsifier,
                          layers: tuple[int, ...] = (), positions: str = "target",
                          reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                          ) -> tuple[list[SparseTargets], list[torch.Tensor]]:
        """:meth:`score`, plus the hidden states ``layers`` (indices into ``output_hidden_states``) from the same
        forward pass: ``reduce`` maps each chunk of rows ``[n, len(layers), H]`` to what is kept (on the CPU). Rows are
        the positions that predict the targets (``positions="target"``, the logits' rows) or every token of every
        sequence (``"all"``), example by example, positions ascending."""
        length = max(len(ids) for ids in batch_ids)
        input_ids = torch.zeros((len(batch_ids), length), dtype=torch.long)
        attention = torch.zeros((len(batch_ids), length), dtype=torch.long)
        target = torch.zeros((len(batch_ids), length), dtype=torch.bool)
        for row, (ids, mask) in enumerate(zip(batch_ids, batch_masks)):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            target[row, : len(ids)] = torch.tensor(mask)
        input_ids, attention, target = input_ids.to(self.device), attention.to(self.device), target.to(self.device)
        hidden_rows: list[torch.Tensor] = []
        if layers:
            final, chosen = layer_hidden_states(self.model, input_ids, attention, layers)
            rows, cols = target.nonzero(as_tuple=True)
            if cols.numel() and bool((cols == 0).any()):
                raise ValueError("position 0 cannot be a target: nothing before it predicts it")
            selected = final[rows, cols - 1]
            at_rows, at_cols = (rows, cols - 1) if positions == "target" else attention.bool().nonzero(as_tuple=True)
            for part in row_chunks(at_rows.shape[0], self.config.chunk_size):
                stacked = torch.stack([h[at_rows[part], at_cols[part]] for h in chosen], dim=1)
                hidden_rows.append((reduce or (lambda x: x))(stacked).cpu())
        else:
            selected = target_hidden_states(self.model, input_ids, attention, target)  # row-major: example by example
        chunks = []
        for rows in row_chunks(selected.shape[0], self.config.chunk_size):
            logits = output_logits(self.model, selected[rows])[:, : self.vocab_size]
            chunks.append(sparsify(logits, rows))
        return chunks, hidden_rows

    def generate(self, prompts: list[list[int]], settings: GenerateConfig, seeds: list[int],
                 stop_ids: list[int]) -> list[list[list[int]]]:
        """The teacher's answers: per prompt, `settings.num_samples` lists of token ids (stop token included).

        Prompts sorted by length go `teacher.batch_size` sequences (prompts x samples) at a time through one
        left-padded decode with a KV cache (:func:`kdcache.teacher.generate_batch.generate_batch`): a prompt leaves the
        batch once all its samples have stopped. Each prompt draws from its own generator seeded with its seed, so an
        answer depends on its prompt and seed only, not on which prompts share a batch (up to float rounding of the
        padded batch). Columns past the tokenizer's vocabulary are never chosen.
        """
        return self.generate_scored(prompts, settings, seeds, stop_ids, None)[0]

    @torch.inference_mode()
    def generate_scored(self, prompts: list[list[int]], settings: GenerateConfig, seeds: list[int],
                        stop_ids: list[int], sparsify: StepSparsifier | None,
                        ) -> tuple[list[list[list[int]]], list[list[SparseTargets]] | None]:
        """:meth:`generate`, and with `sparsify` also each answer's SparseTargets [len(answer), k] taken from the
        decode's own logits (what teacher-forced scoring of prompt + answer gives at the answer's positions, up to
        float rounding), per prompt and sample; None without `sparsify`."""
        from kdcache.teacher.generate_batch import generate_batch

        n = settings.num_samples
        per_batch = max(1, self.config.batch_size // n)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: list[list[list[int]]] = [[] for _ in prompts]
        targets: list[list[SparseTargets]] = [[] for _ in prompts]
        for start in range(0, len(order), per_batch):
            group = order[start : start + per_batch]
            out, scored = generate_batch(self.model, [prompts[i] for i in group], settings, [seeds[i] for i in group],
                                         stop_ids, self.vocab_size, self.device, sparsify)
            for j, (i, samples) in enumerate(zip(group, out)):
                answers[i] = samples
                if scored is not None:
                    targets[i] = scored[j]
        return answers, targets if sparsify is not None else None
