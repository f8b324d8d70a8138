"""`kdcache augment`: rows in, an augmented JSONL out, for `kdcache cache build --data` (docs/data.md).

The stages, in order: format conversions (MCQ -> QA, fill-in-the-blank -> QA, in place), deduplication of the
sources, typo copies and paraphrase copies of each kept source, deduplication of the copies against everything
before them. Every output row keeps its provenance in three fields: `source_id` (the source row's id, or
`FILE:ROW` without `data.id_field`; the same for the source and all its copies), `augmentation` (original,
mcq_to_qa, blank_to_qa, typo, paraphrase) and `augmentation_index` (0 for a source, 1.. for its copies).
A cache built from such rows splits them by source id (`split_key`), so a held-out row's copies stay held out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcache.config_augment import AugmentConfig, ConvertConfig
from kdcache.data.sources import BadRow, Row, read_rows
from kdcache.errors import BadInputError

log = logging.getLogger("kdcache.augment")

PROVENANCE_FIELDS = ("source_id", "augmentation", "augmentation_index")


def split_key(fields: dict, row_index: int) -> int:
    """The key a cache's held-out split hashes for a row: its index, or for a row with a `source_id` a 63-bit hash
    of that id, so a source row and all its augmented copies land on the same side."""
    source_id = fields.get("source_id")
    if source_id is None:
        return row_index
    digest = hashlib.blake2b(str(source_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFFFFFFFFFF


# ---- typo noise ----

def typo_word(word: str, rng: random.Random) -> str:
    """`word` with one typo: two different adjacent letters swapped, a letter deleted (when it has two or more), a
    letter inserted or a letter replaced by another; the op is drawn among those that apply. A word without a
    letter comes back as it is."""
    letters = [i for i, char in enumerate(word) if char.isalpha()]
    if not letters:
        return word
    swaps = [i for i in letters if i + 1 < len(word) and word[i + 1].isalpha() and word[i] != word[i + 1]]
    ops = ["insert", "replace"] + (["swap"] if swaps else []) + (["delete"] if len(letters) >= 2 else [])
    op = rng.choice(ops)
    if op == "swap":
        i = rng.choice(swaps)
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == "delete":
        i = rng.choice(letters)
        return word[:i] + word[i + 1:]
    if op == "insert":
        i = rng.randint(letters[0], letters[-1] + 1)
        new = rng.choice(string.ascii_lowercase)
        return word[:i] + (new.upper() if word[min(i, letters[-1])].isupper() else new) + word[i:]
    i = rng.choice(letters)
    new = rng.choice([c for c in string.ascii_lowercase if c != word[i].lower()])
    return word[:i] + (new.upper() if word[i].isupper() else new) + word[i + 1:]


def add_typos(text: str, rate: float, rng: random.Random) -> tuple[str, int]:
    """`text` with each word (a run of non-space characters holding a letter) given one typo with probability `rate`,
    and the number of typos made. Spacing is kept, so the words stay aligned with the original's."""
    count = 0

    def noisy(match: re.Match) -> str:
        nonlocal count
        word = match.group(0)
        if any(c.isalpha() for c in word) and rng.random() < rate:
            count += 1
            return typo_word(word, rng)
        return word

    return re.sub(r"\S+", noisy, text), count


# ---- format conversions ----

def _fill(template: str, fields: dict, row: Row) -> str:
    try:
        return template.format(**fields)
    except (KeyError, IndexError) as exc:
        raise BadRow(row, f"the conversion template {template!r} uses {exc} which the row lacks") from None


def _option_index(answer: Any, count: int, row: Row, name: str) -> int:
    if isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    else:
        letter = str(answer).strip().strip("().:").strip()
        if len(letter) != 1 or not letter.isalpha():
            raise BadRow(row, f"must be an option letter (A, B, ...) or a 0-based index, got {answer!r}", field=name)
        index = ord(letter.upper()) - ord("A")
    if not 0 <= index < count:
        raise BadRow(row, f"names option {answer!r} but the row has {count} options", field=name)
    return index


def convert_row(spec: ConvertConfig, row: Row) -> tuple[dict, str]:
    """A row as question/answer fields, and which conversion made it (`original` when none applies)."""
    fields = dict(row.fields)
    if spec.mcq and all(fields.get(k) is not None for k in (spec.mcq_question, spec.mcq_options, spec.mcq_answer)):
        options = fields[spec.mcq_options]
        if isinstance(options, dict):
            by_letter = {str(k).strip().upper(): v for k, v in options.items()}
            letter = chr(ord("A") + _option_index(fields[spec.mcq_answer], 26, row, spec.mcq_answer))
            if letter not in by_letter:
                raise BadRow(row, f"names option {letter} but the options are {sorted(by_letter)}",
                             field=spec.mcq_answer)
            answer = by_letter[letter]
        elif isinstance(options, list) and options:
            answer = options[_option_index(fields[spec.mcq_answer], len(options), row, spec.mcq_answer)]
        else:
            raise BadRow(row, f"must be a non-empty list or a {{letter: text}} mapping, got {options!r}",
                         field=spec.mcq_options)
        fields[spec.question_field] = _fill(spec.mcq_template, fields, row)
        fields[spec.answer_field] = str(answer)
        return fields, "mcq_to_qa"
    if spec.blank and all(fields.get(k) is not None for k in (spec.blank_sentence, spec.blank_answer)):
        if spec.blank_marker not in str(fields[spec.blank_sentence]):
            raise BadRow(row, f"must hold the blank marker {spec.blank_marker!r} (convert.blank_marker), got "
                              f"{fields[spec.blank_sentence]!r}", field=spec.blank_sentence)
        answer = str(fields[spec.blank_answer])
        fields[spec.question_field] = _fill(spec.blank_template, fields, row)
        fields[spec.answer_field] = answer
        return fields, "blank_to_qa"
    return fields, "original"


# ---- deduplication ----

_PUNCT = re.compile(r"[^\w\s]")


def normalize_text(text: str) -> str:
    """Lowercased, punctuation stripped, whitespace collapsed: `"  The  cash-flow, ok?"` -> `"the cashflow ok"`."""
    return " ".join(_PUNCT.sub("", text.lower()).split())


def dedup_key(fields: dict, mode: str, compare: list[str], ignore: tuple[str, ...]) -> str:
    """What two rows must share to be duplicates: the compared fields' values, exact or normalised."""
    names = compare or sorted(k for k in fields if k not in ignore)
    values = []
    for name in names:
        value = fields.get(name)
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        values.append([name, normalize_text(text) if mode == "normalized" else text])
    return json.dumps(values, ensure_ascii=False)


def deduplicate(rows: list[dict], mode: str, compare: list[str], ignore: tuple[str, ...],
                seen: set[str] | None = None) -> tuple[list[dict], int]:
    """The rows whose key was not met before (in `seen`, then among the earlier rows), and how many were dropped."""
    if mode == "none":
        return rows, 0
    seen = set() if seen is None else seen
    kept = []
    for row in rows:
        key = dedup_key(row, mode, compare, ignore)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


# ---- the command ----

@dataclass
class AugmentResult:
    output: str
    rows_read: int = 0
    converted: dict[str, int] = field(default_factory=dict)  # conversion -> rows
    duplicate_sources: int = 0  # source rows dropped as repeats of earlier ones
    typo_rows: int = 0
    paraphrase_rows: int = 0
    empty_paraphrases: int = 0  # paraphrases the model left empty (not written)
    duplicate_copies: int = 0  # augmented rows dropped as repeats of a row before them
    rows_written: int = 0

    def summary(self) -> str:
        conversions = ", ".join(f"{n} {kind}" for kind, n in sorted(self.converted.items())) or "none"
        return (f"read {self.rows_read} rows (conversions: {conversions}); dropped {self.duplicate_sources} duplicate "
                f"sources; added {self.typo_rows} typo and {self.paraphrase_rows} paraphrase rows "
                f"({self.empty_paraphrases} empty paraphrases left out), dropped {self.duplicate_copies} duplicate "
                f"copies; wrote {self.rows_written} rows to {self.output}")


def source_id_of(row: Row, fields: dict, id_field: str | None) -> str:
    """A row's source id: the one it already carries (a row of an augmented file), its id, or FILE:ROW."""
    if fields.get("source_id") is not None:
        return str(fields["source_id"])
    if id_field and fields.get(id_field) is not None:
        return str(fields[id_field])
    return f"{Path(row.source.split('#', 1)[0]).name}:{row.row}"


def _copy(source: dict, kind: str, index: int, id_field: str | None, **changes) -> dict:
    row = {**source, **changes, "augmentation": kind, "augmentation_index": index}
    if id_field and source.get(id_field) is not None:  # copies get ids of their own (the build checks ids)
        row[id_field] = f"{source[id_field]}~{kind}{index}"
    return row


def check_augment_config(config: AugmentConfig) -> None:
    if not config.output:
        raise BadInputError("no output given: set --output (the augmented JSONL to write)")
    if not config.output.endswith((".jsonl", ".json")):
        raise BadInputError(f"--output must be a .jsonl file, got {config.output!r}")
    if config.paraphrase.versions and not config.paraphrase.teacher.model:
        raise BadInputError("paraphrase.versions > 0 needs a model: set --paraphrase-model (a local model folder)")


def augment(config: AugmentConfig, backend=None, tokenizer=None, stop_after_batches: int | None = None
            ) -> AugmentResult:
    """Run every configured stage and write `config.output` (a JSONL, replaced whole at the end).

    `backend` and `tokenizer` may be passed in for paraphrases (tests); `stop_after_batches` ends the paraphrase
    stage early as a kill would (its finished paraphrases are kept in OUTPUT.paraphrases.jsonl for the next run).
    """
    check_augment_config(config)
    rows, unparsed = read_rows(config.data)
    if unparsed:
        raise BadInputError(f"bad row: {unparsed[0]}. Fix the row")
    result = AugmentResult(output=config.output, rows_read=len(rows))
    id_field = config.data.id_field
    ignore = (*PROVENANCE_FIELDS, *((id_field,) if id_field else ()))
    sources = []
    for row in rows:
        try:
            fields, kind = convert_row(config.convert, row)
        except BadRow as exc:
            raise BadInputError(f"bad row: {exc}. Fix the row, or turn the conversion off") from None
        result.converted[kind] = result.converted.get(kind, 0) + (kind != "original")
        sid = source_id_of(row, fields, id_field)
        sources.append({**fields, "source_id": sid, "augmentation": kind, "augmentation_index": 0})
    result.converted = {k: n for k, n in result.converted.items() if n}
    seen: set[str] = set()
    sources, result.duplicate_sources = deduplicate(sources, config.dedup, config.dedup_fields, ignore, seen)

    paraphrases: dict[tuple[int, int], str] = {}
    if config.paraphrase.versions:
        from kdcache.data.paraphrase import paraphrase_sources

        paraphrases = paraphrase_sources(config, sources, backend, tokenizer, stop_after_batches)
        if stop_after_batches is not None and len(paraphrases) < len(sources) * config.paraphrase.versions:
            return result  # stopped early, as a kill would: nothing written but the paraphrase progress
    t = config.typos
    out = []
    for position, source in enumerate(sources):
        out.append(source)
        copies = []
        for copy in range(1, t.copies + 1):
            rng = random.Random(f"{t.seed}:{source['source_id']}:{copy}")
            changes = {name: add_typos(source[name], t.rate, rng)[0] for name in t.fields
                       if isinstance(source.get(name), str)}
            copies.append(_copy(source, "typo", copy, id_field, **changes))
        result.typo_rows += len(copies)
        for version in range(config.paraphrase.versions):
            text = paraphrases.get((position, version), "").strip()
            if not text:
                result.empty_paraphrases += 1
                continue
            copies.append(_copy(source, "paraphrase", version + 1, id_field, **{config.paraphrase.text_field: text}))
            result.paraphrase_rows += 1
        kept, dropped = deduplicate(copies, config.dedup, config.dedup_fields, ignore, seen)
        result.duplicate_copies += dropped
        out.extend(kept)
    _write_jsonl(config.output, out)
    result.rows_written = len(out)
    return result


def _write_jsonl(path: str, rows: list[dict]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    os.replace(partial, target)
