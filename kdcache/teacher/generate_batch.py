"""Batched answer generation for the transformers teacher: one left-padded decode with a KV cache per batch.

`generate_batch` is the loop `HFTeacher.generate` runs per batch of prompts. Every prompt's samples sit in the batch
as rows ``p * n + s``; prompts are left-padded, with position ids counted from each prompt's first real token (so
padding shifts nothing), and each step appends one token per row. A prompt's rows leave the batch (and the KV cache)
once all its samples have produced a stop token or ``max_new_tokens`` tokens, so finished rows cost nothing more.
Sampling draws each prompt's next tokens from the prompt's own generator, over all its samples at once, exactly as
one prompt decoded alone would: an answer depends on its prompt and seed only.

Given a `sparsify` (logits [R, V] -> SparseTargets of the R rows), each step's logits of the rows still producing
tokens are also sparsified as they are, so every answer comes back with the teacher's sparse distribution at each of
its tokens (the one that token was chosen from), [answer tokens, k] per answer, never [steps, V]. These are the
targets teacher-forced scoring of prompt + answer would read at the answer positions (the same prefix), up to the
float rounding of the padded, cached batch; `kdcache.teacher.build` stores them instead of scoring the answers again.
"""

from __future__ import annotations

from typing import Callable

import torch

from kdcache.config import GenerateConfig
from kdcache.targets import SparseTargets
from kdcache.teacher.generate import choose_next

# logits [R, V] of R decode rows (float32, a copy the function may overwrite) -> their SparseTargets, on the CPU
StepSparsifier = Callable[[torch.Tensor], SparseTargets]


def _left_padded(prompts: list[list[int]], copies: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts [P], each repeated `copies` times -> (ids, attention mask), both [P * copies, longest], left-padded."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts) * copies, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for p, prompt in enumerate(prompts):
        rows = slice(p * copies, (p + 1) * copies)
        ids[rows, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[rows, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def generate_batch(model, prompts: list[list[int]], settings: GenerateConfig, seeds: list[int], stop_ids: list[int],
                   vocab_size: int, device: torch.device, sparsify: StepSparsifier | None = None,
                   ) -> tuple[list[list[list[int]]], list[list[SparseTargets]] | None]:
    """Answers to `prompts` [P] decoded as one batch: per prompt, `settings.num_samples` lists of token ids, each
    ending at its first stop token (kept) or after `settings.max_new_tokens` tokens; and with `sparsify`, per prompt
    and sample the SparseTargets of the logits each answer token was chosen from ([len(answer), k]), else None.

    Greedy (temperature 0) takes the argmax over the first `vocab_size` columns; sampling draws prompt p's samples
    from ``torch.Generator().manual_seed(seeds[p])``, one multinomial over its n rows per step while any of them runs
    (as :meth:`HFTeacher.generate` did one prompt at a time, so the draws are the same).
    """
    n = settings.num_samples
    ids, mask = _left_padded(prompts, n, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    stops = torch.tensor(stop_ids, device=device)
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds] \
        if settings.temperature > 0 else None
    answers: list[list[list[int]]] = [[[] for _ in range(n)] for _ in prompts]
    scored: list[list[list[SparseTargets]]] = [[[] for _ in range(n)] for _ in prompts]  # with sparsify: per step
    stopped = torch.zeros(len(prompts) * n, dtype=torch.bool)
    active = list(range(len(prompts)))  # prompts still in the batch, in batch order
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    for step in range(settings.max_new_tokens):
        logits = out.logits[:, -1, :vocab_size].float()  # [len(active) * n, V]
        if generators is None:
            chosen = logits.argmax(dim=-1)
        else:
            chosen = torch.cat([choose_next(logits[a * n : (a + 1) * n], settings.temperature, settings.top_p,
                                            generators[p]) for a, p in enumerate(active)])
        if sparsify is not None:  # the rows still producing tokens (a stopped sample waits for its prompt's others)
            live = [(a * n + s, p, s) for a, p in enumerate(active) for s in range(n) if not stopped[p * n + s]]
            step_targets = sparsify(logits[torch.tensor([r for r, _, _ in live], device=logits.device)])
            for j, (_, p, s) in enumerate(live):
                scored[p][s].append(step_targets[j : j + 1])
        ends = torch.isin(chosen, stops).cpu()
        tokens = chosen.cpu().tolist()
        keep = []
        for a, p in enumerate(active):
            for s in range(n):
                row = p * n + s
                if not stopped[row]:
                    answers[p][s].append(tokens[a * n + s])
                    stopped[row] = bool(ends[a * n + s])
            if not bool(stopped[p * n : (p + 1) * n].all()):
                keep.append(a)
        if not keep or step + 1 == settings.max_new_tokens:
            break
        rows = torch.tensor([a * n + s for a in keep for s in range(n)], device=device)
        if len(keep) < len(active):
            out.past_key_values.batch_select_indices(rows)
            mask, positions, chosen = mask[rows], positions[rows], chosen[rows]
        active = [active[a] for a in keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    if sparsify is None:
        return answers, None
    return answers, [[SparseTargets.cat(steps) for steps in samples] for samples in scored]
