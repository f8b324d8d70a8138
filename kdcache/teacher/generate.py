"""Teacher-generated targets (a silver set): the teacher answers each prompt, and its answer becomes the target.

Each answer is generated first (greedy, or sampled with temperature / top-p and a per-row seed) and then scored
teacher-forced exactly like a given target, so a generated cache has the same format and code path as any other:
at every answer position it stores the top-k of the teacher's raw (T = 1) distribution, the one the answer was
drawn from before temperature or top-p were applied. Answers are kept as token ids (stop token included, so a
student learns to stop); their text goes to the records' `teacher_text`.

That distribution is the one the decode itself computed to choose each answer token (same prefix), so where the
backend can keep it (`generate_scored`, the transformers backend) and an example's targets are exactly its answer
tokens after exactly its prompt, :func:`generate_answers` returns the decode's sparse targets and the build skips the
teacher-forced pass for that example (see :func:`decoded_targets_fit`).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from kdcache.config import CacheBuildConfig, GenerateConfig
from kdcache.data.encode import Encoded, with_answer
from kdcache.errors import BadInputError
from kdcache.targets import SparseTargets


def check_generate_config(config: CacheBuildConfig) -> None:
    """Refuse settings that cannot give a sensible silver set, with what to change."""
    g = config.generate
    if not g.enabled:
        return
    if g.num_samples < 1 or g.max_new_tokens < 1:
        raise BadInputError("generate.num_samples and generate.max_new_tokens must be at least 1")
    if g.max_new_tokens >= config.max_length:
        raise BadInputError(
            f"generate.max_new_tokens = {g.max_new_tokens} leaves no room for the prompt in max_length = "
            f"{config.max_length}; raise max_length or lower max_new_tokens"
        )
    if g.temperature < 0 or not 0 < g.top_p <= 1:
        raise BadInputError("generate.temperature must be >= 0 and generate.top_p in (0, 1]")
    if g.num_samples > 1 and g.temperature == 0:
        raise BadInputError(
            f"generate.num_samples = {g.num_samples} with greedy decoding (temperature 0) gives identical answers; "
            "set generate.temperature > 0 (e.g. 0.7) or num_samples = 1"
        )


def answer_seed(seed: int, row_index: int) -> int:
    """The seed of one row's answers: depends on the row only, so a resumed or split build draws the same."""
    return (((seed & 0xFFFFFFFF) << 31) ^ row_index) & 0x7FFFFFFFFFFFFFFF


def stop_token_ids(tokenizer, teacher_path: str, revision: str | None = None) -> list[int]:
    """EOS of the tokenizer plus the teacher's generation_config EOS ids (Qwen2.5 chat ends with <|im_end|>)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(teacher_path, revision=revision).eos_token_id
    except (OSError, ValueError):  # no generation_config.json: the tokenizer's EOS alone
        eos = None
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(i) for i in eos)
    if not ids:
        raise BadInputError("the tokenizer has no EOS token and the teacher no generation_config EOS: answers "
                            "would never stop; use a tokenizer with an EOS token")
    return sorted(ids)


def cut_at_stop(ids: list[int], stop_ids: list[int]) -> tuple[list[int], bool]:
    """The answer up to and including its first stop token, and whether it stopped (else it hit max_new_tokens)."""
    stops = set(stop_ids)
    for i, token in enumerate(ids):
        if token in stops:
            return list(ids[: i + 1]), True
    return list(ids), False


def choose_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row: argmax when temperature is 0, else a draw from softmax(logits / T) cut to the top-p mass."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decoded_targets_fit(prompt: Encoded, example: Encoded, answer: list[int]) -> bool:
    """Whether the decode's targets of `answer` are exactly `example`'s: its tokens are the prompt's then the answer's
    (nothing cut) and its targets exactly the answer's positions (answer-only distillation, not every token)."""
    cut = len(prompt.input_ids)
    return (example.input_ids == list(prompt.input_ids) + list(answer)
            and example.target_mask == [False] * cut + [True] * len(answer))


def generate_answers(config: CacheBuildConfig, tokenizer, backend, prompts: list, stop_ids: list[int],
                     sparsify=None) -> tuple[list, list[SparseTargets | None]]:
    """Each prompt (a `Prepared` with no target yet) -> num_samples examples with the teacher's answers as targets,
    and per example its sparse targets taken from the decode, or None where it must be scored teacher-forced.

    With `sparsify` (a `kdcache.teacher.generate_batch.StepSparsifier`, the build's own sparsifier) and a backend that
    has `generate_scored`, the decode sparsifies the logits each answer token was chosen from; an example keeps them
    when :func:`decoded_targets_fit`. Without either, every example gets None (scored teacher-forced, as before).
    """
    g: GenerateConfig = config.generate
    prompt_ids = [p.encoded.input_ids for p in prompts]
    seeds = [answer_seed(g.seed, p.row_index) for p in prompts]
    decoded = None
    if sparsify is not None and hasattr(backend, "generate_scored"):
        answers, decoded = backend.generate_scored(prompt_ids, g, seeds, stop_ids, sparsify)
    else:
        answers = backend.generate(prompt_ids, g, seeds, stop_ids)
    examples, targets = [], []
    for p, (prompt, samples) in enumerate(zip(prompts, answers)):
        if len(samples) != g.num_samples:
            raise RuntimeError(f"the teacher returned {len(samples)} answers for row {prompt.row_index}, "
                               f"expected {g.num_samples}")
        for sample_index, generated in enumerate(samples):
            answer, stopped = cut_at_stop(generated, stop_ids)
            text_ids = answer[:-1] if stopped else answer
            encoded = with_answer(config.template, prompt.encoded, answer)
            examples.append(replace(
                prompt,
                encoded=encoded,
                sample_index=sample_index,
                teacher_text=tokenizer.decode(text_ids),
                teacher_stopped=stopped,
            ))
            fits = decoded is not None and decoded_targets_fit(prompt.encoded, encoded, answer)
            targets.append(decoded[p][sample_index][: len(answer)] if fits else None)
    return examples, targets
