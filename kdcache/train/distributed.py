"""DDP under torchrun: join the process group from the environment, wrap the student, and the few collectives the
trainer needs (sums for metrics, gathering per-rank resume state, barriers).

`kdcache train` runs unchanged as one process or as ``torchrun --nproc_per_node N -m kdcache.cli train ...``: when
torchrun's ``WORLD_SIZE`` is above 1 every helper here acts on the group, otherwise each is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from kdcache.errors import BadInputError

__all__ = ["Distributed", "init_distributed", "sync_context", "wrap_for_training"]


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: rank, world size, local rank, and whether it created the process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    strategy: str = "ddp"  # the run's distributed.strategy: ddp, or fsdp (kdcache.train.fsdp)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """FSDP over several ranks: parameters are shards, and every block's forward is a collective."""
        return self.enabled and self.strategy == "fsdp"

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, metrics, TensorBoard logs and the progress bar."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The profile's device made specific to this rank (``cuda:LOCAL_RANK`` on GPUs)."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" and self.enabled else device

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum of ``values`` over ranks (float64; the values themselves when alone)."""
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def all_gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order: for per-rank loader and RNG state in checkpoints."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has finished writing a checkpoint)."""
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def shutdown(self) -> None:
        """Destroy the process group if this process created it (a caller's own group is left alone)."""
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def init_distributed(device: torch.device) -> Distributed:
    """Join the group torchrun describes (``WORLD_SIZE`` > 1): nccl for CUDA, gloo for CPU; else one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_available():
        raise BadInputError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise BadInputError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): start at most that many "
                "processes per node (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": torch.device("cuda", local_rank)} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        owns = True
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, owns)


def wrap_for_training(objective: nn.Module, dist: Distributed, device: torch.device) -> nn.Module:
    """DDP around the objective (:class:`kdcache.train.objective.DistillationObjective`) when there are several ranks
    (the objective itself otherwise, or when FSDP has already sharded it: :func:`kdcache.train.fsdp.shard_objective`).

    Only trainable parameters are synchronised: frozen base weights (LoRA, QLoRA) are loaded from the same files on
    every rank, so broadcasting them at start-up would only cost time. Buffers (rotary tables, computed the same way
    on every rank; a causal LM has no running statistics) are ignored too, so DDP never re-broadcasts them per step.
    """
    if not dist.enabled or dist.sharded:
        return objective
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in objective.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in objective.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(objective, frozen)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(objective, device_ids=device_ids)


def sync_context(module: nn.Module, sync: bool):
    """DDP's ``no_sync()`` for micro-batches whose gradients are only accumulated (a no-op without DDP, and under FSDP,
    which reduce-scatters every micro-batch so that gradients stay sharded)."""
    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()
