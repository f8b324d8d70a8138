"""Training from several caches: batches drawn by weight from a seeded generator, the same order for a seed, exact
resume, per-cache held-out figures, and a one-line refusal of caches that cannot train one student."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_config
from test_trainer import config
from test_trainer_checkpoint import checkpoint_entries, final_weights, losses

from kdcache.cli import main
from kdcache.cli.train import cache_overrides
from kdcache.config import TrainConfig, load_config
from kdcache.errors import BadInputError, IncompatibleCacheError
from kdcache.tiny import build_qwen2, build_tokenizer, save_model
from kdcache.train.checkpoint import read_checkpoint
from kdcache.train.heldout import combine_figures
from kdcache.train.loader import CacheDataset
from kdcache.train.mixing import MIX_BLOCK, CacheMixture, mixture_sources
from kdcache.train.trainer import train


@pytest.fixture(scope="module")
def second_cache(tmp_path_factory, sharp_cache, data_file) -> str:
    """A smaller cache from sharp_cache's teacher (same tokenizer) with k = 16 (sharp_cache has 32) and tail
    temperatures {1, 2} only: what a second, differently built cache of the same task looks like."""
    from kdcache.teacher.build import build_cache

    root = tmp_path_factory.mktemp("second")
    teacher = Path(sharp_cache).parent / "teacher"
    build_cache(make_config(root / "silver", teacher, data_file, "template.distill=all", "shard_size=4",
                            "data.limit=16", "sparsifier.k=16", "sparsifier.tail_temperatures=[2.0]"))
    return str(root / "silver")


@pytest.fixture(scope="module")
def foreign_cache(tmp_path_factory, data_file) -> str:
    """A cache built with another tokenizer."""
    from kdcache.teacher.build import build_cache

    root = tmp_path_factory.mktemp("foreign")
    other = build_tokenizer(["entirely different words for another vocabulary"] * 20, vocab_size=300)
    folder = save_model(build_qwen2(len(other), hidden_size=32, layers=1, heads=2), other, root / "teacher")
    build_cache(make_config(root / "cache", folder, data_file, "data.limit=6"))
    return str(root / "cache")


def mixture(paths: list[str], weights: list[float], seed: int = 0) -> CacheMixture:
    datasets = [CacheDataset(p, split="train", heldout_fraction=0.25, batch_size=3, seed=seed) for p in paths]
    return CacheMixture(datasets, weights, paths, seed)


# ------------------------------------------------------------------------------------ the draws


def test_sources_follow_the_weights_and_the_seed():
    weights = [1.0, 0.5]
    drawn = mixture_sources(weights, seed=3, start=0, count=6000)
    # share of cache 0: expected 2/3; binomial sd over 6000 draws is 0.006, the tolerance 0.02 (over 3 sd)
    assert abs((drawn == 0).mean() - 2 / 3) < 0.02
    assert set(drawn.tolist()) == {0, 1}
    assert np.array_equal(drawn, mixture_sources(weights, seed=3, start=0, count=6000))  # the same for a seed
    assert not np.array_equal(drawn, mixture_sources(weights, seed=4, start=0, count=6000))
    # any stretch (here across a block boundary) is the same as in the whole sequence: resuming needs only n
    start = MIX_BLOCK - 10
    assert np.array_equal(mixture_sources(weights, 3, start, 50), drawn[start:start + 50])
    three = mixture_sources([3.0, 1.0, 1.0], seed=0, start=0, count=10000)
    assert np.allclose(np.bincount(three, minlength=3) / 10000, [0.6, 0.2, 0.2], atol=0.015)  # sd <= 0.005


def test_batches_come_from_both_caches_in_the_weight_proportion(sharp_cache, second_cache):
    mixed = mixture([sharp_cache, second_cache], [2.0, 1.0], seed=1)
    ks = []
    for n in range(240):
        batch = mixed.next()
        ks.append(batch.targets.ids.shape[1])
        assert batch.targets.ids.shape[1] == (32 if mixed.source(n) == 0 else 16)  # batch n is its drawn cache's
    share = ks.count(32) / len(ks)
    # expected 2/3; binomial sd over 240 batches is 0.030, the tolerance 0.09 (3 sd)
    assert abs(share - 2 / 3) < 0.09, share
    assert mixed.drawn == [ks.count(32), ks.count(16)] and mixed.draws == 240
    # both caches ran through several epochs of their own (5 and 4 train batches an epoch)
    assert min(d.epoch for d in mixed.datasets) >= 5


def test_the_same_seed_gives_the_same_order(sharp_cache, second_cache):
    def order(seed: int) -> list[tuple[int, tuple[int, ...]]]:
        mixed = mixture([sharp_cache, second_cache], [1.0, 1.0], seed=seed)
        return [(b.targets.ids.shape[1], tuple(b.example_indices.tolist())) for b in (mixed.next() for _ in range(30))]

    assert order(7) == order(7)
    assert order(7) != order(8)


def test_a_resumed_mixture_yields_exactly_the_remaining_batches(sharp_cache, second_cache):
    straight = mixture([sharp_cache, second_cache], [1.0, 0.5])
    reference = [straight.next() for _ in range(23)]
    first = mixture([sharp_cache, second_cache], [1.0, 0.5])
    for _ in range(9):
        first.next()
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = mixture([sharp_cache, second_cache], [1.0, 0.5])
    resumed.load_state_dict(state)
    for want in reference[9:]:
        got = resumed.next()
        assert torch.equal(got.input_ids, want.input_ids)
        assert torch.equal(got.targets.logprobs, want.targets.logprobs)
    assert resumed.drawn == straight.drawn
    other = mixture([second_cache, sharp_cache], [1.0, 0.5])
    with pytest.raises(BadInputError, match="same caches in the same order"):
        other.load_state_dict(state)


# ------------------------------------------------------------------------------------ training


SETTINGS = ["max_steps=6", "save_every=2", "eval_every=3", "lora.enabled=true", "lora.r=4", "lora.dropout=0.1"]


def mixed_config(out: Path, sharp_cache: str, second_cache: str, student_dir: str, *overrides) -> TrainConfig:
    caches = json.dumps([{"path": sharp_cache, "weight": 1.0}, {"path": second_cache, "weight": 0.5}])
    return config("", student_dir, out, f"caches={caches}", *SETTINGS, *overrides)


def test_a_mixed_run_killed_mid_run_resumes_exactly(tmp_path, sharp_cache, second_cache, student_dir):
    straight = tmp_path / "straight"
    result = train(mixed_config(straight, sharp_cache, second_cache, student_dir))
    first = train(mixed_config(tmp_path / "run", sharp_cache, second_cache, student_dir), stop_after_steps=3)
    assert first.step == 3 and read_checkpoint(tmp_path / "run").state.step == 2  # killed after an unsaved step
    train(mixed_config(tmp_path / "run", sharp_cache, second_cache, student_dir))
    assert losses(tmp_path / "run") == losses(straight)
    finals = final_weights(tmp_path / "run"), final_weights(straight)
    assert finals[0].keys() == finals[1].keys() and all(torch.equal(finals[0][k], finals[1][k]) for k in finals[1])
    assert checkpoint_entries(tmp_path / "run") == ["checkpoint-000006", "checkpoint.json"]

    # held-out figures per cache and over both; run_summary.json has one line per cache
    last = result.evals[-1]
    per_cache = last["heldout_caches"]
    assert list(per_cache) == ["cache", "silver"]
    assert last["heldout_targets"] == sum(f["heldout_targets"] for f in per_cache.values()) > 0
    assert min(f["heldout_kd"] for f in per_cache.values()) <= last["heldout_kd"] <= max(
        f["heldout_kd"] for f in per_cache.values())
    summary = json.loads((straight / "run_summary.json").read_text())
    assert [c["path"] for c in summary["caches"]] == [sharp_cache, second_cache]
    assert sum(c["batches_drawn"] for c in summary["caches"]) == 6  # one batch per step (grad_accum 1)
    assert summary["caches"][0]["share_expected"] == pytest.approx(2 / 3)
    assert summary["caches"][1]["heldout_targets"] == per_cache["silver"]["heldout_targets"]
    assert "each cache's examples" in summary["heldout"]


def test_the_temperature_must_be_on_every_caches_grid(tmp_path, sharp_cache, second_cache, student_dir):
    with pytest.raises(BadInputError, match=f"^cache {second_cache}: loss.temperature=1.5 but this cache stores"):
        train(mixed_config(tmp_path / "run", sharp_cache, second_cache, student_dir, "loss.temperature=1.5"))
    assert not (tmp_path / "run" / "checkpoint.json").exists()


def test_caches_with_another_tokenizer_are_refused_in_one_line(tmp_path, sharp_cache, foreign_cache, student_dir):
    result = CliRunner().invoke(main, ["train", "--cache", sharp_cache, "--cache", foreign_cache, "--cache-weight",
                                       "1", "--cache-weight", "2", "--student", student_dir, "--out",
                                       str(tmp_path / "run"), "--profile", "cpu", "--no-progress"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert sharp_cache in lines[0] and foreign_cache in lines[0] and "tokenizer vocab_size (384 vs " in lines[0]
    with pytest.raises(IncompatibleCacheError, match="differ in tokenizer"):
        train(config("", student_dir, tmp_path / "run2", f"caches=[{{path: {foreign_cache}}}, "
                                                            f"{{path: {sharp_cache}}}]", "max_steps=1"))


# ------------------------------------------------------------------------------------ config and figures


@pytest.mark.parametrize("overrides, message", [
    (["cache=a", "caches=[{path: b}]"], "config key 'caches' must be empty when cache is set"),
    (["caches=[{path: a, weight: 0}]"], "config key 'caches[0].weight' must be a positive finite number, got 0.0"),
    (["caches=[{path: a}, {path: b, weight: -1}]"], "config key 'caches[1].weight' must be a positive finite"),
    (["caches=[{path: a}, {path: a, weight: 2}]"], "config key 'caches' must be distinct paths"),
    (["caches=[{weight: 1}]"], "config key 'caches[0].path' must be a cache folder or URL, got ''"),
])
def test_bad_cache_lists_are_refused_naming_the_key(overrides, message):
    with pytest.raises(BadInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(TrainConfig, None, overrides)


def test_cache_keeps_working_and_the_cli_repeats_cache():
    assert load_config(TrainConfig, None, ["cache=a"]).sources()[0].path == "a"
    assert TrainConfig().sources() == []
    spec = load_config(TrainConfig, None, ["cache=spec", *cache_overrides(("a", "b"), (2.0, 1.0))])  # CLI replaces
    assert [(s.path, s.weight) for s in spec.sources()] == [("a", 2.0), ("b", 1.0)] and spec.cache == ""
    with pytest.raises(BadInputError, match="--cache-weight must be given once per --cache"):
        cache_overrides(("a", "b"), (1.0,))


def test_figures_over_several_caches_are_the_pooled_means():
    a = {"heldout_kd": 1.0, "heldout_forward_kl": 2.0, "heldout_targets": 10, "heldout_kd_answer": 4.0,
         "heldout_answer_targets": 2}
    b = {"heldout_kd": 4.0, "heldout_forward_kl": 5.0, "heldout_targets": 30, "heldout_kd_answer": 1.0,
         "heldout_answer_targets": 6}
    both = combine_figures([a, b, {"heldout_targets": 0}])
    assert both["heldout_kd"] == pytest.approx((10 * 1.0 + 30 * 4.0) / 40)
    assert both["heldout_forward_kl"] == pytest.approx((10 * 2.0 + 30 * 5.0) / 40)
    assert both["heldout_kd_answer"] == pytest.approx((2 * 4.0 + 6 * 1.0) / 8)
    assert (both["heldout_targets"], both["heldout_answer_targets"]) == (40, 8)
    with pytest.raises(BadInputError, match="every cache is empty"):
        combine_figures([{"heldout_targets": 0}])


@pytest.mark.slow
def test_torchrun_two_ranks_mix_caches_and_resume_exactly(tmp_path, sharp_cache, second_cache, student_dir):
    from test_trainer_ddp import WORKER, overrides, rank_digests, records, saved_weights, torchrun

    def settings(out: Path) -> list[str]:
        caches = json.dumps([{"path": sharp_cache, "weight": 1.0}, {"path": second_cache, "weight": 0.5}])
        return ["cache=", f"caches={caches}", *overrides(sharp_cache, student_dir, out)[1:]]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun("-m", "kdcache.cli", "train", *[arg for o in settings(straight) for arg in ("--set", o)])
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    torchrun(str(worker), "4", *settings(resumed))  # killed after step 4 (checkpoint at 3), then resumed
    lines, again = records(straight), records(resumed)
    assert [r["loss"] for r in again if "loss" in r] == [r["loss"] for r in lines if "loss" in r]
    assert [r["heldout_caches"] for r in again if "heldout_kd" in r] == [
        r["heldout_caches"] for r in lines if "heldout_kd" in r]
    checkpoint_digest, final_digest = saved_weights(straight)
    assert rank_digests(resumed) == [checkpoint_digest, checkpoint_digest]  # both ranks hold the same weights
    assert saved_weights(resumed) == (checkpoint_digest, final_digest)
