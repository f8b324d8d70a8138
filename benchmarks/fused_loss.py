"""The fused CE + bucket pass (kdcache.train.fused.ce_and_kd) against the unfused pair (hard_ce + kd_loss) on one
chunk of logits: forward + backward time, alternating (fused, unfused, unfused, fused, ...), medians, per T.

    python benchmarks/fused_loss.py --rows 1024 --vocab 16384 --k 64 --repeats 8 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdcache.targets import SparseTargets
from kdcache.train.fused import ce_and_kd
from kdcache.train.losses import LossConfig, hard_ce, kd_loss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024, help="rows of the chunk (the objective's chunk_size)")
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--temperatures", default="1,2")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.rows, args.vocab, generator=g) * 3
    lp = torch.log_softmax(torch.randn(args.rows, args.vocab, generator=g) * 3, -1)
    top, ids = lp.topk(args.k, -1)
    rest = lp.scatter(-1, ids, float("-inf"))
    temps = tuple(float(t) for t in args.temperatures.split(","))
    grid = torch.stack([torch.logsumexp(rest / t, -1) for t in temps], 1)
    targets = SparseTargets(ids=ids, logprobs=top, tail_logmass=torch.logsumexp(rest, -1), tail_grid=grid,
                            tail_temperatures=temps)
    labels = torch.randint(0, args.vocab, (args.rows,), generator=g)
    print(f"chunk {args.rows} x {args.vocab}, k={args.k}, {torch.get_num_threads()} threads, forward_kl, alpha 0.5")
    for T in temps:
        cfg = LossConfig(kind="forward_kl", alpha=0.5, temperature=T)

        def fused(cfg=cfg):
            x = z.clone().requires_grad_()
            ce, kd = ce_and_kd(cfg, x, labels, targets)
            (ce.sum() + kd.sum()).backward()

        def unfused(cfg=cfg):
            x = z.clone().requires_grad_()
            ce, kd = hard_ce(x, labels, reduction="none"), kd_loss(cfg, x, targets, reduction="none")
            (ce.sum() + kd.sum()).backward()

        arms = {"fused": fused, "unfused": unfused}
        times = {name: [] for name in arms}
        fused(), unfused()
        for r in range(args.repeats):
            for name in (("fused", "unfused") if r % 2 == 0 else ("unfused", "fused")):
                start = time.perf_counter()
                arms[name]()
                times[name].append(time.perf_counter() - start)
        f, u = statistics.median(times["fused"]), statistics.median(times["unfused"])
        print(f"T={T:g}: fused {f:.4f} s, unfused {u:.4f} s, fused / unfused {f / u:.3f}")


if __name__ == "__main__":
    main()
