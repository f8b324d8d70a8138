"""FSDP under torchrun (``distributed.strategy: fsdp``): the student's parameters, gradients and AdamW states sharded
over the ranks with torch's FSDP2 (``torch.distributed.fsdp.fully_shard``), so a student larger than one GPU trains.

How the student is split (:func:`shard_objective`):

- each transformer block (the classes the model lists in ``_no_split_modules``, e.g. ``Qwen2DecoderLayer``) is its
  own FSDP unit: all-gathered just before its forward (and again for backward), resharded after;
- everything else (embeddings, final norm, the LM head, a hidden-state projector) is the root unit, the
  :class:`kdcache.train.objective.DistillationObjective` itself. FSDP2 all-gathers the root's parameters once when the
  objective's ``forward`` starts and keeps them whole until its backward is done. The chunked loss calls the LM head
  once per chunk of target positions, in forward and again when each chunk is recomputed in backward; with the head in
  the root unit, every one of those calls sees the full weight and no chunk issues a collective. Ranks hold different
  numbers of target positions and so run different numbers of chunks: a head sharded as a unit of its own would
  all-gather per call, and ranks with fewer chunks would leave the others waiting forever. The price: the embeddings
  and the head (about an eighth of a 7-8B model) are whole on every GPU during a step (docs/training.md).

Held-out evaluation keeps the root unit whole (:func:`unsharded_root`) and runs the ranks in :func:`lockstep`: each
block's forward is a collective, and ranks hold different numbers of held-out batches.

Gradient accumulation reduce-scatters after every micro-batch (FSDP2 without ``set_requires_gradient_sync``): the
gradients stay sharded between micro-batches, which is the memory FSDP is chosen for (skipping the reduce-scatter would
keep every gradient whole on every rank until the optimizer step).

Checkpoints: full tensors gathered to rank 0 (:func:`full_tensors`), written in the same safetensors + JSON format as a
DDP or single-process run (kdcache.train.checkpoint), and cut back into this rank's shards on resume
(:func:`load_full_parameter`, :func:`sharded_optimizer_state`). torch.distributed.checkpoint would write per-rank files
without gathering, but its metadata file is a pickle, which a kdcache run folder never holds (loading a folder someone
else wrote cannot run code). The price is rank 0's CPU memory for the full trained state at each save
(docs/training.md). final/ and best/ are plain Hugging Face folders (or peft adapters), as without FSDP.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from kdcache.errors import BadInputError

__all__ = ["full_tensor", "full_tensors", "is_sharded", "load_full_parameter", "lockstep", "shard_objective",
           "sharded_optimizer_state", "unsharded_root"]

log = logging.getLogger(__name__)


def _dtensor_type():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor) -> bool:
    """Whether ``tensor`` is an FSDP2 shard (a DTensor)."""
    DTensor = _dtensor_type()
    return DTensor is not None and isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (an all-gather every rank must join), or ``tensor`` itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def full_tensors(value, keep: bool = True):
    """``value`` (nested dicts, lists, tuples; e.g. an optimizer's ``state_dict()``) with every tensor whole and on the
    CPU, gathered one at a time (so the GPU never holds more than one whole tensor). ``keep=False`` (ranks other than
    0) joins the gathers but keeps nothing: its tensors come back as None.

    Collective when anything is sharded: every rank calls it on a structure of the same shape."""
    if isinstance(value, dict):
        return {k: full_tensors(v, keep) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(full_tensors(v, keep) for v in value)
    if not isinstance(value, torch.Tensor):
        return value
    whole = full_tensor(value.detach())
    return whole.cpu().clone() if keep else None


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: instances of the classes its Hugging Face class declares in
    ``_no_split_modules`` (what Accelerate's FSDP auto-wrap uses too), outermost first."""
    from transformers import PreTrainedModel

    names: set[str] = set()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            names.update(getattr(module, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    inner = {id(sub) for block in blocks for sub in block.modules() if sub is not block}
    return [block for block in blocks if id(block) not in inner]


def shard_objective(objective: nn.Module, device: torch.device, dist) -> None:
    """Shard ``objective`` (a DistillationObjective whose student may sit on the CPU) in place over the ranks of
    ``dist`` (a :class:`kdcache.train.distributed.Distributed`), on ``device``'s type: one FSDP unit per transformer block, the rest in the root unit (module docstring).

    Parameters move to ``device`` unit by unit, so a rank never holds more than one block whole on the GPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    blocks = _blocks(objective.model)
    if not blocks:
        raise BadInputError(
            f"distributed.strategy=fsdp shards the student block by block, but {type(objective.model).__name__} "
            "names no transformer block classes (_no_split_modules): use distributed.strategy=ddp")
    mesh = init_device_mesh(device.type, (dist.world_size,))
    kind = type(blocks[0]).__name__  # before fully_shard renames the classes (FSDP<name>)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(objective, mesh=mesh)
    if dist.is_main:
        log.info("FSDP: the student's %d %s blocks and the rest (embeddings, head) sharded over %d ranks",
                 len(blocks), kind, dist.world_size)


@contextlib.contextmanager
def unsharded_root(objective: nn.Module, sharded: bool):
    """Keep the root unit (embeddings, LM head, projector) whole while the student is used outside the objective's
    forward (held-out evaluation calls the decoder and the head directly). A no-op unless ``sharded``."""
    if not sharded:
        yield
        return
    objective.unshard()
    try:
        yield
    finally:
        objective.reshard()


def lockstep(batches, dist, device: torch.device, idle):
    """The batches of ``batches`` (this rank's share), with every rank going round the same number of times.

    Under FSDP each block's forward is a collective, so ranks must run the same number of forwards: once this rank's
    share has run out and another rank's has not, ``idle(last)`` runs a forward whose result is dropped (``last``: the
    rank's last batch, None if it had none). One all-reduce of a flag per round. Without FSDP: ``batches`` as they are.
    """
    if not dist.sharded:
        yield from batches
        return
    iterator, last = iter(batches), None
    while True:
        batch = next(iterator, None)
        if dist.all_sum([float(batch is not None)], device)[0] == 0:
            return
        if batch is None:
            idle(last)
        else:
            last = batch
            yield batch


def load_full_parameter(param: nn.Parameter, value: torch.Tensor) -> None:
    """Copy a whole tensor from a checkpoint into ``param``: into this rank's shard when ``param`` is sharded."""
    with torch.no_grad():
        if is_sharded(param):
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(device=param.device, dtype=param.dtype), param.device_mesh,
                                      param.placements, src_data_rank=None)  # each rank cuts its own shard
        param.data.copy_(value)


def sharded_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """``saved`` (a full optimizer ``state_dict``, as a checkpoint holds it) with each state tensor shaped like its
    parameter cut into this rank's shard of that parameter, for ``optimizer.load_state_dict`` (scalars such as
    AdamW's ``step`` stay as they are). ``saved`` itself when no parameter is sharded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(is_sharded(p) for p in params):
        return saved
    from torch.distributed.tensor import distribute_tensor

    ids = [i for group in saved["param_groups"] for i in group["params"]]
    by_id = dict(zip(ids, params))
    state = {}
    for key, values in saved["state"].items():
        param = by_id[key]
        state[key] = {name: distribute_tensor(v.to(param.device), param.device_mesh, param.placements,
                                              src_data_rank=None)
                      if is_sharded(param) and isinstance(v, torch.Tensor) and v.shape == param.shape else v
                      for name, v in values.items()}
    return {**saved, "state": state}
