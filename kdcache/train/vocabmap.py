"""Vocabulary mapping between a teacher's and a student's tokenizers (TRL GOLD's hybrid cross-tokenizer loss).

Two tokens *coincide* when they stand for the same text: each vocabulary entry is read as its text
(:func:`token_texts`: a byte-level BPE's ``"Ġ"`` and a SentencePiece ``"▁"`` both become a space, byte-level tokens
are decoded from their bytes) and a teacher token maps to the student token with the same text. TRL's GOLD trainer
(``GOLDConfig(uld_use_hybrid_loss=True)``) maps the raw vocabulary strings, so ``"Ġthe"`` never meets ``"▁the"``;
here the leading-space markers are normalised first. Tokens with no text of their own (a byte-level piece of a
UTF-8 character, SentencePiece byte fallbacks ``<0xNN>``) map to nothing; added/special tokens map only to an added
token with the same content, and the teacher's end-of-sequence token always maps to the student's.

The map is built once per (teacher tokenizer, student tokenizer) pair and kept in memory (:func:`vocabulary_map`).
:func:`map_rows` applies it to a cached example's rows: mapped entries get the student's ids, the others get
:data:`UNMAPPED` and their probability joins the tail (at T = 1 and at every cached tail temperature, exactly), so
every sparse loss runs unchanged over the student's vocabulary; ``vocab_map=hybrid`` also compares the unmapped
entries by ULD (:func:`kdcache.train.uld.unmapped_uld`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

__all__ = ["UNMAPPED", "VocabularyMap", "map_rows", "token_texts", "vocabulary_map"]

#: The id an unmapped teacher entry gets in mapped targets: not a student token (``< 0``, so every loss skips it like
#: ``-1`` padding, its mass being in the tail), but kept apart from padding for the hybrid's ULD term.
UNMAPPED = -2


def _decoder_types(tokenizer) -> set[str]:
    """The ``type`` of the fast tokenizer's decoder and of every decoder in a ``Sequence``."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    found, stack = set(), [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            found.add(node.get("type"))
            stack.extend(node.get("decoders") or [])
    return found


def token_texts(tokenizer) -> list[str | None]:
    """The text each id of ``tokenizer`` stands for, ``len(tokenizer)`` entries: byte-level tokens decoded from their
    bytes (``None`` when they are not whole UTF-8 characters), ``"▁"`` read as a space otherwise, byte-fallback
    tokens ``<0xNN>`` ``None``; added tokens as ``"\\x00added:" + content`` (they match only each other)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("token_texts needs a fast tokenizer (tokenizer.json)")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_level = "ByteLevel" in _decoder_types(tokenizer)
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    added = {token: i for token, i in tokenizer.get_added_vocab().items()}
    texts: list[str | None] = [None] * len(tokenizer)
    for token, i in tokenizer.get_vocab().items():
        if i >= len(texts):
            continue
        if token in added:
            texts[i] = "\x00added:" + token
        elif byte_level:
            try:
                texts[i] = bytes(to_byte[c] for c in token).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                texts[i] = None
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            texts[i] = None  # a byte-fallback token: one byte, not a text
        else:
            texts[i] = token.replace("\u2581", " ")
    return texts


@dataclass(frozen=True)
class VocabularyMap:
    """``teacher_to_student`` int64 [V_t]: the student id of each teacher id, :data:`UNMAPPED` where none.

    Injective: two teacher tokens never map to one student token (the first id keeps a repeated text)."""

    teacher_to_student: np.ndarray

    @property
    def num_mapped(self) -> int:
        return int((self.teacher_to_student >= 0).sum())


def _build(teacher_tokenizer, student_tokenizer) -> VocabularyMap:
    student_of: dict[str, int] = {}
    for i, text in enumerate(token_texts(student_tokenizer)):
        if text:
            student_of.setdefault(text, i)
    out = np.full(len(teacher_tokenizer), UNMAPPED, dtype=np.int64)
    used: set[int] = set()
    for i, text in enumerate(token_texts(teacher_tokenizer)):
        j = student_of.get(text) if text else None
        if j is not None and j not in used:
            out[i] = j
            used.add(j)
    t_eos, s_eos = teacher_tokenizer.eos_token_id, student_tokenizer.eos_token_id
    if t_eos is not None and s_eos is not None:  # the end of the text is the same event on both sides
        out[out == s_eos] = UNMAPPED
        out[t_eos] = s_eos
    return VocabularyMap(out)


_MAPS: dict[tuple[str, str], VocabularyMap] = {}


def vocabulary_map(teacher_tokenizer, student_tokenizer) -> VocabularyMap:
    """The :class:`VocabularyMap` of a tokenizer pair, built on first use and kept in memory (keyed by the two
    tokenizers' fingerprints)."""
    from kdcache.store.fingerprint import tokenizer_fingerprint

    key = (tokenizer_fingerprint(teacher_tokenizer), tokenizer_fingerprint(student_tokenizer))
    if key not in _MAPS:
        _MAPS[key] = _build(teacher_tokenizer, student_tokenizer)
    return _MAPS[key]


def map_rows(vocab: VocabularyMap, ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray | None,
             tempered: np.ndarray | None, temperatures: tuple[float, ...]):
    """``(ids, logprobs, tail, tempered)`` of cached rows with the teacher's ids replaced by the student's.

    ids: int [R, k] teacher ids (``-1`` padding); logprobs [R, k]; tail [R] (``None``: derived later from the mapped
    entries, which then leaves out the unmapped mass by itself); tempered [R, G] the tail's log-partition at
    ``temperatures``. Each row comes back with its mapped entries first, then the unmapped ones (id
    :data:`UNMAPPED`), then the padding, each group in the cached (teacher's rank) order: the losses expect a row's
    real entries before its padding. The unmapped entries join the tail exactly:
    ``tail' = logaddexp(tail, logsumexp(unmapped logprobs))``, and likewise with ``logprobs / T`` in each column of
    ``tempered``.
    """
    ids = np.asarray(ids)
    table = vocab.teacher_to_student
    inside = (ids >= 0) & (ids < len(table))
    mapped = np.where(inside, table[np.where(inside, ids, 0)], np.where(ids >= 0, UNMAPPED, ids)).astype(np.int64)
    unmapped = mapped == UNMAPPED
    if not unmapped.any():
        return mapped, logprobs, tail, tempered
    order = np.argsort(np.where(mapped >= 0, 0, np.where(unmapped, 1, 2)), axis=1, kind="stable")
    mapped = np.take_along_axis(mapped, order, axis=1)
    logprobs = np.take_along_axis(np.asarray(logprobs), order, axis=1)
    unmapped = mapped == UNMAPPED

    def fold(base: np.ndarray, scale: float) -> np.ndarray:
        extra = np.where(unmapped, logprobs.astype(np.float64) / scale, -np.inf)
        return np.logaddexp(base.astype(np.float64), np.logaddexp.reduce(extra, axis=1)).astype(base.dtype)

    if tail is not None:
        tail = fold(tail, 1.0)
    if tempered is not None and tempered.shape[1]:
        tempered = np.stack([fold(tempered[:, j], t) for j, t in enumerate(temperatures)], axis=1)
    return mapped, logprobs, tail, tempered
