"""The config of `kdcache augment` (kdcache/data/augment.py, docs/data.md "Augmentation"): rows in, an augmented
JSONL out. Apart from kdcache/config.py so that module stays one screenful per command."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kdcache.config import DataConfig, TeacherConfig
from kdcache.config_io import ConfigValueError


def _check_count(name: str, value, low: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigValueError(name, f"an integer >= {low}", value)


@dataclass
class TypoConfig:
    """Typo noise: `copies` noisy versions of each row, each word of `fields` given one typo with probability `rate`
    (a letter swapped with the next, deleted, inserted or replaced)."""

    copies: int = 0  # noisy versions per row; 0: none
    rate: float = 0.25  # typos per word on average (0.25: one typo per four words)
    fields: list[str] = field(default_factory=lambda: ["input"])  # the text fields noised (answers are kept clean)
    seed: int = 0  # with the source id and the copy number, seeds each copy's typos

    def __post_init__(self) -> None:
        _check_count("copies", self.copies)
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or not 0 < self.rate <= 1:
            raise ConfigValueError("rate", "a number in (0, 1] (typos per word)", self.rate)
        if not self.fields:
            raise ConfigValueError("fields", "a non-empty list of field names", self.fields)


@dataclass
class ConvertConfig:
    """Format conversions to question/answer rows: a multiple-choice row (question, options, answer letter) or a
    fill-in-the-blank row (a sentence with a blank marker, answer) becomes `question_field` + `answer_field`; other
    rows pass unchanged. The question is a format string over the row's fields."""

    mcq: bool = False  # convert rows that have mcq_question, mcq_options and mcq_answer
    mcq_question: str = "question"  # field: the question text
    mcq_options: str = "options"  # field: a list of options (A, B, ... in order) or a {letter: text} mapping
    mcq_answer: str = "answer"  # field: the right option's letter (A, b, "(C)") or 0-based index
    mcq_template: str = "{question}"  # the new question
    blank: bool = False  # convert rows that have blank_sentence (holding blank_marker) and blank_answer
    blank_sentence: str = "sentence"  # field: the sentence with the blank
    blank_answer: str = "answer"  # field: the words that fill the blank
    blank_marker: str = "___"  # how the blank is written in the sentence
    blank_template: str = "Fill in the blank: {sentence}"  # the new question
    question_field: str = "input"  # where the new question goes
    answer_field: str = "target"  # where the answer text goes


@dataclass
class ParaphraseConfig:
    """Paraphrases by a local model (the teacher or any other) through the cache build's backends: each row's
    `text_field` is rewritten `versions` times, each with a style prompt drawn (seeded) from `styles`."""

    versions: int = 0  # paraphrases per row; 0: none
    text_field: str = "input"  # the field rewritten (the rest of the row is kept)
    # Style prompts, format strings with {text}; each row draws `versions` of them (without repeats while enough)
    styles: list[str] = field(default_factory=lambda: [
        "Rewrite the following question in other words, keeping its meaning:\n{text}\nRewritten:",
        "Paraphrase this question more formally:\n{text}\nParaphrase:",
        "Restate this question in plain, simple words:\n{text}\nRestated:",
        "Rephrase this question as a student might ask it:\n{text}\nRephrased:",
        "Reword this question concisely:\n{text}\nReworded:",
    ])
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # the model that writes them (teacher.model)
    max_new_tokens: int = 96  # longest paraphrase in tokens
    temperature: float = 0.0  # 0: greedy; > 0: seeded sampling (a draw per row and version)
    top_p: float = 1.0  # nucleus sampling when temperature > 0
    max_length: int = 1024  # longest style prompt + paraphrase in tokens
    seed: int = 0  # the style draws and the sampling seeds

    def __post_init__(self) -> None:
        _check_count("versions", self.versions)
        _check_count("max_new_tokens", self.max_new_tokens, 1)
        if not self.styles or any("{text}" not in s for s in self.styles):
            raise ConfigValueError("styles", "a non-empty list of format strings that each hold {text}", self.styles)


@dataclass
class AugmentConfig:
    """Everything `kdcache augment` needs: rows in, an augmented JSONL out (conversions, typo copies, paraphrases,
    deduplication), each row with its `source_id` and `augmentation`, for `kdcache cache build --data`."""

    output: str = ""  # the augmented JSONL to write
    data: DataConfig = field(default_factory=DataConfig)  # the source rows (data.id_field names their ids)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    typos: TypoConfig = field(default_factory=TypoConfig)
    paraphrase: ParaphraseConfig = field(default_factory=ParaphraseConfig)
    # Drop repeated rows, keeping the first: exact (same fields), normalized (same after lowercasing, collapsing
    # whitespace and stripping punctuation) or none; sources first, then the augmented rows
    dedup: Literal["none", "exact", "normalized"] = "normalized"
    dedup_fields: list[str] = field(default_factory=list)  # the fields compared; []: all but the id and provenance
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dedup not in ("none", "exact", "normalized"):
            raise ConfigValueError("dedup", "one of none, exact, normalized", self.dedup)
