"""`kdcache cache build --generate` against the teacher-forced build over the same rows (issue 14, item 7: at most 2x
for answers of at most 4 tokens).

A randomly initialised Qwen2 teacher (built locally, loaded once through the real HF backend, never timed) fills
three caches over the same `--examples` UPSC rows, arm after arm, round after round (medians of `--repeats`, after
one untimed warm-up round):

- forced: the ordinary build, the data's targets scored teacher-forced;
- generate: `generate.enabled=true`, greedy, `generate.max_new_tokens=--max-new-tokens`: the teacher answers every
  prompt (one left-padded batched decode per `teacher.batch_size` prompts) and the build keeps the sparse targets the
  decode computed at each answer token (no teacher-forced pass over the answers);
- rescored: the same decode, then the answers scored teacher-forced as in forced (the build before the decode's
  targets were kept: the backend is wrapped so that it offers no `generate_scored`);
- per-row: generate with answers generated one prompt at a time (as before batching: `teacher.batch_size=1` for the
  decode only).

    cd benchmarks && python generate_build.py --threads 1 --repeats 5 --clock cpu
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from cache_build import machine_line, make_config  # noqa: E402  (benchmarks/cache_build.py)
from common import upsc_rows, write_data  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--tokenizer-vocab", type=int, default=2048)
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="teacher.batch_size (scoring and the batched decode)")
    p.add_argument("--max-new-tokens", type=int, default=4, help="generate.max_new_tokens")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="what the timings count: wall = elapsed time; cpu = this process's CPU time over all its "
                        "threads, which other work on a loaded machine disturbs far less")
    p.add_argument("--skip-per-row", action="store_true", help="leave out the per-row arm (the slow one)")
    p.add_argument("--skip-rescored", action="store_true", help="leave out the rescored arm")
    args = p.parse_args(argv)
    # what make_config (benchmarks/cache_build.py) reads besides these
    args.device, args.dtype, args.chunk_size, args.shard_size, args.distill = "cpu", "float32", 1024, 1024, "target"
    args.logprob_dtype, args.logprob_step, args.logprob_growth, args.tail_temperatures = "float32", "null", "null", None
    return args


class DecodeOnly:
    """The backend without `generate_scored`: the build then scores generated answers teacher-forced."""

    def __init__(self, inner):
        self.inner = inner

    def score(self, *args):
        return self.inner.score(*args)

    def generate(self, *args):
        return self.inner.generate(*args)


def main(argv=None) -> int:
    args = parse_args(argv)
    from kdcache.config import GenerateConfig
    from kdcache.store.reader import CacheReader
    from kdcache.teacher.build import build_cache, make_backend
    from kdcache.tiny import build_qwen2, build_tokenizer, save_model

    torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="kdcache-genbench-"))
    try:
        base = upsc_rows()
        tokenizer = build_tokenizer([f"{r['title']} {r['text']} {r['gs_paper']}" for r in base],
                                    vocab_size=args.tokenizer_vocab)
        model = build_qwen2(len(tokenizer), hidden_size=args.hidden_size, layers=args.layers, heads=args.heads,
                            max_positions=max(2048, args.max_length), seed=0)
        params = sum(p.numel() for p in model.parameters())
        teacher_dir = save_model(model, tokenizer, scratch / "teacher")
        data_file = scratch / "data.jsonl"
        write_data(data_file, base, args.examples)
        forced_config = make_config(args, str(scratch / "out"), teacher_dir, str(data_file), args.k)
        backend = make_backend(forced_config, len(tokenizer))
        per_row = copy.copy(backend)
        per_row.config = dataclasses.replace(backend.config, batch_size=1)
        generated_config = dataclasses.replace(
            forced_config, generate=GenerateConfig(enabled=True, max_new_tokens=args.max_new_tokens))

        def build(config, teacher):
            out = Path(config.output)
            if out.exists():
                shutil.rmtree(out)
            t0, c0 = time.perf_counter(), time.process_time()
            result = build_cache(config, backend=teacher, tokenizer=tokenizer)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            assert result.finalized
            return (cpu, wall) if args.clock == "cpu" else (wall, cpu)

        arms = {"forced": (forced_config, backend), "generate": (generated_config, backend)}
        if not args.skip_rescored:
            arms["rescored"] = (generated_config, DecodeOnly(backend))
        if not args.skip_per_row:
            arms["per-row"] = (generated_config, per_row)
        times: dict[str, list[float]] = {name: [] for name in arms}
        other: dict[str, list[float]] = {name: [] for name in arms}  # the other clock, measured on the same builds
        for round_ in range(args.repeats + 1):  # round 0: warm-up
            for name, (config, teacher) in arms.items():
                elapsed, elapsed_other = build(config, teacher)
                if round_:
                    times[name].append(elapsed)
                    other[name].append(elapsed_other)
        answers = [int(e.target_mask.sum()) for e in CacheReader(str(scratch / "out")).iter_examples()]
        build(forced_config, backend)
        forced_targets = [int(e.target_mask.sum()) for e in CacheReader(str(scratch / "out")).iter_examples()]
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"machine: {machine_line(torch.device('cpu'), args.threads)}")
        print(f"teacher: Qwen2 hidden {args.hidden_size} x {args.layers} layers, vocab {len(tokenizer)}, "
              f"{params / 1e6:.2f}M params; {args.examples} rows, batch {args.batch_size}, k {args.k}")
        print(f"answers: generated {min(answers)}-{max(answers)} tokens (mean {statistics.mean(answers):.2f}, "
              f"max_new_tokens {args.max_new_tokens}); teacher-forced targets {min(forced_targets)}-"
              f"{max(forced_targets)} tokens (mean {statistics.mean(forced_targets):.2f})")
        print(f"medians of {args.repeats} alternated rounds ({args.clock} clock):")
        for name, value in med.items():
            print(f"  {name:<9} {value:8.3f} s   (all: {', '.join(f'{t:.2f}' for t in times[name])})")
        print(f"generate / forced: {med['generate'] / med['forced']:.2f}  (target <= 2)")
        if "rescored" in med:
            print(f"rescored / forced: {med['rescored'] / med['forced']:.2f}  (answers scored again teacher-forced)")
        if "per-row" in med:
            print(f"per-row / forced:  {med['per-row'] / med['forced']:.2f}  (answers generated one prompt at a time)")
        med_other = {name: statistics.median(t) for name, t in other.items()}
        print(f"the same builds on the {'wall' if args.clock == 'cpu' else 'cpu'} clock: " + ", ".join(
            f"{name} / forced {value / med_other['forced']:.2f}" for name, value in med_other.items() if name != "forced"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
