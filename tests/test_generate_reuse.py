"""`cache build --generate` on the transformers backend keeps the sparse targets its decode computed (the logits each
answer token was chosen from) instead of scoring prompt + answer teacher-forced again: pinned here to the
teacher-forced targets, with the cases that must still be scored teacher-forced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_config

import kdcache.teacher.generate as generate_module
from kdcache.config import GenerateConfig, TeacherConfig
from kdcache.data.encode import Encoded
from kdcache.store.reader import CacheReader
from kdcache.store.verify import verify_cache
from kdcache.targets import SparseTargets
from kdcache.teacher.build import ShardScorer, build_cache
from kdcache.teacher.generate import decoded_targets_fit
from kdcache.teacher.hf import HFTeacher
from kdcache.teacher.sparsify import topk_with_tail

GREEDY = ("generate.enabled=true", "generate.max_new_tokens=6")
SAMPLED = ("generate.enabled=true", "generate.max_new_tokens=5", "generate.num_samples=3",
           "generate.temperature=1.0", "generate.top_p=0.95")
TEMPERATURES = (0.5, 2.0)
EXACT = ("sparsifier.logprob_dtype=float32", "sparsifier.logprob_step=null")  # log-probs stored unrounded


def assert_targets_agree(got, want, atol=1e-4):
    """Same ids wherever the neighbouring log-probs are not near-tied; log-probs, tail and tail grid within atol."""
    assert got.ids.shape == want.ids.shape
    lp = want.logprobs
    gaps = torch.full_like(lp, float("inf"))  # distance to the nearest neighbour in rank (and to the tail's best)
    gaps[:, 1:] = torch.minimum(gaps[:, 1:], lp[:, :-1] - lp[:, 1:])
    gaps[:, :-1] = torch.minimum(gaps[:, :-1], lp[:, :-1] - lp[:, 1:])
    tied = gaps < 10 * atol
    assert bool((got.ids == want.ids)[~tied].all())
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=atol, rtol=0)
    torch.testing.assert_close(got.tail_logmass, want.tail_logmass, atol=atol, rtol=0)
    if want.tail_grid is not None:
        torch.testing.assert_close(got.tail_grid, want.tail_grid, atol=atol, rtol=0)


@pytest.mark.parametrize("settings", [
    GenerateConfig(enabled=True, max_new_tokens=6),
    GenerateConfig(enabled=True, max_new_tokens=5, num_samples=3, temperature=1.0, top_p=0.95),
], ids=["greedy", "sampled"])
def test_decode_targets_are_the_teacher_forced_ones(teacher_dir, tokenizer, settings):
    """Prompts of different lengths in left-padded batches, rows stopping at different steps, several samples per
    prompt: each answer's decode targets equal teacher-forced scoring of prompt + answer at the answer's positions."""
    teacher = HFTeacher(TeacherConfig(model=teacher_dir, device="cpu", batch_size=6), len(tokenizer))
    texts = ["Title: budget", "Title: the monsoon session of parliament\nArticle: the finance minister said",
             "Article: rivers", "Title: a new satellite\nArticle: ISRO", "Title: courts", "Title: trade and tariffs"]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    seeds = [11 * i + 3 for i in range(len(prompts))]
    free = teacher.generate(prompts, settings, seeds, stop_ids=[len(tokenizer) + 5])
    stop = [free[0][0][1]]  # a token some answers produce early and others never: rows stop at different steps
    answers, targets = teacher.generate_scored(prompts, settings, seeds, stop,
                                               lambda logits: topk_with_tail(logits, 16, TEMPERATURES))
    assert answers == teacher.generate(prompts, settings, seeds, stop)  # keeping the targets changes no answer
    lengths = {len(a) for samples in answers for a in samples}
    assert len(lengths) > 1 and max(lengths) == settings.max_new_tokens
    for prompt, samples, scored in zip(prompts, answers, targets):
        assert len(scored) == settings.num_samples
        for answer, got in zip(samples, scored):
            assert got.num_rows == len(answer)
            want = teacher.score([prompt + answer], [[False] * len(prompt) + [True] * len(answer)],
                                 lambda logits, rows: topk_with_tail(logits, 16, TEMPERATURES))
            assert_targets_agree(got, type(got).cat(want))
            if settings.temperature == 0:  # greedy: each answer token is its step's top-1
                assert got.ids[:, 0].tolist() == answer


class Forwards:
    """Counts the teacher-forced scoring calls (HFTeacher.score goes through score_with_hidden) and their rows."""

    def __init__(self, monkeypatch):
        self.calls, self.rows = 0, 0
        real = HFTeacher.score_with_hidden

        def counted(teacher, batch_ids, batch_masks, *args, **kwargs):
            self.calls += 1
            self.rows += sum(sum(m) for m in batch_masks)
            return real(teacher, batch_ids, batch_masks, *args, **kwargs)

        monkeypatch.setattr(HFTeacher, "score_with_hidden", counted)


def _targets(example) -> SparseTargets:
    grid = None if example.tail_tempered is None else torch.from_numpy(example.tail_tempered)
    return SparseTargets(torch.from_numpy(example.sparse_ids), torch.from_numpy(example.sparse_logprobs).float(),
                         tail_logmass=torch.from_numpy(example.tail_logmass), tail_grid=grid,
                         tail_temperatures=tuple(range(1, grid.shape[1] + 1)) if grid is not None else ())


def _examples(path):
    return {e.key: e for e in CacheReader(str(path)).iter_examples()}


@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_generated_build_runs_no_teacher_forced_pass_and_equals_the_scored_one(tmp_path, monkeypatch, teacher_dir,
                                                                               data_file, settings):
    forwards = Forwards(monkeypatch)
    reused = tmp_path / "reused"
    assert build_cache(make_config(reused, teacher_dir, data_file, *settings, *EXACT)).finalized
    assert forwards.calls == 0 and verify_cache(str(reused)).ok
    monkeypatch.setattr(ShardScorer, "decode_sparsifier", lambda self: None)  # the old path: score the answers
    scored = tmp_path / "scored"
    build_cache(make_config(scored, teacher_dir, data_file, *settings, *EXACT))
    got, want = _examples(reused), _examples(scored)
    assert forwards.calls > 0 and forwards.rows == sum(int(e.target_mask.sum()) for e in want.values())
    assert got.keys() == want.keys() and len(got) == 24 * (3 if "generate.num_samples=3" in settings else 1)
    for key, example in want.items():
        mine = got[key]
        assert np.array_equal(mine.input_ids, example.input_ids)
        assert np.array_equal(mine.target_mask, example.target_mask)
        assert mine.record["teacher_text"] == example.record["teacher_text"]
        assert_targets_agree(_targets(mine), _targets(example))


@pytest.mark.parametrize("overrides", [
    ("template.distill=all",),
    ("hidden.layers=[1]", "hidden.dim=8"),
    ("sparsifier.kind=sample", "sparsifier.k=8"),
], ids=["every-token", "hidden-states", "sampled-sparsifier"])
def test_what_the_decode_cannot_give_is_scored_teacher_forced(tmp_path, monkeypatch, teacher_dir, data_file,
                                                             overrides):
    forwards = Forwards(monkeypatch)
    out = tmp_path / "cache"
    build_cache(make_config(out, teacher_dir, data_file, *GREEDY, "data.limit=6", *overrides))
    examples = list(CacheReader(str(out)).iter_examples())
    assert forwards.calls > 0 and forwards.rows == sum(int(e.target_mask.sum()) for e in examples)
    if "template.distill=all" in overrides:
        assert all(int(e.target_mask.sum()) == len(e.input_ids) - 1 for e in examples)


def test_an_example_not_exactly_prompt_plus_answer_is_scored_teacher_forced(tmp_path, monkeypatch, teacher_dir,
                                                                          data_file):
    """An example whose tokens were cut (here its first prompt token, as a left truncation would) cannot take the
    decode's targets: it is scored teacher-forced, its targets read from its own tokens."""
    real = generate_module.with_answer

    def cut(template, prompt, answer):
        encoded = real(template, prompt, answer)
        return Encoded(encoded.input_ids[1:], encoded.target_mask[1:], encoded.prompt_truncated + 1)

    monkeypatch.setattr(generate_module, "with_answer", cut)
    forwards = Forwards(monkeypatch)
    out = tmp_path / "cache"
    build_cache(make_config(out, teacher_dir, data_file, *GREEDY, "data.limit=6"))
    examples = list(CacheReader(str(out)).iter_examples())
    assert len(examples) == 6 and forwards.rows == sum(int(e.target_mask.sum()) for e in examples)


def test_decoded_targets_fit_only_prompt_then_answer_with_the_answer_as_targets():
    prompt = Encoded([5, 6, 7], [False] * 3)
    assert decoded_targets_fit(prompt, Encoded([5, 6, 7, 8, 9], [False] * 3 + [True] * 2), [8, 9])
    assert not decoded_targets_fit(prompt, Encoded([6, 7, 8, 9], [False] * 2 + [True] * 2), [8, 9])  # cut
    assert not decoded_targets_fit(prompt, Encoded([5, 6, 7, 8, 9], [False] + [True] * 4), [8, 9])  # every token
    assert not decoded_targets_fit(prompt, Encoded([5, 6, 7, 8], [False] * 3 + [True]), [8, 9])  # answer cut


class NoScoredDecode:
    """A backend with only `score` and `generate` (as `TeacherBackend` asks): the real HF teacher underneath."""

    def __init__(self, inner):
        self.inner = inner

    def score(self, *args):
        return self.inner.score(*args)

    def generate(self, *args):
        return self.inner.generate(*args)


def test_a_backend_without_a_scored_decode_is_scored_teacher_forced(tmp_path, monkeypatch, teacher_dir, data_file,
                                                                   tokenizer):
    forwards = Forwards(monkeypatch)
    config = make_config(tmp_path / "cache", teacher_dir, data_file, *GREEDY, "data.limit=6")
    backend = NoScoredDecode(HFTeacher(config.teacher, len(tokenizer)))
    build_cache(config, backend=backend, tokenizer=tokenizer)
    examples = list(CacheReader(str(tmp_path / "cache")).iter_examples())
    assert forwards.rows == sum(int(e.target_mask.sum()) for e in examples) > 0


def test_a_killed_generated_build_resumes_to_the_same_cache(tmp_path, teacher_dir, data_file):
    straight = tmp_path / "straight"
    build_cache(make_config(straight, teacher_dir, data_file, *SAMPLED, "data.limit=15"))
    resumed = tmp_path / "resumed"
    first = build_cache(make_config(resumed, teacher_dir, data_file, *SAMPLED, "data.limit=15"), stop_after_shards=1)
    assert not first.finalized
    assert build_cache(make_config(resumed, teacher_dir, data_file, *SAMPLED, "data.limit=15")).finalized
    manifests = [json.loads((Path(p) / "manifest.json").read_text()) for p in (straight, resumed)]
    assert manifests[0] == manifests[1]  # byte-identical shards


def test_a_cache_of_decode_targets_trains(tmp_path, teacher_dir, data_file, student_dir):
    from kdcache.config import TrainConfig, load_config
    from kdcache.train.trainer import train

    cache = tmp_path / "cache"
    build_cache(make_config(cache, teacher_dir, data_file, *GREEDY))
    config = load_config(TrainConfig, None, [
        f"cache={cache}", f"student={student_dir}", f"out={tmp_path / 'run'}", "profile=cpu", "batch_size=4",
        "lr=3e-3", "lora.enabled=false", "heldout_fraction=0.25", "eval_every=1000", "save_every=1000",
        "chunk_size=64", "loss.alpha=0.0", "progress=false", "max_steps=6"])
    assert train(config).step == 6
    losses = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    values = [r["loss"] for r in losses if "loss" in r]
    assert len(values) == 6 and all(np.isfinite(values))
