"""A real labelled text task for the distillation-quality benchmark: WordNet noun gloss -> lexicographer file.

Each row is one WordNet 3.0 noun synset: `text` is its definition (the gloss without its quoted example sentences,
which usually contain the word itself) and `label` is the lexicographer file the synset is filed in, without the
`noun.` prefix: `animal`, `artifact`, `food`, `person`, ... (24 classes, each a single lowercase word). The word
itself is kept apart in `word` and is not part of `text`. noun.Tops (51 synsets, the heterogeneous top of the
hierarchy) and noun.motive (42 synsets) are left out; so are, by default, instance synsets (named people, places,
events: "United States physiologist (1899-1982)"), which would make `person` and `location` trivial, and every
definition that occurs more than once (it could fall into two splits, or carry two labels).

Source: Princeton WordNet 3.0, as the Debian package wordnet-base (version 1:3.0-37, files under /usr/share/wordnet;
`data.noun` is read). Install: `apt-get install wordnet-base`. Licence: the WordNet 3.0 licence (a permissive,
BSD-style licence: use, copy, modify and distribute for any purpose, keeping Princeton's copyright notice and
disclaimer), "WordNet 3.0 Copyright 2006 by Princeton University"; its text is in
/usr/share/doc/wordnet-base/copyright and at the head of /usr/share/wordnet/data.noun.

Splits are deterministic (they depend only on the arguments and the WordNet files, not on Python's RNG): classes are
balanced by capping each class at a common quota (small classes give all they have, the others share the rest),
every class's rows are ordered by a seeded SHA-256 of their id, and the classes are interleaved so that each split,
and every prefix of a split, has about the class mix of the whole. So `splits["student"][: n // 10]` is a
stratified 10 % sample of the student pool. (Classes come round in a fixed cycle, so shuffle before training.)
Labels as target text: train the BPE tokenizer (kdcache.tiny.build_tokenizer) on texts that include the labels, e.g.
`text + " " + label`; then each " label" is one token from a vocabulary of 1024 up, with 24 distinct tokens.

    python benchmarks/realdata.py --out /tmp/wn                      # JSONL per split + labels.json, class counts
    python benchmarks/realdata.py --out /tmp/wn --test 2400 --teacher-train 4800

    from realdata import load_splits                                 # from a script in benchmarks/
    splits = load_splits()            # {"teacher_train": [...], "student": [...], "heldout": [...], "test": [...]}
    splits["test"][0]                 # {"id": "n...", "text": "...", "label": "animal", "word": "...", ...}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

from kdcache.errors import BadInputError

INSTALL_COMMAND = "apt-get install wordnet-base"
WORDNET_DIR_ENV = "KDCACHE_WORDNET_DIR"
DEFAULT_DIRS = ("/usr/share/wordnet",)  # Debian's wordnet-base
SPLITS = ("teacher_train", "student", "heldout", "test")

# WordNet 3.0's noun lexicographer files (lexnames(5WN)): number -> label. 03 noun.Tops and 16 noun.motive left out.
LEXFILES = {
    4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body", 9: "cognition", 10: "communication",
    11: "event", 12: "feeling", 13: "food", 14: "group", 15: "location", 17: "object", 18: "person",
    19: "phenomenon", 20: "plant", 21: "possession", 22: "process", 23: "quantity", 24: "relation", 25: "shape",
    26: "state", 27: "substance", 28: "time",
}
LABELS = tuple(LEXFILES.values())


class WordNetMissingError(BadInputError):
    """The WordNet files are not installed (or not where they were said to be)."""


def find_wordnet_dir(path: str | os.PathLike | None = None) -> Path:
    """The directory holding WordNet's `data.noun`: `path`, else $KDCACHE_WORDNET_DIR, else /usr/share/wordnet."""
    candidates = [path] if path else [os.environ[WORDNET_DIR_ENV]] if os.environ.get(WORDNET_DIR_ENV) else DEFAULT_DIRS
    for candidate in candidates:
        if (Path(candidate) / "data.noun").is_file():
            return Path(candidate)
    raise WordNetMissingError(f"WordNet 3.0 data.noun not found in {', '.join(map(str, candidates))}: "
                              f"install it with `{INSTALL_COMMAND}` (or point ${WORDNET_DIR_ENV} at its directory)")


def parse_data_line(line: str) -> dict | None:
    """One synset line of WordNet's data.noun (wndb(5WN)) -> row dict, or None for the licence header.

    Row: id ("n" + 8-digit offset), text (definition: gloss without quoted examples), word (first lemma, spaces for
    underscores), words (all lemmas), lexfile (int), instance (bool: has an instance-hypernym pointer "@i").
    """
    if line.startswith(" "):
        return None
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    offset, lexfile, n_words = fields[0], int(fields[1]), int(fields[3], 16)
    words = [fields[4 + 2 * i].replace("_", " ") for i in range(n_words)]
    pos = 4 + 2 * n_words
    n_pointers = int(fields[pos])
    pointers = [fields[pos + 1 + 4 * i] for i in range(n_pointers)]
    definition = []
    for part in gloss.strip().split(";"):
        if part.strip().startswith('"'):
            break  # examples start; they follow the definition and usually quote the word
        definition.append(part)
    return {"id": "n" + offset, "text": ";".join(definition).strip(), "word": words[0], "words": words,
            "lexfile": lexfile, "instance": "@i" in pointers}


def read_rows(wordnet_dir: str | os.PathLike | None = None, include_instances: bool = False) -> list[dict]:
    """Every usable noun synset as {id, text, label, word}, in file order (labels: LABELS; see module docstring)."""
    data = find_wordnet_dir(wordnet_dir) / "data.noun"
    synsets = [s for s in map(parse_data_line, data.read_text(encoding="utf-8").splitlines()) if s is not None]
    text_count = Counter(s["text"] for s in synsets)
    return [{"id": s["id"], "text": s["text"], "label": LEXFILES[s["lexfile"]], "word": s["word"]}
            for s in synsets
            if s["lexfile"] in LEXFILES and s["text"] and text_count[s["text"]] == 1
            and (include_instances or not s["instance"])]


def class_quotas(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Rows to take per class so that they sum to `total` and are as equal as the class sizes allow."""
    if total > sum(sizes.values()):
        raise ValueError(f"total must be at most the {sum(sizes.values())} rows available, got {total}")
    quotas, left = {}, total
    order = sorted(sizes, key=lambda label: (sizes[label], label))
    for i, label in enumerate(order):
        quotas[label] = min(sizes[label], -(-left // (len(order) - i)))  # ceil(left / classes left)
        left -= quotas[label]
    return quotas


def _rank(seed: int, row_id: str) -> str:
    return hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()


def load_splits(teacher_train: int = 2400, student: int = 2400, heldout: int = 480, test: int = 1200,
                seed: int = 0, wordnet_dir: str | os.PathLike | None = None,
                include_instances: bool = False) -> dict[str, list[dict]]:
    """Disjoint, class-balanced splits {"teacher_train", "student", "heldout", "test"} of the given sizes.

    Rows are {id, text, label, word} dicts (see read_rows); each split is in stratified order (any prefix has about
    the split's class mix). Defaults: 6480 rows, 270 per class (the smallest class, shape, has 337).
    """
    sizes = {"teacher_train": teacher_train, "student": student, "heldout": heldout, "test": test}
    for name, size in sizes.items():
        if size < 0:
            raise ValueError(f"{name} must be >= 0, got {size}")
    by_label: dict[str, list[dict]] = {label: [] for label in LABELS}
    for row in read_rows(wordnet_dir, include_instances):
        by_label[row["label"]].append(row)
    quotas = class_quotas({label: len(rows) for label, rows in by_label.items()}, sum(sizes.values()))
    keyed = []
    for label, rows in by_label.items():
        chosen = sorted(rows, key=lambda r: _rank(seed, r["id"]))[: quotas[label]]
        keyed += [((i + 0.5) / quotas[label], _rank(seed + 1, r["id"]), r) for i, r in enumerate(chosen)]
    ordered = [r for _, _, r in sorted(keyed, key=lambda k: k[:2])]
    splits, start = {}, 0
    for name in ("test", "heldout", "teacher_train", "student"):  # test first: the most evenly stratified cut
        splits[name] = ordered[start : start + sizes[name]]
        start += sizes[name]
    return {name: splits[name] for name in SPLITS}


def write_splits(splits: dict[str, list[dict]], out: str | os.PathLike) -> Path:
    """Write <out>/<split>.jsonl (one row per line) and <out>/labels.json (the label list); return `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    (out / "labels.json").write_text(json.dumps(list(LABELS)) + "\n", encoding="utf-8")
    return out


def class_table(splits: dict[str, list[dict]]) -> str:
    """Class counts per split, one line per label, as text."""
    counts = {name: Counter(r["label"] for r in rows) for name, rows in splits.items()}
    lines = [f"{'label':<14}" + "".join(f"{name:>14}" for name in splits)]
    lines += [f"{label:<14}" + "".join(f"{counts[name][label]:>14}" for name in splits) for label in LABELS]
    lines.append(f"{'total':<14}" + "".join(f"{len(rows):>14}" for rows in splits.values()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="WordNet 3.0 noun gloss -> lexicographer file (24 classes): write class-balanced, disjoint "
                    f"splits as JSONL. Needs `{INSTALL_COMMAND}` (WordNet 3.0 licence).")
    parser.add_argument("--out", required=True, help="directory for <split>.jsonl and labels.json")
    parser.add_argument("--teacher-train", type=int, default=2400, help="rows the teacher is trained on")
    parser.add_argument("--student", type=int, default=2400, help="rows the student trains on (its pool)")
    parser.add_argument("--heldout", type=int, default=480, help="validation rows")
    parser.add_argument("--test", type=int, default=1200, help="test rows")
    parser.add_argument("--seed", type=int, default=0, help="which rows go where (same seed, same splits)")
    parser.add_argument("--wordnet-dir", default=None,
                        help=f"directory of WordNet's data.noun (default: ${WORDNET_DIR_ENV}, else /usr/share/wordnet)")
    parser.add_argument("--include-instances", action="store_true",
                        help="keep instance synsets (named people, places, events)")
    args = parser.parse_args(argv)
    try:
        splits = load_splits(args.teacher_train, args.student, args.heldout, args.test, seed=args.seed,
                             wordnet_dir=args.wordnet_dir, include_instances=args.include_instances)
    except (WordNetMissingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = write_splits(splits, args.out)
    print(class_table(splits))
    print(f"wrote {', '.join(f'{name}.jsonl' for name in splits)} and labels.json to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
