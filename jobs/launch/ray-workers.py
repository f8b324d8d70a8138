#!/usr/bin/env python3
"""Run N kdcache cache-build workers on a Ray cluster, one per node, each with its own vLLM engine.

    # on the head node of a running Ray cluster (`ray start --head` / `ray start --address=...` on the others):
    python jobs/launch/ray-workers.py --config jobs/teacher-qwen2.5-72b-vllm.yaml \\
        --output s3://bucket/caches/upsc-72b-k64 --num-workers 4 --gpus-per-node 4

    # re-run only worker 2 (after a node failure); it skips the shards it already committed:
    python jobs/launch/ray-workers.py ... --num-workers 4 --worker-index 2

    # see the commands without Ray:
    python jobs/launch/ray-workers.py ... --dry-run

Worker i runs `kdcache cache build --config CONFIG --output OUTPUT --num-workers N --worker-index i [EXTRA...]` as a
subprocess of a Ray task that holds all of one node's GPUs; a STRICT_SPREAD placement group puts every worker on a
different node. vLLM then does tensor parallelism inside the node with its own processes (not Ray's), so the
engine behaves exactly as in the SLURM launcher. Workers share only the output location; the last to finish
writes the manifest, and this script runs `kdcache cache finalize` at the end when every worker succeeded.
Anything after `--` is passed to `kdcache cache build`.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="kdcache job spec (YAML), e.g. jobs/teacher-qwen2.5-72b-vllm.yaml")
    p.add_argument("--output", required=True, help="cache location shared by all workers (path or fsspec URL)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="workers = nodes used (default: every alive node with --gpus-per-node GPUs)")
    p.add_argument("--worker-index", type=int, action="append", default=None,
                   help="run only this worker index (repeatable); default: all of 0..num-workers-1")
    p.add_argument("--gpus-per-node", type=int, default=4, help="GPUs each worker holds (= tensor_parallel_size)")
    p.add_argument("--cpus-per-worker", type=int, default=8)
    p.add_argument("--address", default="auto", help="Ray cluster address")
    p.add_argument("--max-retries", type=int, default=2, help="Ray retries of a worker whose node died")
    p.add_argument("--dry-run", action="store_true", help="print each worker's command and exit (no Ray needed)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="-- then options for `kdcache cache build`")
    args = p.parse_args(argv)
    if args.extra and args.extra[0] == "--":
        args.extra = args.extra[1:]
    return args


def worker_command(args, num_workers: int, index: int) -> list[str]:
    return ["kdcache", "cache", "build", "--config", args.config, "--output", args.output,
            "--num-workers", str(num_workers), "--worker-index", str(index), "--no-progress", *args.extra]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        num_workers = args.num_workers or 1
        for index in args.worker_index or range(num_workers):
            print(shlex.join(worker_command(args, num_workers, index)))
        return 0

    try:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    except ImportError:
        print("this launcher needs Ray on the cluster: pip install 'ray[default]'", file=sys.stderr)
        return 2

    ray.init(address=args.address)
    gpu_nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) >= args.gpus_per_node]
    num_workers = args.num_workers or len(gpu_nodes)
    indices = sorted(set(args.worker_index or range(num_workers)))
    if not num_workers or any(not 0 <= i < num_workers for i in indices):
        print(f"worker indices {indices} must lie in [0, {num_workers})", file=sys.stderr)
        return 2
    if len(indices) > len(gpu_nodes):
        print(f"{len(indices)} workers need as many nodes with {args.gpus_per_node} GPUs; the cluster has "
              f"{len(gpu_nodes)}. Run fewer at once with --worker-index (the cache is the same)", file=sys.stderr)
        return 2

    bundles = [{"GPU": args.gpus_per_node, "CPU": args.cpus_per_worker} for _ in indices]
    group = placement_group(bundles, strategy="STRICT_SPREAD")  # one bundle, hence one worker, per node
    ray.get(group.ready())

    @ray.remote(max_retries=args.max_retries)
    def run_worker(command: list[str]) -> tuple[int, str, int]:
        import os
        import socket

        # Ray sets CUDA_VISIBLE_DEVICES to this task's GPUs; vLLM's own processes use them for tensor parallelism.
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        completed = subprocess.run(command, env=env)
        return completed.returncode, socket.gethostname(), int(command[command.index("--worker-index") + 1])

    futures = [
        run_worker.options(
            num_gpus=args.gpus_per_node, num_cpus=args.cpus_per_worker,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group,
                                                                 placement_group_bundle_index=bundle),
        ).remote(worker_command(args, num_workers, index))
        for bundle, index in enumerate(indices)
    ]
    failed = []
    for code, host, index in ray.get(futures):
        print(f"worker {index} of {num_workers} on {host}: exit {code}")
        if code != 0:
            failed.append(index)
    if failed:
        print(f"workers {failed} failed; re-run them with --worker-index (they resume)", file=sys.stderr)
        return 1
    # Every worker finished: make sure the manifest exists (a no-op rewrite if the last worker already wrote it).
    return subprocess.run(["kdcache", "cache", "finalize", args.output]).returncode


if __name__ == "__main__":
    sys.exit(main())
