"""The build plan (plan.json): everything that shapes a cache's content, as typed records, and how a build makes it.

Workers and resumed runs must follow one plan; the manifest (kdcache.store.manifest) is the plan plus the counts
and the shards' commit records. Field names and values are the JSON keys of docs/format.md, unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Literal

from kdcache.config import CacheBuildConfig, TemplateConfig, to_dict
from kdcache.data.encode import uses_chat_template
from kdcache.data.sources import Row
from kdcache.errors import BadInputError
from kdcache.store import FORMAT_VERSION, READABLE_FORMAT_VERSIONS
from kdcache.store.fingerprint import canonical_json, rows_fingerprint, tokenizer_fingerprint
from kdcache.store.hidden import HiddenInfo
from kdcache.store.imported import ImportInfo
from kdcache.store.schema import FieldError, Record, check_at_least, omitted_when_none

#: The first format version whose commit records and manifest carry the plan's hash (and must).
PLAN_HASH_VERSION = 3

@dataclass(frozen=True, kw_only=True)
class TeacherInfo(Record):
    """The teacher that scored the cache."""

    model: str
    revision: str | None
    dtype: Literal["float32", "float16", "bfloat16"]
    backend: Literal["hf", "vllm"]
    vllm: dict | None = omitted_when_none()  # backend=vllm: the engine settings that change the teacher's numbers


@dataclass(frozen=True, kw_only=True)
class TokenizerInfo(Record):
    """The tokenizer the cache's token ids belong to; readers refuse a tokenizer with another fingerprint."""

    name: str
    fingerprint: str  # "sha256:..." over the vocabulary and added tokens (kdcache.store.fingerprint)
    vocab_size: int  # len(tokenizer), not the model's (maybe padded) embedding rows
    eos_token_id: int | None

    def __post_init__(self) -> None:
        check_at_least(self, "vocab_size", 1)


@dataclass(frozen=True, kw_only=True)
class DatasetInfo(Record):
    """The source rows the cache was built from."""

    fingerprint: str  # "sha256:..." over the rows' field values in order
    sources: tuple[str, ...]
    num_rows: int
    unparsed_rows: int  # rows that could not be parsed at all (skipped with --skip-bad-rows)
    id_field: str | None
    label_fields: tuple[str, ...]

    def __post_init__(self) -> None:
        check_at_least(self, "num_rows", 0)
        check_at_least(self, "unparsed_rows", 0)


@dataclass(frozen=True, kw_only=True)
class TemplateInfo(Record):
    """The job's TemplateConfig as it was, plus whether the tokenizer's chat template was applied."""

    prompt: str
    target: str
    system: str | None
    chat: Literal["auto", "yes", "no"]
    distill: Literal["target", "all"]
    add_eos: bool
    chat_template_used: bool
    # Conversation rows (kdcache/data/chat.py) only, so plans of prompt/target caches stay as they were.
    messages: str | None = omitted_when_none()
    roles_to_train: tuple[str, ...] | None = omitted_when_none()


@dataclass(frozen=True, kw_only=True)
class SparsifierInfo(Record):
    """What is kept of each teacher distribution; `temperature` and `seed` exist for `sample` only,
    `tail_temperatures` for `topk` only (absent from format v1 caches: their tail is exact at T = 1 only)."""

    kind: Literal["topk", "sample"]
    k: int  # top-k entries kept, or draws per position
    logprob_dtype: Literal["float32", "float16"]
    temperature: float | None = omitted_when_none()
    seed: int | None = omitted_when_none()
    tail_temperatures: tuple[float, ...] | None = omitted_when_none()
    # topk only: the top-k log-probs are stored as offsets below each row's top-1 in steps of this many nats, the
    # top-1 and the tails as logprob_dtype (kdcache.store.encoding); absent: plain logprob_dtype arrays, as before.
    logprob_step: float | None = omitted_when_none()
    # with logprob_step only: the step grows e-fold every this many nats below the top-1; absent: a uniform step.
    logprob_growth: float | None = omitted_when_none()

    def __post_init__(self) -> None:
        check_at_least(self, "k", 1)
        if self.logprob_step is not None and (self.kind != "topk" or not 0 < self.logprob_step <= 1):
            raise FieldError("logprob_step", "a number of nats in (0, 1] for a topk sparsifier, or absent",
                             self.logprob_step)
        if self.logprob_growth is not None and (self.logprob_step is None or not 1 <= self.logprob_growth <= 64):
            raise FieldError("logprob_growth", "a number of nats in [1, 64] beside a logprob_step, or absent",
                             self.logprob_growth)
        for name, kind in (("temperature", "a number"), ("seed", "an integer")):
            value = getattr(self, name)
            if self.kind == "sample" and value is None:
                raise FieldError(name, f"{kind} for a sample sparsifier", value)
            if self.kind == "topk" and value is not None:
                raise FieldError(name, "absent for a topk sparsifier", value)
        if self.kind == "sample" and self.tail_temperatures is not None:
            raise FieldError("tail_temperatures", "absent for a sample sparsifier", self.tail_temperatures)
        for t in self.tail_temperatures or ():
            if not 0 < t < float("inf"):
                raise FieldError("tail_temperatures", "a list of positive finite numbers", self.tail_temperatures)


@dataclass(frozen=True, kw_only=True)
class GenerateInfo(Record):
    """Teacher-generated targets: the job's GenerateConfig as it was, plus the ids that ended an answer."""

    enabled: bool
    num_samples: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        check_at_least(self, "num_samples", 1)


@dataclass(frozen=True, kw_only=True)
class Plan(Record):
    """plan.json: what every worker of a build must agree on. Shard i holds source rows [i * shard_size, ...)."""

    format: Literal["kdcache"]
    format_version: int
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    dataset: DatasetInfo
    template: TemplateInfo
    sparsifier: SparsifierInfo
    max_length: int
    shard_size: int
    num_shards: int
    generate: GenerateInfo | None = omitted_when_none()  # absent from teacher-forced caches' plans
    hidden: HiddenInfo | None = omitted_when_none()  # teacher hidden states (kdcache.store.hidden); absent: none
    imported: ImportInfo | None = omitted_when_none()  # `kdcache cache import` (kdcache.store.imported); absent: built

    def __post_init__(self) -> None:
        if self.format_version not in READABLE_FORMAT_VERSIONS:
            raise FieldError("format_version", f"one of {READABLE_FORMAT_VERSIONS}", self.format_version)
        for name in ("max_length", "shard_size", "num_shards"):
            check_at_least(self, name, 1)
        expected = max(1, -(-self.dataset.num_rows // self.shard_size))
        if self.num_shards != expected:  # checked before anything iterates over the shards
            raise FieldError("num_shards", f"{expected} (dataset.num_rows / shard_size, rounded up)", self.num_shards)

    def shard_rows(self, index: int) -> tuple[int, int]:
        """[start, stop): the source rows of shard `index`."""
        start = index * self.shard_size
        return start, min(start + self.shard_size, self.dataset.num_rows)


def plan_hash(plan: Plan) -> str:
    """"sha256:<hex>" over the plan's canonical JSON, as plan.json holds it (of a Manifest: of its plan part).

    Format 3 puts it into every commit record and the manifest, so shards written under another plan are refused."""
    fields = {f.name: getattr(plan, f.name) for f in dataclasses.fields(Plan)}
    data = Plan.from_dict(json.loads(json.dumps(Plan(**fields).to_dict()))).to_dict()  # as read back from disk
    return "sha256:" + hashlib.sha256(canonical_json(data).encode("utf-8")).hexdigest()


def tail_route_stores_no_grid(config: CacheBuildConfig) -> bool:
    """vLLM's prompt_logprobs route sees only the top-k log-probs (its tail is derived as 1 - sum), so it cannot
    store the tail at other temperatures: its caches record no tail temperatures (training at T != 1 is refused)."""
    return config.teacher.backend == "vllm" and (config.teacher.vllm or {}).get("scoring") == "prompt_logprobs"


def make_plan(config: CacheBuildConfig, tokenizer, rows: list[Row], unparsed_rows: int = 0,
              stop_ids: list[int] | None = None, hidden: HiddenInfo | None = None) -> Plan:
    """Everything that shapes the cache's content (and so must agree between workers and across resumes)."""
    if config.sparsifier.k < 1:
        raise BadInputError("sparsifier.k must be at least 1")
    if config.sparsifier.k > len(tokenizer):
        raise BadInputError(f"sparsifier.k = {config.sparsifier.k} is more than the vocabulary ({len(tokenizer)})")
    sparsifier = to_dict(config.sparsifier)
    if config.sparsifier.kind == "topk":
        sparsifier.pop("temperature")
        sparsifier.pop("seed")
        sparsifier["tail_temperatures"] = () if tail_route_stores_no_grid(config) else tuple(
            config.sparsifier.tail_temperatures)
    else:
        sparsifier.pop("tail_temperatures")
        sparsifier["logprob_step"] = None  # sampled log-probs are unsorted (kept for inspection): stored plainly
    if sparsifier["logprob_step"] is None:
        sparsifier["logprob_growth"] = None  # a growth only shapes offsets
    generate = None
    if config.generate.enabled:  # only then, so plans of teacher-forced caches stay as they were
        generate = GenerateInfo(**to_dict(config.generate), stop_token_ids=tuple(stop_ids or ()))
    return Plan(
        format="kdcache",
        format_version=FORMAT_VERSION,
        teacher=TeacherInfo(
            model=config.teacher.model,
            revision=config.teacher.revision,
            dtype=config.teacher.dtype,
            backend=config.teacher.backend,
            vllm=engine_settings_that_shape_content(config),
        ),
        tokenizer=TokenizerInfo(
            name=config.tokenizer or config.teacher.model,
            fingerprint=tokenizer_fingerprint(tokenizer),
            vocab_size=len(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
        ),
        dataset=DatasetInfo(
            fingerprint=rows_fingerprint(row.fields for row in rows),
            sources=tuple(config.data.paths),
            num_rows=len(rows),
            unparsed_rows=unparsed_rows,
            id_field=config.data.id_field,
            label_fields=tuple(config.data.label_fields),
        ),
        template=template_info(config.template, tokenizer),
        sparsifier=SparsifierInfo(**sparsifier),
        max_length=config.max_length,
        shard_size=config.shard_size,
        num_shards=max(1, -(-len(rows) // config.shard_size)),
        generate=generate,
        hidden=hidden,
    )


def template_info(template: TemplateConfig, tokenizer) -> TemplateInfo:
    """The plan's record of the template; `roles_to_train` is kept only with conversation rows."""
    fields = to_dict(template)
    if template.messages is None:
        fields["roles_to_train"] = None
    else:
        fields["roles_to_train"] = tuple(fields["roles_to_train"])
    return TemplateInfo(**fields, chat_template_used=uses_chat_template(template, tokenizer))


# vLLM engine settings that change the teacher's numbers (the rest, such as parallelism or memory, do not).
_CONTENT_SHAPING_VLLM_KEYS = ("scoring", "quantization", "hf_overrides", "kv_cache_dtype", "tokenizer_mode")


def engine_settings_that_shape_content(config: CacheBuildConfig) -> dict | None:
    """The vLLM settings recorded in the plan (None for other backends): workers with different quantization or
    scoring must not mix."""
    if config.teacher.backend != "vllm":
        return None
    settings = config.teacher.vllm or {}
    shaping = {key: settings[key] for key in _CONTENT_SHAPING_VLLM_KEYS if key in settings}
    shaping.setdefault("scoring", "exact")
    return shaping
