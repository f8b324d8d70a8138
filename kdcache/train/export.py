"""Merge a LoRA adapter into its base model, for deployment without peft."""

from __future__ import annotations

import json
from pathlib import Path

from kdcache.errors import BadInputError


def merge_adapter(adapter: str, out: str, base: str | None = None) -> None:
    """Load base + adapter, merge the LoRA weights in, and save the plain model, its tokenizer and a README.md
    model card (kdcache.train.model_card) to `out`."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    config_file = Path(adapter) / "adapter_config.json"
    if not config_file.exists():
        raise BadInputError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json); a full fine-tune "
                            "is already a plain model")
    base = base or json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise BadInputError("the adapter does not name its base model; pass --base")
    try:
        seq2seq = bool(getattr(AutoConfig.from_pretrained(base), "is_encoder_decoder", False))  # T5-family students
        model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(base)
    except OSError as exc:
        raise BadInputError(f"cannot load the base model '{base}': {exc}") from None
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(out)
    from kdcache.train.model_card import write_model_card

    write_model_card(adapter, base, out)  # README.md: teacher, cache plan hash, loss, steps, held-out figures
