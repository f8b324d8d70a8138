"""`kdcache augment` (kdcache/data/augment.py, paraphrase.py): typo rate, conversions, dedup counts, determinism,
provenance into the cache's records, split hygiene, and resumable paraphrases by a tiny local model."""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest

from conftest import make_config
from kdcache.config import load_config
from kdcache.config_augment import AugmentConfig, ConvertConfig
from kdcache.data.augment import add_typos, augment, convert_row, normalize_text, split_key
from kdcache.data.paraphrase import progress_path
from kdcache.data.sources import Row
from kdcache.errors import BadInputError

WORDS = "the ledger shows debit and credit entries for cash inventory payable receivable equity".split()


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def qa_rows(n: int = 12) -> list[dict]:
    rng = random.Random(3)
    return [{"id": f"q{i}", "input": " ".join(rng.choice(WORDS) for _ in range(8)) + f" item {i}?",
             "target": f" answer {i}"} for i in range(n)]


def config_for(tmp_path, data, *overrides) -> AugmentConfig:
    return load_config(AugmentConfig, None, [f"output={tmp_path / 'out.jsonl'}", f"data.paths=[{data}]",
                                             "data.id_field=id", "progress=false", *overrides])


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_typo_rate_is_near_the_configured_one():
    rng = random.Random(0)
    words = [rng.choice(WORDS) for _ in range(20000)]
    for rate in (0.25, 0.1):
        noisy, count = add_typos(" ".join(words), rate, random.Random(7))
        changed = sum(a != b for a, b in zip(words, noisy.split()))
        assert len(noisy.split()) == len(words)
        assert changed == count  # every typo changes its word
        assert abs(changed / len(words) - rate) < 0.015, (rate, changed / len(words))  # ~5 sigma
    assert add_typos("42 $100 --", 1.0, random.Random(0)) == ("42 $100 --", 0)  # words without letters stay


def test_conversions_on_hand_written_rows():
    spec = ConvertConfig(mcq=True, blank=True, mcq_template="Q: {question}")
    mcq = {"question": "Which is an asset?", "options": ["Loan", "Cash", "Revenue"], "answer": "B"}
    assert convert_row(spec, Row("f", 1, mcq)) == ({**mcq, "input": "Q: Which is an asset?", "target": "Cash"},
                                                   "mcq_to_qa")
    as_dict = {**mcq, "options": {"a": "Loan", "b": "Cash"}, "answer": "(a)"}
    assert convert_row(spec, Row("f", 2, as_dict))[0]["target"] == "Loan"
    assert convert_row(spec, Row("f", 3, {**mcq, "answer": 2}))[0]["target"] == "Revenue"
    blank = {"sentence": "Assets equal liabilities plus ___.", "answer": "equity"}
    fields, kind = convert_row(spec, Row("f", 4, blank))
    assert kind == "blank_to_qa"
    assert (fields["input"], fields["target"]) == ("Fill in the blank: Assets equal liabilities plus ___.", "equity")
    plain = {"input": "What is cash?", "target": "money"}
    assert convert_row(spec, Row("f", 5, plain)) == (plain, "original")
    with pytest.raises(Exception, match=r"names option 'E' but the row has 3 options"):
        convert_row(spec, Row("f", 6, {**mcq, "answer": "E"}))
    with pytest.raises(Exception, match=r"must hold the blank marker '___'"):
        convert_row(spec, Row("f", 7, {"sentence": "no blank here", "answer": "x"}))


def test_conversion_error_is_one_line(tmp_path):
    data = write_rows(tmp_path / "in.jsonl", [{"id": "m", "question": "Q?", "options": ["a"], "answer": "Z"}])
    with pytest.raises(BadInputError, match=r"^bad row: .*in.jsonl, row 1, field 'answer': names option 'Z'") as exc:
        augment(config_for(tmp_path, data, "convert.mcq=true"))
    assert "\n" not in str(exc.value)


def test_bad_config_says_must_be_got():
    for override, message in (("typos.rate=2", "config key 'typos.rate' must be a number in (0, 1]"),
                              ("typos.copies=-1", "config key 'typos.copies' must be an integer >= 0, got -1"),
                              ("paraphrase.styles=[no placeholder]", "config key 'paraphrase.styles' must be"),
                              ("dedup=fuzzy", "dedup")):
        with pytest.raises(BadInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(AugmentConfig, None, [override])


def test_dedup_counts_exact_and_normalized(tmp_path):
    rows = [{"id": "a", "input": "What is cash?", "target": "money"},
            {"id": "b", "input": "What is cash?", "target": "money"},  # exact repeat (ids are not compared)
            {"id": "c", "input": "  what IS  cash", "target": "Money."},  # a normalised repeat
            {"id": "d", "input": "What is debt?", "target": "owed money"}]
    data = write_rows(tmp_path / "in.jsonl", rows)
    assert normalize_text("  what IS  cash") == normalize_text("What is cash?") == "what is cash"
    counts = {}
    for mode in ("none", "exact", "normalized"):
        result = augment(config_for(tmp_path, data, f"dedup={mode}"))
        counts[mode] = (result.duplicate_sources, [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")])
    assert counts == {"none": (0, ["a", "b", "c", "d"]), "exact": (1, ["a", "c", "d"]),
                      "normalized": (2, ["a", "d"])}
    # copies that equal a row before them are dropped and counted (a typo rate of 1 on a one-letter-free field)
    data = write_rows(tmp_path / "in2.jsonl", [{"id": "n", "input": "1234", "target": "x"}])
    result = augment(config_for(tmp_path, data, "typos.copies=3"))
    assert (result.typo_rows, result.duplicate_copies, result.rows_written) == (3, 3, 1)


def test_same_seed_same_rows_and_provenance(tmp_path):
    data = write_rows(tmp_path / "in.jsonl", qa_rows())
    outputs = []
    for seed in (5, 5, 6):
        augment(config_for(tmp_path, data, "typos.copies=3", f"typos.seed={seed}", "dedup=none"))
        outputs.append((tmp_path / "out.jsonl").read_text())
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]
    rows = [json.loads(line) for line in outputs[0].splitlines()]
    assert len(rows) == 12 * 4
    assert len({r["id"] for r in rows}) == len(rows)  # copies get ids of their own
    sources = {r["id"]: r for r in qa_rows()}
    for row in rows:
        source = sources[row["source_id"]]
        assert row["target"] == source["target"]  # answers are kept clean
        if row["augmentation"] == "original":
            assert row["augmentation_index"] == 0 and row["input"] == source["input"]
        else:
            assert row["augmentation"] == "typo" and row["id"] == f"{source['id']}~typo{row['augmentation_index']}"
    # a copy that drew no typo (0.75^9 of them) equals its source: deduplication drops exactly those
    unchanged = sum(r["augmentation"] == "typo" and r["input"] == sources[r["source_id"]]["input"] for r in rows)
    assert 0 < unchanged < 12
    result = augment(config_for(tmp_path, data, "typos.copies=3", "typos.seed=5"))
    assert (result.duplicate_copies, result.rows_written) == (unchanged, 48 - unchanged)


def test_provenance_reaches_records_and_copies_share_the_split(tmp_path, tokenizer, teacher_dir):
    from kdcache.teacher.build import build_cache
    from kdcache.train.epochs import count_batches
    from kdcache.train.loader import CacheDataset

    data = write_rows(tmp_path / "in.jsonl", qa_rows(20))
    augment(config_for(tmp_path, data, "typos.copies=2", "dedup=none"))
    cache = tmp_path / "cache"
    build_cache(make_config(cache, teacher_dir, tmp_path / "out.jsonl", 'template.prompt="{input}"',
                            'template.target="{target}"', "data.label_fields=[]", "shard_size=16"),
                tokenizer=tokenizer)
    records = pq.read_table(cache / "shards" / "00000" / "records.parquet").to_pylist()
    assert records[0]["source_id"] == "q0" and records[0]["augmentation"] == "original"
    assert records[1]["source_id"] == "q0" and records[1]["augmentation"] == "typo"
    assert records[1]["split_key"] == split_key({"source_id": "q0"}, 1) != records[1]["example_index"]
    sides = {}
    for split in ("train", "heldout"):
        dataset = CacheDataset(str(cache), split=split, heldout_fraction=0.3, batch_size=4, shuffle=False)
        plan = dataset.epoch_plan()
        groups = [g for b in range(len(plan.buffers)) for g in dataset._buffer_batches(plan, b)]
        assert count_batches(dataset) == len(groups)  # the step count reads the same split
        sides[split] = [e.record["source_id"] for g in groups for e in g]
    assert sides["train"] and sides["heldout"]
    assert not set(sides["train"]) & set(sides["heldout"])  # no source on both sides
    assert len(sides["train"]) + len(sides["heldout"]) == 60
    assert all(sides["heldout"].count(s) == 3 for s in set(sides["heldout"]))  # a source with all its copies


class CountingBackend:
    """The real HF backend, counting the prompts it is asked to answer."""

    def __init__(self, inner):
        self.inner, self.prompts = inner, 0

    def generate(self, prompts, settings, seeds, stop_ids):
        self.prompts += len(prompts)
        return self.inner.generate(prompts, settings, seeds, stop_ids)


@pytest.fixture(scope="module")
def paraphraser_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny random model with an untied LM head (a tied one only repeats the prompt's last newline)."""
    from kdcache.tiny import build_qwen2, save_model

    model = build_qwen2(len(tokenizer), hidden_size=64, layers=2, heads=2, seed=3, tie_embeddings=False)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("paraphraser"))


@pytest.fixture(scope="module")
def hf_backend(paraphraser_dir, tokenizer):
    from kdcache.config import TeacherConfig
    from kdcache.teacher.hf import HFTeacher

    return HFTeacher(TeacherConfig(model=paraphraser_dir, device="cpu"), len(tokenizer))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_paraphrases_versions_determinism_and_resume(tmp_path, tokenizer, paraphraser_dir, hf_backend,
                                                    temperature):
    data = write_rows(tmp_path / "in.jsonl", qa_rows(5))
    settings = [f"paraphrase.teacher.model={paraphraser_dir}", "paraphrase.versions=3", "paraphrase.max_new_tokens=6",
                f"paraphrase.temperature={temperature}", "paraphrase.teacher.batch_size=4", "dedup=none"]
    full = CountingBackend(hf_backend)
    augment(config_for(tmp_path, data, *settings), backend=full, tokenizer=tokenizer)
    first = read_jsonl(tmp_path / "out.jsonl")
    assert full.prompts == 15
    paraphrases = [r for r in first if r["augmentation"] == "paraphrase"]
    assert len(paraphrases) == 15 and all(r["input"].strip() for r in paraphrases)
    for source in qa_rows(5):  # N versions per row, each linked to its source, the rest of the row kept
        mine = [r for r in paraphrases if r["source_id"] == source["id"]]
        assert sorted(r["augmentation_index"] for r in mine) == [1, 2, 3]
        assert all(r["target"] == source["target"] for r in mine)

    # a second output: killed after one batch of 4, then resumed: only the 11 missing are generated, same rows
    other = tmp_path / "again"
    other.mkdir()
    killed = CountingBackend(hf_backend)
    augment(config_for(other, data, *settings), backend=killed, tokenizer=tokenizer, stop_after_batches=1)
    assert killed.prompts == 4 and not (other / "out.jsonl").exists()
    assert len(progress_path(str(other / "out.jsonl")).read_text().splitlines()) == 1 + 4
    resumed = CountingBackend(hf_backend)
    augment(config_for(other, data, *settings), backend=resumed, tokenizer=tokenizer)
    assert resumed.prompts == 11
    assert read_jsonl(other / "out.jsonl") == first  # the same seed gives the same rows, resumed or not
    again = CountingBackend(hf_backend)  # nothing left to do: no generation at all
    augment(config_for(other, data, *settings), backend=again, tokenizer=tokenizer)
    assert again.prompts == 0
    with pytest.raises(BadInputError, match="other paraphrase settings"):
        augment(config_for(other, data, *settings, "paraphrase.seed=9"), backend=again, tokenizer=tokenizer)


def test_cli_summary_and_one_line_error(tmp_path):
    from click.testing import CliRunner

    from kdcache.cli import main

    rows = [{"id": "m1", "question": "Which is an asset?", "options": ["Loan", "Cash"], "answer": "B"},
            {"id": "b1", "sentence": "Assets equal liabilities plus ___.", "answer": "equity"},
            {"id": "m2", "question": "Which is an asset?", "options": ["Loan", "Cash"], "answer": "b"}]
    data = write_rows(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(main, ["augment", "--data", data, "--id-field", "id", "-o", str(out), "--mcq-to-qa",
                                       "--blank-to-qa", "--typo-copies", "1", "--typo-rate", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "1 blank_to_qa, 2 mcq_to_qa" in result.output and "dropped 1 duplicate sources" in result.output
    written = read_jsonl(out)
    assert [(r["id"], r["augmentation"]) for r in written] == [("m1", "mcq_to_qa"), ("m1~typo1", "typo"),
                                                               ("b1", "blank_to_qa"), ("b1~typo1", "typo")]
    result = CliRunner().invoke(main, ["augment", "--data", data, "-o", str(out), "--typo-rate", "3"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: config key 'typos.rate' must be a number in (0, 1] (typos per word), got 3.0"]
