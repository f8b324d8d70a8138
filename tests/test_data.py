"""Data ingestion: every supported source reads the same rows; bad rows are named by file, row and field."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_config, upsc_rows

from kdcache.config import DataConfig, TemplateConfig
from kdcache.data.encode import encode
from kdcache.data.sources import Row, read_rows
from kdcache.errors import BadInputError
from kdcache.store.fingerprint import rows_fingerprint
from kdcache.store.reader import CacheReader
from kdcache.teacher.build import build_cache

FIELDS = ["id", "title", "text", "relevant", "gs_paper"]


@pytest.fixture()
def rows():
    return upsc_rows(6)


def test_jsonl_csv_parquet_and_datasets_folder_read_the_same_rows(tmp_path, rows):
    import datasets

    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(tmp_path / "a.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "folder"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    fingerprints = set()
    for path in ["a.jsonl", "a.csv", "a.parquet", "folder", "dict#train"]:
        loaded, bad = read_rows(DataConfig(paths=[str(tmp_path / path)]))
        assert not bad and [r.fields for r in loaded] == rows, path
        fingerprints.add(rows_fingerprint(r.fields for r in loaded))
    assert len(fingerprints) == 1
    with pytest.raises(BadInputError, match="holds several splits .*train.*name one as"):
        read_rows(DataConfig(paths=[str(tmp_path / "dict")]))


def test_missing_file_and_unknown_format_are_clear(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        read_rows(DataConfig(paths=[str(tmp_path / "nope.jsonl")]))
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(BadInputError, match="cannot tell the format"):
        read_rows(DataConfig(paths=[str(tmp_path / "data.txt")]))


@pytest.fixture()
def bad_file(tmp_path, rows):
    lines = [json.dumps(rows[0])]
    lines.append("{not json")  # line 2: does not parse
    lines.append(json.dumps({k: v for k, v in rows[1].items() if k != "gs_paper"}))  # line 3: missing field
    lines.append(json.dumps({**rows[2], "gs_paper": "  "}))  # line 4: empty target
    lines.append(json.dumps({**rows[3], "gs_paper": "GS2 " * 300}))  # line 5: target longer than max_length
    lines.append(json.dumps(rows[4]))
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_each_kind_of_bad_row_is_reported_with_file_row_and_field(tmp_path, teacher_dir, bad_file):
    def build(*overrides):
        return build_cache(make_config(tmp_path / "cache", teacher_dir, bad_file, "max_length=256", *overrides))

    with pytest.raises(BadInputError, match=r"bad\.jsonl, row 2: line does not parse as JSON.*--skip-bad-rows"):
        build()
    lines = open(bad_file).read().splitlines()
    missing = tmp_path / "missing.jsonl"
    missing.write_text(lines[0] + "\n" + lines[2] + "\n")
    with pytest.raises(BadInputError, match=r"missing\.jsonl, row 2, field 'gs_paper': missing field"):
        build_cache(make_config(tmp_path / "other", teacher_dir, str(missing)))
    result = build("skip_bad_rows=true")
    reasons = [str(b) for b in result.bad_rows]
    assert len(reasons) == 4
    assert "row 2: line does not parse as JSON" in reasons[0]
    assert "row 3, field 'gs_paper': missing field" in reasons[1]
    assert "row 4, field 'gs_paper': target is empty" in reasons[2]
    assert "row 5, field 'target': target cut off by max_length" in reasons[3]
    reader = CacheReader(str(tmp_path / "cache"))
    assert reader.manifest.counts.num_examples == 2
    assert reader.manifest.counts.skipped_rows == 3  # rows that parsed but could not become examples
    assert reader.manifest.dataset.unparsed_rows == 1
    assert [e.record["source_row"] for e in reader.iter_examples()] == [1, 6]


def test_long_prompts_are_cut_from_the_left_and_targets_kept(tokenizer):
    template = TemplateConfig(prompt="{text}", target=" {gs_paper}", chat="no")
    row = Row("mem", 1, {"text": "word " * 400, "gs_paper": "GS3"})
    encoded = encode(template, tokenizer, row, "word " * 400, " GS3", max_length=32)
    assert len(encoded.input_ids) == 32 and encoded.prompt_truncated > 0
    target_ids = tokenizer(" GS3", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert encoded.input_ids[-len(target_ids):] == target_ids
    assert encoded.target_mask == [False] * (32 - len(target_ids)) + [True] * len(target_ids)


def test_chat_template_and_whole_sequence_distillation(tokenizer):
    row = Row("mem", 1, {})
    chat = encode(TemplateConfig(chat="yes", system="Be brief."), tokenizer, row, "Hello", "Hi", max_length=64)
    text = tokenizer.decode(chat.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>")
    assert text.endswith("<|im_start|>assistant\nHi<|im_end|>")
    assert tokenizer.decode([t for t, m in zip(chat.input_ids, chat.target_mask) if m]) == "Hi<|im_end|>"
    whole = encode(TemplateConfig(chat="no", distill="all"), tokenizer, row, "Hello there", "Hi", max_length=64)
    assert whole.target_mask[0] is False and all(whole.target_mask[1:])
