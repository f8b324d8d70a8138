"""The chunked student loss equals the loss on full logits, in value and gradient, without full logits."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config

import kdcache.train.fused as fused
import kdcache.train.fused_linear as fused_linear
import kdcache.train.objective as objective
from kdcache.modeling import linear_head_weight
from kdcache.targets import SparseTargets
from kdcache.teacher.build import build_cache
from kdcache.tiny import build_qwen2
from kdcache.train.loader import CacheDataset
from kdcache.train.losses import LossConfig, distillation_loss, teacher_confidence_weight
from kdcache.train.objective import chunked_distillation_loss


@pytest.fixture(scope="module")
def batch(tmp_path_factory, teacher_dir, data_file):
    """One padded batch of 4 cached examples (12 target positions, top-16 targets)."""
    path = tmp_path_factory.mktemp("student") / "cache"
    build_cache(make_config(path, teacher_dir, data_file, "data.limit=8"))
    dataset = CacheDataset(str(path), batch_size=4, split="all", seed=0)
    batch = next(iter(dataset))
    assert batch.input_ids.shape[0] == 4 and batch.num_targets > 4
    return batch, dataset.vocab_size


def student(vocab_rows: int, head: str = "linear"):
    """A tiny Qwen2; ``head="hooked"`` puts a no-op hook on its LM head, so the loss calls the head module (under
    checkpointing) instead of projecting with its weight in the fused Function (kdcache.modeling.linear_head_weight);
    ``head="frozen"`` freezes the (tied) head, as a LoRA student's, so its gradient is made in forward
    (kdcache.train.fused_linear)."""
    model = build_qwen2(vocab_rows, hidden_size=32, layers=1, heads=2, seed=7)
    if head == "frozen":
        model.get_output_embeddings().weight.requires_grad_(False)
    if head == "hooked":
        model.get_output_embeddings().register_forward_hook(lambda module, args, output: None)
        assert linear_head_weight(model) is None
    else:
        assert linear_head_weight(model) is not None
    return model.train()


def reference(model, batch, config, vocab_size=None, weights=None):
    """Full [B, L, V] logits, gathered at positions t - 1, then distillation_loss."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    rows, cols = batch.target_mask.nonzero(as_tuple=True)
    selected = logits[rows, cols - 1]
    if vocab_size is not None:
        selected = selected[:, :vocab_size]
    return distillation_loss(config, selected, batch.targets, batch.labels, weights=weights)


def loss_and_grads(fn, model):
    model.zero_grad(set_to_none=True)
    loss, parts = fn()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), parts, grads


def assert_same(a, b):
    loss_a, parts_a, grads_a = a
    loss_b, parts_b, grads_b = b
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    assert parts_a.keys() == parts_b.keys()
    for key in parts_a:
        torch.testing.assert_close(parts_a[key], parts_b[key], atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4, msg=name)


CONFIGS = {
    "fkl_ce": LossConfig(kind="forward_kl", alpha=0.5),
    "rkl": LossConfig(kind="reverse_kl", alpha=0.0, temperature=2.0),
    "jsd_topk": LossConfig(kind="jsd", alpha=0.2, top_k=5),
    "ce_only": LossConfig(kind="forward_kl", alpha=1.0),
}


CASES = [("fkl_ce", 1), ("fkl_ce", 3), ("fkl_ce", 1000), ("rkl", 3), ("jsd_topk", 1), ("ce_only", 1000)]


@pytest.mark.parametrize("head", ["linear", "frozen", "hooked"])
@pytest.mark.parametrize("config,chunk_size", CASES, ids=[f"{c}-{n}" for c, n in CASES])
def test_chunked_equals_full_logits(batch, config, chunk_size, head):
    batch, vocab = batch
    config = CONFIGS[config]
    model = student(vocab, head)
    expected = loss_and_grads(lambda: reference(model, batch, config), model)
    got = loss_and_grads(lambda: chunked_distillation_loss(
        model, batch.input_ids, batch.attention_mask, batch.target_mask, batch.targets, batch.labels, config,
        chunk_size=chunk_size), model)
    assert_same(got, expected)
    assert len(got[2]) == len([p for p in model.parameters() if p.requires_grad])  # every trained one gets a gradient


def test_weights_and_ignored_labels(batch):
    batch, vocab = batch
    config = LossConfig(kind="skew_forward_kl", alpha=0.3)
    model = student(vocab)
    weights = teacher_confidence_weight(batch.targets)
    weights[0] = 0.0
    labels = batch.labels.clone()
    labels[1] = -100
    batch_ce = type(batch)(**{**batch.__dict__, "labels": labels})
    expected = loss_and_grads(lambda: reference(model, batch_ce, config, weights=weights), model)
    got = loss_and_grads(lambda: chunked_distillation_loss(
        model, batch.input_ids, batch.attention_mask, batch.target_mask, batch.targets, labels, config,
        chunk_size=2, weights=weights), model)
    assert_same(got, expected)


@pytest.mark.parametrize("head", ["linear", "frozen", "hooked"])
@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_padded_vocab_student_uses_the_tokenizer_columns_only(batch, chunk_size, head):
    batch, vocab = batch
    config = LossConfig(kind="forward_kl", alpha=0.5)
    model = student(vocab + 40, head)  # embedding rows past the tokenizer, as Qwen2.5 has
    expected = loss_and_grads(lambda: reference(model, batch, config, vocab_size=vocab), model)
    got = loss_and_grads(lambda: chunked_distillation_loss(
        model, batch.input_ids, batch.attention_mask, batch.target_mask, batch.targets, None, config,
        chunk_size=chunk_size, vocab_size=vocab), model)  # labels taken from input_ids
    assert_same(got, expected)
    unsliced = reference(model, batch, config)[0].detach()
    assert not torch.allclose(unsliced, got[0], atol=1e-4)  # the padding columns would have changed the loss
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_distillation_loss(model, batch.input_ids, batch.attention_mask, batch.target_mask, batch.targets,
                                  None, config, vocab_size=vocab + 41)


def test_a_linear_head_makes_logits_one_chunk_at_a_time_and_remakes_only_them_in_backward(batch, monkeypatch):
    """With a plain head the fused Function projects each chunk itself: forward runs the loss passes once per chunk
    (no checkpoint replays them in backward), and backward remakes each chunk's logits for its gradient."""
    batch, vocab = batch
    forwards, backwards = [], []
    original_forward, original_grad = fused._forward, fused._grad_logits

    def recording_forward(logits, *rest):
        forwards.append(tuple(logits.shape))
        return original_forward(logits, *rest)

    def recording_grad(logits, *rest):
        backwards.append(tuple(logits.shape))
        return original_grad(logits, *rest)

    monkeypatch.setattr(fused, "_forward", recording_forward)
    monkeypatch.setattr(fused, "_grad_logits", recording_grad)
    model = student(vocab)
    n, chunk = batch.num_targets, 3
    loss, _ = chunked_distillation_loss(model, batch.input_ids, batch.attention_mask, batch.target_mask,
                                        batch.targets, batch.labels, LossConfig(), chunk_size=chunk)
    chunks = -(-n // chunk)
    assert len(forwards) == chunks and all(rows <= chunk and width == vocab for rows, width in forwards)
    assert sum(rows for rows, _ in forwards) == n and not backwards
    loss.backward()
    assert len(forwards) == chunks  # the loss passes did not run again
    assert sorted(backwards) == sorted(forwards)  # each chunk's logits remade once, for its gradient


@pytest.mark.parametrize("config", ["fkl_ce", "ce_only"])
def test_a_frozen_head_makes_each_chunk_s_logits_once_and_its_gradient_in_forward(batch, monkeypatch, config):
    """A frozen plain head (LoRA students): one head matmul and one set of loss passes per chunk in forward, and
    backward makes neither again (it scales the gradient w.r.t. the hidden states made in forward)."""
    batch, vocab = batch
    passes = []
    original = fused_linear._Passes

    def recording(make, *rest):
        def recorded(rows):
            logits = make(rows)
            passes.append(tuple(logits.shape))
            return logits

        return original(recorded, *rest)

    monkeypatch.setattr(fused_linear, "_Passes", recording)
    monkeypatch.setattr(fused, "_forward", lambda *args: pytest.fail("the remade path ran"))
    monkeypatch.setattr(fused, "_grad_logits", lambda *args: pytest.fail("the remade path ran"))
    model = student(vocab, "frozen")
    n, chunk = batch.num_targets, 3
    loss, _ = chunked_distillation_loss(model, batch.input_ids, batch.attention_mask, batch.target_mask,
                                        batch.targets, batch.labels, CONFIGS[config], chunk_size=chunk)
    chunks = -(-n // chunk)
    assert len(passes) == chunks and sum(rows for rows, _ in passes) == n
    loss.backward()
    assert len(passes) == chunks
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_logits_exist_one_chunk_at_a_time_and_are_recomputed_in_backward(batch, monkeypatch):
    batch, vocab = batch
    calls = []
    original = objective.output_logits

    def recording(model, hidden):
        calls.append(tuple(hidden.shape))
        return original(model, hidden)

    monkeypatch.setattr(objective, "output_logits", recording)
    model = student(vocab, "hooked")
    n, chunk = batch.num_targets, 3
    loss, _ = chunked_distillation_loss(model, batch.input_ids, batch.attention_mask, batch.target_mask,
                                        batch.targets, batch.labels, LossConfig(), chunk_size=chunk)
    chunks = -(-n // chunk)
    assert len(calls) == chunks and all(len(shape) == 2 and shape[0] <= chunk for shape in calls)
    loss.backward()
    assert len(calls) == 2 * chunks  # each chunk's logits recomputed, one at a time
    assert sum(rows for rows, _ in calls[:chunks]) == n


def test_no_targets_gives_zero_loss_that_backpropagates(batch):
    batch, vocab = batch
    model = student(vocab)
    empty = SparseTargets(ids=torch.zeros(0, 16, dtype=torch.long), logprobs=torch.zeros(0, 16),
                          tail_logmass=torch.zeros(0))
    no_targets = torch.zeros_like(batch.target_mask)
    loss, parts = chunked_distillation_loss(model, batch.input_ids, batch.attention_mask, no_targets, empty,
                                            torch.zeros(0, dtype=torch.long), LossConfig())
    assert loss.item() == 0.0 and set(parts) == {"ce", "kd"}
    loss.backward()
