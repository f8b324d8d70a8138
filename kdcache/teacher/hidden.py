"""The build's half of hidden-state storage: the plan's `hidden` record with its basis (seeded, or PCA fitted on the
first shard), and the reduced rows a shard keeps. Formats and maths: kdcache.store.hidden and kdcache.hidden."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kdcache.config import CacheBuildConfig
from kdcache.errors import BadInputError
from kdcache.hidden import encode, fit_pca, random_orthogonal_basis, reduce_rows, resolve_layers
from kdcache.store.hidden import HiddenInfo, read_basis, write_basis
from kdcache.store.location import PLAN_FILE

__all__ = ["HiddenPlan", "check_hidden_config", "plan_hidden"]

VLLM_REFUSAL = ("hidden.layers needs teacher.backend=hf: vLLM's engine does not hand out intermediate layers' hidden "
                "states; build this cache with the transformers backend, or set hidden.layers=[]")


@dataclass(frozen=True)
class HiddenPlan:
    """What the shard writer needs: the plan's record and the reduction's tensors (None without a reduction)."""

    info: HiddenInfo
    mean: torch.Tensor | None  # [C, H]
    basis: torch.Tensor | None  # [C, H, dim]

    def reduce(self, rows: torch.Tensor) -> torch.Tensor:
        """[n, C, H] hidden states -> float32 [n, C, dim] (on their device)."""
        return reduce_rows(rows, self.mean, self.basis)

    def shard_arrays(self, per_example: list[np.ndarray]) -> dict[str, np.ndarray | None]:
        """The shard's ``hidden_states`` (and int8's ``hidden_scale``) from each example's float32 rows."""
        info = self.info
        rows = (np.concatenate(per_example) if per_example else
                np.zeros((0, len(info.layers), info.dim), np.float32))
        values, scale = encode(rows, info.dtype)
        return {"hidden_states": values, "hidden_scale": scale}


def check_hidden_config(config: CacheBuildConfig) -> None:
    """Refuse what cannot be built, before anything is loaded."""
    if config.hidden.layers and config.teacher.backend != "hf":
        raise BadInputError(VLLM_REFUSAL)


def _teacher_shape(config: CacheBuildConfig, backend) -> tuple[int, int]:
    """(blocks, hidden size) of the teacher: from the loaded model, else from its config file alone."""
    model_config = getattr(getattr(backend, "model", None), "config", None)
    if model_config is None:
        from transformers import AutoConfig

        try:
            model_config = AutoConfig.from_pretrained(config.teacher.model, revision=config.teacher.revision,
                                                      trust_remote_code=config.teacher.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise BadInputError(f"cannot read the config of the teacher '{config.teacher.model}': {exc}") from None
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return int(text.num_hidden_layers), int(text.hidden_size)


def _existing(location, settings: dict) -> HiddenPlan | None:
    """The hidden plan of an existing plan.json with the same settings (a resumed build or another worker), so the
    basis it names is reused rather than fitted again."""
    from kdcache.store.manifest import read_plan

    if not location.exists(location.path(PLAN_FILE)):
        return None
    found = read_plan(location).hidden
    if found is None or any(getattr(found, name) != value for name, value in settings.items()):
        return None  # the plan check that follows lists the differences
    if found.basis_file is None:
        return HiddenPlan(found, None, None)
    return HiddenPlan(found, *read_basis(location, found))


def plan_hidden(config: CacheBuildConfig, location, backend, first_shard_ids: list[list[int]]) -> HiddenPlan | None:
    """The plan's `hidden` record and its reduction (None when `hidden.layers` is empty).

    `backend` must be loaded for reduction=pca (the basis is fitted on the teacher's hidden states of every token of
    `first_shard_ids`, at most `pca_rows` of them, taken evenly); otherwise it may be None.
    """
    spec = config.hidden
    if not spec.layers:
        return None
    check_hidden_config(config)
    depth, hidden_size = _teacher_shape(config, backend)
    try:
        layers = resolve_layers(spec.layers, depth)
    except ValueError as exc:
        raise BadInputError(f"{exc}: fix hidden.layers") from None
    dim = hidden_size if spec.reduction == "none" else spec.dim
    if dim > hidden_size:
        raise BadInputError(f"hidden.dim={dim} is more than the teacher's hidden size {hidden_size}: lower it, or set "
                            "hidden.reduction=none to store the states whole")
    settings = dict(layers=layers, num_layers=depth, hidden_size=hidden_size, positions=spec.positions,
                    reduction=spec.reduction, dim=dim, dtype=spec.dtype,
                    seed=spec.seed if spec.reduction == "random" else None,
                    pca_rows=spec.pca_rows if spec.reduction == "pca" else None)
    existing = _existing(location, settings)
    if existing is not None:
        return existing
    if spec.reduction == "none":
        return HiddenPlan(HiddenInfo(**settings), None, None)
    kept = None
    if spec.reduction == "random":
        one = random_orthogonal_basis(hidden_size, dim, spec.seed)
        basis = one[None].expand(len(layers), -1, -1).contiguous()
        mean = torch.zeros((len(layers), hidden_size))
    else:
        mean, basis, kept = _fit_pca(config, backend, layers, first_shard_ids, dim)
    name, digest = write_basis(location, mean, basis)
    info = HiddenInfo(**settings, basis_file=name, basis_sha256=digest, pca_kept_variance=kept)
    return HiddenPlan(info, mean, basis)


def _fit_pca(config: CacheBuildConfig, backend, layers: tuple[int, ...], sequences: list[list[int]], dim: int):
    spec, collected, count = config.hidden, [], 0
    for start in range(0, len(sequences), config.teacher.batch_size):
        batch = sequences[start : start + config.teacher.batch_size]
        masks = [[False] * len(ids) for ids in batch]
        _, rows = backend.score_with_hidden(batch, masks, lambda logits, part: None, layers, "all", None)
        collected.extend(r.float() for r in rows)
        count += sum(r.shape[0] for r in rows)
        if count >= 4 * spec.pca_rows:  # enough to take pca_rows evenly from
            break
    sample = torch.cat(collected) if collected else torch.zeros((0, len(layers), 1))
    if sample.shape[0] > spec.pca_rows:
        keep = torch.randperm(sample.shape[0], generator=torch.Generator().manual_seed(spec.seed))[: spec.pca_rows]
        sample = sample[keep.sort().values]
    if sample.shape[0] < dim:
        raise BadInputError(f"hidden.reduction=pca with hidden.dim={dim}, but the first shard has only "
                            f"{sample.shape[0]} tokens to fit it on: lower hidden.dim or use hidden.reduction=random")
    fits = [fit_pca(sample[:, c], dim) for c in range(len(layers))]
    mean = torch.stack([m for m, _, _ in fits])
    basis = torch.stack([b for _, b, _ in fits])
    return mean, basis, tuple(round(k, 6) for k in (kept for _, _, kept in fits))
