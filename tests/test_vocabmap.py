"""TRL GOLD's vocabulary mapping against the cache: teacher entries mapped to the student's ids (the unmapped ones
folded into the tail), the sparse losses over the mapped entries and ULD over the unmapped ones, pinned to a dense
reference written from whole distributions and a Python dict (values and gradients)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdcache.config import LossConfig
from kdcache.targets import SparseTargets
from kdcache.train.fused import ce_and_kd
from kdcache.train.losses import kd_loss
from kdcache.train.uld import unmapped_uld
from kdcache.train.vocabmap import UNMAPPED, VocabularyMap, map_rows

V_T, V_S = 14, 11
# teacher id -> student id for 8 of the 14 teacher tokens (teacher tokens 3, 6, 9, 10, 12 and 13 have no counterpart)
MAPPING = {0: 4, 1: 0, 2: 9, 4: 2, 5: 7, 7: 10, 8: 1, 11: 5}
TEMPERATURES = (2.0, 3.0)


def table() -> VocabularyMap:
    out = np.full(V_T, UNMAPPED, dtype=np.int64)
    for t, s in MAPPING.items():
        out[t] = s
    return VocabularyMap(out)


@pytest.fixture
def dense():
    g = torch.Generator().manual_seed(3)
    teacher = torch.log_softmax(2.5 * torch.randn(6, V_T, generator=g, dtype=torch.float64), -1)
    student = (1.5 * torch.randn(6, V_S, generator=g, dtype=torch.float64)).requires_grad_()
    return teacher, student


def cached_then_mapped(teacher: torch.Tensor, k: int) -> SparseTargets:
    """What a topk cache of ``teacher`` holds (top-k, tail at T = 1 and at TEMPERATURES), after :func:`map_rows`."""
    values, ids = teacher.topk(k, dim=-1)
    rest = teacher.scatter(-1, ids, float("-inf"))
    tail = torch.logsumexp(rest, -1)
    grid = torch.stack([torch.logsumexp(rest / t, -1) for t in TEMPERATURES], 1)
    mapped, values, tail, grid = map_rows(table(), ids.numpy(), values.numpy(), tail.numpy(), grid.numpy(),
                                         TEMPERATURES)
    return SparseTargets(ids=torch.from_numpy(mapped), logprobs=torch.from_numpy(values), tail_logmass=torch.from_numpy(tail),
                         tail_grid=torch.from_numpy(grid), tail_temperatures=TEMPERATURES)


def reference(teacher: torch.Tensor, student: torch.Tensor, k: int, skew: float, T: float, hybrid: bool):
    """Per row: T^2 * skew KL between the buckets {mapped top-k tokens, rest} of the teacher tempered at T and of the
    student, plus (hybrid) the sorted L1 of the unmapped top-k probabilities against the student's probabilities off
    the mapped ids, with one remainder bucket each."""
    out = []
    for n in range(teacher.shape[0]):
        q, z = teacher[n], student[n]
        top = sorted(range(V_T), key=lambda t: -float(q[t]))[:k]
        mapped = [t for t in top if t in MAPPING]
        q_t = torch.softmax(q / T, -1)  # the teacher's whole distribution at T
        p_t = torch.softmax(z / T, -1)
        zero = torch.zeros((), dtype=q.dtype)
        qb = torch.stack([q_t[t] for t in mapped] + [1 - sum((q_t[t] for t in mapped), zero)])
        pb = torch.stack([p_t[MAPPING[t]] for t in mapped] + [1 - sum((p_t[MAPPING[t]] for t in mapped), zero)])
        value = T * T * (qb * (qb / (skew * qb + (1 - skew) * pb)).log()).sum()
        if hybrid:
            p = torch.softmax(z, -1)
            u = sorted((q[t].exp() for t in top if t not in MAPPING), key=lambda x: -float(x))
            rest_q = 1 - sum((q[t].exp() for t in top), zero)
            off = [p[s] for s in range(V_S) if s not in {MAPPING[t] for t in mapped}]
            off = sorted(off, key=lambda x: -float(x.detach()))
            m = len(u)
            ranked = sum((abs(off[r] - u[r]) if r < len(off) else u[r]) for r in range(m)) if m else 0.0
            value = value + ranked + abs(sum(off[m:], zero) - rest_q)
        out.append(value)
    return torch.stack(out)


@pytest.mark.parametrize("k", [V_T, 9, 4])
@pytest.mark.parametrize("hybrid", [False, True])
def test_mapped_skew_forward_kl_equals_the_dense_reference_in_value_and_gradient(dense, k, hybrid):
    teacher, student = dense
    targets = cached_then_mapped(teacher, k)
    assert (targets.ids == UNMAPPED).any() and (targets.ids >= 0).any()
    config = LossConfig(kind="skew_forward_kl", skew=0.1, alpha=0.0, vocab_map="hybrid" if hybrid else "tail")
    got = kd_loss(config, student, targets, reduction="none")
    expected = reference(teacher, student, k, 0.1, 1.0, hybrid)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    (g_got,) = torch.autograd.grad(got.sum(), student)
    (g_ref,) = torch.autograd.grad(expected.sum(), student)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-8, atol=1e-12)
    _, fused = ce_and_kd(config, student, torch.zeros(6, dtype=torch.long), targets)  # the trainer's fused path
    torch.testing.assert_close(fused, got, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T", TEMPERATURES)
def test_tail_mode_at_a_cached_temperature_folds_the_unmapped_mass_into_the_tempered_tail(dense, T):
    teacher, student = dense
    config = LossConfig(kind="skew_forward_kl", skew=0.1, alpha=0.0, temperature=T, vocab_map="tail")
    got = kd_loss(config, student, cached_then_mapped(teacher, 6), reduction="none")
    torch.testing.assert_close(got, reference(teacher, student, 6, 0.1, T, False), rtol=1e-10, atol=1e-12)


def test_whole_vocabulary_unmapped_term_is_golds_unmatched_term(dense):
    """With every teacher token cached, the ULD half is GOLD's: the sorted student probabilities of the tokens no
    teacher token maps to against the sorted teacher probabilities of the unmatched tokens, zero-padded, L1."""
    teacher, student = dense
    got = unmapped_uld(student, cached_then_mapped(teacher, V_T), reduction="none")
    p, q = torch.softmax(student, -1), teacher.exp()
    unmatched_s = [s for s in range(V_S) if s not in MAPPING.values()]
    unmatched_t = [t for t in range(V_T) if t not in MAPPING]
    ps = p[:, unmatched_s].sort(-1, descending=True).values
    qs = q[:, unmatched_t].sort(-1, descending=True).values
    width = max(ps.shape[1], qs.shape[1])
    gold = (torch.nn.functional.pad(ps, (0, width - ps.shape[1]))
            - torch.nn.functional.pad(qs, (0, width - qs.shape[1]))).abs().sum(-1)
    torch.testing.assert_close(got, gold, rtol=1e-10, atol=1e-12)


def test_map_rows_keeps_padding_and_folds_exactly():
    ids = np.array([[0, 3, -1], [13, 7, 6]])
    logprobs = np.log(np.array([[0.5, 0.2, 0.1], [0.3, 0.3, 0.1]]))
    tail = np.log(np.array([0.3, 0.3]))
    mapped, kept, new_tail, grid = map_rows(table(), ids, logprobs, tail, None, ())
    # mapped entries first, then the unmapped ones, then padding (the losses expect real entries before padding)
    assert mapped.tolist() == [[4, UNMAPPED, -1], [10, UNMAPPED, UNMAPPED]] and grid is None
    np.testing.assert_allclose(np.exp(kept), [[0.5, 0.2, 0.1], [0.3, 0.3, 0.1]])
    np.testing.assert_allclose(np.exp(new_tail), [0.5, 0.7])


def test_loss_config_validates_the_vocabulary_map():
    with pytest.raises(ValueError, match="vocab_map must be one of off, hybrid, tail, got 'gold'"):
        LossConfig(vocab_map="gold")
    with pytest.raises(ValueError, match="kind must be one of forward_kl.*with vocab_map=hybrid"):
        LossConfig(kind="uld", vocab_map="hybrid")
    with pytest.raises(ValueError, match="temperature must be 1 with vocab_map=hybrid"):
        LossConfig(kind="forward_kl", vocab_map="hybrid", temperature=2.0)
    with pytest.raises(ValueError, match="unmapped_weight must be a finite number >= 0"):
        LossConfig(vocab_map="hybrid", unmapped_weight=math.inf)
    assert LossConfig(kind="jsd", vocab_map="tail", temperature=2.0).vocab_map == "tail"


def test_a_teacher_tokenizer_that_cannot_be_loaded_or_differs_is_refused_in_one_line(tmp_path):
    from types import SimpleNamespace

    from kdcache.errors import BadInputError
    from kdcache.tiny import build_unigram_tokenizer
    from kdcache.train.crosstok import _teacher_map

    student = build_unigram_tokenizer(["a few words to train on", "and a few more words"], 40)
    student.save_pretrained(tmp_path / "other")

    def manifest(name, kind="topk"):
        return SimpleNamespace(sparsifier=SimpleNamespace(kind=kind),
                               tokenizer=SimpleNamespace(name=str(name), fingerprint="sha256:0"))

    with pytest.raises(BadInputError, match="could not be loaded.*loss.kind=uld"):
        _teacher_map(manifest(tmp_path / "missing"), student)
    with pytest.raises(BadInputError, match="not the one the cache was built with"):
        _teacher_map(manifest(tmp_path / "other"), student)
    with pytest.raises(BadInputError, match="sample cache"):
        _teacher_map(manifest(tmp_path / "other", "sample"), student)
