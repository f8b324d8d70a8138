"""Teacher hidden states in the cache: the reductions' stated errors, the build against an independent recomputation
from transformers' output_hidden_states, verify, and the vLLM refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_config
from kdcache.errors import BadInputError
from kdcache.hidden import (bytes_per_row, decode, encode, fit_pca, random_orthogonal_basis, reduce_rows,
                            resolve_layers, uniform_layer_map)
from kdcache.store.hidden import read_basis
from kdcache.store.location import CacheLocation
from kdcache.store.reader import CacheReader
from kdcache.store.verify import verify_cache
from kdcache.teacher.build import build_cache

# ------------------------------------------------------------------------------------------------ pure functions


def test_resolve_layers_by_index_fraction_and_last():
    assert resolve_layers([0, 0.5, "last", -1, 3], 24) == (0, 12, 24, 3)  # -1 is "last", kept once
    assert resolve_layers([-2], 4) == (3,)
    with pytest.raises(ValueError, match="outside"):
        resolve_layers([5], 4)


def test_uniform_layer_map_matches_depths():
    assert uniform_layer_map((0, 7, 14, 28), 28, 14) == (0, 4, 7, 14)  # round(7/2) = 4 (banker's: 3.5 -> 4)
    assert uniform_layer_map((2,), 2, 1) == (1,)


def test_random_basis_is_orthonormal_and_seeded():
    q = random_orthogonal_basis(48, 16, seed=3)
    assert q.shape == (48, 16)
    torch.testing.assert_close(q.T @ q, torch.eye(16), atol=1e-5, rtol=0)
    assert torch.equal(q, random_orthogonal_basis(48, 16, seed=3))
    assert not torch.equal(q, random_orthogonal_basis(48, 16, seed=4))


def test_float16_round_trip_within_half_an_ulp():
    z = np.random.default_rng(0).normal(scale=30.0, size=(200, 2, 32)).astype(np.float32)
    values, scale = encode(z, "float16")
    assert values.dtype == np.float16 and scale is None
    error = np.abs(decode(values, scale) - z)
    assert np.all(error <= np.abs(z) * 2.0**-11 + 1e-7)


def test_int8_round_trip_within_half_a_step_per_row():
    z = np.random.default_rng(1).standard_t(3, size=(300, 3, 64)).astype(np.float32) * 5
    z[0, 0] = 0.0  # an all-zero row decodes to zeros
    values, scale = encode(z, "int8")
    assert values.dtype == np.int8 and scale.shape == (300, 3)
    back = decode(values, scale)
    bound = np.abs(z).max(axis=-1, keepdims=True) / 254 * (1 + 1e-6)
    assert np.all(np.abs(back - z) <= bound + 1e-12)
    assert np.all(back[0, 0] == 0)
    assert bytes_per_row(64, 3, "int8") == 3 * (64 + 4) and bytes_per_row(64, 3, "float16") == 3 * 128


def test_pca_reconstructs_its_span_and_loses_exactly_the_left_out_variance():
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 40, generator=g,
                                                                                  dtype=torch.float64) + 3.0
    mean, basis, kept = fit_pca(low_rank, 8)  # dim >= rank: a lossless round trip
    z = reduce_rows(low_rank.float()[:, None], mean[None], basis[None])[:, 0]
    torch.testing.assert_close(z @ basis.T + mean, low_rank.float(), atol=2e-3, rtol=1e-4)
    assert kept == pytest.approx(1.0, abs=1e-9)
    full = torch.randn(400, 20, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, 20, dtype=torch.float64)
    mean, basis, kept = fit_pca(full, 5)
    centred = full - full.mean(0)
    back = (centred.float() @ basis) @ basis.T
    lost = float(((centred.float() - back) ** 2).sum() / (centred**2).sum())
    assert lost == pytest.approx(1 - kept, rel=1e-3)
    eigen = torch.linalg.eigvalsh(centred.T @ centred).flip(0)
    assert kept == pytest.approx(float(eigen[:5].sum() / eigen.sum()), rel=1e-6)


# ------------------------------------------------------------------------------------------------ the build


def _recomputed(teacher_dir, ids: np.ndarray, layers, rows: str, mask: np.ndarray) -> torch.Tensor:
    """The teacher's hidden states [rows, C, H] by a full forward with output_hidden_states, row by row."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        states = model(input_ids=torch.tensor(ids, dtype=torch.long)[None], output_hidden_states=True).hidden_states
    stacked = torch.stack([states[i][0] for i in layers], dim=1)  # [T, C, H]
    if rows == "all":
        return stacked
    targets = np.nonzero(mask)[0]
    return stacked[torch.tensor(targets - 1)]


def test_build_stores_projected_hidden_states_equal_to_a_recomputation(tmp_path, teacher_dir, data_file):
    out = tmp_path / "cache"
    build_cache(make_config(out, teacher_dir, data_file, "data.limit=8", "hidden.layers=[1, last]",
                            "hidden.dim=16", "hidden.seed=7"))
    reader = CacheReader(str(out))
    info = reader.manifest.hidden
    assert info.layers == (1, 2) and info.dim == 16 and info.reduction == "random" and info.positions == "target"
    mean, basis = read_basis(CacheLocation(str(out)), info)
    torch.testing.assert_close(basis[1], random_orthogonal_basis(64, 16, 7))
    assert torch.all(mean == 0)
    for example in list(reader.iter_examples())[:4]:
        assert example.hidden_states.shape == (len(example.sparse_ids), 2, 16)
        expected = _recomputed(teacher_dir, example.input_ids, info.layers, "target", example.target_mask)
        projected = torch.einsum("nch,chd->ncd", expected, basis).numpy()
        stored = decode(example.hidden_states, example.hidden_scale)
        assert np.all(np.abs(stored - projected) <= np.abs(projected) * 2.0**-10 + 2e-4)
    assert verify_cache(str(out)).ok


def test_build_with_pca_int8_at_every_token_verifies_and_matches(tmp_path, teacher_dir, data_file):
    out = tmp_path / "cache"
    build_cache(make_config(out, teacher_dir, data_file, "data.limit=8", "hidden.layers=[0.5]",
                            "hidden.reduction=pca", "hidden.dim=8", "hidden.dtype=int8", "hidden.positions=all",
                            "hidden.pca_rows=300"))
    reader = CacheReader(str(out))
    info = reader.manifest.hidden
    assert info.layers == (1,) and info.pca_rows == 300 and 0 < info.pca_kept_variance[0] <= 1
    mean, basis = read_basis(CacheLocation(str(out)), info)
    for example in list(reader.iter_examples())[:3]:
        assert example.hidden_states.shape == (len(example.input_ids), 1, 8) and example.hidden_scale is not None
        expected = reduce_rows(_recomputed(teacher_dir, example.input_ids, info.layers, "all", None), mean, basis)
        stored = decode(example.hidden_states, example.hidden_scale)
        bound = np.abs(expected.numpy()).max(axis=-1, keepdims=True) / 254 + 1e-3
        assert np.all(np.abs(stored - expected.numpy()) <= bound)
    assert verify_cache(str(out)).ok


def test_resumed_build_reuses_the_basis(tmp_path, teacher_dir, data_file):
    settings = ("data.limit=12", "hidden.layers=[last]", "hidden.reduction=pca", "hidden.dim=4",
                "hidden.pca_rows=100")
    out = tmp_path / "cache"
    build_cache(make_config(out, teacher_dir, data_file, *settings), stop_after_shards=1)
    basis_files = sorted(p.name for p in out.iterdir() if p.name.startswith("hidden_basis"))
    result = build_cache(make_config(out, teacher_dir, data_file, *settings))
    assert result.finalized and verify_cache(str(out)).ok
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("hidden_basis")) == basis_files


def test_verify_names_a_damaged_basis(tmp_path, teacher_dir, data_file):
    out = tmp_path / "cache"
    build_cache(make_config(out, teacher_dir, data_file, "data.limit=5", "hidden.layers=[1]", "hidden.dim=8"))
    (basis,) = [p for p in out.iterdir() if p.name.startswith("hidden_basis")]
    content = bytearray(basis.read_bytes())
    content[len(content) // 3] ^= 0xFF  # inside the basis (the random reduction's mean is all zeros)
    basis.write_bytes(bytes(content))
    report = verify_cache(str(out))
    assert not report.ok and "sha256" in report.first_problem


def test_vllm_route_refuses_hidden_states(tmp_path, teacher_dir, data_file):
    config = make_config(tmp_path / "c", teacher_dir, data_file, "teacher.backend=vllm", "hidden.layers=[last]")
    with pytest.raises(BadInputError, match="teacher.backend=hf"):
        build_cache(config)


def test_a_cache_without_hidden_states_reads_as_before(tmp_path, teacher_dir, data_file):
    out = tmp_path / "cache"
    build_cache(make_config(out, teacher_dir, data_file, "data.limit=5"))
    reader = CacheReader(str(out))
    assert reader.manifest.hidden is None and "hidden" not in reader.manifest.to_dict()
    assert all(e.hidden_states is None for e in reader.iter_examples())
