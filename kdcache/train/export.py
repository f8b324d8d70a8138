"""`kdcache export`: a run's LoRA adapter merged into its base (or the adapter alone), ready for the Hub.

The folder written holds the model (merged weights in the chosen dtype, or the adapter files), the tokenizer and a
README.md model card (:mod:`kdcache.train.model_card`). The base model is named by its hub id when it can be known
(:func:`kdcache.train.hub.base_model_id`), not by a local path: ``base_model_name_or_path`` in the adapter's
config and in the merged model's config.json, and ``base_model:`` in the card's metadata.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from kdcache.errors import BadInputError

#: --dtype of the merged weights: the base is loaded and merged in float32, then cast to this.
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ADAPTER_CONFIG = "adapter_config.json"
LEFT_OUT = ("hidden_projector.safetensors",)  # a training-time part (hidden-state loss), of no use to a deployment


@dataclass(frozen=True)
class Export:
    """What `export` wrote: the folder, the base as loaded, its hub id (None when unknown), the merged dtype."""

    out: str
    base: str
    base_model_id: str | None
    dtype: str | None  # None: the adapter alone (merge=False)


def _adapter_config(adapter: str) -> dict:
    path = Path(adapter) / ADAPTER_CONFIG
    if not path.exists():
        raise BadInputError(f"{adapter} is not a LoRA adapter folder (no {ADAPTER_CONFIG}); a full fine-tune "
                            "is already a plain model")
    return json.loads(path.read_text())


def export(adapter: str, out: str, base: str | None = None, *, merge: bool = True, dtype: str | None = None,
           base_model_id: str | None = None, compare: str | None = None) -> Export:
    """Write the student of `adapter` (a run's final/ or best/) to `out`: merged into `base` (default: the base the
    adapter names) in `dtype` (bf16, fp16 or fp32; default: the base's own), or the adapter alone (`merge` False),
    with its tokenizer and a model card; `compare` is a `kdcache compare --out` folder whose results the card
    shows."""
    from kdcache.train.hub import base_model_id as find_base_model_id
    from kdcache.train.model_card import write_model_card

    config = _adapter_config(adapter)
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise BadInputError("the adapter does not name its base model; pass --base")
    if dtype is not None and dtype not in DTYPES:
        raise BadInputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype is not None and not merge:
        raise BadInputError("--dtype sets the merged weights' dtype; drop it with --no-merge (the adapter is copied "
                            "as trained)")
    hub_id = find_base_model_id(base, Path(adapter).resolve().parent, base_model_id)
    if merge:
        dtype = _write_merged(adapter, base, out, dtype, hub_id)
    else:
        _write_adapter(adapter, out, config, hub_id)
    write_model_card(adapter, hub_id or base, out, merged=merge, dtype=dtype, compare=compare,
                     base_is_hub_id=hub_id is not None)
    return Export(out=str(out), base=base, base_model_id=hub_id, dtype=dtype)


def merge_adapter(adapter: str, out: str, base: str | None = None) -> None:
    """Load base + adapter, merge the LoRA weights in, and save the plain model, its tokenizer and a README.md
    model card to `out` (:func:`export` with its defaults)."""
    export(adapter, out, base)


def _write_merged(adapter: str, base: str, out: str, dtype: str | None, hub_id: str | None) -> str:
    """Merge in float32, cast to `dtype` (default: the base's stored dtype, else float32), save; the dtype name."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        base_config = AutoConfig.from_pretrained(base)
        seq2seq = bool(getattr(base_config, "is_encoder_decoder", False))  # T5-family students
        model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(base,
                                                                                           dtype=torch.float32)
    except OSError as exc:
        raise BadInputError(f"cannot load the base model '{base}': {exc}") from None
    stored = str(getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None) or "float32")
    name = DTYPES[dtype] if dtype else stored.removeprefix("torch.")
    if name not in DTYPES.values():
        name = "float32"
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().to(getattr(torch, name))
    if hub_id is not None:
        merged.config.base_model_name_or_path = hub_id  # kept in config.json (transformers drops _name_or_path)
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(out)
    return name


def _write_adapter(adapter: str, out: str, config: dict, hub_id: str | None) -> None:
    """The adapter's files (tokenizer included) without the training-only ones, naming the base by its hub id."""
    shutil.copytree(adapter, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*LEFT_OUT))
    if hub_id is not None:
        (Path(out) / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": hub_id},
                                                           indent=2) + "\n")
