"""From source rows to prepared examples: render and tokenise each row (plain, conversation, or prompt-only for
teacher-written answers), check ids, add character spans, and lay out the Parquet records of a shard."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, replace

import pyarrow as pa

from kdcache.config import CacheBuildConfig
from kdcache.data.augment import split_key
from kdcache.data.chat import encode_conversation, prompt_of_conversation
from kdcache.data.encode import Encoded, encode, encode_prompt, fit_prompt
from kdcache.data.sources import BadRow, Row
from kdcache.data.spans import example_char_spans
from kdcache.data.templates import render, render_prompt
from kdcache.errors import BadInputError

log = logging.getLogger("kdcache.build")


@dataclass
class Prepared:
    """A row that became an example: its tokens and everything its Parquet record holds."""

    row_index: int
    row: Row
    prompt: str
    target: str  # the given target text; with teacher-generated answers, the row's reference if it has one
    encoded: Encoded
    sample_index: int = 0  # which of the teacher's answers to this row (teacher-generated targets)
    teacher_text: str | None = None  # the teacher's answer (teacher-generated targets), else None
    teacher_stopped: bool | None = None  # whether that answer ended with a stop token (else it hit max_new_tokens)
    char_spans: tuple[list[int], list[int]] | None = None  # per target row: start and end character in the text


def prepare_rows(config: CacheBuildConfig, tokenizer, rows: list[Row], start: int) -> tuple[list[Prepared], list[BadRow]]:
    """Render and tokenise rows; bad rows stop the job unless skip_bad_rows, in which case they are returned."""
    good, bad = [], []
    generate = config.generate.enabled
    for offset, row in enumerate(rows):
        try:
            if config.template.messages is not None:  # a conversation (kdcache/data/chat.py)
                prompt, target, encoded = _encode_chat(config, tokenizer, row)
            elif generate:  # the teacher writes the target later; a reference target is kept when the row has one
                prompt, target = render_prompt(config.template, row)
                room = config.max_length - config.generate.max_new_tokens
                encoded = encode_prompt(config.template, tokenizer, prompt, room)
            else:
                prompt, target = render(config.template, row)
                encoded = encode(config.template, tokenizer, row, prompt, target, config.max_length)
        except BadRow as exc:
            if not config.skip_bad_rows:
                raise BadInputError(f"bad row: {exc}. Fix the row, or pass --skip-bad-rows to skip such rows") from None
            bad.append(exc)
            continue
        good.append(Prepared(start + offset, row, prompt, target, encoded))
    return good, bad


def _encode_chat(config: CacheBuildConfig, tokenizer, row: Row) -> tuple[str, str, Encoded]:
    """A conversation row's prompt text, target text and tokens: its turns to train as targets, or with
    teacher-written answers the conversation up to its last user turn as the prompt."""
    if config.generate.enabled:
        prompt, reference = prompt_of_conversation(config.template, tokenizer, row)
        room = config.max_length - config.generate.max_new_tokens
        ids, dropped = fit_prompt(tokenizer, tokenizer(prompt, add_special_tokens=False)["input_ids"], room)
        return prompt, reference, Encoded(input_ids=ids, target_mask=[False] * len(ids), prompt_truncated=dropped)
    encoded, prompt, target = encode_conversation(config.template, tokenizer, row, config.max_length)
    return prompt, target, encoded


def _records_table(config: CacheBuildConfig, examples: list[Prepared], targets: list[int]) -> pa.Table:
    def label(example: Prepared, name: str):
        value = example.row.fields.get(name)
        return None if value is None else str(value)

    columns = {
        "example_index": pa.array([e.row_index for e in examples], pa.int64()),
        "sample_index": pa.array([e.sample_index for e in examples], pa.int64()),
        "id": pa.array(
            [str(e.row.fields.get(config.data.id_field, e.row_index)) if config.data.id_field else str(e.row_index)
             for e in examples],
            pa.string(),
        ),
        "source": pa.array([e.row.source for e in examples], pa.string()),
        "source_row": pa.array([e.row.row for e in examples], pa.int64()),
        "prompt": pa.array([e.prompt for e in examples], pa.string()),
        "target": pa.array([e.target for e in examples], pa.string()),
        "fields": pa.array([json.dumps(e.row.fields, sort_keys=True, default=str) for e in examples], pa.string()),
        "num_tokens": pa.array([len(e.encoded.input_ids) for e in examples], pa.int64()),
        "num_targets": pa.array(targets, pa.int64()),
        "prompt_truncated": pa.array([e.encoded.prompt_truncated for e in examples], pa.int64()),
        "teacher_text": pa.array([e.teacher_text for e in examples], pa.string()),
        "teacher_stopped": pa.array([e.teacher_stopped for e in examples], pa.bool_()),
        # Provenance of augmented rows (kdcache augment), and the key the held-out split hashes (by source id).
        "source_id": pa.array([label(e, "source_id") for e in examples], pa.string()),
        "augmentation": pa.array([label(e, "augmentation") for e in examples], pa.string()),
        "split_key": pa.array([split_key(e.row.fields, e.row_index) for e in examples], pa.int64()),
    }
    if examples and all(e.char_spans is not None for e in examples):  # kdcache.data.spans: cross-tokenizer students
        columns["target_char_starts"] = pa.array([e.char_spans[0] for e in examples], pa.list_(pa.int32()))
        columns["target_char_ends"] = pa.array([e.char_spans[1] for e in examples], pa.list_(pa.int32()))
    for name in config.data.label_fields:
        columns[f"label_{name}"] = pa.array([label(e, name) for e in examples], pa.string())
    return pa.table(columns)


def with_char_spans(tokenizer, example: Prepared) -> Prepared:
    """The example with its target rows' character spans in its target text (kdcache.data.spans)."""
    text = example.teacher_text if example.teacher_text is not None else example.target
    if example.teacher_text is None:
        eos = tokenizer.eos_token_id
    else:  # an answer that stopped ends with the stop token it generated
        eos = example.encoded.input_ids[-1] if example.teacher_stopped else None
    spans = example_char_spans(tokenizer, text, example.encoded.input_ids, example.encoded.target_mask, eos)
    return replace(example, char_spans=spans)


def check_ids(config: CacheBuildConfig, rows: list[Row]) -> None:
    """Warn with counts when `data.id_field` leaves rows without an id or gives several rows one id; with
    `strict`, refuse (an id is how examples are matched across caches and eval runs)."""
    name = config.data.id_field
    if name is None:
        return
    missing = [row for row in rows if row.fields.get(name) is None]
    counts = Counter(str(row.fields[name]) for row in rows if row.fields.get(name) is not None)
    repeated = {value: n for value, n in counts.items() if n > 1}
    problems = []
    if missing:
        problems.append(f"{len(missing)} rows have no value in the id field '{name}' (the first: {missing[0].where})")
    if repeated:
        value, n = max(repeated.items(), key=lambda item: item[1])
        problems.append(f"{sum(repeated.values()) - len(repeated)} rows repeat the id of an earlier row "
                        f"({len(repeated)} ids occur more than once; {value!r} {n} times)")
    if not problems:
        return
    if config.strict:
        raise BadInputError(f"{'; '.join(problems)}: ids must be present and unique with --strict; fix the data, "
                            "or build without --strict to keep them as they are")
    log.warning("warning: %s; the cache keeps them as they are (--strict refuses such data)", "; ".join(problems))
