"""Label scoring from one forward over the prompts: every label scored against the prompts' shared KV cache.

`kdcache.eval.scoring.score_labels` calls :func:`score_from_prompt_cache` for decoder-only models. The prompts go
through the decoder once (right-padded, keeping the KV cache), and a label's first token is scored at its prompt's
last position, so one-token labels cost one forward over the prompts. The later tokens of longer labels need the
hidden states after the label's earlier tokens: the distinct label prefixes (:func:`label_prefix_inputs`, shared
prefixes fed once) run as one extra row per prompt, all prefixes side by side, against the prompt's cache, with a
4D attention mask that lets each prefix token see the prompt and its own prefix only (a token tree, as in
speculative decoding), at positions counted on from the prompt's end.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from kdcache.modeling import decoder_of, output_logits, row_chunks

MASKABLE = ("sdpa", "eager")  # attention implementations that take a custom 4D additive mask as given


def _padded(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | None = None,
            left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, attention mask) [len(sequences), longest] long tensors, right-padded (left-padded with
    `left`, as generation wants), on `device`."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[i, span] = torch.tensor(list(seq), dtype=torch.long)
        mask[i, span] = 1
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


def label_prefix_inputs(labels: Sequence[Sequence[int]]) -> tuple[list[tuple[int, ...]], list[list[tuple[int, int]]]]:
    """What the label tokens after the first need fed after the prompt, with shared prefixes fed once.

    Token k >= 1 of a label is predicted by the hidden state after the label's first k tokens. Returns the
    `inputs`: the distinct ``label[:-1]`` that are no strict prefix of another (so " GS1", " GS2", ... tokenised
    " GS" + digit need the single input (" GS",)); and per label, per token k >= 1, the (input index, position in
    it) whose hidden state predicts that token.
    """
    wanted = {tuple(label[:-1]) for label in labels if len(label) > 1}
    inputs = sorted(w for w in wanted if not any(len(o) > len(w) and o[: len(w)] == w for o in wanted))
    sources = []
    for label in labels:
        head = tuple(label[:-1])
        r = next((i for i, inp in enumerate(inputs) if inp[: len(head)] == head), None) if head else None
        sources.append([(r, k - 1) for k in range(1, len(label))])
    return inputs, sources


def tree_attention_mask(prompt_mask: torch.Tensor, inputs: Sequence[Sequence[int]], dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, S, P + S] for the inputs (S tokens in all, side by side) after prompts whose padding
    mask is `prompt_mask` [B, P]: a token sees its prompt's real tokens and, among the inputs, the tokens of its own
    input up to itself. 0 where seen, the dtype's minimum elsewhere."""
    owner = torch.tensor([r for r, inp in enumerate(inputs) for _ in inp], device=prompt_mask.device)
    step = torch.tensor([j for inp in inputs for j in range(len(inp))], device=prompt_mask.device)
    own = (owner[:, None] == owner[None, :]) & (step[None, :] <= step[:, None])  # [S, S]
    batch, width = prompt_mask.shape
    seen = torch.cat([prompt_mask.bool()[:, None, :].expand(batch, len(owner), width),
                      own[None].expand(batch, -1, -1)], dim=2)  # [B, S, P + S]
    zero = torch.zeros((), dtype=dtype, device=prompt_mask.device)
    return torch.where(seen, zero, torch.finfo(dtype).min)[:, None]


def can_score_from_prompt_cache(model) -> bool:
    """Decoder-only, with a separate decoder, full attention in every layer (no sliding window) and an attention
    implementation that takes a custom 4D mask (sdpa, eager)."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False) or decoder_of(model) is None:
        return False
    if getattr(config, "_attn_implementation", None) not in MASKABLE:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return not (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True))


def score_from_prompt_cache(model, prompts: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int,
                            device: torch.device, chunk_size: int, vocab_size: int | None) -> np.ndarray:
    """Sum of each label's token log-likelihoods after each prompt, float64 [len(prompts), len(labels)], from one
    forward over the prompts [B] and, for labels of more than one token, one forward over the label prefixes [B, S]
    against the prompts' KV cache (see the module docstring). The LM head runs on the B + B * S distinct positions
    only, `chunk_size` rows at a time, log-softmax in float32. Equal to one (prompt + label) sequence per pair
    (tests/test_eval_runs.py). The model must pass :func:`can_score_from_prompt_cache`.
    """
    decoder = decoder_of(model)
    batch = len(prompts)
    inputs, sources = label_prefix_inputs(labels)
    ids, mask = _padded(prompts, pad_id, device)
    lengths = mask.sum(1)
    out = decoder(input_ids=ids, attention_mask=mask, use_cache=bool(inputs))  # one-token labels need no cache
    nodes = [out.last_hidden_state[torch.arange(batch, device=device), lengths - 1]]  # [B, H]: the first tokens
    offsets = np.cumsum([0] + [len(inp) for inp in inputs]).tolist()  # input r's positions in a prompt's row
    if inputs:
        flat = torch.tensor([t for inp in inputs for t in inp], device=device)  # [S]
        steps = torch.tensor([j for inp in inputs for j in range(len(inp))], device=device)
        hidden = decoder(
            input_ids=flat.expand(batch, -1),
            attention_mask=tree_attention_mask(mask, inputs, nodes[0].dtype),
            position_ids=lengths[:, None] + steps,
            past_key_values=out.past_key_values, use_cache=True,
        ).last_hidden_state  # [B, S, H]
        nodes.append(hidden.reshape(-1, hidden.shape[-1]))  # row b * S + offsets[r] + j
    nodes = torch.cat(nodes)
    # (node, target, label column) for every token of every label, prompt by prompt
    per_prompt = offsets[-1]
    node, target, column = [], [], []
    for b in range(batch):
        for col, label in enumerate(labels):
            node.append(b)
            node.extend(batch + b * per_prompt + offsets[r] + j for r, j in sources[col])
            target.extend(label)
            column.extend([b * len(labels) + col] * len(label))
    node_t = torch.tensor(node, device=device)
    target_t = torch.tensor(target, device=device)
    token_logprobs = torch.empty(len(node), dtype=torch.float32, device=device)
    for part in row_chunks(nodes.shape[0], chunk_size):
        logprobs = output_logits(model, nodes[part]).float()[:, :vocab_size].log_softmax(-1)
        hit = (node_t >= part.start) & (node_t < part.stop)
        token_logprobs[hit] = logprobs[node_t[hit] - part.start, target_t[hit]]
    totals = torch.zeros(batch * len(labels), dtype=torch.float64, device=device)
    totals.index_add_(0, torch.tensor(column, device=device), token_logprobs.double())
    return totals.cpu().numpy().reshape(batch, len(labels))


__all__ = ["can_score_from_prompt_cache", "label_prefix_inputs", "score_from_prompt_cache", "tree_attention_mask"]
