"""Character spans of target tokens in their text: what lets a student with another tokenizer line its tokens up
with the teacher's cached positions (Universal Logit Distillation, :mod:`kdcache.train.crosstok`).

A cache keeps, per target row, the ``[start, end)`` characters of the target token in the example's target text (the
record's ``target``, or ``teacher_text`` for teacher-written answers); ``-1`` where a target row has no characters
there (prompt tokens under ``template.distill=all``, or a text the tokenizer does not give back token for token). The
end-of-sequence token appended to a target gets the empty span ``[len(text), len(text))``.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["NO_SPAN", "example_char_spans", "text_token_spans"]

NO_SPAN = -1


def text_token_spans(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]] | None:
    """``(ids, spans)`` of ``text`` tokenised without special tokens, spans as ``(start, end)`` character offsets;
    None for a tokenizer that cannot give offsets (a slow, Python tokenizer)."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [(int(a), int(b)) for a, b in encoded["offset_mapping"]]


def example_char_spans(tokenizer, text: str, input_ids: Sequence[int], target_mask: Sequence[bool],
                       eos_id: int | None) -> tuple[list[int], list[int]]:
    """Start and end character of each target row (in order) in ``text``, the example's target text.

    The target text's tokens are the last tokens of ``input_ids`` (followed by ``eos_id`` when the template added
    one); target rows before them (prompt tokens) get ``-1``. When ``text`` does not tokenise to exactly those ids
    (a teacher answer that re-tokenises differently, a slow tokenizer), every row gets ``-1``.
    """
    rows = [i for i, m in enumerate(target_mask) if m]
    starts, ends = [NO_SPAN] * len(rows), [NO_SPAN] * len(rows)
    tokens = text_token_spans(tokenizer, text) if text is not None else None
    if tokens is None:
        return starts, ends
    ids, spans = tokens
    ids, spans = list(ids), list(spans)
    tail = list(input_ids[len(input_ids) - len(ids) - 1:])
    if eos_id is not None and len(tail) == len(ids) + 1 and tail[-1] == eos_id and tail[:-1] == ids:
        ids, spans = ids + [eos_id], spans + [(len(text), len(text))]
    if not ids or list(input_ids[len(input_ids) - len(ids):]) != ids:
        return starts, ends
    first = len(input_ids) - len(ids)
    where = {position: n for n, position in enumerate(rows)}
    for offset, (start, end) in enumerate(spans):
        n = where.get(first + offset)
        if n is not None:
            starts[n], ends[n] = start, end
    return starts, ends
