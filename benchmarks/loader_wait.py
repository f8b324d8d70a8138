"""The loader's wait as a share of step time, from a training run's metrics.jsonl (target: under 2 %).

Each step record holds ``loader_wait_s`` (seconds the step waited for its batches, mean over ranks) and
``step_s`` (the step's wall time on rank 0, loader wait included). The first ``--skip`` steps (warm-up: the loader
starts, the first shard is opened) are left out.

    python benchmarks/loader_wait.py RUN/metrics.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics


def wait_share(path: str, skip: int = 1) -> dict:
    """{'steps', 'wait_s', 'step_s', 'share', 'median_share'} over the step records after the first ``skip``."""
    records = [json.loads(line) for line in open(path) if line.strip()]
    steps = [r for r in records if "loader_wait_s" in r and "step_s" in r][skip:]
    if not steps:
        raise SystemExit(f"{path}: no step records with loader_wait_s after the first {skip}")
    seconds = [r["step_s"] for r in steps]
    waits = [r["loader_wait_s"] for r in steps]
    return {"steps": len(steps), "wait_s": sum(waits), "step_s": sum(seconds), "share": sum(waits) / sum(seconds),
            "median_share": statistics.median(w / s for w, s in zip(waits, seconds))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="metrics.jsonl of a kdcache train run")
    parser.add_argument("--skip", type=int, default=1, help="leading steps left out (warm-up)")
    args = parser.parse_args(argv)
    f = wait_share(args.metrics, args.skip)
    print(f"loader wait: {f['wait_s']:.3f} s of {f['step_s']:.3f} s over {f['steps']} steps = "
          f"{100 * f['share']:.2f} % (median per step {100 * f['median_share']:.2f} %)")


if __name__ == "__main__":
    main()
