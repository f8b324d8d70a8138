"""`kdcache train` under torchrun (DDP, gloo on the CPU): ranks read their own shards, stay bit-identical, rank 0
writes, and a killed run resumes exactly."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from kdcache.config import TrainConfig, load_config
from kdcache.errors import BadInputError
from kdcache.train.checkpoint import read_checkpoint
from kdcache.train.loader import CacheDataset
from kdcache.train.trainer import train

pytestmark = pytest.mark.slow

# Stops after a number of steps as a kill would, then resumes in the same processes from the checkpoint on disk. The
# worker creates the process group itself, so train() must use a caller's group and leave it alone. At each
# checkpoint every rank writes the digest of its own trained parameters (rank 0 alone saves them): the ranks must
# agree bit for bit.
WORKER = """
import hashlib, json, sys
from pathlib import Path
import torch.distributed as dist
from kdcache.config import TrainConfig, load_config
from kdcache.train import trainer
from kdcache.train.trainer import train

def digest_every_rank(save):
    def saving(out, model, *args, **kwargs):
        digest = hashlib.sha256()
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.requires_grad:
                digest.update(name.encode())
                digest.update(param.detach().cpu().contiguous().numpy().tobytes())
        Path(out, f"param-digest-rank{dist.get_rank()}.json").write_text(json.dumps({"sha256": digest.hexdigest()}))
        return save(out, model, *args, **kwargs)
    return saving

trainer.save_checkpoint = digest_every_rank(trainer.save_checkpoint)
dist.init_process_group("gloo")
config = load_config(TrainConfig, None, sys.argv[2:])
first = train(config, stop_after_steps=int(sys.argv[1]))
assert dist.is_initialized(), "train() destroyed a process group it did not create"
assert first.step == int(sys.argv[1]) and first.step < config.max_steps
train(config)
dist.destroy_process_group()
"""


def overrides(cache: str, student: str, out: Path) -> list[str]:
    """LoRA with dropout (per-rank RNG), CE + KD, and gradient accumulation (DDP's no_sync on the first micro-batch)."""
    return [f"cache={cache}", f"student={student}", f"out={out}", "profile=cpu", "batch_size=3", "lr=3e-3",
            "lora.enabled=true", "lora.r=4", "lora.dropout=0.1", "loss.alpha=0.5", "grad_accum=2",
            "heldout_fraction=0.25", "eval_every=4", "save_every=3", "chunk_size=64", "max_steps=6",
            "progress=false"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """Two CPU ranks on this machine."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def digest(tensors: dict) -> str:
    """sha256 of named tensors' bytes, in name order (the worker's digest of every rank's parameters)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def saved_weights(out: Path) -> tuple[str, str]:
    """Digests of the run's saved weights: the last checkpoint's trained parameters, and final/'s adapter."""
    from safetensors.torch import load_file

    return digest(read_checkpoint(out).trainable), digest(load_file(out / "final" / "adapter_model.safetensors"))


def rank_digests(out: Path) -> list[str]:
    found = sorted(out.glob("param-digest-rank*.json"))
    assert [p.name for p in found] == ["param-digest-rank0.json", "param-digest-rank1.json"]
    return [json.loads(p.read_text())["sha256"] for p in found]


def test_ranks_read_disjoint_shares_of_the_cache(sharp_cache):
    def indices(rank: int) -> set[int]:
        data = CacheDataset(sharp_cache, batch_size=4, rank=rank, world_size=2, heldout_fraction=0.25)
        return {int(i) for batch in data for i in batch.example_indices}

    everything = CacheDataset(sharp_cache, batch_size=4, rank=0, world_size=1, heldout_fraction=0.25)
    whole = {int(i) for batch in everything for i in batch.example_indices}
    first, second = indices(0), indices(1)
    assert first and second and not first & second
    assert first | second == whole


def test_torchrun_two_ranks_stay_identical_and_resume_exactly(tmp_path, sharp_cache, student_dir):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    sets = [arg for o in overrides(sharp_cache, student_dir, straight) for arg in ("--set", o)]
    done = torchrun("-m", "kdcache.cli", "train", *sets)  # the plain command, unchanged
    assert done.stdout.count("trained to step 6") == 1, done.stdout  # rank 0 alone reports

    lines = records(straight)
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]  # one writer: no duplicated lines
    assert [r["step"] for r in lines if "heldout_kd" in r] == [4]
    assert (straight / "final" / "adapter_config.json").exists()
    assert len(list((straight / "tensorboard").glob("events.out.tfevents.*"))) == 1
    saved = read_checkpoint(straight)
    assert saved.folder.name == "checkpoint-000006" and saved.state.step == 6
    assert saved.contents["world_size"] == 2
    assert [s["settings"]["rank"] for s in saved.contents["loader"]] == [0, 1]

    # Killed after step 4 (last checkpoint at step 3), then resumed: the same curve and the same final weights.
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    torchrun(str(worker), "4", *overrides(sharp_cache, student_dir, resumed))
    again = records(resumed)
    assert [r["step"] for r in again if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in again if "loss" in r] == pytest.approx(  # flat: pytest >= 9.2 refuses nested approx
        [r["loss"] for r in lines if "loss" in r], rel=1e-6, abs=1e-7)
    assert [r["heldout_kd"] for r in again if "heldout_kd" in r] == pytest.approx(
        [r["heldout_kd"] for r in lines if "heldout_kd" in r], rel=1e-6)
    # Gradients are all-reduced: both ranks hold the same weights, although they trained on different shards; and
    # the resumed run saved the same weights as the straight one, bit for bit.
    checkpoint_digest, final_digest = saved_weights(straight)
    assert rank_digests(resumed) == [checkpoint_digest, checkpoint_digest]
    assert saved_weights(resumed) == (checkpoint_digest, final_digest)

    # Per-rank loader positions cannot be shared out among another number of processes.
    config = load_config(TrainConfig, None, [*overrides(sharp_cache, student_dir, straight), "max_steps=8",
                                             "allow_config_change=true"])
    with pytest.raises(BadInputError, match="nproc_per_node 2"):
        train(config)

