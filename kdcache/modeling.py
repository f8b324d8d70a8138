"""What every part of kdcache does with a transformers causal LM: load it and its tokenizer, pick device and dtype,
and score chosen positions without full logits (hidden states of the positions that predict targets, then the LM head
a chunk of rows at a time).

The teacher backend, the trainer and the evaluator all import these, so a teacher, a student and an evaluated model
see the same LM head (with the logit scale / soft-cap some architectures apply) and the same error messages.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch
from torch import Tensor

from kdcache.errors import BadInputError

__all__ = [
    "DTYPES",
    "decoder_of",
    "decoder_depth",
    "final_hidden_states",
    "is_encoder_decoder",
    "layer_hidden_states",
    "load_causal_lm",
    "load_tokenizer",
    "looks_like_local_path",
    "output_logits",
    "resolve_device",
    "resolve_dtype",
    "row_chunks",
    "seq2seq_target_hidden_states",
    "target_hidden_states",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------ device and dtype


def resolve_device(name: str) -> torch.device:
    """`auto` is cuda when available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise BadInputError(f"unknown device {name!r} ({exc}); use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"device {name!r} asked for but CUDA is not available here; use --device cpu")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype of a weight dtype name (`float32`, `float16`, `bfloat16`)."""
    if name not in DTYPES:
        raise BadInputError(f"unknown dtype {name!r}; choose one of {list(DTYPES)}")
    return DTYPES[name]


# ---------------------------------------------------------------------------------------------------------- loading


def looks_like_local_path(name: str) -> bool:
    """Whether a model name can only mean a folder: it exists, starts with `/`, `.` or `~`, ends with `/`, or
    has more than one `/` (a hub id is `name` or `owner/name`)."""
    return (os.path.exists(os.path.expanduser(name)) or name.startswith(("/", ".", "~")) or name.endswith("/")
            or name.count("/") > 1 or os.sep != "/" and os.sep in name)


def check_model_source(name: str, role: str = "model") -> None:
    """Refuse a model name that can only be a local folder when no such folder exists, before transformers reads
    it as a hub id (its "Repo id must be in the form ..." message misleads); `role` names it in the message."""
    if not name:
        raise BadInputError(f"no {role} given: pass a local model folder or a hub id")
    if looks_like_local_path(name) and not os.path.isdir(os.path.expanduser(name)):
        what = "is a file, not a folder" if os.path.exists(os.path.expanduser(name)) else "folder not found"
        raise BadInputError(f"{role} {what}: {name} (give a model folder holding config.json and weights, or a "
                            "hub id whose weights are already downloaded; `kdcache demo` writes storage/demo/teacher "
                            "and storage/demo/student-untrained)")


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False):
    """A tokenizer from a local folder or a hub id already downloaded."""
    from transformers import AutoTokenizer

    check_model_source(name, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"cannot load the tokenizer '{name}': {exc}") from None


def load_causal_lm(name: str, revision: str | None = None, dtype: str = "float32", device: torch.device | None = None,
                   trust_remote_code: bool = False):
    """A causal LM from a local folder or a hub id, in eval mode, with SDPA attention where available.

    ``device=None`` leaves it where transformers loads it (the CPU), for callers that change it first (an adapter).
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    check_model_source(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, revision=revision, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise BadInputError(
            f"cannot load the model '{name}': {exc}. Give a local folder with config and weights, or a hub id "
            "whose weights are already downloaded"
        ) from None
    return model.eval() if device is None else model.to(device).eval()


# ---------------------------------------------------------------------------------------- hidden states and the head


def decoder_of(model) -> torch.nn.Module | None:
    """The model's decoder stack (its final norm included, no LM head), or None when it exposes none apart from
    itself."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "base_model", None)
    return None if decoder is None or decoder is model else decoder


def final_hidden_states(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The decoder's last hidden states [B, L, H] (after its final norm), without computing any logits."""
    decoder = decoder_of(model)
    if decoder is None:
        raise ValueError(f"{type(model).__name__} exposes no decoder apart from its LM head (get_decoder())")
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def layer_hidden_states(model, input_ids: Tensor, attention_mask: Tensor,
                        layers: tuple[int, ...]) -> tuple[Tensor, list[Tensor]]:
    """The decoder's last hidden states [B, L, H] and its hidden states ``layers`` (indices into
    ``output_hidden_states``: 0 = embeddings, i = after block i, the last = after the final norm), each [B, L, H],
    from one forward pass without logits."""
    decoder = decoder_of(model)
    if decoder is None:
        raise ValueError(f"{type(model).__name__} exposes no decoder apart from its LM head (get_decoder())")
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True)
    return out.last_hidden_state, [out.hidden_states[i] for i in layers]


def decoder_depth(model) -> int:
    """The number of decoder blocks (``output_hidden_states`` has one more entry: the embeddings)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


def target_hidden_states(model, input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor) -> Tensor:
    """Final hidden states ``[N, H]`` that predict the target tokens: position ``t - 1`` for each target ``t``,
    in row-major order of ``target_mask`` [B, L] (the cache's order: example by example, positions ascending)."""
    rows, cols = target_mask.nonzero(as_tuple=True)
    if cols.numel() and bool((cols == 0).any()):
        raise ValueError("position 0 cannot be a target: nothing before it predicts it")
    hidden = final_hidden_states(model, input_ids, attention_mask)
    return hidden[rows, cols - 1]


def is_encoder_decoder(model) -> bool:
    """Whether the model is an encoder-decoder (T5, FLAN-T5, BART...), whose targets are read on the decoder side."""
    return bool(getattr(model.config, "is_encoder_decoder", False))


def seq2seq_target_hidden_states(model, input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor,
                                 prompt_lengths: Tensor) -> Tensor:
    """An encoder-decoder's final decoder hidden states ``[N, H]`` that predict the target tokens, in row-major order
    of ``target_mask`` [B, L] (the same rows :func:`target_hidden_states` gives a causal LM).

    Example b's first ``prompt_lengths[b]`` tokens go to the encoder; its decoder reads the start token and the
    target tokens after the prompt, shifted right, so decoder position ``t - prompt_lengths[b]`` predicts token t.
    Every target must come after the prompt.
    """
    rows, cols = target_mask.nonzero(as_tuple=True)
    prompt_lengths = prompt_lengths.to(input_ids.device)
    if cols.numel() and bool((cols < prompt_lengths[rows]).any()):
        raise ValueError("an encoder-decoder student distills target tokens only, not prompt tokens "
                         "(template.distill=all)")
    lengths = attention_mask.sum(dim=1)
    batch = input_ids.shape[0]
    enc_width = max(1, int(prompt_lengths.max()))
    dec_width = max(1, int((lengths - prompt_lengths).max()))
    enc = input_ids.new_zeros((batch, enc_width))
    enc_mask = attention_mask.new_zeros((batch, enc_width))
    start = model.config.decoder_start_token_id
    dec = input_ids.new_full((batch, dec_width), 0 if start is None else int(start))
    dec_mask = attention_mask.new_zeros((batch, dec_width))
    for b in range(batch):
        p, n = int(prompt_lengths[b]), int(lengths[b])
        enc[b, :p], enc_mask[b, :p] = input_ids[b, :p], 1
        dec[b, 1:n - p] = input_ids[b, p:n - 1]
        dec_mask[b, :n - p] = 1
    encoded = model.get_encoder()(input_ids=enc, attention_mask=enc_mask).last_hidden_state
    hidden = model.get_decoder()(input_ids=dec, attention_mask=dec_mask, encoder_hidden_states=encoded,
                                 encoder_attention_mask=enc_mask, use_cache=False).last_hidden_state
    return hidden[rows, cols - prompt_lengths[rows]]


def output_logits(model, hidden: Tensor) -> Tensor:
    """Logits [n, rows of the LM head] of final hidden states [n, H], with the scale / soft-cap some architectures
    apply (T5's ``d_model ** -0.5`` on the decoder's output). Columns past the tokenizer's vocabulary (embedding
    padding) are the caller's to drop."""
    config = model.config
    if getattr(config, "scale_decoder_outputs", False) and getattr(config, "d_model", None):
        hidden = hidden * config.d_model ** -0.5
    logits = model.get_output_embeddings()(hidden)
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def linear_head_weight(model) -> Tensor | None:
    """The LM head's weight [rows, H] when :func:`output_logits` is exactly ``hidden @ weight.T`` (a plain bias-free
    ``nn.Linear`` with no hooks, no output scale or soft-cap, not a distributed tensor), so a loss may do the
    projection itself (:func:`kdcache.train.fused.ce_and_kd_from_head`); None otherwise (LoRA or quantised heads,
    T5's scaled decoder output, Gemma's soft-cap, FSDP-sharded heads), where the caller calls the head module."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    hooks = torch.nn.modules.module
    if head._forward_pre_hooks or head._forward_hooks or hooks._global_forward_pre_hooks or hooks._global_forward_hooks:
        return None
    config = model.config
    scale = getattr(config, "logit_scale", None)
    if getattr(config, "scale_decoder_outputs", False) or getattr(config, "final_logit_softcapping", None) or (
            isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1):
        return None
    weight = head.weight
    if type(weight) is not torch.nn.Parameter:  # e.g. a DTensor under FSDP
        return None
    return weight


def row_chunks(num_rows: int, chunk_size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``chunk_size`` rows covering ``range(num_rows)``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, num_rows, chunk_size):
        yield slice(start, min(start + chunk_size, num_rows))
