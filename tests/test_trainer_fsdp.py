"""`kdcache train` with ``distributed.strategy: fsdp`` under torchrun (FSDP2, gloo on the CPU, 2 ranks): the same
losses as DDP, exact resume, per-rank loader state, and checkpoints and final folders that load in one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_trainer_ddp import records, saved_weights, torchrun
from test_trainer_hidden import hidden_cache  # noqa: F401 (a fixture: a cache with teacher hidden states)

from kdcache.config import TrainConfig, load_config
from kdcache.errors import BadInputError
from kdcache.tiny import build_qwen2, save_model
from kdcache.train.checkpoint import read_checkpoint

# Several runs in the same two processes (one torchrun start, whose imports cost most of the time here), under a
# process group the worker creates itself. Each run: `kdcache train` arguments ("cli"), or TrainConfig overrides and
# optionally a step to stop after as a kill would, before the same command resumes from the checkpoint on disk
# (unless "resume" is false). First, the held-out loop's lockstep:
# rank r has r + 1 batches, so rank 0 must run one idle forward while rank 1 scores its second batch.
WORKER = """
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist
from kdcache.config import TrainConfig, load_config
from kdcache.train.distributed import Distributed
from kdcache.train.fsdp import lockstep
from kdcache.train.trainer import train

dist.init_process_group("gloo")
rank = dist.get_rank()
group = Distributed(rank, 2, rank, strategy="fsdp")
idle = []
seen = list(lockstep([f"batch{i}" for i in range(rank + 1)], group, torch.device("cpu"), idle.append))
Path(sys.argv[2], f"lockstep-rank{rank}.json").write_text(json.dumps({"seen": seen, "idle": idle}))
for run in json.loads(Path(sys.argv[1]).read_text()):
    if "cli" in run:  # the plain command, as `torchrun ... -m kdcache.cli train --set ...` runs it
        from kdcache.cli import main
        main(run["cli"], standalone_mode=False)
        continue
    config = load_config(TrainConfig, None, run["overrides"])
    if run.get("stop_after"):
        first = train(config, stop_after_steps=run["stop_after"])
        assert first.step == run["stop_after"] < config.max_steps
        if not run.get("resume", True):
            continue
    train(config)
    assert dist.is_initialized()
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def student2(tmp_path_factory, tokenizer) -> str:
    """A 2-layer Qwen2 student with tied embeddings (two FSDP blocks, and a head shared with the embeddings)."""
    model = build_qwen2(len(tokenizer), hidden_size=64, layers=2, heads=2, seed=5)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("student2"))


def overrides(cache: str, student: str, out: Path, strategy: str, *extra: str) -> list[str]:
    """LoRA of rank 3 (lora_A's 3 rows shard unevenly over 2 ranks) with dropout (per-rank RNG), CE + KD, gradient
    accumulation, chunks of 32 target positions (the ranks run different numbers of chunks)."""
    return [f"cache={cache}", f"student={student}", f"out={out}", "profile=cpu", "batch_size=3", "lr=3e-3",
            "lora.enabled=true", "lora.r=3", "lora.dropout=0.1", "loss.alpha=0.5", "grad_accum=2",
            "heldout_fraction=0.25", "eval_every=4", "save_every=3", "chunk_size=32", "max_steps=6",
            "progress=false", f"distributed.strategy={strategy}", *extra]


def losses(out: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in records(out) if key in r]


@pytest.mark.slow
def test_fsdp_matches_ddp_resumes_exactly_and_saves_normal_folders(tmp_path, sharp_cache, student2,
                                                                   hidden_cache):  # noqa: F811 (the fixture)
    full = ("lora.enabled=false", "lr=1e-3", "max_steps=3", "eval_every=2")  # full fine-tuning: every weight sharded
    hidden = ("loss.hidden_weight=0.5", "max_steps=3", "eval_every=2")  # a projector in the root unit
    straight = tmp_path / "fsdp"
    sets = [arg for o in overrides(sharp_cache, student2, straight, "fsdp") for arg in ("--set", o)]
    runs = {"ddp": overrides(sharp_cache, student2, tmp_path / "ddp", "ddp"),
            "resumed": overrides(sharp_cache, student2, tmp_path / "resumed", "fsdp"),
            "ddp_full": overrides(sharp_cache, student2, tmp_path / "ddp_full", "ddp", *full),
            "fsdp_full": overrides(sharp_cache, student2, tmp_path / "fsdp_full", "fsdp", *full),
            "ddp_hidden": overrides(hidden_cache, student2, tmp_path / "ddp_hidden", "ddp", *hidden),
            "fsdp_hidden": overrides(hidden_cache, student2, tmp_path / "fsdp_hidden", "fsdp", *hidden)}
    plan = tmp_path / "runs.json"
    switched = tmp_path / "switched"  # killed under DDP after step 3 (a checkpoint), resumed under FSDP
    plan.write_text(json.dumps([{"cli": ["train", *sets]}] + [
        {"overrides": o, "stop_after": 4 if name == "resumed" else None} for name, o in runs.items()] + [
        {"overrides": overrides(sharp_cache, student2, switched, "ddp"), "stop_after": 3, "resume": False},
        {"overrides": overrides(sharp_cache, student2, switched, "fsdp", "allow_config_change=true")}]))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    done = torchrun(str(worker), str(plan), str(tmp_path))
    assert done.stdout.count("trained to step 6") == 1, done.stdout  # rank 0 alone reports the plain command's run
    assert done.stderr.count("FSDP: the student's 2 Qwen2DecoderLayer blocks and the rest (embeddings, head) "
                             "sharded over 2 ranks") == 6  # the plain command, the killed run, its resume, full, hidden, switched

    lock = [json.loads((tmp_path / f"lockstep-rank{r}.json").read_text()) for r in (0, 1)]
    assert lock == [{"seen": ["batch0"], "idle": ["batch0"]}, {"seen": ["batch0", "batch1"], "idle": []}]

    # The same losses, gradient norms and held-out figures as DDP: the same data on each rank, the same mean gradient.
    assert [r["step"] for r in records(straight) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    for key, rel in (("loss", 1e-5), ("grad_norm", 1e-4), ("heldout_kd", 1e-5)):
        assert losses(straight, key) == pytest.approx(losses(tmp_path / "ddp", key), rel=rel)
    assert len(losses(straight, "heldout_kd")) == 1
    for key in ("loss", "heldout_kd"):
        assert losses(tmp_path / "fsdp_full", key) == pytest.approx(losses(tmp_path / "ddp_full", key), rel=1e-5)
    assert len(losses(tmp_path / "fsdp_full")) == 3
    for key in ("loss", "hidden", "heldout_kd", "heldout_hidden_mse"):
        assert losses(tmp_path / "fsdp_hidden", key) == pytest.approx(losses(tmp_path / "ddp_hidden", key), rel=1e-5)
    assert len(losses(tmp_path / "fsdp_hidden", "hidden")) == 3

    # A checkpoint holds whole tensors (not one rank's shards) and each rank's loader position, as DDP's does.
    fsdp_saved, ddp_saved = read_checkpoint(straight), read_checkpoint(tmp_path / "ddp")
    assert fsdp_saved.folder.name == "checkpoint-000006" and fsdp_saved.contents["world_size"] == 2
    assert [s["settings"]["rank"] for s in fsdp_saved.contents["loader"]] == [0, 1]
    assert sorted(fsdp_saved.trainable) == sorted(ddp_saved.trainable) and any(
        v.shape[0] == 3 for v in fsdp_saved.trainable.values())
    for name, value in ddp_saved.trainable.items():
        torch.testing.assert_close(fsdp_saved.trainable[name], value, rtol=1e-4, atol=1e-6)
    fsdp_moments = {k: v["exp_avg"].shape for k, v in fsdp_saved.contents["optimizer"]["state"].items()}
    assert fsdp_moments == {k: v["exp_avg"].shape for k, v in ddp_saved.contents["optimizer"]["state"].items()}

    # Killed after step 4 (last checkpoint at step 3), then resumed: the same curve, and the same weights bit for bit.
    resumed = tmp_path / "resumed"
    assert [r["step"] for r in records(resumed) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-6, abs=1e-7)
    assert losses(resumed, "heldout_kd") == pytest.approx(losses(straight, "heldout_kd"), rel=1e-6)
    assert saved_weights(resumed) == saved_weights(straight)
    # The checkpoint format is one: a DDP checkpoint resumes under FSDP (allow_config_change: the strategy changed).
    assert [r["step"] for r in records(switched) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert losses(switched) == pytest.approx(losses(tmp_path / "ddp"), rel=1e-5)

    # final/ is a normal adapter folder: `kdcache export` merges it in one process.
    from transformers import AutoModelForCausalLM

    from kdcache.train.export import merge_adapter

    merge_adapter(str(straight / "final"), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.num_hidden_layers == 2 and (tmp_path / "merged" / "README.md").exists()

    # A full fine-tune's final/ and best/ are plain models: loaded in one process, final/ holds the trained weights.
    full_saved = read_checkpoint(tmp_path / "fsdp_full")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp_full" / "final")
    state = model.state_dict()
    assert set(full_saved.trainable) <= set(state)
    for name, value in full_saved.trainable.items():
        assert torch.equal(state[name], value), name
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp_full" / "best").config.num_hidden_layers == 2

    # The hidden-state projector (in the root unit) is saved whole, beside the adapter, as the checkpoint has it.
    from safetensors.torch import load_file

    from kdcache.train.checkpoint import PROJECTOR_PREFIX
    from kdcache.train.hidden import PROJECTOR_FILE

    hidden_saved = read_checkpoint(tmp_path / "fsdp_hidden").trainable
    projector = load_file(tmp_path / "fsdp_hidden" / "final" / PROJECTOR_FILE)
    assert projector and {k: v.shape for k, v in projector.items()} == {
        k.removeprefix(PROJECTOR_PREFIX): v.shape for k, v in hidden_saved.items() if k.startswith(PROJECTOR_PREFIX)}
    for name, value in projector.items():
        assert torch.equal(value, hidden_saved[PROJECTOR_PREFIX + name]), name


def test_fsdp_refuses_what_it_cannot_shard():
    for extra, match in ((["lora.quantize=4bit"], "QLoRA"), (["optimizer=adamw_8bit"], "adamw_8bit"),
                         ([], "one of")):
        strategy = "zero" if not extra else "fsdp"
        with pytest.raises(BadInputError, match=f"distributed.strategy' must be .*{match}"):
            load_config(TrainConfig, None, [f"distributed.strategy={strategy}", *extra])
    assert load_config(TrainConfig, None, []).distributed.strategy == "ddp"


def test_fsdp_units_are_the_students_blocks(student_dir, tokenizer):
    from kdcache.config import LoraConfig
    from kdcache.train.fsdp import _blocks
    from kdcache.train.student import load_student, resolve_precision

    model = load_student(student_dir, resolve_precision("cpu", False), LoraConfig(r=2), len(tokenizer))
    blocks = _blocks(model)  # through peft's wrappers
    assert [type(b).__name__ for b in blocks] == ["Qwen2DecoderLayer"]
    assert blocks[0] is model.base_model.model.model.layers[0]


def test_a_lora_save_gathers_the_adapter_only(tmp_path, student_dir, tokenizer):
    """Under FSDP every tensor save_student writes is all-gathered first: for a LoRA student that is the adapter
    (what peft writes), not the frozen base; the adapter written from it equals peft's own save."""
    from safetensors.torch import load_file

    from kdcache.config import LoraConfig
    from kdcache.train.student import load_student, resolve_precision
    from kdcache.train.trainer import saved_state

    precision = resolve_precision("cpu", False)
    model = load_student(student_dir, precision, LoraConfig(r=2), len(tokenizer))
    state = saved_state(model)
    assert state and all("lora_" in key for key in state)
    assert len(state) < len(model.state_dict()) / 2
    model.save_pretrained(tmp_path / "peft")
    model.save_pretrained(tmp_path / "ours", state_dict=state)
    theirs, ours = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("peft", "ours"))
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    full = load_student(student_dir, precision, LoraConfig(enabled=False), len(tokenizer))
    assert saved_state(full).keys() == full.state_dict().keys()  # full fine-tuning: the whole model
