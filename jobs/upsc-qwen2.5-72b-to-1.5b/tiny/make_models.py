"""The tiny UPSC recipe's models and data, built locally (no download): a byte-level BPE tokenizer trained on the
shipped UPSC texts, a 2-layer Qwen2-config teacher briefly fitted to the task on the silver rows (it stands in for
Qwen2.5-72B-Instruct), and a smaller untrained Qwen2-config student with the same tokenizer (Qwen2.5-1.5B's stand-in).
Articles are cut to their first `words` words, and the first 200 silver and 60 golden rows are kept, so that
every step is short on a CPU.

    python jobs/upsc-qwen2.5-72b-to-1.5b/tiny/make_models.py storage/models/upsc-tiny

writes teacher/, student/, silver.jsonl and golden.jsonl into that folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "upsc"
# The real recipe's prompt (jobs/teacher-qwen2.5-72b-vllm.yaml) without the chat template and system message.
PROMPT = "Title: {title}\nArticle: {text}\nWhich UPSC GS paper is this relevant to (GS1, GS2, GS3, GS4 or none)?"
TARGET = " {gs_paper}"


def _rows(name: str, words: int) -> list[dict]:
    rows = [json.loads(line) for line in (EXAMPLES / name).read_text().splitlines() if line.strip()]
    return [{**row, "text": " ".join(row["text"].split()[:words])} for row in rows]


def main(out: str, teacher_steps: int = 120, words: int = 12, silver_rows: int = 200, golden_rows: int = 60
         ) -> dict[str, str]:
    from kdcache.tiny import build_qwen2, build_tokenizer, fit_teacher, write_recipe

    silver, golden = _rows("silver.jsonl", words), _rows("golden.jsonl", words)
    tokenizer = build_tokenizer([PROMPT.format(**r) + TARGET.format(**r) for r in silver + golden], vocab_size=512,
                                chat=False)
    silver, golden = silver[:silver_rows], golden[:golden_rows]  # the tokenizer saw every text; the rest is smaller
    teacher = build_qwen2(len(tokenizer), hidden_size=64, layers=2, heads=2, seed=1)
    fit_teacher(teacher, tokenizer, [(PROMPT.format(**r), TARGET.format(**r)) for r in silver], teacher_steps, seed=1,
                answer_only=True)
    student = build_qwen2(len(tokenizer), hidden_size=32, layers=1, heads=2, seed=2)
    return write_recipe(out, teacher, student, tokenizer, {"silver": silver, "golden": golden})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write teacher/, student/, silver.jsonl and golden.jsonl to")
    parser.add_argument("--teacher-steps", type=int, default=120)
    args = parser.parse_args()
    print(json.dumps(main(args.out, args.teacher_steps), indent=1))
