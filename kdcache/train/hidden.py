"""The trainer's hidden-state term: a learned linear projector from chosen student layers to the cache's hidden-state
space, the student's rows that meet the cached ones, and the distance between them (docs/losses.md).

The projector is trained with the adapters, kept in every checkpoint (so a resumed run is exact), saved beside the
adapter as ``hidden_projector.safetensors`` in ``final/`` and ``best/``, and dropped by ``kdcache export`` (only the
student is merged).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcache.errors import BadInputError
from kdcache.hidden import uniform_layer_map
from kdcache.modeling import decoder_depth, layer_hidden_states

__all__ = ["HiddenProjector", "HiddenTerm", "PROJECTOR_FILE", "hidden_state_loss", "student_layers_for",
           "student_rows"]

PROJECTOR_FILE = "hidden_projector.safetensors"


def hidden_state_loss(student: Tensor, teacher: Tensor, kind: str = "mse") -> Tensor:
    """Per-row distance [N] between projected student hidden states and cached teacher ones, both ``[N, C, d]``
    (C layers of d numbers), averaged over the layers: ``mse`` is the mean over d of the squared difference,
    ``cosine`` is ``1 - cos(student, teacher)``. Computed in float32 (float64 kept)."""
    if student.shape != teacher.shape or student.dim() != 3:
        raise ValueError(f"student and teacher hidden states must both be [N, C, d], got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    s, t = student.to(dtype), teacher.to(device=student.device, dtype=dtype)
    if kind == "mse":
        per_layer = (s - t).pow(2).mean(dim=-1)
    elif kind == "cosine":
        per_layer = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    else:
        raise ValueError(f"kind must be mse or cosine, got {kind!r}")
    return per_layer.mean(dim=-1)


class HiddenProjector(nn.Module):
    """One ``nn.Linear(student_hidden, dim)`` per matched layer: ``[N, C, H_s] -> [N, C, dim]``."""

    def __init__(self, student_hidden: int, dim: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(student_hidden, dim) for _ in range(num_layers))

    def forward(self, rows: Tensor) -> Tensor:
        return torch.stack([layer(rows[:, c]) for c, layer in enumerate(self.layers)], dim=1)

    def save(self, folder: Path, state: dict | None = None) -> None:
        """hidden_projector.safetensors in ``folder``: ``state`` (whole tensors, e.g. gathered under FSDP) or this
        projector's own."""
        from safetensors.torch import save_file

        state = self.state_dict() if state is None else state
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / PROJECTOR_FILE))


@dataclass
class HiddenTerm:
    """What the objective needs for the hidden term of one micro-batch."""

    projector: nn.Module
    student_layers: tuple[int, ...]
    positions: str  # "target" or "all", as the cache stores them
    kind: str  # "mse" or "cosine"
    weight: float


def student_layers_for(info, model, explicit: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """The student layer (an ``output_hidden_states`` index) matched to each cached teacher layer: ``explicit`` when
    given, else uniform by depth (:func:`kdcache.hidden.uniform_layer_map`)."""
    depth = decoder_depth(model)
    if not explicit:
        return uniform_layer_map(info.layers, info.num_layers, depth)
    if len(explicit) != len(info.layers) or any(not 0 <= s <= depth for s in explicit):
        raise BadInputError(f"hidden_student_layers must give one student layer in [0, {depth}] for each of the "
                            f"cache's {len(info.layers)} teacher layers {list(info.layers)}, got {list(explicit)}")
    return tuple(int(s) for s in explicit)


def check_hidden_for_cache(loss, manifest) -> None:
    """Refuse a hidden term on a cache without hidden states (one line, before the model is loaded)."""
    if loss.hidden_weight > 0 and manifest.hidden is None:
        raise BadInputError("loss.hidden_weight > 0 but this cache stores no teacher hidden states: rebuild it with "
                            "hidden.layers set (docs/format.md), or set loss.hidden_weight=0")


def student_rows(model, input_ids: Tensor, attention_mask: Tensor, target_mask: Tensor, layers: tuple[int, ...],
                 positions: str) -> tuple[Tensor, Tensor]:
    """``(final [N, H], chosen [R, C, H])`` from one decoder pass: the final hidden states that predict the N targets
    (position t - 1, row-major, as :func:`kdcache.modeling.target_hidden_states`), and the ``layers`` at the rows the
    cache stores: the same N positions (``positions="target"``) or every real token (``"all"``), row-major."""
    rows, cols = target_mask.nonzero(as_tuple=True)
    if cols.numel() and bool((cols == 0).any()):
        raise ValueError("position 0 cannot be a target: nothing before it predicts it")
    final, chosen = layer_hidden_states(model, input_ids, attention_mask, layers)
    at_rows, at_cols = (rows, cols - 1) if positions == "target" else attention_mask.bool().nonzero(as_tuple=True)
    return final[rows, cols - 1], torch.stack([h[at_rows, at_cols] for h in chosen], dim=1)
