"""How wrong the single-atom tail is at T = 2 on a Qwen-sized vocabulary, and that the stored grid is exact.

    python benchmarks/tempered_tail.py     # prints the teacher tail bucket at T = 2, three ways (CPU, seconds)
"""
import sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "tests"))
from test_tempering import zipf_logits, stored, dense_tail
from kdcache.tempering import single_atom_tail
V, k = 151665, 64
logits = zipf_logits(4, V, seed=0, peak=8.0)
tau1, grid = stored(logits, k, (2.0,))
lp = torch.log_softmax(logits.double(), -1)
top = lp.topk(k, -1).values
for name, tau in (("single atom", single_atom_tail(tau1.double(), 2.0)), ("stored grid", grid[:, 0].double()),
                  ("dense truth", dense_tail(logits, k, 2.0))):
    bucket = torch.softmax(torch.cat([top / 2, tau[:, None]], 1), -1)[:, -1]
    print(f"{name:12s} tail bucket at T=2: " + " ".join(f"{b:.3f}" for b in bucket.tolist()))
print("top-1 prob:", " ".join(f"{p:.2f}" for p in lp.max(-1).values.exp().tolist()))
