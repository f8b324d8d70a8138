"""Tokenise a prompt and target into one sequence with a mask of the positions to distill."""

from __future__ import annotations

from dataclasses import dataclass

from kdcache.config import TemplateConfig
from kdcache.data.sources import BadRow, Row


@dataclass
class Encoded:
    """Token ids of prompt + target; `target_mask[t]` is True when token t is distilled (predicted from t-1)."""

    input_ids: list[int]
    target_mask: list[bool]
    prompt_truncated: int = 0  # prompt tokens dropped from the left to fit max_length


def uses_chat_template(template: TemplateConfig, tokenizer) -> bool:
    """Whether the prompt is wrapped in the tokenizer's chat template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if template.chat == "yes" and not has_template:
        from kdcache.errors import BadInputError

        raise BadInputError("template.chat is 'yes' but the tokenizer has no chat template; set template.chat=no")
    return template.chat == "yes" or (template.chat == "auto" and has_template)


def prompt_text_for_model(template: TemplateConfig, tokenizer, prompt: str) -> tuple[str, bool]:
    """The exact prompt string fed to the tokenizer, and whether special tokens are already in it."""
    if uses_chat_template(template, tokenizer):
        messages = []
        if template.system:
            messages.append({"role": "system", "content": template.system})
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, True
    if template.system:
        prompt = template.system + "\n\n" + prompt
    return prompt, False


def prompt_ids(template: TemplateConfig, tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids exactly as the model sees them (chat template applied when used)."""
    text, has_specials = prompt_text_for_model(template, tokenizer, prompt)
    return tokenizer(text, add_special_tokens=not has_specials)["input_ids"]


def fit_prompt(tokenizer, ids: list[int], room: int) -> tuple[list[int], int]:
    """Cut the prompt from the left to `room` tokens; an empty prompt gets one BOS/EOS token as context."""
    dropped = max(0, len(ids) - room)
    ids = ids[dropped:]
    if not ids:
        # A target at position 0 has nothing to be predicted from: start with BOS/EOS as a context token.
        anchor = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [anchor if anchor is not None else 0]
    return ids, dropped


def _with_target(template: TemplateConfig, ids: list[int], target_ids: list[int], dropped: int) -> Encoded:
    input_ids = ids + target_ids
    if template.distill == "all":
        mask = [False] + [True] * (len(input_ids) - 1)
    else:
        mask = [False] * len(ids) + [True] * len(target_ids)
    return Encoded(input_ids=input_ids, target_mask=mask, prompt_truncated=dropped)


def encode(template: TemplateConfig, tokenizer, row: Row, prompt: str, target: str, max_length: int) -> Encoded:
    """Token ids and target mask; the prompt is cut from the left to fit, a target that cannot fit is a bad row."""
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] if target else []
    if template.add_eos and tokenizer.eos_token_id is not None:
        target_ids = target_ids + [tokenizer.eos_token_id]
    if template.distill == "target" and not target_ids:
        raise BadRow(row, "target tokenises to nothing", field="target")
    room_for_prompt = max_length - len(target_ids)
    if room_for_prompt < 1:
        raise BadRow(
            row,
            f"target cut off by max_length: it has {len(target_ids)} tokens and max_length is {max_length} "
            "(raise max_length or shorten the target)",
            field="target",
        )
    ids, dropped = fit_prompt(tokenizer, prompt_ids(template, tokenizer, prompt), room_for_prompt)
    return _with_target(template, ids, target_ids, dropped)


def encode_prompt(template: TemplateConfig, tokenizer, prompt: str, room: int) -> Encoded:
    """A prompt alone (for teacher-generated answers), cut from the left to `room` tokens; nothing is a target yet."""
    ids, dropped = fit_prompt(tokenizer, prompt_ids(template, tokenizer, prompt), room)
    return Encoded(input_ids=ids, target_mask=[False] * len(ids), prompt_truncated=dropped)


def with_answer(template: TemplateConfig, prompt: Encoded, answer_ids: list[int]) -> Encoded:
    """A prompt followed by the teacher's answer tokens (kept as generated, stop token included), as an example."""
    return _with_target(template, list(prompt.input_ids), list(answer_ids), prompt.prompt_truncated)
