"""How a shard's top-k log-probabilities sit on disk: plainly, or as quantised offsets below each row's top-1.

The plan's ``sparsifier.logprob_step`` chooses (absent: plain, as every cache before it). Offsets encoding at step
``s`` (nats), per target row of k log-probs ``lp`` (sorted, most likely first, as the topk sparsifier writes them):

- ``logprob_top`` [N]: the row's first log-prob in ``logprob_dtype`` (float16 by default): ``a = fp16(lp[0])``;
- ``logprob_offsets`` [N, k] uint16: ``c_j = round((a - lp_j) / s)``, clamped to [0, 65534]; 65535 marks ``-inf``.
  They are measured from the *stored* ``a``, so the anchor's rounding never adds to the others' error. The codes of
  a sorted row never decrease, so they are stored as their differences along the row (mod 2^16): small numbers
  that Blosc's bit-shuffle plus zstd packs into a few bits each.

With a ``growth`` g (nats; the default), the step grows with the offset d = a - lp_j: uniform for the first g / 2
nats below the top-1, then e-fold every g nats. The codes quantise the companded offset ``u = G(d)`` in steps of
``s``, with ``G(d) = d`` up to the knee ``D = g / 2`` and ``D + g * (1 - exp(-(d - D) / g))`` beyond (u < D + g),
so an entry d > D nats down is rounded to a step of about ``s * exp((d - D) / g)``. An entry's weight in the KL
is its probability, ``p_0 * exp(-d)``, so deep entries need far less precision than the top ones: their expected
KL terms ``p_j * step_j^2 / 24`` fall off as ``exp(-d / 2)`` at g = 4, and the bytes go where the KL is, while the
entries within D of the top-1 (probability above 0.13 * p_0 at g = 4) keep the full step, so rows with many
near-equal entries keep the uniform step's KL. Codes run to ``ceil((D + g) / s) - 1``; the last one decodes to
about ``D + g * ln(g / s)`` nats below the top-1 (29.7 nats at s = 2^-8, g = 4), and deeper entries (probability
under ``p_0 * 1e-12``) are stored there. Every entry above that depth is within ``G^-1(u_c + s / 2) - G^-1(u_c)``
nats of its float32 value, u_c = c_j * s (:func:`growth_error_bound`).

Uniform steps (``growth`` None): decoded, ``lp_hat_j = a - c_j * s``. Error bound, stated in docs/format.md and tested: every finite entry is within
``max(s / 2, u)`` nats of the float32 value, where ``u`` is half a unit in the last place of ``logprob_dtype`` at
``lp[0]`` (the anchor's own rounding, and the rare entry that lies above the rounded anchor), for offsets up to
65534 steps (512 nats at s = 1/128; below that both probabilities are under e^-500). A relative error of at most
``e`` in every probability gives a (k+1)-bucket KL of at most ``(e^e - 1 - e)`` times the mass it touches, about
``e^2 / 2``; rounding errors spread uniformly make it ``s^2 / 24`` times the mass outside the top-1 on average.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

#: Offsets code meaning -inf (a row with fewer than k finite logits).
MISSING = np.uint16(65535)
_MAX_CODE = 65534

#: The on-disk arrays of the offsets encoding (replacing ``sparse_logprobs``).
TOP_ARRAY = "logprob_top"
OFFSETS_ARRAY = "logprob_offsets"
#: Zarr attributes of ``logprob_offsets`` holding the step and the growth, so a shard decodes without its plan.
STEP_ATTRIBUTE = "step"
GROWTH_ATTRIBUTE = "growth"


@dataclass(frozen=True)
class LogprobEncoding:
    """How a shard writer stores top-k log-probs: ``step`` None = plainly as ``dtype`` (tails float32, as before);
    a step in nats = offsets below the top-1 (module docstring), with the top-1 and the tails in ``dtype``;
    ``growth`` (nats, offsets only) makes the step grow with the offset, None keeps it uniform."""

    step: float | None = None
    dtype: str = "float32"
    growth: float | None = None

    def __post_init__(self) -> None:
        if self.step is not None and not 0 < self.step < float("inf"):
            raise ValueError(f"LogprobEncoding.step must be a positive number of nats or None, got {self.step}")
        if self.growth is not None and (self.step is None or not 0 < self.growth < float("inf")):
            raise ValueError(f"LogprobEncoding.growth must be a positive number of nats with a step, or None, "
                             f"got {self.growth}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"LogprobEncoding.dtype must be 'float16' or 'float32', got {self.dtype!r}")

    @classmethod
    def of(cls, sparsifier) -> LogprobEncoding:
        """The encoding a plan's SparsifierInfo (or a SparsifierConfig) names; sample sparsifiers are plain."""
        step = getattr(sparsifier, "logprob_step", None) if sparsifier.kind == "topk" else None
        growth = getattr(sparsifier, "logprob_growth", None) if step is not None else None
        return cls(step=step, dtype=sparsifier.logprob_dtype, growth=growth)


def float_dtype(name: str) -> np.dtype:
    """numpy dtype of a plan's ``logprob_dtype`` ("float16" or "float32")."""
    return np.dtype(np.float16 if name == "float16" else np.float32)


def _max_code(step: float, growth: float | None) -> int:
    return _MAX_CODE if growth is None else min(_MAX_CODE, math.ceil(1.5 * growth / step) - 1)


def _compand(d: np.ndarray, growth: float) -> np.ndarray:
    """Offsets d >= 0 (nats) -> u = G(d) of the module docstring, in [0, 1.5 * growth)."""
    knee = growth / 2
    return np.where(d <= knee, d, knee - growth * np.expm1(-np.maximum(d - knee, 0.0) / growth))


@functools.lru_cache(maxsize=8)
def _expand_table(step: float, growth: float) -> np.ndarray:
    """float32 [max code + 1]: the decoded offset of every code (read-only)."""
    table = _expand(np.arange(_max_code(step, growth) + 1, dtype=np.float64) * step, growth).astype(np.float32)
    table.flags.writeable = False
    return table


def _expand(u: np.ndarray, growth: float) -> np.ndarray:
    """The inverse of :func:`_compand`: u in [0, 1.5 * growth) -> d (inf from 1.5 * growth on)."""
    knee = growth / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        beyond = knee - growth * np.log1p(-np.clip(u - knee, 0.0, growth) / growth)
    return np.where(u <= knee, u, beyond)


def encode_offsets(logprobs: np.ndarray, step: float, anchor_dtype: np.dtype,
                   growth: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Log-probs [N, k] (sorted descending per row) -> (anchor [N] in ``anchor_dtype``, deltas [N, k] uint16).

    ``deltas`` are the row-wise differences of the offset codes (the first column is the first code, mostly 0);
    :func:`decode_offsets` inverts it exactly up to the quantisation of the module docstring.
    """
    if not step > 0:
        raise ValueError(f"step must be > 0 nats, got {step}")
    n, k = logprobs.shape
    if k == 0 or n == 0:
        return np.zeros(n, anchor_dtype), np.zeros((n, k), np.uint16)
    # float32 throughout, in place where it can be (6x faster than float64 on a build's shard): the anchor (an fp16
    # or fp32 value) and the log-probs are exact in float32, and d = a - lp rounds by at most 2^-24 relative, four
    # orders below the step's half, so a code changes only on a near-tie and then within the tested bounds.
    values = np.asarray(logprobs, dtype=np.float32)
    anchor = values[:, 0].astype(anchor_dtype)
    missing = ~np.isfinite(values)
    with np.errstate(invalid="ignore"):
        d = anchor.astype(np.float32)[:, None] - values  # +inf where missing (nan for an all -inf row)
    np.maximum(d, np.float32(0.0), out=d)  # an entry above the rounded anchor counts as d = 0
    if growth is not None:  # the companded offset, only where it differs from d (beyond the knee)
        knee = np.float32(growth / 2)
        deep = d > knee
        d[deep] = _compand(d[deep], growth)
    d /= np.float32(step)
    np.rint(d, out=d)
    np.minimum(d, np.float32(_max_code(step, growth)), out=d)
    d[missing] = 0.0
    codes = d.astype(np.uint16)
    codes[missing] = MISSING
    deltas = codes.copy()
    deltas[:, 1:] -= codes[:, :-1]  # uint16 arithmetic: wraps mod 2^16, undone exactly by a uint16 cumsum
    return anchor, deltas


def decode_offsets(anchor: np.ndarray, deltas: np.ndarray, step: float, growth: float | None = None) -> np.ndarray:
    """(anchor [N], deltas [N, k] uint16) -> float32 log-probs [N, k]: ``anchor - code * step`` (uniform) or
    ``anchor - G^-1(code * step)`` (with a growth); -inf where missing."""
    codes = np.cumsum(deltas, axis=1, dtype=np.uint16)
    missing = codes == MISSING
    if growth is None:
        out = anchor.astype(np.float32)[:, None] - codes.astype(np.float32) * np.float32(step)
    else:
        table = _expand_table(step, growth)  # one gather instead of a log per entry (the reader's hot loop)
        out = anchor.astype(np.float32)[:, None] - table[np.minimum(codes, len(table) - 1)]
    out[missing] = -np.inf
    return out


def growth_error_bound(decoded: np.ndarray, anchor: np.ndarray, step: float, growth: float) -> np.ndarray:
    """Per entry [N, k] of :func:`decode_offsets` with a growth: the largest |decoded - true| (nats) the rounding
    allows, ``G^-1(u + step / 2) - G^-1(u)`` at the entry's companded offset ``u`` (the upper side of its rounding
    interval: G^-1 is convex); inf at the last code (entries deeper than it are stored there) and 0 where missing.
    The anchor's own rounding (``error_bound``'s half ulp) is not included: it moves every entry of the row alike."""
    finite = np.isfinite(decoded)
    d = np.where(finite, anchor.astype(np.float64)[:, None] - decoded.astype(np.float64), 0.0)
    u = np.rint(_compand(np.maximum(d, 0.0), growth) / step) * step
    last = np.rint(u / step) >= _max_code(step, growth)
    bound = _expand(u + step / 2, growth) - _expand(u, growth)
    return np.where(last, np.inf, np.where(finite, bound, 0.0))


def error_bound(top_logprobs: np.ndarray, step: float, anchor_dtype: np.dtype) -> np.ndarray:
    """Per row [N]: the largest |decoded - float32| over its finite log-probs that the uniform encoding allows
    (nats): ``max(step / 2, u)`` with ``u`` the anchor's half ulp in ``anchor_dtype``."""
    top = np.abs(top_logprobs.astype(np.float64))
    _, exponent = np.frexp(np.maximum(top, np.finfo(anchor_dtype).tiny))
    half_ulp = np.ldexp(1.0, exponent - 1 - np.finfo(anchor_dtype).nmant - 1)  # half of 2^(e-1-mantissa bits)
    return np.maximum(step / 2, half_ulp)
