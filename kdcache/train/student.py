"""Load a student for distillation: precision profile, vocabulary check against the cache, LoRA through peft."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kdcache.config import LoraConfig
from kdcache.errors import BadInputError, IncompatibleCacheError
from kdcache.modeling import check_model_source


@dataclass(frozen=True)
class Precision:
    """How a profile runs: the frozen weights' dtype, the autocast dtype (None: off) and whether to scale losses."""

    name: str
    device: torch.device
    weight_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    grad_scaler: bool


def resolve_precision(profile: str, full_finetune: bool) -> Precision:
    """`t4`: fp16 autocast + GradScaler, fp32 trainable weights; `bf16`: bf16 autocast; `cpu`: fp32 everywhere."""
    if profile == "auto":
        profile = "cpu" if not torch.cuda.is_available() else (
            "bf16" if torch.cuda.is_bf16_supported() else "t4")
    if profile == "cpu":
        return Precision("cpu", torch.device("cpu"), torch.float32, None, False)
    if not torch.cuda.is_available():
        raise BadInputError(f"precision profile '{profile}' needs a CUDA GPU; use profile=cpu here")
    device = torch.device("cuda")
    if profile == "t4":
        # Frozen base weights in fp16 (LoRA); full fine-tuning keeps fp32 master weights under fp16 autocast.
        return Precision("t4", device, torch.float32 if full_finetune else torch.float16, torch.float16, True)
    return Precision("bf16", device, torch.float32 if full_finetune else torch.bfloat16, torch.bfloat16, False)


def check_student_vocab(model, vocab_size: int, student: str) -> None:
    """The student's LM head must cover the cache's vocabulary; extra (padding) rows are fine and are ignored."""
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < vocab_size:
        raise IncompatibleCacheError(
            f"the student '{student}' has {rows} output rows but the cache's tokenizer has {vocab_size} tokens; "
            "the student cannot represent the teacher's distribution"
        )


def _bitsandbytes_version() -> str | None:
    """The installed bitsandbytes' version, or None when it cannot be imported."""
    try:
        import bitsandbytes
    except Exception:  # ImportError, or a build that fails while loading its native library
        return None
    return str(getattr(bitsandbytes, "__version__", "?"))


@functools.lru_cache(maxsize=None)
def _bitsandbytes_runs_on_cpu(feature: str) -> bool:
    """Whether the installed bitsandbytes can do `feature` ('adamw_8bit' or '4bit') on the CPU: a tiny real try.

    Releases before CPU support existed raise (or fail to find a native library) here, so asking is the reliable check.
    """
    try:
        if feature == "adamw_8bit":
            import bitsandbytes as bnb

            param = torch.nn.Parameter(torch.ones(4096))
            optimizer = bnb.optim.AdamW8bit([param], lr=1e-3)
            param.grad = torch.ones_like(param)
            optimizer.step()
            return bool(torch.isfinite(param).all())
        import bitsandbytes.functional as bnbf

        weight = torch.linspace(-1, 1, 128).reshape(2, 64)
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4")
        return bool((bnbf.dequantize_4bit(packed, state) - weight).abs().max() < 0.2)
    except Exception:
        return False


def require_bitsandbytes(feature: str, device: torch.device) -> None:
    """Refuse 8-bit AdamW (`adamw_8bit`) or QLoRA (`4bit`) with a clear message when bitsandbytes cannot do it here."""
    what = {"adamw_8bit": "optimizer=adamw_8bit", "4bit": "lora.quantize=4bit (QLoRA)"}[feature]
    instead = {"adamw_8bit": "optimizer=adamw", "4bit": "lora.quantize=none"}[feature]
    version = _bitsandbytes_version()
    if version is None:
        raise BadInputError(f"{what} needs bitsandbytes: pip install bitsandbytes, or set {instead}")
    if device.type == "cpu" and not _bitsandbytes_runs_on_cpu(feature):
        raise BadInputError(
            f"{what}: the installed bitsandbytes {version} cannot run on the CPU; run on a GPU with profile=t4 (or "
            f"bf16), upgrade to a release with CPU support (pip install -U bitsandbytes; 0.50 works), or set {instead}"
        )


def _nf4_config(precision: Precision):
    """QLoRA's quantisation: nf4 base weights with double quantisation, computing in the profile's dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=precision.autocast_dtype or torch.float32)


def load_student(name: str, precision: Precision, lora: LoraConfig, vocab_size: int,
                 gradient_checkpointing: bool = False):
    """The student model ready to train: LoRA adapters in fp32 (or every weight trainable), on the profile's device.

    A causal LM, or an encoder-decoder (T5-family, ``config.is_encoder_decoder``) through ``AutoModelForSeq2SeqLM``.

    With ``lora.quantize='4bit'`` (QLoRA) the frozen base is loaded in nf4 through bitsandbytes, straight onto the
    device, and prepared with peft's ``prepare_model_for_kbit_training`` (norms and head in fp32, input grads on).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    quantized = lora.quantize == "4bit"
    extra = {}
    if quantized:
        if not lora.enabled:
            raise BadInputError("lora.quantize=4bit (QLoRA) trains LoRA adapters on a 4-bit base: set "
                                "lora.enabled=true, or lora.quantize=none for full fine-tuning")
        require_bitsandbytes("4bit", precision.device)
        extra = {"quantization_config": _nf4_config(precision), "device_map": {"": str(precision.device)}}
    check_model_source(name, "student")
    try:
        seq2seq = bool(getattr(AutoConfig.from_pretrained(name), "is_encoder_decoder", False))
        if seq2seq:  # T5 / FLAN-T5: the prompt goes to the encoder, targets are distilled on the decoder side
            model = AutoModelForSeq2SeqLM.from_pretrained(name, dtype=precision.weight_dtype, **extra)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=precision.weight_dtype,
                                                         attn_implementation="sdpa", **extra)
    except OSError as exc:
        raise BadInputError(f"cannot load the student '{name}': {exc}") from None
    check_student_vocab(model, vocab_size, name)
    model.config.use_cache = False
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora.enabled:
            model.enable_input_require_grads()
    if lora.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        targets = [m for m in lora.target_modules if m in present]
        if not targets:
            raise BadInputError(
                f"none of lora.target_modules {lora.target_modules} exist in the student; it has e.g. "
                f"{sorted(present)[:12]}"
            )
        model = get_peft_model(model, PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
            task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM"))
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # trainable weights stay fp32 (fp16 Adam updates underflow)
    return model if quantized else model.to(precision.device)  # a 4-bit model is already placed by device_map


def make_optimizer(kind: str, params: list, lr: float, weight_decay: float, device: torch.device):
    """AdamW from torch, or bitsandbytes' 8-bit AdamW (optimizer states in 8 bits: about 75% less state memory)."""
    if kind == "adamw_8bit":
        require_bitsandbytes("adamw_8bit", device)
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if kind != "adamw":
        raise BadInputError(f"optimizer must be adamw or adamw_8bit, got {kind!r}")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def trainable_state(model, keep: bool = True) -> dict[str, torch.Tensor]:
    """Only the parameters being trained (the adapter, or everything): what a checkpoint must keep. Whole tensors on
    the CPU: under FSDP every rank joins the all-gathers and only ``keep`` ranks (rank 0) hold the result."""
    from kdcache.train.fsdp import full_tensors

    return full_tensors({n: p for n, p in model.named_parameters() if p.requires_grad}, keep)
