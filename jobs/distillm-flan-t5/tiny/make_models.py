"""The tiny recipe's models, built locally (no download): a Llama-config teacher with a byte-level BPE tokenizer
(TinyLlama's shape, much smaller) and a T5-config student with a SentencePiece-style unigram tokenizer (FLAN-T5's),
both tokenizers trained on the shipped UPSC texts. The teacher is briefly fitted to the task on the first 80 golden
rows (train.jsonl, what the cache is built over) so it has something to teach; the last 40 (heldout.jsonl) are for
evaluation only.

    python jobs/distillm-flan-t5/tiny/make_models.py storage/models/distillm-tiny
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[3] / "examples" / "upsc" / "golden.jsonl"
PROMPT = "Title: {title}\nWhich UPSC GS paper (GS1, GS2, GS3, GS4 or none)?"
TARGET = " {gs_paper}"


def main(out: str, teacher_steps: int = 150, train_rows: int = 80) -> dict[str, str]:
    from kdcache.tiny import build_llama, build_t5, build_tokenizer, build_unigram_tokenizer, fit_teacher, write_recipe

    data = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    texts = [f"{r['title']} {r['text']} {r['gs_paper']}" for r in data]
    bpe = build_tokenizer(texts, vocab_size=512, chat=False)
    bpe.padding_side = "right"
    unigram = build_unigram_tokenizer(texts, vocab_size=400)
    teacher = build_llama(len(bpe), hidden_size=64, layers=2, heads=2, seed=1, eos_id=bpe.eos_token_id)
    fit_teacher(teacher, bpe, [(PROMPT.format(**r), TARGET.format(**r)) for r in data[:train_rows]], teacher_steps,
                seed=1, batch_size=8)
    student = build_t5(len(unigram), d_model=64, layers=2, heads=2, seed=2, pad_id=unigram.pad_token_id,
                       eos_id=unigram.eos_token_id)
    return write_recipe(out, teacher, student, bpe, {"train": data[:train_rows], "heldout": data[train_rows:]},
                        student_tokenizer=unigram)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write teacher/ and student/ to")
    args = parser.parse_args()
    print(json.dumps(main(args.out), indent=1))
