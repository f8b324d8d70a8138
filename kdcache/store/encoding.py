"""How a shard's top-k log-probabilities sit on disk: plainly, or as quantised offsets below each row's top-1.

The plan's ``sparsifier.logprob_step`` chooses (absent: plain, as every cache before it). Offsets encoding at step
``s`` (nats), per target row of k log-probs ``lp`` (sorted, most likely first, as the topk sparsifier writes them):

- ``logprob_top`` [N]: the row's first log-prob in ``logprob_dtype`` (float16 by default): ``a = fp16(lp[0])``;
- ``logprob_offsets`` [N, k] uint16: ``c_j = round((a - lp_j) / s)``, clamped to [0, 65534]; 65535 marks ``-inf``.
  They are measured from the *stored* ``a``, so the anchor's rounding never adds to the others' error. The codes of
  a sorted row never decrease, so they are stored as their differences along the row (mod 2^16): small numbers
  that Blosc's bit-shuffle plus zstd packs into a few bits each.

Decoded, ``lp_hat_j = a - c_j * s``. Error bound, stated in docs/format.md and tested: every finite entry is within
``max(s / 2, u)`` nats of the float32 value, where ``u`` is half a unit in the last place of ``logprob_dtype`` at
``lp[0]`` (the anchor's own rounding, and the rare entry that lies above the rounded anchor), for offsets up to
65534 steps (512 nats at s = 1/128; below that both probabilities are under e^-500). A relative error of at most
``e`` in every probability gives a (k+1)-bucket KL of at most ``(e^e - 1 - e)`` times the mass it touches, about
``e^2 / 2``; rounding errors spread uniformly make it ``s^2 / 24`` times the mass outside the top-1 on average.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Offsets code meaning -inf (a row with fewer than k finite logits).
MISSING = np.uint16(65535)
_MAX_CODE = 65534

#: The on-disk arrays of the offsets encoding (replacing ``sparse_logprobs``).
TOP_ARRAY = "logprob_top"
OFFSETS_ARRAY = "logprob_offsets"
#: Zarr attribute of ``logprob_offsets`` holding the step, so a shard decodes without its plan.
STEP_ATTRIBUTE = "step"


@dataclass(frozen=True)
class LogprobEncoding:
    """How a shard writer stores top-k log-probs: ``step`` None = plainly as ``dtype`` (tails float32, as before);
    a step in nats = offsets below the top-1 (module docstring), with the top-1 and the tails in ``dtype``."""

    step: float | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.step is not None and not 0 < self.step < float("inf"):
            raise ValueError(f"LogprobEncoding.step must be a positive number of nats or None, got {self.step}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"LogprobEncoding.dtype must be 'float16' or 'float32', got {self.dtype!r}")

    @classmethod
    def of(cls, sparsifier) -> LogprobEncoding:
        """The encoding a plan's SparsifierInfo (or a SparsifierConfig) names; sample sparsifiers are plain."""
        step = getattr(sparsifier, "logprob_step", None) if sparsifier.kind == "topk" else None
        return cls(step=step, dtype=sparsifier.logprob_dtype)


def float_dtype(name: str) -> np.dtype:
    """numpy dtype of a plan's ``logprob_dtype`` ("float16" or "float32")."""
    return np.dtype(np.float16 if name == "float16" else np.float32)


def encode_offsets(logprobs: np.ndarray, step: float, anchor_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Log-probs [N, k] (sorted descending per row) -> (anchor [N] in ``anchor_dtype``, deltas [N, k] uint16).

    ``deltas`` are the row-wise differences of the offset codes (the first column is the first code, mostly 0);
    :func:`decode_offsets` inverts it exactly up to the quantisation of the module docstring.
    """
    if not step > 0:
        raise ValueError(f"step must be > 0 nats, got {step}")
    n, k = logprobs.shape
    if k == 0 or n == 0:
        return np.zeros(n, anchor_dtype), np.zeros((n, k), np.uint16)
    values = logprobs.astype(np.float64)
    anchor = values[:, 0].astype(anchor_dtype)
    with np.errstate(invalid="ignore"):
        offsets = (anchor.astype(np.float64)[:, None] - values) / step
    finite = np.isfinite(values)
    codes = np.where(finite, np.clip(np.rint(np.where(finite, offsets, 0.0)), 0, _MAX_CODE), MISSING)
    codes = codes.astype(np.uint16)
    deltas = codes.copy()
    deltas[:, 1:] -= codes[:, :-1]  # uint16 arithmetic: wraps mod 2^16, undone exactly by a uint16 cumsum
    return anchor, deltas


def decode_offsets(anchor: np.ndarray, deltas: np.ndarray, step: float) -> np.ndarray:
    """(anchor [N], deltas [N, k] uint16) -> float32 log-probs [N, k]: ``anchor - code * step``, -inf where missing."""
    codes = np.cumsum(deltas, axis=1, dtype=np.uint16)
    out = anchor.astype(np.float32)[:, None] - codes.astype(np.float32) * np.float32(step)
    out[codes == MISSING] = -np.inf
    return out


def error_bound(top_logprobs: np.ndarray, step: float, anchor_dtype: np.dtype) -> np.ndarray:
    """Per row [N]: the largest |decoded - float32| over its finite log-probs that the encoding allows (nats)."""
    top = np.abs(top_logprobs.astype(np.float64))
    _, exponent = np.frexp(np.maximum(top, np.finfo(anchor_dtype).tiny))
    half_ulp = np.ldexp(1.0, exponent - 1 - np.finfo(anchor_dtype).nmant - 1)  # half of 2^(e-1-mantissa bits)
    return np.maximum(step / 2, half_ulp)
