"""The tiny accounting-QA recipe's models and data, built locally (no download): a byte-level BPE tokenizer trained on
accounting-qa.jsonl (48 short question/answer pairs written by hand for this recipe: synthetic, not from the report),
a 2-layer GPT-2-config teacher fitted to the answers (GPT-2 Large's stand-in) and a 1-layer untrained GPT-2-config
student with the same tokenizer (DistilGPT-2's stand-in, as the real pair shares GPT-2's tokenizer).

    python jobs/accounting-gpt2-large-to-distilgpt2/tiny/make_models.py storage/models/accounting-tiny

writes teacher/, student/, train.jsonl (the first 40 rows: the cache) and test.jsonl (the last 8) into that folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "accounting-qa.jsonl"
PROMPT = "Question: {question}\nAnswer:"
TARGET = " {answer}"


def main(out: str, teacher_steps: int = 150, train_rows: int = 40) -> dict[str, str]:
    from kdcache.tiny import build_gpt2, build_tokenizer, fit_teacher, write_recipe

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    tokenizer = build_tokenizer([PROMPT.format(**r) + TARGET.format(**r) for r in rows], vocab_size=400, chat=False)
    tokenizer.padding_side = "right"
    eos = tokenizer.eos_token_id
    teacher = build_gpt2(len(tokenizer), hidden_size=64, layers=2, heads=2, seed=1, bos_id=eos, eos_id=eos)
    fit_teacher(teacher, tokenizer, [(PROMPT.format(**r), TARGET.format(**r)) for r in rows], teacher_steps, seed=1)
    student = build_gpt2(len(tokenizer), hidden_size=32, layers=1, heads=2, seed=2, bos_id=eos, eos_id=eos)
    return write_recipe(out, teacher, student, tokenizer, {"train": rows[:train_rows], "test": rows[train_rows:]})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write teacher/, student/, train.jsonl and test.jsonl to")
    parser.add_argument("--teacher-steps", type=int, default=150)
    args = parser.parse_args()
    print(json.dumps(main(args.out, args.teacher_steps), indent=1))
