"""A student with another tokenizer, trained from a cache: re-tokenise each cached example with the student's
tokenizer and line the student's target tokens up with the teacher's cached target rows by character offsets.

The cache keeps, per target row, the characters of the teacher's token in the example's target text
(:mod:`kdcache.data.spans`). The student's tokenizer gives its own tokens' offsets in the same text. A teacher row and
a student token are *aligned* when they start at the same character, both read after skipping the whitespace a
token begins with (``" Paris"`` in a byte-level BPE and ``"▁Paris"`` in SentencePiece start at the ``P``; a lone
``"▁"`` before ``"Paris"`` starts there too, and is the student position that predicts the word): the two
models then predict the next token from the same text, and their distributions can be compared as sorted vectors
(:func:`kdcache.train.uld.universal_logit_distillation`). The end-of-sequence token matches the student's. This is
the span alignment TRL's GOLD trainer computes by decoding tokens one by one (the first tokens of its span groups),
done here from stored offsets, once per example, and kept in memory (:class:`StudentView`).

Only aligned student positions are distilled; a student token that starts inside a teacher token (or the reverse)
has no teacher distribution over the same next-text event and is left out (also of the hard-label term).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from kdcache.config import TemplateConfig
from kdcache.data.encode import prompt_ids
from kdcache.data.spans import NO_SPAN, text_token_spans
from kdcache.errors import BadInputError
from kdcache.store.reader import CachedExample
from kdcache.train.vocabmap import VocabularyMap, map_rows, vocabulary_map

__all__ = ["StudentView", "align_by_offsets", "canonical_starts", "tokenizer_role"]


def tokenizer_role(loss, cache: str, tokenizer, verify_checksums: bool = True) -> dict:
    """How a :class:`kdcache.train.loader.CacheDataset` takes the student's tokenizer: ``{"tokenizer": ...}`` (it
    must be the cache's: another one is refused with a message naming ``loss.kind=uld`` and ``loss.vocab_map``), or,
    with ``loss.kind=uld`` or a ``loss.vocab_map`` and another tokenizer, ``{"student_tokenizer": ...,
    "map_vocabulary": ...}`` (examples re-tokenised and aligned; the teacher's ids mapped to the student's)."""
    if loss.kind != "uld" and loss.vocab_map == "off":
        return {"tokenizer": tokenizer}
    from kdcache.store.fingerprint import tokenizer_fingerprint
    from kdcache.store.reader import CacheReader

    manifest = CacheReader(cache, verify_checksums=verify_checksums).manifest
    same = tokenizer_fingerprint(tokenizer) == manifest.tokenizer.fingerprint
    if same:
        return {"tokenizer": tokenizer}
    return {"student_tokenizer": tokenizer, "map_vocabulary": loss.vocab_map != "off"}


def canonical_starts(text: str, spans: Sequence[tuple[int, int]]) -> list[int]:
    """Where each span's word begins: its first character that is not whitespace, looking past its end (a token that
    is only a space, like SentencePiece's lone ``▁``, starts the word after it, as the tokens of one GOLD span group
    do). An empty span (the appended end-of-sequence token) gets ``len(text) + 1``, so it meets only the other side's
    end of sequence; ``-1`` stays ``-1``."""
    out = []
    for start, end in spans:
        if start < 0:
            out.append(NO_SPAN)
            continue
        if start == end:
            out.append(len(text) + 1)
            continue
        s = start
        while s < len(text) and text[s].isspace():
            s += 1
        out.append(s)
    return out


def align_by_offsets(teacher_starts: Sequence[int], student_starts: Sequence[int]) -> list[tuple[int, int]]:
    """``(teacher row, student token)`` pairs that start at the same character, in order; where several tokens of one
    side start at the same character (a character split over byte tokens), the first is used. ``-1`` never aligns."""
    first_teacher: dict[int, int] = {}
    for row, start in enumerate(teacher_starts):
        if start >= 0:
            first_teacher.setdefault(int(start), row)
    pairs, seen = [], set()
    for token, start in enumerate(student_starts):
        if start >= 0 and start in first_teacher and start not in seen:
            seen.add(start)
            pairs.append((first_teacher[start], token))
    return pairs


@dataclass
class _Aligned:
    input_ids: np.ndarray  # int32 [tokens]: the student's prompt + target tokens
    target_mask: np.ndarray  # bool [tokens]: the aligned student target positions
    rows: np.ndarray  # int64 [aligned]: the teacher's cached rows, in the order of the student positions
    prompt_length: int  # the student's prompt tokens (what an encoder-decoder student's encoder reads)


class StudentView:
    """Cached examples as the student sees them: its own tokens, the aligned positions as targets, and the teacher's
    rows for those positions. Each example's alignment is computed once and kept (keyed by ``example.key``).

    manifest: the cache's (template and max length); tokenizer: the student's (a fast tokenizer, for offsets).
    map_vocabulary: also give the teacher's entries the student's ids (:func:`kdcache.train.vocabmap.map_rows`; the
    teacher's tokenizer is loaded from the name the cache records), for ``loss.vocab_map``.
    """

    def __init__(self, manifest, tokenizer, cache_tokenizer=None, map_vocabulary: bool = False):
        if cache_tokenizer is not None:
            raise TypeError("give tokenizer (the cache's) or student_tokenizer (another one), not both")
        if not getattr(tokenizer, "is_fast", False):
            raise BadInputError(f"the student's tokenizer '{getattr(tokenizer, 'name_or_path', '?')}' is a slow "
                                "(Python) tokenizer without character offsets; give a student with a fast tokenizer "
                                "(tokenizer.json) for loss.kind=uld")
        t = manifest.template
        self.template = TemplateConfig(prompt=t.prompt, target=t.target, system=t.system, chat=t.chat,
                                       distill=t.distill, add_eos=t.add_eos)
        self.tokenizer = tokenizer
        self.max_length = manifest.max_length
        self.memory: dict[tuple[int, int], _Aligned] = {}
        self.vocab_size = len(tokenizer)  # the student's softmax covers its own tokenizer's vocabulary
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.vocabulary = _teacher_map(manifest, tokenizer) if map_vocabulary else None
        self.tail_temperatures = tuple(getattr(manifest.sparsifier, "tail_temperatures", None) or ())

    def __call__(self, example: CachedExample) -> CachedExample:
        aligned = self.memory.get(example.key)
        if aligned is None:
            aligned = self.memory[example.key] = self._align(example)
        rows = aligned.rows

        def take(array):
            return None if array is None else array[rows]

        ids, logprobs = example.sparse_ids[rows], example.sparse_logprobs[rows]
        tail, tempered = take(example.tail_logmass), take(example.tail_tempered)
        if self.vocabulary is not None:
            ids, logprobs, tail, tempered = map_rows(self.vocabulary, ids, logprobs, tail, tempered, self.tail_temperatures)
        return replace(example, input_ids=aligned.input_ids, target_mask=aligned.target_mask,
                       sparse_ids=ids, sparse_logprobs=logprobs, tail_logmass=tail,
                       sample_counts=take(example.sample_counts), tail_tempered=tempered,
                       prompt_length=aligned.prompt_length)

    def _align(self, example: CachedExample) -> _Aligned:
        record = example.record
        if "target_char_starts" not in record:
            raise BadInputError("this cache keeps no character offsets of its target tokens (built before kdcache "
                                "stored them), so a student with another tokenizer cannot be aligned to it: rebuild "
                                "the cache with this kdcache")
        text = record["teacher_text"] if record.get("teacher_text") is not None else record["target"]
        tokenizer = self.tokenizer
        ids, spans = text_token_spans(tokenizer, text)
        if self.template.add_eos and tokenizer.eos_token_id is not None:
            ids, spans = ids + [tokenizer.eos_token_id], spans + [(len(text), len(text))]
        prompt = prompt_ids(self.template, tokenizer, record["prompt"])
        room = max(1, self.max_length - len(ids))
        prompt = prompt[max(0, len(prompt) - room):] or [tokenizer.bos_token_id or tokenizer.eos_token_id or 0]
        teacher = canonical_starts(text, list(zip(record["target_char_starts"], record["target_char_ends"])))
        student = canonical_starts(text, spans)
        pairs = [(row, token) for row, token in align_by_offsets(teacher, student)]
        input_ids = np.asarray(prompt + ids, dtype=np.int32)
        mask = np.zeros(len(input_ids), dtype=bool)
        positions = [len(prompt) + token for _, token in pairs]
        mask[positions] = True
        return _Aligned(input_ids, mask, np.asarray([row for row, _ in pairs], dtype=np.int64), len(prompt))


def _teacher_map(manifest, student_tokenizer) -> VocabularyMap:
    """The vocabulary map from the cache's tokenizer (loaded by the name the cache records, and checked against its
    fingerprint) to the student's."""
    from transformers import AutoTokenizer

    from kdcache.store.fingerprint import tokenizer_fingerprint

    if manifest.sparsifier.kind != "topk":
        raise BadInputError("loss.vocab_map maps a topk cache's entries; this cache is a sample cache: use "
                            "loss.kind=uld with a topk cache, or rebuild it with sparsifier.kind=topk")
    name = manifest.tokenizer.name
    try:
        teacher = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise BadInputError(f"loss.vocab_map needs the cache's tokenizer '{name}' to map its token ids, and it could "
                            f"not be loaded ({str(error).splitlines()[0]}): make it available locally, or use "
                            "loss.kind=uld (no vocabulary map)") from None
    if tokenizer_fingerprint(teacher) != manifest.tokenizer.fingerprint:
        raise BadInputError(f"the tokenizer loaded from '{name}' is not the one the cache was built with (another "
                            "fingerprint), so its token ids would be read wrongly: restore that tokenizer, or use "
                            "loss.kind=uld (no vocabulary map)")
    return vocabulary_map(teacher, student_tokenizer)
