"""Load a student for distillation: precision profile, vocabulary check against the cache, LoRA through peft."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdcache.config import LoraConfig
from kdcache.errors import BadInputError, IncompatibleCacheError


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


def load_student(name: str, precision: Precision, lora: LoraConfig, vocab_size: int,
                 gradient_checkpointing: bool = False):
    """The student model ready to train: LoRA adapters in fp32 (or every weight trainable), on the profile's device."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=precision.weight_dtype, attn_implementation="sdpa")
    except OSError as exc:
        raise BadInputError(f"cannot load the student '{name}': {exc}") from None
    check_student_vocab(model, vocab_size, name)
    model.config.use_cache = False
    if gradient_checkpointing:
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
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM"))
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # trainable weights stay fp32 (fp16 Adam updates underflow)
    return model.to(precision.device)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Only the parameters being trained (the adapter, or everything): what a checkpoint must keep."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
