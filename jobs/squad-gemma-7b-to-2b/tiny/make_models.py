"""The tiny recipe's models and data, built locally (no download): a Gemma-config teacher (4 blocks, hidden 64, 4x the MLP) and a
Gemma-config student (2 blocks, hidden 64), sharing one byte-level BPE tokenizer trained on the data, as Gemma-7B-it
and Gemma-2B-it share Gemma's, and a SYNTHETIC SQuAD-style data set: every row has a `context` (two sentences about
a made-up person), a `question` about it, and an `answer` that is a span of the context (a city, a year or a job).
It is not SQuAD, it has SQuAD's fields and answer kind, so EM/F1 are computed the same way.

The teacher is briefly fitted to the task on train.jsonl (what the cache is built over) so that it has something to
teach; heldout.jsonl (other people, other combinations) is for evaluation only.

    python jobs/squad-gemma-7b-to-2b/tiny/make_models.py storage/models/squad-gemma-tiny
"""

from __future__ import annotations

import argparse
import json
import random

PROMPT = "Context: {context}\nQuestion: {question}\nAnswer:"
TARGET = " {answer}"
NAMES = ["Ada", "Boris", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Irene", "Jonas", "Kira", "Luca",
         "Mira", "Nils", "Olga", "Pavel"]
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Quito", "Dublin", "Hanoi", "Riga", "Accra", "Bern", "Dakar", "Sofia"]
JOBS = ["baker", "pilot", "doctor", "farmer", "teacher", "painter", "sailor", "miner", "judge", "nurse"]
YEARS = [str(y) for y in range(1901, 1999, 7)]
QUESTIONS = (("Where was {name} born?", "city"), ("In which year was {name} born?", "year"),
             ("What did {name} work as?", "job"))


def synthetic_squad(rows: int, seed: int) -> list[dict]:
    """`rows` SQuAD-style rows (id, title, context, question, answer); the answer is always a span of the context."""
    rng = random.Random(seed)
    out = []
    for i in range(rows):
        fact = {"name": rng.choice(NAMES), "city": rng.choice(CITIES), "year": rng.choice(YEARS),
                "job": rng.choice(JOBS)}
        context = "{name} was born in {city} in {year}. {name} worked as a {job}.".format(**fact)
        question, field = rng.choice(QUESTIONS)
        answer = fact[field]
        assert answer in context
        out.append({"id": f"syn-{seed}-{i}", "title": fact["name"], "context": context,
                    "question": question.format(**fact), "answer": answer})
    return out


def main(out: str, teacher_steps: int = 200, train_rows: int = 240, heldout_rows: int = 60) -> dict[str, str]:
    from kdcache.tiny import build_gemma, build_tokenizer, fit_teacher, write_recipe

    train, heldout = synthetic_squad(train_rows, seed=0), synthetic_squad(heldout_rows, seed=1)
    texts = [PROMPT.format(**r) + TARGET.format(**r) for r in train + heldout]
    tokenizer = build_tokenizer(texts, vocab_size=512)  # EOS <|im_end|>, pad <|endoftext|>: distinct, as Gemma's
    tokenizer.padding_side = "right"
    ids = {"pad_id": tokenizer.pad_token_id, "eos_id": tokenizer.eos_token_id}
    teacher = build_gemma(len(tokenizer), hidden_size=64, layers=4, heads=2, seed=1, **ids)
    fit_teacher(teacher, tokenizer, [(PROMPT.format(**r), TARGET.format(**r)) for r in train], teacher_steps, seed=1,
                lr=5e-3)
    student = build_gemma(len(tokenizer), hidden_size=64, layers=2, heads=2, seed=2, init_std=0.15, **ids)
    return write_recipe(out, teacher, student, tokenizer, {"train": train, "heldout": heldout})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write teacher/, student/, train.jsonl and heldout.jsonl to")
    args = parser.parse_args()
    print(json.dumps(main(args.out), indent=1))
