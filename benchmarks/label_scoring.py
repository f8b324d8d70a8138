"""Label scoring against one forward pass over the prompts (issue 14, item 7: at most 1.5x for single-token labels).

A Qwen2 model built from a config (no download) scores `--labels` labels after `--prompts` prompts of about
`--prompt-len` tokens, batch by batch as `kdcache eval` does. Four arms, alternated round by round, medians:

- forward: the model's final hidden states over the prompts and the LM head at each prompt's last position (the
  floor: any label scoring needs this much);
- single: `score_labels` as eval calls it, one-token labels (one forward over the prompts);
- multi: `score_labels`, labels of 2, 3, 4 tokens in turn with no shared prefix (the worst case for the shared
  prompt KV cache: every label's prefix is its own input);
- per-label: the old path for the multi-token labels, one (prompt + label) sequence per pair.

    python benchmarks/label_scoring.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdcache.eval.scoring import _score_per_label, score_labels  # noqa: E402
from kdcache.modeling import final_hidden_states, output_logits  # noqa: E402
from kdcache.tiny import build_qwen2  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompts", type=int, default=64, help="prompts per batch")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=96, help="mean prompt length (lengths vary +-25%%)")
    p.add_argument("--labels", type=int, default=15)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-per-label", action="store_true", help="leave out the per-label arm (the slow one)")
    return p.parse_args(argv)


@torch.inference_mode()
def forward_floor(model, prompts, pad_id: int) -> torch.Tensor:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    last = final_hidden_states(model, ids, mask)[torch.arange(len(prompts)), mask.sum(1) - 1]
    return output_logits(model, last).float().log_softmax(-1)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_qwen2(args.vocab, hidden_size=args.hidden_size, layers=args.layers, heads=4, seed=0).eval()
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.batches):
        lengths = torch.randint(int(args.prompt_len * 0.75), int(args.prompt_len * 1.25) + 1, (args.prompts,),
                                generator=generator)
        batches.append([torch.randint(3, args.vocab, (int(n),), generator=generator).tolist() for n in lengths])
    labels = [[10 + i] for i in range(args.labels)]
    multi = [[100 + 10 * i + t for t in range(2 + i % 3)] for i in range(args.labels)]  # 2-4 tokens, no shared prefix
    cpu = torch.device("cpu")
    arms = {
        "forward": lambda b: forward_floor(model, b, 0),
        "single": lambda b: score_labels(model, b, labels, 0, vocab_size=args.vocab),
        "multi": lambda b: score_labels(model, b, multi, 0, vocab_size=args.vocab),
        "per-label": lambda b: _score_per_label(model, b, multi, 0, cpu, 1024, args.vocab),
    }
    if args.skip_per_label:
        del arms["per-label"]
    for fn in arms.values():  # warm-up
        fn(batches[0])
    times = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, fn in arms.items():
            start = time.perf_counter()
            for b in batches:
                fn(b)
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    rows = args.prompts * args.batches
    print(f"{rows} prompts of ~{args.prompt_len} tokens, {args.labels} labels (one-token; 2-4 tokens), Qwen2 hidden "
          f"{args.hidden_size} x {args.layers} layers, vocab {args.vocab}, {args.threads} thread(s), "
          f"medians of {args.repeats}")
    for name, value in med.items():
        print(f"  {name:<10} {value:8.3f} s   ({rows / value:,.0f} prompts/s)")
    print(f"single / forward:    {med['single'] / med['forward']:.2f}  (one-token labels; target <= 1.5)")
    print(f"multi / forward:     {med['multi'] / med['forward']:.2f}  (2-4-token labels, shared prompt KV cache)")
    if "per-label" in med:
        print(f"per-label / forward: {med['per-label'] / med['forward']:.2f}  (2-4-token labels, one sequence per "
              "label)")
        print(f"per-label / multi:   {med['per-label'] / med['multi']:.2f}")


if __name__ == "__main__":
    main()
