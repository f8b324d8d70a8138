"""The cross-tokenizer student of benchmarks/distill_quality.py (issue 18, point 5): a student with another tokenizer,
a SentencePiece-style unigram vocabulary trained locally on the same texts (another vocabulary size and other word
splits than the teacher's byte-level BPE), in a T5-config encoder-decoder of the pool student's width and depth.

Why T5 and not the pool student's Qwen2: transformers 5's AutoTokenizer picks the tokenizer class from the model's
config, so a Qwen2 folder's unigram tokenizer.json comes back as a Qwen2Tokenizer with Qwen2's byte-level
pre-tokenizer (every word split into characters); a T5 folder keeps the tokenizer as saved."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from kdcache.tiny import build_t5, build_unigram_tokenizer, save_model

UNIGRAM_VOCAB = 1536  # the teacher's BPE has 2,048 tokens


def unigram_student(out: Path, texts: list[str], shape: tuple[int, int, int], labels, log) -> Path:
    """The saved init of the cross-tokenizer student (made once, reused when present), as ``out/models/...``."""
    folder = out / "models" / "student-unigram-init"
    if not (folder / "config.json").exists():
        tokenizer = build_unigram_tokenizer(texts, UNIGRAM_VOCAB)
        hidden, layers, heads = shape
        save_model(build_t5(len(tokenizer), d_model=hidden, layers=layers, heads=heads, seed=2,
                            pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id), tokenizer, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    single = sum(len(tokenizer(" " + label, add_special_tokens=False)["input_ids"]) == 1 for label in labels)
    log(f"unigram student tokenizer: {len(tokenizer)} tokens; {single} of {len(labels)} labels are one token")
    return folder
