"""Teacher hidden states in a cache: the plan's `hidden` record, the basis file, and verify's checks of the arrays.

A cache with hidden states has, besides the logits, per shard ``tokens.zarr/hidden_states`` ([rows, C, dim],
float16 or int8) and, for int8, ``tokens.zarr/hidden_scale`` ([rows, C] float32), where rows are the shard's targets
(``positions: target``) or its tokens (``positions: all``) in the same order as ``sparse_ids`` or ``input_ids``, and
C is the number of layers. A projecting reduction also writes ``hidden_basis-<hash>.safetensors`` at the cache's
root (``mean`` [C, H] and ``basis`` [C, H, dim], float32), named by the plan with its sha256: the plan (and so every
shard's plan hash) is tied to the basis. A plan without `hidden` has no hidden states (caches before them read as
before). The maths is kdcache.hidden's.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from kdcache.store.fingerprint import file_sha256
from kdcache.store.schema import FieldError, Record, check_at_least, omitted_when_none

__all__ = ["HiddenInfo", "check_hidden_arrays", "read_basis", "write_basis"]

_BASIS_FILE = re.compile(r"hidden_basis-[0-9a-f]{16}\.safetensors")
MAX_BASIS_BYTES = 1 << 34


@dataclass(frozen=True, kw_only=True)
class HiddenInfo(Record):
    """The plan's `hidden` record: which teacher hidden states the shards hold and in which form."""

    layers: tuple[int, ...]  # indices into output_hidden_states (0 = embeddings, num_layers = after the final norm)
    num_layers: int  # the teacher's blocks (L_t), for matching a student's layers
    hidden_size: int  # the teacher's H
    positions: Literal["target", "all"]
    reduction: Literal["random", "pca", "none"]
    dim: int  # numbers stored per row and layer (hidden_size when reduction is none)
    dtype: Literal["float16", "int8"]
    seed: int | None = omitted_when_none()  # reduction random
    pca_rows: int | None = omitted_when_none()  # reduction pca: rows of the first shard the basis was fitted on
    pca_kept_variance: tuple[float, ...] | None = omitted_when_none()  # reduction pca: per layer
    basis_file: str | None = omitted_when_none()  # random and pca: at the cache's root
    basis_sha256: str | None = omitted_when_none()

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "dim"):
            check_at_least(self, name, 1)
        if not self.layers or any(not 0 <= i <= self.num_layers for i in self.layers):
            raise FieldError("layers", f"a non-empty list of indices in [0, {self.num_layers}]", list(self.layers))
        if self.reduction == "none" and self.dim != self.hidden_size:
            raise FieldError("dim", f"{self.hidden_size} (the hidden size) without a reduction", self.dim)
        if self.dim > self.hidden_size:
            raise FieldError("dim", f"at most the hidden size {self.hidden_size}", self.dim)
        projected = self.reduction != "none"
        if projected != (self.basis_file is not None) or projected != (self.basis_sha256 is not None):
            raise FieldError("basis_file", "present (with basis_sha256) exactly when there is a reduction",
                             self.basis_file)
        if self.basis_file is not None and not _BASIS_FILE.fullmatch(self.basis_file):
            raise FieldError("basis_file", "hidden_basis-<16 hex digits>.safetensors", self.basis_file)

    @property
    def row_name(self) -> str:
        """What a stored row belongs to: "targets" or "tokens"."""
        return "targets" if self.positions == "target" else "tokens"


def write_basis(location, mean: torch.Tensor, basis: torch.Tensor) -> tuple[str, str]:
    """Write ``mean`` [C, H] and ``basis`` [C, H, dim] to the cache root under a name made of their hash (so
    workers that fit different bases never overwrite each other's); returns ``(file name, sha256 hex)``."""
    from safetensors.torch import save

    payload = save({"mean": mean.float().contiguous().cpu(), "basis": basis.float().contiguous().cpu()})
    digest = file_sha256(payload)
    name = f"hidden_basis-{digest[:16]}.safetensors"
    path = location.path(name)
    if not location.exists(path):
        if location.is_local:
            os.replace(location._write_temp(path, payload), path)
        else:
            location.fs.pipe_file(path, payload)
    return name, digest


def read_basis(location, info: HiddenInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean [C, H], basis [C, H, dim])`` from the cache, its sha256 checked against the plan."""
    from safetensors.torch import load

    from kdcache.errors import CacheFormatError

    payload = location.read_bytes(location.path(info.basis_file), MAX_BASIS_BYTES)
    if file_sha256(payload) != info.basis_sha256:
        raise CacheFormatError(f"{info.basis_file} of {location.url} does not match the sha256 its plan records; "
                               "the cache was changed after it was built: rebuild it")
    tensors = load(payload)
    mean, basis = tensors["mean"], tensors["basis"]
    shape = (len(info.layers), info.hidden_size, info.dim)
    if tuple(basis.shape) != shape or tuple(mean.shape) != shape[:2]:
        raise CacheFormatError(f"{info.basis_file} of {location.url} holds a basis of shape {tuple(basis.shape)}, "
                               f"the plan says {list(shape)}: rebuild the cache")
    return mean, basis


def check_hidden_arrays(info: HiddenInfo | None, data) -> str | None:
    """verify: the shard's hidden arrays have the plan's shape and dtype, one row per target or token, and are
    finite (None when all is well)."""
    values, scale = data.hidden_states, data.hidden_scale
    if info is None:
        return None if values is None and scale is None else "hidden_states are stored but the plan has no hidden"
    rows = data.num_targets if info.positions == "target" else data.num_tokens
    shape = (rows, len(info.layers), info.dim)
    dtype = np.float16 if info.dtype == "float16" else np.int8
    if values is None or values.shape != shape or values.dtype != dtype:
        found = None if values is None else f"{list(values.shape)} {values.dtype}"
        return f"hidden_states is not {list(shape)} {np.dtype(dtype)} (one row per {info.row_name[:-1]}); found {found}"
    if info.dtype == "int8":
        if scale is None or scale.shape != shape[:2] or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            return f"hidden_scale is missing, not {list(shape[:2])}, or not positive and finite"
    elif scale is not None:
        return "hidden_scale is stored but hidden_states are float16"
    elif not np.all(np.isfinite(values)):
        return "hidden_states hold NaN or infinity"
    return None
