"""Checkpoints of a training run: generations that survive a kill at any point and load without running code.

A run folder (``--out``) holds::

    checkpoint.json             the pointer, written last: {"checkpoint": "checkpoint-000012", "step": 12}
    checkpoint-000012/          one generation, named by its step
        trainable.safetensors   the parameters being trained (the adapter, or the whole model), by parameter name
        state.safetensors       every other tensor: optimizer moments, RNG states
        state.json              optimizer, scheduler and scaler state, each rank's loader position and RNG state;
                                tensors appear as {"__tensor__": name} references into state.safetensors
        trainer_state.json      TrainState: step, best held-out loss, evaluations since the best, all evaluations

Saving writes a generation into a staging folder (``.checkpoint-000012.tmp-<random>``), renames it into place,
replaces ``checkpoint.json`` atomically (temporary file + ``os.replace``), and only then removes older generations
and staging folders left by earlier kills. A kill at any point leaves ``checkpoint.json`` naming a complete
generation (or, before the first save, no pointer: the run starts over). Loading reads JSON and safetensors only, so
a file placed in a run folder cannot run code; a checkpoint of kdcache before generations (``checkpoint/state.pt``)
is read with ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from kdcache.errors import BadInputError
from kdcache.train.distributed import Distributed
from kdcache.train.fsdp import full_tensors, load_full_parameter, sharded_optimizer_state
from kdcache.train.student import trainable_state

__all__ = ["Checkpoint", "TrainState", "has_checkpoint", "load_checkpoint", "read_checkpoint", "save_checkpoint"]

POINTER = "checkpoint.json"
PREFIX = "checkpoint-"
TRAINABLE, TENSORS, STATE, TRAINER_STATE = ("trainable.safetensors", "state.safetensors", "state.json",
                                            "trainer_state.json")
PROJECTOR_PREFIX = "hidden_projector."  # the hidden-state projector's parameters in trainable.safetensors
LEGACY = "checkpoint"  # the single checkpoint folder of kdcache before generations (state.pt, a pickle)
_GENERATION = re.compile(r"checkpoint-(\d+)")
_LEFTOVER = re.compile(r"\.checkpoint-\d+\.tmp-.*|\.checkpoint\.json\.tmp-.*|\.checkpoint\.old|\.checkpoint\.tmp-.*")
_TAGS = ("__tensor__", "__tuple__", "__items__")


def _no_crash(point: str, path: Path) -> None:
    pass


# Called at each point of a save where a kill leaves something behind: "staging" (a staging folder partly written),
# "staged", "renamed" (a new generation the pointer does not name yet), "pointed" (older generations still there) and
# "removing" (before each leftover is removed). Tests replace it with one that raises, as a kill would.
crash_point: Callable[[str, Path], None] = _no_crash


@dataclass
class TrainState:
    """Where the loop stands (trainer_state.json): optimizer steps done, the best held-out loss so far, evaluations
    since it (for patience), and every evaluation's figures."""

    step: int = 0
    best: float | None = None
    evals_since_best: int = 0
    evals: list[dict] = field(default_factory=list)

    def __post_init__(self):
        for name in ("step", "evals_since_best"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.best is not None and (not isinstance(self.best, (int, float)) or isinstance(self.best, bool)):
            raise ValueError(f"best must be a number or null, got {self.best!r}")
        if not isinstance(self.evals, list) or not all(isinstance(e, dict) for e in self.evals):
            raise ValueError(f"evals must be a list of records, got {self.evals!r:.80}")

    def to_dict(self) -> dict:
        return {"step": self.step, "best": self.best, "evals_since_best": self.evals_since_best,
                "evals": [dict(e) for e in self.evals]}

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        """A state from trainer_state.json (the same four keys since the first kdcache release)."""
        if not isinstance(data, dict):
            raise ValueError(f"a trainer state must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"a trainer state has only step, best, evals_since_best and evals, got {unknown}")
        return cls(**data)


# ------------------------------------------------------------------------------------------- tensors plus JSON


def to_json(value, tensors: dict[str, torch.Tensor], name: str):
    """``value`` (nested dicts, lists, tuples, scalars and tensors) as JSON; each tensor is moved into ``tensors``
    under its path (``optimizer.state.0.exp_avg``) and replaced by ``{"__tensor__": path}``. Tuples and dicts with
    keys other than strings are tagged so that :func:`from_json` gives back the same types."""
    def at(part) -> str:
        return f"{name}.{part}" if name else str(part)

    if isinstance(value, torch.Tensor):
        key = name if name not in tensors else f"{name}#{len(tensors)}"
        tensors[key] = value.detach().cpu()
        return {"__tensor__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [to_json(v, tensors, at(i)) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [to_json(v, tensors, at(i)) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in _TAGS):
            return {k: to_json(v, tensors, at(k)) for k, v in value.items()}
        return {"__items__": [[to_json(k, tensors, at(f"key{i}")), to_json(v, tensors, at(k))]
                              for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a checkpoint cannot hold a {type(value).__name__} (at {name})")


def from_json(value, tensors: dict[str, torch.Tensor]):
    """The inverse of :func:`to_json`: tagged objects become tensors, tuples and dicts again."""
    if isinstance(value, list):
        return [from_json(v, tensors) for v in value]
    if isinstance(value, dict):
        if len(value) == 1 and next(iter(value)) in _TAGS:
            ((tag, inner),) = value.items()
            if tag == "__tensor__":
                return tensors[inner]
            if tag == "__tuple__":
                return tuple(from_json(v, tensors) for v in inner)
            return {from_json(k, tensors): from_json(v, tensors) for k, v in inner}
        return {k: from_json(v, tensors) for k, v in value.items()}
    return value


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, none sharing memory with another (safetensors refuses shared memory): copies where they
    do (e.g. the quantization map bitsandbytes keeps once for every parameter)."""
    seen, out = set(), {}
    for key, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        out[key] = tensor.clone() if storage in seen else tensor.contiguous()
        if storage is not None:
            seen.add(storage)
    return out


# ------------------------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """This process's random streams (python, numpy, torch, cuda) as plain values and tensors."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, [int(k) for k in key], pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ------------------------------------------------------------------------------------------- saving


def save_checkpoint(out: Path, model, optimizer, scheduler, scaler, loader, state: TrainState,
                    dist: Distributed | None = None, projector: torch.nn.Module | None = None) -> None:
    """Write a new generation and point to it (see the module docstring).

    Model, optimizer, scheduler and scaler are the same on every rank (under FSDP, their shards are gathered into
    whole tensors: the same files as without it); the loader position and RNG state are each rank's own, so they are
    gathered and kept as one entry per rank. Rank 0 writes; the barrier after it keeps every
    rank from going on (or exiting) before the checkpoint is complete.
    """
    dist = dist or Distributed()
    per_rank = dist.all_gather({"loader": loader.state_dict(), "rng": rng_state()})
    if dist.is_main or dist.sharded:  # FSDP: every rank joins the all-gathers of whole tensors, rank 0 keeps them
        keep = dist.is_main
        optimizer_state = full_tensors(optimizer.state_dict(), keep)
        trainable = trainable_state(model, keep)
        if projector is not None:
            trainable.update(full_tensors({PROJECTOR_PREFIX + n: p for n, p in projector.named_parameters()}, keep))
    if dist.is_main:
        contents = {"world_size": dist.world_size, "optimizer": optimizer_state,
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "loader": [r["loader"] for r in per_rank], "rng": [r["rng"] for r in per_rank]}
        write_generation(Path(out), trainable, contents, state)
    dist.barrier()


def write_generation(out: Path, trainable: dict[str, torch.Tensor], contents: dict, state: TrainState) -> Path:
    """Stage, rename into place, point to it, then remove what is older: the four steps of a crash-safe save."""
    name = f"{PREFIX}{state.step:06d}"
    staging = out / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        _write_files(staging, trainable, contents, state)
    except Exception:  # e.g. a full disk: leave nothing half-written behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    crash_point("staged", staging)
    target = out / name
    if target.exists():  # finished by a killed run but never pointed to: the pointer names an older generation
        shutil.rmtree(target)
    os.replace(staging, target)
    _fsync_dir(out)
    crash_point("renamed", target)
    _write_pointer(out, {"checkpoint": name, "step": state.step})
    crash_point("pointed", target)
    _remove_leftovers(out, keep=name)
    return target


def _write_files(folder: Path, trainable: dict, contents: dict, state: TrainState) -> None:
    from safetensors.torch import save_file

    save_file(_unshared(trainable), str(folder / TRAINABLE))
    crash_point("staging", folder)
    tensors: dict[str, torch.Tensor] = {}
    encoded = to_json(contents, tensors, "")
    save_file(_unshared(tensors), str(folder / TENSORS))
    (folder / STATE).write_text(json.dumps(encoded))
    (folder / TRAINER_STATE).write_text(json.dumps(state.to_dict(), indent=2))
    for path in folder.iterdir():
        _fsync(path)


def _write_pointer(out: Path, pointer: dict) -> None:
    temporary = out / f".{POINTER}.tmp-{uuid.uuid4().hex[:8]}"
    temporary.write_text(json.dumps(pointer) + "\n")
    _fsync(temporary)
    os.replace(temporary, out / POINTER)
    _fsync_dir(out)


def _remove_leftovers(out: Path, keep: str) -> None:
    """Older generations, staging folders and temporary pointers of killed saves, and a pre-generation checkpoint."""
    for path in sorted(out.iterdir()):
        old_generation = _GENERATION.fullmatch(path.name) and path.name != keep
        if old_generation or _LEFTOVER.fullmatch(path.name) or (path.name == LEGACY and path.is_dir()):
            crash_point("removing", path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (a no-op where directories cannot be opened, e.g. on Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# ------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back: where it is, the trained parameters, everything else, and the loop's state."""

    folder: Path
    trainable: dict[str, torch.Tensor]
    contents: dict  # world_size, optimizer, scheduler, scaler, loader (per rank), rng (per rank)
    state: TrainState


def has_checkpoint(out: Path | str) -> bool:
    """Whether the run folder has a checkpoint to resume from (a pointer, or a pre-generation ``checkpoint/``)."""
    out = Path(out)
    return (out / POINTER).exists() or (out / LEGACY / TRAINER_STATE).exists()


def read_checkpoint(out: Path | str) -> Checkpoint | None:
    """The generation ``checkpoint.json`` names (or a pre-generation ``checkpoint/``); None when there is none."""
    out = Path(out)
    if (out / POINTER).exists():
        folder = _pointed_folder(out)
        return _guarded(folder, f"delete {out / POINTER} and the {PREFIX}* folders", lambda: _read_generation(folder))
    folder = out / LEGACY
    if (folder / TRAINER_STATE).exists():
        return _guarded(folder, f"delete {folder}", lambda: _read_legacy(folder))
    return None


def _pointed_folder(out: Path) -> Path:
    try:
        name = json.loads((out / POINTER).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"{out / POINTER} cannot be read ({_first_line(exc)}): delete it and the "
                            f"{PREFIX}* folders to start this run over, or train into a new --out") from None
    if not isinstance(name, str) or not _GENERATION.fullmatch(name):
        raise BadInputError(f"{out / POINTER} must name a {PREFIX}NNNNNN folder, got {name!r}: delete it to start "
                            "this run over, or train into a new --out")
    return out / name


def _guarded(folder: Path, start_over: str, read: Callable[[], Checkpoint]) -> Checkpoint:
    """``read()``, with anything that goes wrong reading files turned into one line naming the folder."""
    from safetensors import SafetensorError

    try:
        return read()
    except pickle.UnpicklingError:
        reason = "it holds objects other than tensors and plain containers, which kdcache does not unpickle"
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        reason = _first_line(exc)
    raise BadInputError(f"the checkpoint in {folder} cannot be read ({reason}): {start_over} to start this run "
                        "over, or train into a new --out") from None


def _read_generation(folder: Path) -> Checkpoint:
    from safetensors.torch import load_file

    trainable = load_file(str(folder / TRAINABLE))
    tensors = load_file(str(folder / TENSORS))
    contents = _checked(from_json(json.loads((folder / STATE).read_text()), tensors))
    state = TrainState.from_dict(json.loads((folder / TRAINER_STATE).read_text()))
    return Checkpoint(folder, trainable, contents, state)


def _checked(contents) -> dict:
    """``contents`` if it has the parts a resume needs, with one loader position and RNG state per rank."""
    if not isinstance(contents, dict):
        raise ValueError(f"its state must be an object, got {type(contents).__name__}")
    missing = [key for key in ("optimizer", "scheduler", "scaler", "loader", "rng") if key not in contents]
    if missing:
        raise ValueError(f"its state has no {', '.join(missing)}")
    if not isinstance(contents["loader"], list) or not isinstance(contents["rng"], list) or (
            len(contents["loader"]) != len(contents["rng"])):
        raise ValueError("its state must hold one loader position and one RNG state per rank")
    return contents


def _read_legacy(folder: Path) -> Checkpoint:
    """``checkpoint/state.pt`` of kdcache before generations: tensors, plain containers and numpy's RNG key only."""
    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):
        saved = torch.load(folder / "state.pt", weights_only=True, map_location="cpu")
    if not isinstance(saved, dict) or not isinstance(saved.get("trainable"), dict):
        raise ValueError("state.pt is not a kdcache checkpoint")
    trainable = saved.pop("trainable")
    saved = _checked(saved)
    state = TrainState.from_dict(json.loads((folder / TRAINER_STATE).read_text()))
    return Checkpoint(folder, trainable, saved, state)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def load_checkpoint(out: Path, model, optimizer, scheduler, scaler, loader,
                    dist: Distributed | None = None, projector: torch.nn.Module | None = None) -> TrainState | None:
    """Restore the newest complete checkpoint (each rank takes its own loader position and RNG state); None when
    the run folder has none."""
    dist = dist or Distributed()
    found = read_checkpoint(out)
    if found is None:
        return None
    saved = found.contents
    loaders, rngs = saved["loader"], saved["rng"]
    if len(loaders) != dist.world_size:
        raise BadInputError(
            f"the checkpoint in {found.folder} was written by {len(loaders)} process(es) but this run has "
            f"{dist.world_size}: each rank's loader position is its own, so resume with the same number "
            f"(torchrun --nproc_per_node {len(loaders)}), or train into a new --out"
        )
    params = dict(model.named_parameters())
    if projector is not None:
        params.update({PROJECTOR_PREFIX + n: p for n, p in projector.named_parameters()})
    for name, value in found.trainable.items():
        if name not in params:
            raise BadInputError(f"the checkpoint in {found.folder} holds {name}, which this run does not train (it "
                                "was trained with another loss.hidden_weight or student): resume with the same "
                                "settings, or train into a new --out")
        load_full_parameter(params[name], value)  # under FSDP: this rank's shard of it
    optimizer.load_state_dict(sharded_optimizer_state(optimizer, saved["optimizer"]))
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    loader.load_state_dict(loaders[dist.rank])
    set_rng_state(rngs[dist.rank])
    return found.state
