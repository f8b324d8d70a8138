"""Classification by label scoring, and free generation with a label parser, for any causal LM folder.

Label scoring: for each example the prompt (rendered with a TemplateConfig, wrapped in the tokenizer's chat
template when it has one) is followed by each label's tokens, and the label's score is the sum of its tokens'
log-likelihoods given the prompt. The prediction is the best label; the confidence is the softmax of the label
scores (the model's probability of each label, renormalised over the label set).

Prompt and label are tokenised separately and concatenated, exactly as `kdcache.data.encode` builds training
sequences, so a student is scored on the token boundary it was trained on. A decoder-only model reads the prompt
once and scores every label against its KV cache. Only the label positions go through the LM head, so no
full-vocabulary logits are held for the prompt.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kdcache.config import TemplateConfig
from kdcache.data.encode import prompt_text_for_model, uses_chat_template
from kdcache.data.sources import Row
from kdcache.data.templates import render
from kdcache.errors import BadInputError
from kdcache.eval.prompt_cache import (
    _padded,
    can_score_from_prompt_cache,
    label_prefix_inputs,
    score_from_prompt_cache,
)
from kdcache.modeling import (
    decoder_of,
    final_hidden_states,
    is_encoder_decoder,
    load_causal_lm,
    load_tokenizer,
    output_logits,
    resolve_device,
    resolve_dtype,
    row_chunks,
    seq2seq_target_hidden_states,
)

UNPARSED = "unparsed"


def folder_size(path: str | os.PathLike) -> int | None:
    """Bytes of all files under a local folder (symlinks followed once), or None when it is not a local folder."""
    root = Path(path)
    if not root.is_dir():
        return None
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                total += (Path(dirpath) / name).stat().st_size
            except OSError:
                pass
    return total


@dataclass
class LoadedModel:
    """A model ready to evaluate, with what the report says about it."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: str
    path: str
    base: str | None  # the base model of an adapter folder
    parameters: int  # parameters of the model as evaluated (after merging an adapter)
    adapter_parameters: int | None
    size_on_disk_bytes: int | None  # the folder given (for an adapter: the adapter folder)
    base_size_on_disk_bytes: int | None


def is_adapter_folder(path: str) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def _has_tokenizer(path: str) -> bool:
    return any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def _load_lm(source: str, dtype: str):
    """A causal LM, or an encoder-decoder (T5, FLAN-T5: ``config.is_encoder_decoder``) through AutoModelForSeq2SeqLM."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    try:
        seq2seq = bool(getattr(AutoConfig.from_pretrained(source), "is_encoder_decoder", False))
    except (OSError, ValueError):
        seq2seq = False  # load_causal_lm reports what is wrong with the folder
    if not seq2seq:
        return load_causal_lm(source, dtype=dtype)
    return AutoModelForSeq2SeqLM.from_pretrained(source, dtype=resolve_dtype(dtype)).eval()


def load_model(path: str, device: str = "auto", dtype: str = "float32", tokenizer: str | None = None,
               base: str | None = None, merge_adapter: bool = True) -> LoadedModel:
    """Load a causal LM folder (or hub id already cached), or a peft adapter folder on top of its base model.

    An adapter folder (one holding adapter_config.json) loads its base (`base`, else the one its config names),
    applies the adapter and, by default, merges it in, as a deployment would. The tokenizer comes from
    `tokenizer`, else the folder given, else the base model's folder.
    """
    resolve_dtype(dtype)  # an unknown dtype fails before anything is loaded
    torch_device = resolve_device(device)
    adapter = is_adapter_folder(path)
    base_name = None
    if adapter:
        config = json.loads((Path(path) / "adapter_config.json").read_text())
        base_name = base or config.get("base_model_name_or_path")
        if not base_name:
            raise BadInputError(f"the adapter {path} does not name its base model; pass the base model explicitly")
    source = base_name if adapter else path
    model = _load_lm(source, dtype)  # on the CPU: the adapter is applied before it moves
    adapter_parameters = None
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path)
        adapter_parameters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        if merge_adapter:
            model = model.merge_and_unload()
    tokenizer_source = tokenizer or (path if (not adapter or _has_tokenizer(path)) else base_name)
    tok = load_tokenizer(tokenizer_source)
    model = model.to(torch_device).eval()
    parameters = sum(p.numel() for p in model.parameters())
    return LoadedModel(
        model=model, tokenizer=tok, device=torch_device, dtype=dtype, path=path, base=base_name,
        parameters=parameters, adapter_parameters=adapter_parameters, size_on_disk_bytes=folder_size(path),
        base_size_on_disk_bytes=folder_size(base_name) if base_name else None,
    )


# --------------------------------------------------------------------------------------------------- prompts


def prompt_ids(template: TemplateConfig, tokenizer, row: Row, max_prompt_tokens: int | None = None
               ) -> tuple[list[int], int]:
    """Token ids of a row's prompt as the model sees it (chat template honoured), cut from the left to fit.

    Returns the ids and the number of tokens dropped from the left.
    """
    prompt_template = dataclasses.replace(template, target="", distill="all")
    prompt, _ = render(prompt_template, row)
    text, has_specials = prompt_text_for_model(template, tokenizer, prompt)
    ids = tokenizer(text, add_special_tokens=not has_specials)["input_ids"]
    dropped = 0
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        dropped = len(ids) - max_prompt_tokens
        ids = ids[dropped:]
    if not ids:
        anchor = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [anchor if anchor is not None else 0]
    return ids, dropped


def label_token_ids(tokenizer, labels: Sequence[str], prefix: str = " ", add_eos: bool = False) -> list[list[int]]:
    """The token ids scored for each label: `prefix + label` tokenised alone (plus EOS when asked)."""
    if not labels:
        raise BadInputError("no labels given: pass the label strings to score (e.g. --labels GS1 --labels GS2)")
    if len(set(labels)) != len(labels):
        raise BadInputError(f"the labels {list(labels)} contain duplicates")
    result = []
    for label in labels:
        ids = tokenizer(prefix + label, add_special_tokens=False)["input_ids"]
        if add_eos:
            if tokenizer.eos_token_id is None:
                raise BadInputError("label EOS asked for but the tokenizer has no EOS token")
            ids = ids + [tokenizer.eos_token_id]
        if not ids:
            raise BadInputError(f"the label {label!r} tokenises to nothing")
        result.append(ids)
    seen: dict[tuple, str] = {}
    for label, ids in zip(labels, result):
        if tuple(ids) in seen:
            raise BadInputError(f"the labels {seen[tuple(ids)]!r} and {label!r} tokenise to the same tokens")
        seen[tuple(ids)] = label
    return result


# ----------------------------------------------------------------------------------------------- label scoring


@torch.inference_mode()
def score_labels(model, prompts: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int,
                 device: torch.device | None = None, chunk_size: int = 1024,
                 vocab_size: int | None = None) -> np.ndarray:
    """Sum of each label's token log-likelihoods after each prompt: a float64 array [len(prompts), len(labels)].

    A decoder-only model runs the prompts once and the labels against their shared KV cache
    (:func:`kdcache.eval.prompt_cache.score_from_prompt_cache`: one-token labels cost one forward over the prompts);
    an encoder-decoder, or a model without a separate decoder, with sliding-window layers or with an attention
    implementation that takes no custom mask (flash attention), runs every (prompt, label) pair as its own sequence
    (:func:`_score_per_label`). Hidden states are taken at the positions that predict label tokens only, and
    projected through the LM head `chunk_size` rows at a time; log-softmax is done in float32 whatever the model's
    dtype. ``vocab_size`` (the tokenizer's length): LM-head rows past it (embedding padding, e.g. 151,936 rows for
    Qwen2.5's 151,665 tokens) are left out of the softmax.
    """
    if not prompts:
        return np.zeros((0, len(labels)))
    device = device or next(model.parameters()).device
    if labels and can_score_from_prompt_cache(model):
        return score_from_prompt_cache(model, prompts, labels, pad_id, device, chunk_size, vocab_size)
    return _score_per_label(model, prompts, labels, pad_id, device, chunk_size, vocab_size)


@torch.inference_mode()
def _score_per_label(model, prompts: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int,
                     device: torch.device, chunk_size: int, vocab_size: int | None) -> np.ndarray:
    """:func:`score_labels` with one (prompt + label) sequence per pair, all in one right-padded batch: the path of
    encoder-decoders (the prompt to the encoder, the label on the decoder side) and of models without a separate
    decoder, and the reference the shared-prompt path is pinned to (tests/test_eval_runs.py)."""
    sequences, starts = [], []
    for prompt in prompts:
        for label in labels:
            sequences.append(list(prompt) + list(label))
            starts.append(len(prompt))
    ids, mask = _padded(sequences, pad_id, device)
    # (row, position predicting the token, token) for every label token of every sequence
    rows, positions, targets = [], [], []
    for i, seq in enumerate(sequences):
        for t in range(starts[i], len(seq)):
            rows.append(i)
            positions.append(t - 1)
            targets.append(seq[t])
    rows_t = torch.tensor(rows, device=device)
    positions_t = torch.tensor(positions, device=device)
    targets_t = torch.tensor(targets, device=device)
    token_logprobs = torch.empty(len(rows), dtype=torch.float32, device=device)
    if is_encoder_decoder(model):  # the prompt to the encoder, the label on the decoder side
        target_mask = torch.zeros_like(mask, dtype=torch.bool)
        target_mask[rows_t, positions_t + 1] = True  # row-major order: the order of rows / positions above
        prompt_lengths = torch.tensor(starts, device=device)
        selected = seq2seq_target_hidden_states(model, ids, mask, target_mask, prompt_lengths)
        for part in row_chunks(len(rows), chunk_size):
            logits = output_logits(model, selected[part]).float()[:, :vocab_size]
            token_logprobs[part] = logits.log_softmax(-1).gather(-1, targets_t[part, None])[:, 0]
    elif decoder_of(model) is not None:
        selected = final_hidden_states(model, ids, mask)[rows_t, positions_t]
        for part in row_chunks(len(rows), chunk_size):
            logits = output_logits(model, selected[part]).float()[:, :vocab_size]
            token_logprobs[part] = logits.log_softmax(-1).gather(-1, targets_t[part, None])[:, 0]
    else:  # a model without a separate decoder: full logits (fine for small models)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        token_logprobs = logits[rows_t, positions_t].float()[:, :vocab_size].log_softmax(-1).gather(-1, targets_t[:, None])[:, 0]
    totals = torch.zeros(len(sequences), dtype=torch.float64, device=device)
    totals.index_add_(0, rows_t, token_logprobs.double())
    return totals.cpu().numpy().reshape(len(prompts), len(labels))


def label_probabilities(logliks: np.ndarray) -> np.ndarray:
    """Softmax over the label axis: each label's probability renormalised over the label set."""
    shifted = logliks - logliks.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


# -------------------------------------------------------------------------------------------------- generation


@torch.inference_mode()
def generate(model, prompts: Sequence[Sequence[int]], tokenizer, max_new_tokens: int = 16,
             device: torch.device | None = None) -> list[str]:
    """Greedy continuations of the prompts (left-padded into one batch), decoded without special tokens.

    LM-head rows past the tokenizer's vocabulary (embedding padding) are never chosen: they decode to nothing."""
    if not prompts:
        return []
    device = device or next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids, mask = _padded(prompts, pad_id, left=True)
    from transformers import GenerationConfig

    rows = model.get_output_embeddings().weight.shape[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
                              eos_token_id=tokenizer.eos_token_id,
                              suppress_tokens=list(range(len(tokenizer), rows)) or None)
    output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    # An encoder-decoder returns its decoder's tokens only, after the start token; a causal LM the prompt too.
    new_tokens = output[:, 1 if is_encoder_decoder(model) else ids.shape[1]:].cpu().tolist()
    texts = []
    for tokens in new_tokens:
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return texts


def parse_label(text: str, labels: Sequence[str]) -> str:
    """The label whose string occurs first in `text` (case-insensitive; the longest on a tie), else 'unparsed'."""
    lowered = text.lower()
    best: tuple[int, int] | None = None
    found = UNPARSED
    for label in labels:
        position = lowered.find(label.lower())
        if position < 0:
            continue
        key = (position, -len(label))
        if best is None or key < best:
            best, found = key, label
    return found


def template_for(prompt: str, system: str | None = None, chat: str = "auto") -> TemplateConfig:
    """A TemplateConfig for evaluation prompts (the target side is unused)."""
    return TemplateConfig(prompt=prompt, target="", system=system, chat=chat, distill="all", add_eos=False)


__all__ = [
    "LoadedModel", "UNPARSED", "folder_size", "generate", "is_adapter_folder", "label_probabilities",
    "label_prefix_inputs", "label_token_ids", "load_model", "parse_label", "prompt_ids", "score_labels",
    "template_for", "uses_chat_template",
]
