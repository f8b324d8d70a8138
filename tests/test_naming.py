"""Names that match the ecosystem: `loss.ce_weight` / `loss.kd_weight` (with `alpha` as another name for
ce_weight, contradictions refused in one line) and `num_epochs` beside `max_steps`."""

from __future__ import annotations

import math

import pytest
from test_trainer import config

from kdcache.config import LossConfig, TrainConfig, load_config
from kdcache.errors import BadInputError
from kdcache.train.ablate import run_config
from kdcache.train.epochs import count_batches
from kdcache.train.loader import CacheDataset
from kdcache.train.trainer import train


def test_ce_weight_kd_weight_and_alpha_are_one_setting():
    assert LossConfig() == LossConfig(ce_weight=0.5) == LossConfig(kd_weight=0.5) == LossConfig(alpha=0.5)
    mix = LossConfig(kd_weight=0.7)
    assert (mix.ce_weight, mix.kd_weight, mix.alpha) == (0.3, 0.7, 0.3)
    assert mix == LossConfig(alpha=0.3) == LossConfig(ce_weight=0.3, kd_weight=0.7, alpha=0.3)
    assert mix.with_ce_weight(0.0) == LossConfig(kd_weight=1.0)
    assert load_config(TrainConfig, None, ["loss.kd_weight=1"]).loss.alpha == 0.0


@pytest.mark.parametrize("settings, message", [
    (["loss.alpha=0.3", "loss.kd_weight=0.5"],
     "config key 'loss.alpha' must be 0.5 to agree with kd_weight=0.5 (the CE and KD weights sum to 1, and alpha is "
     "another name for ce_weight): give only one of them, got 0.3"),
    (["loss.ce_weight=0.2", "loss.kd_weight=0.2"], "config key 'loss.kd_weight' must be 0.8 to agree with "
                                                   "ce_weight=0.2"),
    (["loss.kd_weight=1.5"], "config key 'loss.kd_weight' must be in [0, 1], got 1.5"),
])
def test_contradictory_or_bad_weights_are_refused_in_one_line(settings, message):
    with pytest.raises(BadInputError) as error:
        load_config(TrainConfig, None, settings)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_an_ablation_grid_over_kd_weight_replaces_the_base_alpha(tmp_path):
    made = run_config({"loss": {"alpha": 0.5, "kind": "jsd"}}, "c", tmp_path, "r", {"loss.kd_weight": 0.9}, ())
    assert made.loss.kd_weight == 0.9 and made.loss.kind == "jsd"
    assert made.out == str(tmp_path / "r")  # each grid point keeps its own folder (a loop once renamed it)


@pytest.mark.parametrize("options", [dict(batch_size=4), dict(batch_size=8, max_tokens=300)])
def test_count_batches_equals_the_batches_the_loader_yields(sharp_cache, options):
    data = CacheDataset(sharp_cache, split="train", heldout_fraction=0.25, seed=3, **options)
    for epoch in (0, 1):
        data.set_epoch(epoch)
        assert count_batches(data) == sum(1 for _ in data) > 0


def test_num_epochs_sets_the_steps(tmp_path, sharp_cache, student_dir):
    batches = count_batches(CacheDataset(sharp_cache, split="train", heldout_fraction=0.25, batch_size=4))
    steps = math.ceil(2 * batches / 2)
    result = train(config(sharp_cache, student_dir, tmp_path / "run", "num_epochs=2", "grad_accum=2",
                          "eval_every=0"))
    assert result.step == steps
    again = train(config(sharp_cache, student_dir, tmp_path / "run", "num_epochs=2", "grad_accum=2",
                         "eval_every=0", f"max_steps={steps}"))  # the saved config holds both: they agree
    assert again.step == steps
    with pytest.raises(BadInputError, match=f"max_steps={steps + 1} and num_epochs=2.0 .* disagree: give one"):
        train(config(sharp_cache, student_dir, tmp_path / "other", "num_epochs=2", "grad_accum=2",
                     f"max_steps={steps + 1}"))
