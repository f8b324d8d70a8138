"""The transformers backend stores exactly what a plain forward pass of the teacher says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_config

from kdcache.modeling import load_causal_lm
from kdcache.store.reader import CacheReader
from kdcache.teacher.build import build_cache
from kdcache.teacher.sparsify import example_uniforms, sample_with_counts
from kdcache.tiny import build_qwen2, save_model

# Plain float32 log-probs, so the cache holds the teacher's values exactly (the default rounds them: test_encoding).
PLAIN = ("sparsifier.logprob_step=null", "sparsifier.logprob_dtype=float32")


def dense_logprobs(model, input_ids: np.ndarray) -> torch.Tensor:
    """log_softmax of a plain, unbatched forward pass: the reference."""
    with torch.no_grad():
        logits = model(torch.tensor(input_ids, dtype=torch.long)[None]).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def assert_same_topk(cached_ids, cached_logprobs, reference, top_values) -> None:
    """Cached ids are distinct, carry the reference log-probabilities, and those are the top-k values in order.

    (Comparing ids position by position would fail on near-ties deep in the tail, where batched and unbatched
    forward passes may order two tokens whose log-probabilities differ by 1e-7 differently.)
    """
    ids = torch.as_tensor(cached_ids, dtype=torch.long)
    assert all(len(set(row.tolist())) == len(row) for row in ids)
    np.testing.assert_allclose(cached_logprobs, reference.gather(-1, ids).numpy(), atol=2e-5)
    np.testing.assert_allclose(cached_logprobs, top_values.numpy(), atol=2e-5)


@pytest.mark.parametrize("k", [16, "vocab"])
def test_cached_topk_equals_plain_forward(tmp_path, tokenizer, teacher_dir, data_file, k):
    k = len(tokenizer) if k == "vocab" else k
    build_cache(make_config(tmp_path / "cache", teacher_dir, data_file, f"sparsifier.k={k}", *PLAIN))
    model = load_causal_lm(teacher_dir, None, "float32", torch.device("cpu"))
    reader = CacheReader(str(tmp_path / "cache"), tokenizer=tokenizer)
    checked = 0
    for example in reader.iter_examples():
        logprobs = dense_logprobs(model, example.input_ids)
        positions = np.nonzero(example.target_mask)[0]
        assert len(positions) == example.sparse_ids.shape[0] > 0
        reference = logprobs[positions - 1]  # token t is predicted from position t - 1
        values, ids = torch.topk(reference, k, dim=-1)
        assert_same_topk(example.sparse_ids, example.sparse_logprobs, reference, values)
        rest = reference.scatter(-1, torch.as_tensor(example.sparse_ids, dtype=torch.long), float("-inf"))
        tail = torch.logsumexp(rest, dim=-1).numpy()
        if k == len(tokenizer):
            assert np.all(np.isneginf(example.tail_logmass))
        else:
            np.testing.assert_allclose(example.tail_logmass, tail, atol=2e-5)
            total = np.logaddexp(np.logaddexp.reduce(example.sparse_logprobs.astype(np.float64), axis=1),
                                 example.tail_logmass)
            np.testing.assert_allclose(total, 0.0, atol=1e-5)
        checked += len(positions)
    assert checked == reader.manifest.counts.num_targets


def test_padded_embedding_teacher_is_accepted_and_padding_columns_dropped(tmp_path, tokenizer, data_file):
    """A teacher whose embedding has more rows than the tokenizer (as Qwen2.5-72B has) builds a normal cache."""
    model = build_qwen2(len(tokenizer) + 64, hidden_size=64, layers=1, heads=2, seed=3)
    folder = save_model(model, tokenizer, tmp_path / "padded")
    build_cache(make_config(tmp_path / "cache", folder, data_file, "sparsifier.k=8", "data.limit=6", *PLAIN))
    reader = CacheReader(str(tmp_path / "cache"), tokenizer=tokenizer)
    assert reader.manifest.tokenizer.vocab_size == len(tokenizer)
    for example in reader.iter_examples():
        assert example.sparse_ids.max() < len(tokenizer)
        logprobs = dense_logprobs(model, example.input_ids)[:, : len(tokenizer)]
        renormalised = torch.log_softmax(logprobs, dim=-1)  # the distribution over real tokens only
        positions = np.nonzero(example.target_mask)[0]
        values, _ = torch.topk(renormalised[positions - 1], 8, dim=-1)
        assert_same_topk(example.sparse_ids, example.sparse_logprobs, renormalised[positions - 1], values)


def test_sampling_sparsifier_counts_follow_teacher_distribution():
    torch.manual_seed(0)
    logits = torch.randn(3, 11) * 2
    draws = 20000
    chunk = sample_with_counts(logits, example_uniforms(seed=5, example_index=0, num_targets=3, num_samples=draws), 1.0)
    probs = torch.softmax(logits.double(), dim=-1)
    for row in range(3):
        valid = chunk.ids[row] >= 0
        assert int(chunk.counts[row].sum()) == draws
        freq = chunk.counts[row][valid].double() / draws
        expected = probs[row, chunk.ids[row][valid].long()]
        assert torch.allclose(freq, expected, atol=0.02)  # ~7 sigma for p=0.5 at 20k draws
        np.testing.assert_allclose(chunk.logprobs[row][valid].numpy(),
                                   torch.log_softmax(logits[row], -1)[chunk.ids[row][valid].long()].numpy(), atol=1e-6)


def test_sampled_cache_is_independent_of_batching(tmp_path, tokenizer, teacher_dir, data_file):
    def build(name, *overrides):
        config = make_config(tmp_path / name, teacher_dir, data_file, "sparsifier.kind=sample", "sparsifier.k=12",
                             "sparsifier.seed=7", "data.limit=8", *overrides)
        build_cache(config)
        return list(CacheReader(str(tmp_path / name)).iter_examples())

    # Draws are seeded per example, so batch and chunk sizes change no draw (log-probabilities may differ in the
    # last bit, since a padded batch sums in another order).
    a = build("a", "teacher.batch_size=1", "teacher.chunk_size=3")
    b = build("b", "teacher.batch_size=4", "teacher.chunk_size=100")
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.sparse_ids, y.sparse_ids)
        np.testing.assert_array_equal(x.sample_counts, y.sample_counts)
        np.testing.assert_allclose(x.sparse_logprobs, y.sparse_logprobs, atol=1e-5)
        assert np.all(x.sample_counts.sum(axis=1) == 12)
        assert np.all((x.sample_counts > 0) == (x.sparse_ids >= 0))
