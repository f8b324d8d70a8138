"""The trainer's hidden-state term: the distance pinned to a reference, the combination written once, training lowers
the held-out hidden MSE, the projector is checkpointed (exact resume) and saved beside the adapter, export drops it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_trainer import config

from conftest import make_config
from kdcache.errors import BadInputError
from kdcache.teacher.build import build_cache
from kdcache.tiny import build_qwen2, save_model
from kdcache.train.checkpoint import read_checkpoint
from kdcache.train.hidden import PROJECTOR_FILE, hidden_state_loss
from kdcache.train.losses import combine_terms
from kdcache.train.trainer import train


def test_hidden_state_loss_matches_a_reference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 3, 5, generator=g), torch.randn(7, 3, 5, generator=g)
    mse = torch.stack([torch.stack([torch.nn.functional.mse_loss(s[i, c], t[i, c]) for c in range(3)]).mean()
                       for i in range(7)])
    torch.testing.assert_close(hidden_state_loss(s, t, "mse"), mse)
    cos = torch.tensor([sum(1 - float(s[i, c] @ t[i, c]) / float(s[i, c].norm() * t[i, c].norm()) for c in range(3)) / 3
                        for i in range(7)])
    torch.testing.assert_close(hidden_state_loss(s, t, "cosine"), cos, atol=1e-6, rtol=1e-5)
    assert float(hidden_state_loss(t, t, "mse").abs().max()) == 0.0
    with pytest.raises(ValueError, match=r"\[N, C, d\]"):
        hidden_state_loss(s, t[:, :2])


def test_combine_terms_adds_the_weighted_hidden_mean():
    ce, kd, hid = torch.tensor(6.0), torch.tensor(3.0), torch.tensor(8.0)
    total, parts = combine_terms(ce, 3, kd, 2, 0.25, hidden_sum=hid, hidden_den=4, hidden_weight=0.5)
    assert float(total) == pytest.approx(0.25 * 2 + 0.75 * 1.5 + 0.5 * 2)
    assert float(parts["hidden"]) == 2.0
    total, parts = combine_terms(ce, 3, kd, 2, 0.25)  # weight 0: as before
    assert float(total) == pytest.approx(0.25 * 2 + 0.75 * 1.5) and "hidden" not in parts


@pytest.fixture(scope="module")
def hidden_cache(tmp_path_factory, tokenizer, data_file) -> str:
    """A sharp teacher's cache with its last two hidden states projected to 16 numbers (fp16, every target)."""
    root = tmp_path_factory.mktemp("hidden")
    teacher = build_qwen2(len(tokenizer), hidden_size=64, layers=2, heads=2, seed=11, tie_embeddings=False)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)
    folder = save_model(teacher, tokenizer, root / "teacher")
    build_cache(make_config(root / "cache", folder, data_file, "template.distill=all", "shard_size=6",
                            "sparsifier.k=32", "hidden.layers=[1, last]", "hidden.dim=16"))
    return str(root / "cache")


def _evals(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "heldout_hidden_mse" in r]


def test_hidden_term_lowers_the_heldout_hidden_mse(tmp_path, hidden_cache, student_dir):
    out = tmp_path / "run"
    train(config(hidden_cache, student_dir, out, "max_steps=20", "eval_every=2", "loss.hidden_weight=1.0"))
    curve = [r["heldout_hidden_mse"] for r in _evals(out)]
    assert curve[-1] < 0.7 * curve[0] and curve[-1] == min(curve), curve
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("hidden" in r for r in steps if "loss" in r)
    projector = out / "final" / PROJECTOR_FILE
    assert projector.exists() and (out / "best" / PROJECTOR_FILE).exists()


def test_resume_with_the_projector_is_exact(tmp_path, hidden_cache, student_dir):
    settings = ["max_steps=4", "save_every=2", "eval_every=2", "lora.enabled=true", "lora.r=4", "lora.dropout=0.1",
                "loss.hidden_weight=0.5", "loss.alpha=0.2"]
    train(config(hidden_cache, student_dir, tmp_path / "straight", *settings))
    train(config(hidden_cache, student_dir, tmp_path / "resumed", *settings), stop_after_steps=3)
    train(config(hidden_cache, student_dir, tmp_path / "resumed", *settings))  # resumes from step 2
    curves = [[(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text()
                                                       .splitlines()) if "loss" in r]
              for run in ("straight", "resumed")]
    assert curves[0] == curves[1]
    reference, resumed = read_checkpoint(tmp_path / "straight"), read_checkpoint(tmp_path / "resumed")
    names = [k for k in reference.trainable if k.startswith("hidden_projector.")]
    assert names and resumed.trainable.keys() == reference.trainable.keys()
    assert all(torch.equal(resumed.trainable[k], reference.trainable[k]) for k in reference.trainable)


def test_export_leaves_the_projector_out(tmp_path, hidden_cache, student_dir):
    from kdcache.train.export import merge_adapter

    out = tmp_path / "run"
    train(config(hidden_cache, student_dir, out, "max_steps=2", "lora.enabled=true", "lora.r=4",
                 "loss.hidden_weight=1.0", "hidden_student_layers=[0, 1]"))
    merge_adapter(str(out / "final"), str(tmp_path / "merged"))
    assert not (tmp_path / "merged" / PROJECTOR_FILE).exists()
    assert (out / "final" / PROJECTOR_FILE).exists()
    card = (tmp_path / "merged" / "README.md").read_text()  # the model card names the cache it was distilled from
    manifest = json.loads((Path(hidden_cache) / "manifest.json").read_text())
    assert manifest["plan_hash"] in card and manifest["teacher"]["model"] in card and "hidden_weight 1.0" in card
    assert "steps: 2" in card and card.startswith("---\n") and "base_model:" not in card  # a local base: no hub id


def test_hidden_term_needs_a_cache_with_hidden_states(tmp_path, sharp_cache, student_dir, hidden_cache):
    with pytest.raises(BadInputError, match="stores no teacher hidden states"):
        train(config(sharp_cache, student_dir, tmp_path / "run", "max_steps=1", "loss.hidden_weight=1.0"))
    with pytest.raises(BadInputError, match="hidden_student_layers"):
        train(config(hidden_cache, student_dir, tmp_path / "run2", "max_steps=1", "loss.hidden_weight=1.0",
                     "hidden_student_layers=[0, 5]"))
