"""Typed job configs: dataclasses loaded from YAML files in jobs/, with `key.sub=value` overrides from the CLI."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Literal

# The loader (YAML, --set overrides, coercion) lives in config_io; its names are kdcache.config's public API too.
from kdcache.config_io import ConfigValueError, apply_override, from_dict, load_config, to_dict  # noqa: F401

# datasets: a `save_to_disk` folder; hub: `datasets.load_dataset` (a hub id, a hub-layout folder, or data_files)
DataFormat = Literal["auto", "jsonl", "csv", "parquet", "datasets", "hub"]
Dtype = Literal["float32", "float16", "bfloat16"]
ChatMode = Literal["auto", "yes", "no"]  # wrap the prompt in the tokenizer's chat template (auto: when it has one)


@dataclass
class DataConfig:
    """Where examples come from and which fields of a row mean what."""

    # JSONL, CSV, Parquet files or globs of them, `save_to_disk` folders (FOLDER#SPLIT), hub-layout folders or hub
    # dataset ids (ID#SPLIT; offline from the local cache with HF_DATASETS_OFFLINE=1)
    paths: list[str] = field(default_factory=list)
    format: DataFormat = "auto"
    config_name: str | None = None  # hub datasets: the dataset config (load_dataset's `name`)
    split: str | None = None  # hub datasets: the split to read (default: train)
    data_files: list[str] = field(default_factory=list)  # passed to load_dataset (paths then names a builder: json)
    streaming: bool = False  # hub datasets: read rows as they come instead of converting to Arrow first
    id_field: str | None = None  # a stable example id; the row number is used when absent
    target_field: str | None = None  # the answer; `{field}` placeholders in the template may use any field
    label_fields: list[str] = field(default_factory=list)  # fields copied to the records as labels
    limit: int | None = None  # read at most this many rows in total (for smoke runs)


@dataclass
class TemplateConfig:
    """How a row becomes a prompt and a target: Python format strings over the row's fields."""

    prompt: str = "{input}"
    target: str = "{target}"
    system: str | None = None  # a system message, used with chat templates
    chat: ChatMode = "auto"  # wrap the prompt in the tokenizer's chat template (auto: when it has one)
    distill: Literal["target", "all"] = "target"  # distill answer tokens only, or every token after the first
    add_eos: bool = True  # end the target with the tokenizer's EOS token, so the student learns to stop
    # Conversations (kdcache/data/chat.py): the field holding each row's turns, OpenAI/TRL `messages` (role, content)
    # or ShareGPT `conversations` (from, value), rendered with the tokenizer's chat template; prompt, target and
    # add_eos are then unused. Found by itself when the rows have `messages` or `conversations` and no `input`.
    messages: str | None = None
    roles_to_train: list[str] = field(default_factory=lambda: ["assistant"])  # whose turns are distilled

    def __post_init__(self) -> None:
        roles = ("system", "user", "assistant", "tool")
        if not self.roles_to_train or any(role not in roles for role in self.roles_to_train):
            raise ConfigValueError("roles_to_train", f"a non-empty list of {', '.join(roles)}", self.roles_to_train)


#: Default `sparsifier.logprob_step` and `logprob_growth` (nats): the exact-enough setting of docs/format.md
#: ("Log-prob encoding"): mean bucket KL below 1e-6 on a raw and a sharpened teacher (benchmarks/RESULTS.md, issue 13).
DEFAULT_LOGPROB_STEP = 2.0**-8
DEFAULT_LOGPROB_GROWTH = 4.0


@dataclass
class SparsifierConfig:
    """What is kept of each teacher distribution: the top-k with tail mass, or sampled tokens with counts."""

    kind: Literal["topk", "sample"] = "topk"
    k: int = 64  # top-k entries kept; for `sample`, the number of draws per position
    temperature: float = 1.0  # `sample` only: draws come from softmax(logits / temperature)
    seed: int = 0  # `sample` only
    # Log-probs stored as floats of this dtype: all of them (logprob_step null), or each row's top-1 and the tails.
    logprob_dtype: Literal["float32", "float16"] = "float16"
    # `topk` only: the other top-k log-probs are stored as offsets below the row's top-1, rounded to this many nats
    # at the top (docs/format.md); 2^-8 keeps the mean bucket KL under 1e-6, 0.02 (the smaller setting, about 1e-5)
    # saves a quarter more; null stores every log-prob as logprob_dtype.
    logprob_step: float | None = DEFAULT_LOGPROB_STEP
    # `topk` offsets only: the rounding step is uniform for the first growth/2 nats below the top-1, then grows
    # e-fold every this many nats, since an entry's weight in the KL is its probability; null keeps one step for
    # every offset (each entry within step/2).
    logprob_growth: float | None = DEFAULT_LOGPROB_GROWTH
    # `topk` only: temperatures besides 1 at which the tail's exact log-partition is stored (4 bytes each per
    # target), so a trainer at any of them is exact (kdcache/tempering.py); [] stores none (T = 1 only).
    tail_temperatures: list[float] = field(default_factory=lambda: list(DEFAULT_TAIL_TEMPERATURES))

    def __post_init__(self) -> None:
        for value in self.tail_temperatures:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise ConfigValueError("tail_temperatures", "a list of positive finite numbers", self.tail_temperatures)
        if self.logprob_step is not None and (isinstance(self.logprob_step, bool)
                                              or not isinstance(self.logprob_step, (int, float))
                                              or not 0 < self.logprob_step <= 1):
            raise ConfigValueError("logprob_step", "a number of nats in (0, 1], or null for plain log-probs",
                                   self.logprob_step)
        if self.logprob_growth is not None and (isinstance(self.logprob_growth, bool)
                                                or not isinstance(self.logprob_growth, (int, float))
                                                or not 1 <= self.logprob_growth <= 64):
            raise ConfigValueError("logprob_growth", "a number of nats in [1, 64], or null for a uniform step",
                                   self.logprob_growth)
        # One spelling per grid: sorted, without repeats, without 1 (the tail log-mass is the T = 1 value).
        self.tail_temperatures = sorted({float(t) for t in self.tail_temperatures if float(t) != 1.0})


@dataclass
class TeacherConfig:
    """The teacher model and how to run it."""

    model: str = ""  # a local folder or a hub id (weights must already be available locally or via the hub cache)
    revision: str | None = None  # a hub revision (branch, tag or commit) of the teacher
    backend: Literal["hf", "vllm"] = "hf"
    dtype: Dtype = "float32"
    device: str = "auto"  # auto: cuda when available, else cpu
    batch_size: int = 8
    chunk_size: int = 1024  # target positions projected through the LM head at once
    trust_remote_code: bool = False  # let transformers run the model repository's own code
    vllm: dict = field(default_factory=dict)  # backend=vllm: vllm.LLM(...) settings, passed through (see jobs/)


@dataclass
class GenerateConfig:
    """Teacher-generated targets (a silver set): the teacher writes each answer, then its top-k is stored there."""

    enabled: bool = False  # off: targets come from the data (teacher-forced scoring of given answers)
    num_samples: int = 1  # answers per prompt, each its own example (more than 1 needs temperature > 0)
    max_new_tokens: int = 256  # the prompt is cut from the left so that prompt + answer fit max_length
    temperature: float = 0.0  # 0: greedy; the cached log-probabilities are always the raw (T = 1) distribution
    top_p: float = 1.0  # nucleus sampling when temperature > 0
    seed: int = 0  # each prompt's answers are drawn with a seed made from this and the row's index


@dataclass
class HiddenConfig:
    """Teacher hidden states stored beside the logits (docs/format.md), for a hidden-state loss in the trainer.

    layers: which of the teacher's hidden states, each an index into transformers' ``output_hidden_states``
        (0 = embeddings, i = after block i, negative from the end), a fraction of depth in (0, 1), or "last" (after
        the final norm); [] stores none (the default).
    positions: "target": the hidden state that predicts each target (position t - 1, as the logits); "all": every
        token's.
    reduction: fixed at build time and recorded in the plan: "random" (a seeded random orthogonal projection to
        ``dim``), "pca" (the top ``dim`` principal directions of ``pca_rows`` rows of the first shard) or "none".
    dtype: "float16", or "int8" with one float32 scale per row and layer.
    """

    layers: list[int | float | str] = field(default_factory=list)
    positions: Literal["target", "all"] = "target"
    reduction: Literal["random", "pca", "none"] = "random"
    dim: int = 256  # dimensions kept per layer by a random or pca reduction (ignored for none)
    dtype: Literal["float16", "int8"] = "float16"
    seed: int = 0  # reduction=random: the projection's seed
    pca_rows: int = 4096  # reduction=pca: rows of the first shard the basis is fitted on (at most)

    def __post_init__(self) -> None:
        for value in self.layers:
            if isinstance(value, bool) or not (isinstance(value, int) or value == "last" or (
                    isinstance(value, float) and 0 < value < 1)):
                raise ConfigValueError("layers", 'a list of layer indices, fractions in (0, 1) or "last"', self.layers)
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ConfigValueError("dim", "a positive integer", self.dim)
        if isinstance(self.pca_rows, bool) or not isinstance(self.pca_rows, int) or self.pca_rows < 2:
            raise ConfigValueError("pca_rows", "an integer >= 2", self.pca_rows)


@dataclass
class CacheBuildConfig:
    """Everything `kdcache cache build` needs; the parts that shape the cache go into its manifest."""

    output: str = ""  # the cache folder or fsspec URL (s3://...); an existing one is resumed
    data: DataConfig = field(default_factory=DataConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    sparsifier: SparsifierConfig = field(default_factory=SparsifierConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    hidden: HiddenConfig = field(default_factory=HiddenConfig)
    tokenizer: str | None = None  # defaults to the teacher's own
    max_length: int = 1024  # longest sequence in tokens; prompts are cut from the left to fit
    shard_size: int = 1024  # examples per shard
    num_workers: int = 1  # workers writing this cache (one per node), each with its own worker_index
    worker_index: int = 0  # in [0, num_workers): this worker writes shards i with i % num_workers == worker_index
    skip_bad_rows: bool = False  # skip rows that cannot be used (counted and named) instead of stopping
    strict: bool = False  # refuse rows without an id or with a repeated id (data.id_field) instead of warning
    progress: bool = True


@dataclass
class LoraConfig:
    """LoRA through peft; `enabled: false` trains every weight (full fine-tuning)."""

    enabled: bool = True  # false: full fine-tuning of every weight
    r: int = 16  # LoRA rank
    alpha: int = 32  # LoRA scaling numerator (the update is scaled by alpha / r)
    dropout: float = 0.05  # dropout on the LoRA branch
    target_modules: list[str] = field(  # the modules that get adapters (Qwen2/Llama names)
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    quantize: Literal["none", "4bit"] = "none"  # 4bit: QLoRA, an nf4 base via bitsandbytes (t4 profile)


@dataclass
class DistributedConfig:
    """How `kdcache train` spreads the student over torchrun's processes (docs/training.md); one process ignores it."""

    # ddp: the whole student, its gradients and AdamW states on every GPU (fastest when they fit); fsdp: all three
    # sharded over the GPUs (torch FSDP2), for students larger than one GPU
    strategy: Literal["ddp", "fsdp"] = "ddp"

    def __post_init__(self) -> None:
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigValueError("strategy", "one of ddp, fsdp", self.strategy)


#: The distillation losses (docs/losses.md): `LossConfig.kind`, `kdcache train --loss` and `losses.kd_loss` all
#: take their names from this one list.
#: Temperatures (besides 1) whose tail log-partition a build stores by default: the published recipes use 0.7
#: (GPT-2 accounting QA) and 2 (UPSC); 1.5, 3 and 4 cover the usual ablation range.
DEFAULT_TAIL_TEMPERATURES: tuple[float, ...] = (0.7, 1.5, 2.0, 3.0, 4.0)

#: The names of the CE/KD mix in LossConfig (one value: an ablation grid over one replaces the base's).
LOSS_WEIGHT_NAMES = ("ce_weight", "kd_weight", "alpha")

TailMode = Literal["exact", "interpolate", "single_atom"]
#: How a trainer gets the teacher's tail at its temperature (kdcache/tempering.py, docs/losses.md).
TAIL_MODES: tuple[str, ...] = typing.get_args(TailMode)

LossKind = Literal["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "tv", "topk_forward_kl",
                   "sampled_ce", "uld"]  # uld: Universal Logit Distillation, for a student with another tokenizer
LOSS_KINDS: tuple[str, ...] = typing.get_args(LossKind)
VocabMap = Literal["off", "hybrid", "tail"]
#: How a student with another tokenizer reads the teacher's entries (kdcache/train/vocabmap.py, docs/losses.md).
VOCAB_MAPS: tuple[str, ...] = typing.get_args(VocabMap)


@dataclass(frozen=True)
class LossConfig:
    """What the student is trained on: ``ce_weight * CE(labels) + kd_weight * KD(kind)`` (docs/losses.md).

    kind: one of :data:`LOSS_KINDS`.
    temperature: T > 0 (for ``sampled_ce`` it should be the sampling temperature the cache was built with,
        normally 1).
    ce_weight, kd_weight: the weights of the hard-label cross-entropy and of the distillation term, each in
        [0, 1] and summing to 1 (give either; default 0.5 each). ``kd_weight`` is torchtune's ``kd_ratio`` and
        Axolotl's ``kd_alpha``; ``ce_weight = 1`` is plain fine-tuning.
    alpha: another name for ``ce_weight`` (kdcache's first name for it, kept so older specs run; note that it
        weights the cross-entropy, the reverse of torchtune's and Axolotl's alphas). Settings that disagree are
        refused. After construction all three hold the resolved values.
    skew: skew coefficient a in [0, 1) for the skew KLs (DistiLLM uses 0.1).
    beta: JSD mixing weight in (0, 1).
    top_k: use only the first k' <= k cached entries of topk targets; the dropped entries' mass is folded exactly
        into the tail bucket (``None`` = all).
    confidence_weight: weight positions by the teacher's top-1 probability.
    tail_mode: how the teacher's tail is tempered at T != 1: ``exact`` (the cache's stored tail at T; other
        temperatures are refused), ``interpolate`` (between stored temperatures, with a bounded error) or
        ``single_atom`` (the tail tempered as one token: the inexact pre-v2 behaviour, for old caches and
        comparisons).
    hidden_weight: weight of the hidden-state term added on top (Gemma's ``beta_mse``; needs a cache with hidden
        states, docs/losses.md); 0 = off.
    hidden_kind: ``mse`` (mean squared error per dimension) or ``cosine`` (1 - cosine similarity) between the
        projected student hidden state and the cached teacher one.
    vocab_map: for a student with another tokenizer (TRL GOLD's vocabulary mapping): ``off``; ``hybrid`` (each
        teacher token mapped to the student token with the same text, leading-space markers normalised; ``kind``
        runs on the mapped entries over the student's vocabulary, and the unmapped entries are compared by ULD,
        GOLD's hybrid; needs T = 1); ``tail`` (the unmapped entries folded into the tail bucket). ``kind`` must be
        a bucket kind (forward_kl, reverse_kl, skew_forward_kl, skew_reverse_kl, jsd, tv).
    unmapped_weight: weight of the ULD term over the unmapped entries with ``vocab_map=hybrid`` (GOLD's
        ``uld_hybrid_unmatched_weight``; the mapped term has weight 1).
    """

    kind: LossKind = "forward_kl"
    temperature: float = 1.0
    alpha: float | None = None  # another name for ce_weight (kept so older specs run)
    ce_weight: float | None = None  # weight of the hard-label cross-entropy, in [0, 1] (default 0.5)
    kd_weight: float | None = None  # weight of the distillation term, 1 - ce_weight (give either)
    skew: float = 0.1
    beta: float = 0.5
    top_k: int | None = None
    confidence_weight: bool = False
    tail_mode: TailMode = "exact"
    hidden_weight: float = 0.0
    hidden_kind: Literal["mse", "cosine"] = "mse"
    vocab_map: VocabMap = "off"
    unmapped_weight: float = 1.0

    def __post_init__(self) -> None:
        if not (self.hidden_weight >= 0 and math.isfinite(self.hidden_weight)):
            raise ConfigValueError("hidden_weight", "a finite number >= 0", self.hidden_weight)
        if self.hidden_kind not in ("mse", "cosine"):
            raise ConfigValueError("hidden_kind", "one of mse, cosine", self.hidden_kind)
        if self.tail_mode not in TAIL_MODES:
            raise ConfigValueError("tail_mode", f"one of {', '.join(TAIL_MODES)}", self.tail_mode)
        if self.kind not in LOSS_KINDS:
            raise ConfigValueError("kind", f"one of {', '.join(LOSS_KINDS)}", self.kind)
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigValueError("temperature", "a positive finite number", self.temperature)
        self._resolve_weights()
        if not 0.0 <= self.skew < 1.0:
            raise ConfigValueError("skew", "in [0, 1)", self.skew)
        if not 0.0 < self.beta < 1.0:
            raise ConfigValueError("beta", "in (0, 1)", self.beta)
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
                raise ConfigValueError("top_k", "a positive integer or None", self.top_k)
            if self.kind == "sampled_ce":
                raise ConfigValueError("top_k", "None with kind 'sampled_ce' (it applies to topk targets only)",
                                       self.top_k)
        self._check_vocab_map()

    def _check_vocab_map(self) -> None:
        if self.vocab_map not in VOCAB_MAPS:
            raise ConfigValueError("vocab_map", f"one of {', '.join(VOCAB_MAPS)}", self.vocab_map)
        if isinstance(self.unmapped_weight, bool) or not isinstance(self.unmapped_weight, (int, float)) or not (
                self.unmapped_weight >= 0 and math.isfinite(self.unmapped_weight)):
            raise ConfigValueError("unmapped_weight", "a finite number >= 0", self.unmapped_weight)
        if self.vocab_map == "off":
            return
        mapped_kinds = ("forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "tv")
        if self.kind not in mapped_kinds:
            raise ConfigValueError("kind", f"one of {', '.join(mapped_kinds)} with vocab_map={self.vocab_map} (uld "
                                   "needs no vocabulary map: set vocab_map=off)", self.kind)
        if self.vocab_map == "hybrid" and abs(self.temperature - 1.0) > 1e-6:
            raise ConfigValueError("temperature", "1 with vocab_map=hybrid (its ULD term compares the distributions "
                                   "at T = 1; vocab_map=tail trains at any T)", self.temperature)

    def _resolve_weights(self) -> None:
        """Check ce_weight, kd_weight and alpha against each other and set all three (frozen: object.__setattr__)."""
        implied = {}  # the cross-entropy weight each given setting means
        for name in ("ce_weight", "kd_weight", "alpha"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigValueError(name, "in [0, 1]", value)
            implied[name] = 1.0 - value if name == "kd_weight" else float(value)
        names = list(implied)
        for name in names[1:]:
            if abs(implied[name] - implied[names[0]]) > 1e-9:
                wanted = 1.0 - implied[names[0]] if name == "kd_weight" else implied[names[0]]
                raise ConfigValueError(name, f"{wanted:g} to agree with {names[0]}={getattr(self, names[0])!r} (the "
                                       "CE and KD weights sum to 1, and alpha is another name for ce_weight): give "
                                       "only one of them", getattr(self, name))
        ce = round(next(iter(implied.values()), 0.5), 12)
        for name, value in (("ce_weight", ce), ("kd_weight", 1.0 - ce), ("alpha", ce)):
            object.__setattr__(self, name, value)

    def with_ce_weight(self, ce_weight: float) -> LossConfig:
        """The same loss with another CE/KD mix (the three weight names set consistently)."""
        return dataclasses.replace(self, ce_weight=ce_weight, kd_weight=None, alpha=None)


@dataclass
class CacheSource:
    """One of several caches a run trains from (`caches`): its path and how often its batches are drawn."""

    path: str = ""  # a cache folder or fsspec URL
    weight: float = 1.0  # relative sampling weight: each batch comes from this cache with probability weight / sum

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ConfigValueError("path", "a cache folder or URL", self.path)
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not (
                0 < self.weight < math.inf):
            raise ConfigValueError("weight", "a positive finite number", self.weight)
        self.weight = float(self.weight)


@dataclass
class TrainConfig:
    """Everything `kdcache train` needs: a cache, a student, and how to train it."""

    cache: str = ""
    # Several caches instead of `cache` (e.g. a gold and a silver one, same tokenizer), as a list of {path, weight}:
    # each batch is drawn from one of them with probability weight / sum of weights, seeded by `seed`; each keeps its
    # own heldout_fraction split (docs/training.md). On the command line: --cache A --cache B [--cache-weight W ...].
    caches: list[CacheSource] = field(default_factory=list)
    verify_checksums: bool = True  # sha256 of every shard file as it is read; false only for a cache verified once
    student: str = ""  # a local folder or a hub id (weights already available locally)
    out: str = ""
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    profile: Literal["auto", "cpu", "t4", "bf16"] = "auto"  # t4: fp16 autocast + GradScaler; bf16: newer GPUs
    batch_size: int = 8
    max_tokens: int | None = None  # token budget per batch (padded); batch_size is then an upper bound
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4
    weight_decay: float = 0.0  # AdamW weight decay
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"  # adamw_8bit: bitsandbytes' 8-bit AdamW states
    warmup_steps: int = 0  # linear warm-up of the learning rate, then cosine decay to 10% of it at max_steps
    max_steps: int | None = None  # optimizer steps; default 100, or what num_epochs gives
    num_epochs: float | None = None  # passes over the train split instead (steps counted from the cache); not both
    clip_grad: float = 1.0  # the gradient's global norm is clipped to this
    chunk_size: int = 1024  # target positions projected through the LM head at once
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, slower
    # Share of the cache's examples held out of training (a hash of each example's row index, or of its source_id for
    # augmented rows: the same rows in every run over the cache) for the held-out figures every eval_every steps; 0
    # trains on every example.
    heldout_fraction: float = 0.1
    # A separate cache (same tokenizer) whose every example is the held-out set, e.g. with heldout_fraction=0 to
    # train on every example of `cache`; the teacher's figures there are the held-out ones.
    heldout_cache: str | None = None
    eval_every: int = 50  # steps between held-out evaluations (0: none)
    patience: int | None = None  # stop after this many evaluations without improvement
    save_every: int = 50  # steps between checkpoints (a re-run resumes from the last); the last step is saved too
    seed: int = 0  # LoRA initialisation, data order and dropout
    progress: bool = True
    # Experiment trackers that get the metrics.jsonl scalars (kdcache/train/trackers.py): tensorboard (OUT/tensorboard),
    # wandb (pip install 'kdcache[wandb]'), mlflow (pip install 'kdcache[mlflow]'); [] for metrics.jsonl alone.
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    tensorboard: bool | None = None  # the older switch: false drops tensorboard from report_to, true adds it
    # Resume a run folder whose checkpoint was trained with other settings (kdcache/train/run_config.py): the
    # differences are logged, and the settings each part of the run was trained with are kept.
    allow_config_change: bool = False
    # loss.hidden_weight > 0: the student layer matched to each cached teacher layer (output_hidden_states indices);
    # [] maps them uniformly (teacher layer t <-> student layer round(t * L_s / L_t)).
    hidden_student_layers: list[int] = field(default_factory=list)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # under torchrun: ddp or fsdp

    def __post_init__(self) -> None:
        if len(set(self.report_to)) != len(self.report_to):
            raise ConfigValueError("report_to", "a list of distinct trackers", self.report_to)
        if self.tensorboard is not None:  # the older switch, folded into report_to (the same after a round trip)
            others = [name for name in self.report_to if name != "tensorboard"]
            self.report_to = ["tensorboard", *others] if self.tensorboard else others
        self.caches = [CacheSource(**c) if isinstance(c, dict) else c for c in self.caches]
        if self.distributed.strategy == "fsdp":
            if self.lora.quantize != "none":
                raise ConfigValueError("distributed.strategy", "ddp with lora.quantize=4bit (QLoRA's 4-bit base is "
                                       "not sharded by FSDP; QLoRA fits 7-8B students on one GPU)", "fsdp")
            if self.optimizer != "adamw":
                raise ConfigValueError("distributed.strategy", "ddp with optimizer=adamw_8bit (FSDP shards torch's "
                                       "AdamW; its states are already split over the GPUs)", "fsdp")
        if self.cache and self.caches:
            raise ConfigValueError("caches", f"empty when cache is set (give one of them; cache={self.cache!r})",
                                   [c.path for c in self.caches])
        paths = [c.path for c in self.caches]
        repeated = sorted({p for p in paths if paths.count(p) > 1})
        if repeated:
            raise ConfigValueError("caches", "distinct paths (raise a weight instead of listing a cache twice)",
                                   repeated)

    def sources(self) -> list[CacheSource]:
        """The caches this run trains from: `caches`, or `cache` with weight 1 ([] when neither is set)."""
        return list(self.caches) if self.caches else [CacheSource(self.cache)] if self.cache else []


@dataclass
class EvalConfig:
    """Everything `kdcache eval` needs. `labels` are scored (mode=score) or parsed from generations (generate)."""

    model: str = ""  # a model folder, a peft adapter folder, or a hub id whose weights are already local
    data: list[str] = field(default_factory=list)  # JSONL / CSV / Parquet files or `datasets` folders
    out: str = ""
    labels: list[str] = field(default_factory=list)
    label_field: str = "label"  # the gold label (or, for generation metrics, the reference text or list)
    prompt: str = "{input}"  # a format string over the row's fields
    system: str | None = None
    chat: ChatMode = "auto"
    id_field: str | None = None  # default: the field `id` when every row has it, else the row number
    data_format: DataFormat = "auto"  # auto: from each file's name (a folder is a `datasets` save_to_disk folder)
    negative_label: str | None = None  # e.g. "none": enables the binary relevance metrics
    label_prefix: str = " "  # text between the prompt and a label, as in the training target (" {gs_paper}")
    label_eos: bool = False  # score label + EOS (the label and nothing after it)
    mode: Literal["score", "generate"] = "score"
    max_new_tokens: int = 16
    limit: int | None = None
    batch_size: int = 8  # examples per forward pass (each scored with every label)
    device: str = "auto"
    dtype: Dtype = "float32"
    tokenizer: str | None = None
    base: str | None = None  # the base model of an adapter, when not the one its config names
    max_length: int = 1024  # prompt + longest label, in tokens; prompts are cut from the left to fit
    n_bins: int = 10
    bleu_smoothing: str = "exp"  # sacrebleu smooth_method for BLEU in generation mode (exp, floor, add-k or none)
    rouge_stemmer: bool = True  # rouge-score's Porter stemmer for ROUGE-L (the S-NI / MiniLLM / DistiLLM setting)
    warmup: bool = True  # run the first batch once, untimed, before measuring
    plots: bool = True
    progress: bool = True
