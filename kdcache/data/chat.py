"""Conversations as examples: a `messages` field (OpenAI/TRL: role, content) or ShareGPT `conversations` (from,
value; human, gpt), one or many turns, rendered with the tokenizer's chat template; the turns of the roles to
train (`template.roles_to_train`, assistant by default, as Axolotl's `roles_to_train`) are the distilled targets.

How a conversation becomes tokens (`encode_conversation`):

1. The whole conversation is rendered once by the chat template. Each turn to train starts where the rendering of
   the turns before it ends with the generation prompt (an assistant turn; other roles: where its content starts),
   so its header is context, and ends where the rendering up to it ends, less trailing whitespace: an assistant
   turn is its content and its end-of-turn token (`Hi<|im_end|>`), what the model generates after the generation
   prompt.
2. Those prefixes must be prefixes of the whole rendering (else the template rewrites earlier turns, and the
   spans are unknown: the row is refused).
3. The text is tokenised piece by piece at the span boundaries, as at inference (the prompt, then the answer), and
   exactly the pieces of the turns to train are targets.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kdcache.config import TemplateConfig
from kdcache.data.encode import Encoded
from kdcache.data.sources import BadRow, Row
from kdcache.errors import BadInputError

#: ShareGPT's and other datasets' speaker names, as the chat template's roles.
ROLE_NAMES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant", "chatgpt": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}
#: Fields that hold a conversation, in the order a default template looks for them.
CONVERSATION_FIELDS = ("messages", "conversations")


def resolve_conversations(template: TemplateConfig, first_row: Row | None) -> TemplateConfig:
    """The template to build with: with the default prompt/target (`{input}`/`{target}`) and rows that have no
    `input` but a `messages` or `conversations` field, that field holds the conversations (as TRL reads a
    `messages` column); any other template is returned as given."""
    default = TemplateConfig()
    if (template.messages is not None or first_row is None or template.prompt != default.prompt
            or template.target != default.target or "input" in first_row.fields):
        return template
    found = next((name for name in CONVERSATION_FIELDS if name in first_row.fields), None)
    return template if found is None else dataclasses.replace(template, messages=found)


def check_chat_tokenizer(template: TemplateConfig, tokenizer) -> None:
    """Conversations need the tokenizer's chat template (and template.chat other than 'no')."""
    if template.chat == "no":
        raise BadInputError(f"template.messages ('{template.messages}') renders conversations with the tokenizer's "
                            "chat template, so template.chat cannot be 'no'; set it to auto or yes")
    if not getattr(tokenizer, "chat_template", None):
        raise BadInputError(f"the rows hold conversations (field '{template.messages}') but the tokenizer has no chat "
                            "template: use a chat (instruct) tokenizer, or give prompt/target templates instead")


def _turn(row: Row, field: str, number: int, turn: Any) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise BadRow(row, f"turn {number} is not a mapping (got {type(turn).__name__})", field=field)
    if "role" in turn or "content" in turn:
        speaker, text = turn.get("role"), turn.get("content")
    else:
        speaker, text = turn.get("from"), turn.get("value")
    if speaker is None:
        raise BadRow(row, f"turn {number} has no role (OpenAI `role`/`content` or ShareGPT `from`/`value`; it has "
                          f"{', '.join(sorted(turn)) or 'no keys'})", field=field)
    role = ROLE_NAMES.get(str(speaker).lower())
    if role is None:
        raise BadRow(row, f"turn {number} has role '{speaker}', not one of {', '.join(sorted(ROLE_NAMES))}",
                     field=field)
    if not isinstance(text, str):
        raise BadRow(row, f"turn {number} ({role}) has no text content (got {type(text).__name__})", field=field)
    return {"role": role, "content": text}


def conversation(template: TemplateConfig, row: Row) -> list[dict[str, str]]:
    """The row's turns as `{"role", "content"}` with standard roles; `template.system` is put first when the
    conversation has no system turn."""
    field = template.messages
    turns = row.fields.get(field)
    if turns is None:
        raise BadRow(row, f"missing field (template.messages names it; the row has: "
                          f"{', '.join(sorted(row.fields)) or 'no fields'})", field=field)
    if not isinstance(turns, (list, tuple)) or not turns:
        raise BadRow(row, "is not a non-empty list of turns", field=field)
    messages = [_turn(row, field, number, turn) for number, turn in enumerate(turns, start=1)]
    if template.system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": template.system})
    return messages


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def turn_spans(template: TemplateConfig, tokenizer, row: Row, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The whole rendering and the [start, end) character spans of the turns to train (see the module docstring)."""
    full = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] not in template.roles_to_train:
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=message["role"] == "assistant") if i else ""
        through = _render(tokenizer, messages[: i + 1]).rstrip()
        if message["role"] != "assistant":  # no generation prompt for other roles: the turn starts at its content
            found = through.find(message["content"].strip(), len(before))
            before = before if found < 0 else through[:found]
        if not (full.startswith(before) and full.startswith(through) and len(before) < len(through)):
            raise BadRow(row, f"the tokenizer's chat template does not render turn {i + 1} as a prefix of the "
                              "whole conversation, so its tokens cannot be told apart; use a template that renders "
                              "earlier turns the same whatever follows", field=template.messages)
        spans.append((len(before), len(through)))
    return full, spans


def encode_conversation(template: TemplateConfig, tokenizer, row: Row, max_length: int) -> tuple[Encoded, str, str]:
    """Token ids, target mask (the turns to train), the prompt text (everything before the first such turn) and the
    target text (the rest). A conversation over max_length is cut from the left while no target is dropped."""
    messages = conversation(template, row)
    full, spans = turn_spans(template, tokenizer, row, messages)
    if not spans and template.distill == "target":
        raise BadRow(row, f"has no turn of the roles to train ({', '.join(template.roles_to_train)})",
                     field=template.messages)
    ids: list[int] = []
    mask: list[bool] = []
    cursor = 0
    for start, end in [*spans, (len(full), len(full))]:
        for piece, is_target in ((full[cursor:start], False), (full[start:end], True)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids.extend(piece_ids)
                mask.extend([is_target] * len(piece_ids))
        cursor = end
    if template.distill == "all":
        mask = [True] * len(ids)
    mask[0] = False  # the first token has nothing to be predicted from
    dropped = max(0, len(ids) - max_length)
    if any(mask[:dropped]) or (dropped and template.distill == "all"):
        raise BadRow(row, f"conversation has {len(ids)} tokens, more than max_length {max_length}, and cutting it "
                          "from the left would drop distilled turns (raise max_length or split the conversation)",
                     field=template.messages)
    prompt_end = spans[0][0] if spans else len(full)
    encoded = Encoded(input_ids=ids[dropped:], target_mask=mask[dropped:], prompt_truncated=dropped)
    return encoded, full[:prompt_end], full[prompt_end:]


def prompt_of_conversation(template: TemplateConfig, tokenizer, row: Row) -> tuple[str, str]:
    """For teacher-written answers: the conversation up to its last user turn with the generation prompt, and the
    final assistant turn's content as the reference (else "")."""
    messages = conversation(template, row)
    reference = ""
    if messages[-1]["role"] == "assistant":
        reference = messages.pop()["content"]
    if not any(m["role"] == "user" for m in messages):
        raise BadRow(row, "has no user turn to answer", field=template.messages)
    return _render(tokenizer, messages, generation_prompt=True), reference
