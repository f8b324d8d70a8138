"""Teacher-generated targets with the transformers backend: the teacher writes each answer, the cache stores its
top-k there. (The vLLM backend is checked against this one in tests/test_vllm.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_config

from kdcache.config import GenerateConfig, TeacherConfig
from kdcache.errors import BadInputError
from kdcache.store.reader import CacheReader
from kdcache.store.verify import verify_cache
from kdcache.teacher.build import build_cache
from kdcache.teacher.generate import choose_next, cut_at_stop
from kdcache.teacher.hf import HFTeacher
from kdcache.train.loader import heldout_mask

GREEDY = ("generate.enabled=true", "generate.max_new_tokens=6")
SAMPLED = ("generate.enabled=true", "generate.max_new_tokens=5", "generate.num_samples=3",
           "generate.temperature=1.0", "generate.top_p=0.95")


def _manifest(path) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def greedy_cache(tmp_path_factory, teacher_dir, data_file) -> str:
    out = tmp_path_factory.mktemp("greedy") / "cache"
    assert build_cache(make_config(out, teacher_dir, data_file, *GREEDY)).finalized
    return str(out)


def test_greedy_answers_are_the_teachers_top1_and_their_text_is_recorded(greedy_cache, tokenizer):
    manifest = _manifest(greedy_cache)
    assert manifest["generate"]["enabled"] and manifest["generate"]["stop_token_ids"] == [tokenizer.eos_token_id]
    examples = list(CacheReader(greedy_cache).iter_examples())
    assert len(examples) == 24 and verify_cache(greedy_cache).ok
    for example in examples:
        answer = example.input_ids[example.target_mask].tolist()
        assert 1 <= len(answer) <= 6
        # Greedy decoding picks the argmax, which is the first cached id at the same position.
        assert example.sparse_ids[:, 0].tolist() == answer
        record = example.record
        stopped = answer[-1] == tokenizer.eos_token_id
        assert record["teacher_stopped"] == stopped and (stopped or len(answer) == 6)
        assert record["teacher_text"] == tokenizer.decode(answer[:-1] if stopped else answer)
        assert record["target"].startswith(" GS") or record["target"].startswith(" none")  # the reference, kept
        assert record["sample_index"] == 0 and record["num_targets"] == len(answer)


def test_sampled_answers_are_seeded_per_row_so_workers_and_reruns_agree(tmp_path, teacher_dir, data_file):
    one = tmp_path / "one"
    build_cache(make_config(one, teacher_dir, data_file, *SAMPLED))
    examples = list(CacheReader(str(one)).iter_examples())
    assert len(examples) == 72 and [e.key for e in examples[:3]] == [(0, 0), (0, 1), (0, 2)]
    answers = {e.key: e.input_ids[e.target_mask].tolist() for e in examples}
    assert sum(answers[(r, 0)] != answers[(r, 1)] for r in range(24)) > 12  # samples differ (T = 1)
    two = tmp_path / "two"
    for index in (0, 1):
        build_cache(make_config(two, teacher_dir, data_file, *SAMPLED, "num_workers=2", f"worker_index={index}"))
    assert _manifest(two) == _manifest(one)  # byte-identical shards: answers depend on the row and seed only
    reseeded = tmp_path / "reseeded"
    build_cache(make_config(reseeded, teacher_dir, data_file, *SAMPLED, "generate.seed=1", "data.limit=5"))
    other = {e.key: e.input_ids[e.target_mask].tolist() for e in CacheReader(str(reseeded)).iter_examples()}
    assert any(other[key] != answers[key] for key in other)
    # The held-out split goes by row, so a row's answers never straddle train and held-out.
    held = heldout_mask([e.index for e in examples], 0.3)
    for row in range(24):
        assert len({bool(held[i]) for i, e in enumerate(examples) if e.index == row}) == 1


def test_a_stop_token_ends_the_answer_and_is_kept(teacher_dir, tokenizer):
    teacher = HFTeacher(TeacherConfig(model=teacher_dir, device="cpu"), len(tokenizer))
    prompt = tokenizer("Title: budget\nArticle: the finance minister", add_special_tokens=False)["input_ids"]
    settings = GenerateConfig(enabled=True, max_new_tokens=8)
    [[free]] = teacher.generate([prompt], settings, [0], stop_ids=[len(tokenizer) + 5])  # a stop never produced
    assert len(free) == 8
    stop = free[3]
    [[stopped]] = teacher.generate([prompt], settings, [0], stop_ids=[stop])
    first = free.index(stop)
    assert stopped == free[: first + 1]  # generation ended at the stop token, which is kept
    assert cut_at_stop(free, [stop]) == (free[: first + 1], True)
    assert cut_at_stop(free, [len(tokenizer) + 5]) == (free, False)


def _reference_answers(model, prompt, settings, seed, stop_ids, vocab_size):
    """One prompt alone, no padding, no KV cache: the full prefix through the model at every step; the prompt's n
    samples drawn together from its own seeded generator. Answers cut after their first stop token."""
    n = settings.num_samples
    generator = torch.Generator().manual_seed(seed)
    rows = torch.tensor([prompt] * n)
    with torch.no_grad():
        for _ in range(settings.max_new_tokens):
            logits = model(input_ids=rows).logits[:, -1, :vocab_size].float()
            chosen = choose_next(logits, settings.temperature, settings.top_p, generator)
            rows = torch.cat([rows, chosen[:, None]], dim=1)
            if all(any(t in stop_ids for t in row[len(prompt):]) for row in rows.tolist()):
                break
    return [cut_at_stop(row[len(prompt):], stop_ids)[0] for row in rows.tolist()]


@pytest.mark.parametrize("settings", [
    GenerateConfig(enabled=True, max_new_tokens=6),
    GenerateConfig(enabled=True, max_new_tokens=5, num_samples=3, temperature=1.0, top_p=0.95),
], ids=["greedy", "sampled"])
def test_batched_answers_equal_each_prompt_decoded_alone(teacher_dir, tokenizer, settings):
    """Prompts of different lengths in left-padded batches (3 batches of 2 when sampled): each prompt's answers are
    those of the prompt decoded alone without a cache, with its own seed, and rows stop at different steps."""
    teacher = HFTeacher(TeacherConfig(model=teacher_dir, device="cpu", batch_size=6), len(tokenizer))
    texts = ["Title: budget", "Title: the monsoon session of parliament\nArticle: the finance minister said",
             "Article: rivers", "Title: a new satellite\nArticle: ISRO", "Title: courts", "Title: trade and tariffs"]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)
    seeds = [11 * i + 3 for i in range(len(prompts))]
    free = teacher.generate(prompts, settings, seeds, stop_ids=[len(tokenizer) + 5])
    # stop on a token some answers produce early and others not at all: rows finish at different steps
    stop = [free[0][0][1]]
    got = teacher.generate(prompts, settings, seeds, stop)
    lengths = {len(a) for samples in got for a in samples}
    assert len(lengths) > 1 and max(lengths) == settings.max_new_tokens
    for prompt, seed, samples in zip(prompts, seeds, got):
        assert samples == _reference_answers(teacher.model, prompt, settings, seed, stop, len(tokenizer))
    if settings.temperature > 0:  # the samples of a prompt differ, and another seed draws others
        assert any(len({tuple(a) for a in samples}) > 1 for samples in got)
        assert teacher.generate(prompts, settings, [s + 1 for s in seeds], stop) != got


def test_choose_next_greedy_temperature_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert choose_next(logits, 0.0, 1.0, None).tolist() == [0]
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([choose_next(logits, 1.0, 0.7, generator) for _ in range(2000)]).flatten()
    counts = torch.bincount(draws, minlength=4).tolist()
    assert counts[2] == counts[3] == 0  # outside the 0.7 nucleus {0.5, 0.3}
    assert abs(counts[0] / 2000 - 0.5 / 0.8) < 0.04  # renormalised within the nucleus
    draws = torch.stack([choose_next(logits, 1.0, 1.0, generator) for _ in range(4000)]).flatten()
    frequencies = np.bincount(draws.numpy(), minlength=4) / 4000
    np.testing.assert_allclose(frequencies, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    assert choose_next(logits, 1.0, 0.1, generator).tolist() == [0]  # only the top token is in a tiny nucleus


@pytest.mark.parametrize("overrides, message", [
    (("generate.num_samples=2",), "identical answers"),
    (("generate.max_new_tokens=4096",), "no room for the prompt"),
    (("generate.top_p=0",), "top_p"),
])
def test_generation_settings_that_make_no_sense_are_refused(tmp_path, teacher_dir, data_file, overrides, message):
    with pytest.raises(BadInputError, match=message):
        build_cache(make_config(tmp_path / "c", teacher_dir, data_file, "generate.enabled=true", *overrides))
