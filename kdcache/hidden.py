"""Teacher hidden states in the cache: which layers, how they are reduced and stored, and how a student's layers are
matched to them. Pure functions; the build (kdcache.teacher.build), the store (kdcache.store.hidden) and the trainer
(kdcache.train.hidden) use them.

Layers are indices into transformers' ``output_hidden_states``: 0 is the embeddings, i the output of block i, and
L (the number of blocks) the last one, after the final norm. A reduction fixed at build time turns each H-wide row
into ``dim`` numbers: ``z = (h - mean) @ basis`` with ``basis`` [H, dim] of orthonormal columns (a seeded random
orthogonal projection, with mean 0, or the top principal directions of a sample), or ``z = h`` (no reduction). The
numbers are stored in float16, or in int8 with one float32 scale per row and layer (``scale = max|z| / 127``).

Stated errors (tests/test_hidden.py pins them):

* float16: ``|z - decode(encode(z))| <= |z| * 2**-11`` for normal numbers (round to nearest, 11-bit significand);
* int8: ``|z - decode(encode(z))| <= scale / 2 = max|z_row| / 254`` per row and layer;
* a projection keeps inner products inside its span exactly: ``h_hat = z @ basis.T + mean`` equals ``h`` when ``h -
  mean`` lies in the span (PCA with ``dim`` >= the sample's rank), and PCA's mean squared reconstruction error on
  its sample equals the variance it leaves out (the plan records the fraction it keeps).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["bytes_per_row", "decode", "encode", "fit_pca", "random_orthogonal_basis", "reduce_rows",
           "resolve_layers", "uniform_layer_map"]

INT8_MAX = 127


def resolve_layers(requested: Sequence[int | float | str], num_layers: int) -> tuple[int, ...]:
    """Indices in [0, num_layers] of the requested layers (ints, negative from the end; fractions f in (0, 1) as
    round(f * num_layers); "last" as num_layers), in the order given, without repeats.

    >>> resolve_layers([0.5, "last", -2], 24)
    (12, 24, 23)
    """
    out: list[int] = []
    for value in requested:
        if value == "last":
            index = num_layers
        elif isinstance(value, float):
            index = int(round(value * num_layers))
        else:
            index = value + num_layers + 1 if value < 0 else value
        if not 0 <= index <= num_layers:
            raise ValueError(f"hidden layer {value!r} is outside the teacher's hidden states 0..{num_layers} "
                             f"(-{num_layers + 1}..-1 from the end)")
        if index not in out:
            out.append(index)
    return tuple(out)


def uniform_layer_map(teacher_layers: Sequence[int], teacher_depth: int, student_depth: int) -> tuple[int, ...]:
    """The student layer matched to each teacher layer: student layer s <-> teacher layer round(s * L_t / L_s), so
    teacher layer t takes s = round(t * L_s / L_t) (0 stays the embeddings, L_t the student's last)."""
    return tuple(int(round(t * student_depth / teacher_depth)) for t in teacher_layers)


def random_orthogonal_basis(hidden_size: int, dim: int, seed: int) -> Tensor:
    """A seeded random ``[hidden_size, dim]`` float32 matrix with orthonormal columns (Haar-distributed: QR of a
    Gaussian matrix, signs fixed by R's diagonal); the same on every machine for a seed (drawn in float64 on the
    CPU)."""
    if not 1 <= dim <= hidden_size:
        raise ValueError(f"dim must be in [1, hidden_size={hidden_size}], got {dim}")
    generator = torch.Generator().manual_seed(int(seed))
    gaussian = torch.randn((hidden_size, dim), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))[None, :]).float()


def fit_pca(rows: Tensor, dim: int) -> tuple[Tensor, Tensor, float]:
    """``(mean [H], basis [H, dim], kept)`` of ``rows`` [n, H]: the top ``dim`` principal directions (float32,
    each column's largest entry positive so the fit is deterministic) and the fraction of the sample's variance they
    keep. Needs ``dim <= min(n, H)``."""
    n, hidden = rows.shape
    if not 1 <= dim <= min(n, hidden):
        raise ValueError(f"dim must be in [1, min(rows={n}, hidden_size={hidden})], got {dim}")
    x = rows.detach().double().cpu()
    mean = x.mean(dim=0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    basis = vh[:dim].T
    signs = torch.sign(basis.gather(0, basis.abs().argmax(dim=0, keepdim=True)))
    basis = basis * torch.where(signs == 0, torch.ones_like(signs), signs)
    total = float((s**2).sum())
    kept = float((s[:dim] ** 2).sum()) / total if total > 0 else 1.0
    return mean.float(), basis.float(), kept


def reduce_rows(hidden: Tensor, mean: Tensor | None, basis: Tensor | None) -> Tensor:
    """float32 ``[n, C, dim]`` of hidden states ``[n, C, H]`` (C layers): ``(h - mean[c]) @ basis[c]`` per layer with
    ``mean`` [C, H] and ``basis`` [C, H, dim], or ``h`` itself when ``basis`` is None."""
    h = hidden.float()
    if basis is None:
        return h
    basis = basis.to(device=h.device, dtype=torch.float32)
    if mean is not None:
        h = h - mean.to(device=h.device, dtype=torch.float32)[None]
    return torch.einsum("nch,chd->ncd", h, basis)


def encode(values: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The stored form of float32 ``values`` [n, C, d]: ``(float16 values, None)``, or for ``int8`` ``(int8 values,
    float32 scale [n, C])`` with ``scale = max|row| / 127`` (1 for an all-zero row)."""
    values = np.asarray(values, dtype=np.float32)
    if dtype == "float16":
        return values.astype(np.float16), None
    if dtype != "int8":
        raise ValueError(f"dtype must be float16 or int8, got {dtype!r}")
    peak = np.abs(values).max(axis=-1) if values.shape[-1] else np.zeros(values.shape[:-1], np.float32)
    scale = np.where(peak > 0, peak / INT8_MAX, 1.0).astype(np.float32)
    quantised = np.clip(np.rint(values / scale[..., None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return quantised, scale


def decode(values: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """float32 values of the stored form (:func:`encode`'s inverse, up to its rounding)."""
    out = np.asarray(values).astype(np.float32)
    return out if scale is None else out * np.asarray(scale, dtype=np.float32)[..., None]


def bytes_per_row(dim: int, num_layers: int, dtype: str) -> int:
    """Bytes of one stored row (a target or a token) before compression: values plus int8's scales."""
    return num_layers * (2 * dim if dtype == "float16" else dim + 4)
