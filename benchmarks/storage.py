"""Storage benchmark (issue 13): bytes per target token of every log-prob encoding, what each costs in bucket KL,
and DistillKit's compression side by side, on one realistic teacher's positions.

Teacher (benchmarks/storage_teacher.py): the real Qwen2.5 vocabulary (151,665 tokens) and a small Qwen2 trained on
WordNet noun glosses; "raw" is its own output (broad, like an early-training model), "sharpened" the same model with
every logit divided by T, chosen so the mean entropy is under 1.5 nats (a large teacher is sharper still).

Positions: held-out glosses ("word" -> ": definition"), every token after the first distilled. One float32 cache at
k = 128 is built per teacher with the real `build_cache` (HF backend, plain float32 log-probs); it is the reference.
Every setting is then written from those same teacher outputs through the real writer (`commit_shard` with the
setting's encoding, plan, finalize) and read back through `CacheReader`: top-k at a smaller k is the reference's
first k entries with the tail (and the tempered tails) recomputed exactly in float64.

Figures per setting: bytes per target token over all shard files and over the sparse arrays alone (ids, log-probs,
tail log-mass; the tempered tails, 5 per target by default, are counted in "all files"), mean and p99 bucket KL
against the float32 cache at the same k (the generalised KL sum p log(p/q) - p + q over the k + 1 buckets, which
is >= 0 and is the KL when both sum to one), top-1 agreement, write time (encode + write + checksums) and read
throughput (CacheReader.read_shard of every shard, target tokens/s), both timed alternately over --repeats rounds,
medians. DistillKit (benchmarks/storage_peer.py, its own code) is run on the same positions at its recommended and
budget settings; its tail bucket is the mass its k values leave, as its `missing_probability_handling` uses it.

    python benchmarks/storage.py --work /tmp/storage_bench --json /tmp/storage.json     # a few minutes on 2 CPUs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import storage_peer  # noqa: E402
from storage_teacher import gloss_texts, qwen25_tokenizer, sharpened_copy, train_teacher  # noqa: E402

from kdcache.config import CacheBuildConfig, load_config  # noqa: E402
from kdcache.store.encoding import LogprobEncoding  # noqa: E402
from kdcache.store.location import CacheLocation  # noqa: E402
from kdcache.store.manifest import finalize, write_or_check_plan  # noqa: E402
from kdcache.store.reader import CacheReader  # noqa: E402
from kdcache.store.writer import commit_shard  # noqa: E402
from kdcache.teacher.build import build_cache  # noqa: E402

SPARSE = ("sparse_ids", "sparse_logprobs", "logprob_top", "logprob_offsets", "tail_logmass")
# (label, logprob_dtype, logprob_step, logprob_growth): plain arrays, the default, the smaller setting, and neighbours
# (uniform steps, as before the growth, among them).
ENCODINGS = [("float32", "float32", None, None), ("float16", "float16", None, None),
             ("uniform 2^-9", "float16", 2.0**-9, None), ("uniform 2^-7", "float16", 2.0**-7, None),
             ("uniform 2^-5", "float16", 2.0**-5, None),
             ("growth 2^-8 (default)", "float16", 2.0**-8, 4.0), ("growth 0.02 (small)", "float16", 0.02, 4.0),
             ("growth 2^-4", "float16", 2.0**-4, 4.0)]
#: The settings measured at every k (the others at k = 64 only).
EVERY_K = ("float16", "growth 2^-8 (default)", "growth 0.02 (small)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="storage/bench/storage", help="scratch folder (tokenizer, teachers, caches "
                   "are kept and reused)")
    p.add_argument("--rows", type=int, default=400, help="held-out glosses scored (about 14 targets each)")
    p.add_argument("--teacher-steps", type=int, default=60, help="AdamW steps of the small LM (batch 8)")
    p.add_argument("--k", type=int, nargs="+", default=[32, 64, 128], help="kdcache k values")
    p.add_argument("--max-entropy", type=float, default=1.5, help="the sharpened teacher's mean entropy bound")
    p.add_argument("--repeats", type=int, default=3, help="alternating write/read rounds (medians)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write every figure here")
    return p.parse_args(argv)


def reference_cache(work: Path, teacher: Path, rows: list[str], tag: str) -> str:
    """The float32 k = 128 cache of `teacher` on `rows` (built once with the real build_cache)."""
    out = work / f"ref-{tag}"
    if (out / "manifest.json").is_file():
        return str(out)
    data = work / "rows.jsonl"
    with open(data, "w") as f:
        for text in rows:
            word, definition = text.split(": ", 1)
            f.write(json.dumps({"input": word, "target": ": " + definition}) + "\n")
    config = load_config(CacheBuildConfig, None, [
        f"output={out}", f"teacher.model={teacher}", f"data.paths=[{data}]", "template.distill=all",
        "sparsifier.k=128", "sparsifier.logprob_dtype=float32", "sparsifier.logprob_step=null", "shard_size=200",
        "max_length=128", "teacher.batch_size=16", "skip_bad_rows=true", "progress=false"])
    build_cache(config)
    return str(out)


def mean_entropies(reader: CacheReader, model_dir: Path, temperatures: list[float], examples: int = 40) -> list[float]:
    """Mean entropy (nats) of softmax(logits / T) at the target positions of the cache's first `examples`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    total, count = np.zeros(len(temperatures)), 0
    with torch.inference_mode():
        for _, example in zip(range(examples), reader.iter_examples()):
            ids = torch.as_tensor(example.input_ids[None].astype(np.int64))
            logits = model(input_ids=ids).logits[0, :-1][torch.as_tensor(example.target_mask[1:])]
            for j, t in enumerate(temperatures):
                logp = torch.log_softmax(logits / t, -1)
                total[j] += float(-(logp.exp() * logp).sum())
            count += logits.shape[0]
    return list(total / count)


def load_all(reader: CacheReader):
    shards = [reader.read_shard(i) for i in range(reader.num_shards)]
    cat = lambda name: np.concatenate([getattr(s, name) for s in shards])  # noqa: E731
    return shards, cat("sparse_ids"), cat("sparse_logprobs").astype(np.float64), cat("tail_logmass").astype(np.float64)


def at_k(data, k: int, temperatures):
    """A float32 shard of k = 128 cut to its top k: the tail and tempered tails recomputed exactly (float64)."""
    lp = data.sparse_logprobs.astype(np.float64)
    rest = lp[:, k:]
    tail = np.logaddexp(data.tail_logmass.astype(np.float64), np.logaddexp.reduce(rest, axis=1))
    grid = data.tail_tempered
    if grid is not None:
        grid = np.stack([np.logaddexp(grid[:, j].astype(np.float64), np.logaddexp.reduce(rest / t, axis=1))
                         for j, t in enumerate(temperatures)], axis=1).astype(np.float32)
    return dataclasses.replace(data, sparse_ids=np.ascontiguousarray(data.sparse_ids[:, :k]),
                               sparse_logprobs=np.ascontiguousarray(data.sparse_logprobs[:, :k]),
                               tail_logmass=tail.astype(np.float32), tail_tempered=grid)


def write_cache(url: str, ref: CacheReader, shards, k: int, dtype: str, step, growth=None) -> float:
    """Write `shards` (already at k) as a cache with this encoding; returns the seconds spent in commit_shard."""
    import shutil

    shutil.rmtree(url, ignore_errors=True)
    sparsifier = dataclasses.replace(ref.manifest.sparsifier, k=k, logprob_dtype=dtype, logprob_step=step,
                                     logprob_growth=growth)
    plan = dataclasses.replace(ref.manifest.plan, sparsifier=sparsifier)
    location = CacheLocation(url)
    hashed = write_or_check_plan(location, plan)
    encoding = LogprobEncoding.of(sparsifier)
    if encoding.step is None:  # plain: the build stores the dtype itself
        shards = [dataclasses.replace(s, sparse_logprobs=s.sparse_logprobs.astype(dtype)) for s in shards]
    spent = 0.0
    for entry, data in zip(ref.manifest.shards, shards):
        start = time.perf_counter()
        commit_shard(location, entry.shard, data, {"rows": list(entry.rows), "skipped_rows": entry.skipped_rows,
                                                   "plan_hash": hashed}, encoding)
        spent += time.perf_counter() - start
    finalize(location)
    return spent


def bucket_kl(lp_ref, tail_ref, lp, tail) -> np.ndarray:
    """Generalised KL per row between the (k+1)-bucket reference and a decoded copy (q need not sum to one)."""
    p = np.exp(np.concatenate([lp_ref, tail_ref[:, None]], axis=1))
    q = np.exp(np.concatenate([lp, tail[:, None]], axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0) - p + q
    return terms.sum(axis=1)


def cache_bytes(url: str) -> tuple[int, int, int]:
    """(all shard file bytes, sparse-array bytes, target tokens) of a finished cache."""
    manifest = CacheReader(url, verify_checksums=False).manifest
    total = sparse = 0
    for entry in manifest.shards:
        for key, f in entry.files.items():
            total += f.bytes
            parts = key.split("/")
            sparse += f.bytes if len(parts) > 1 and parts[1] in SPARSE else 0
    return total, sparse, manifest.counts.num_targets


def read_pass(url: str) -> float:
    reader = CacheReader(url)
    start = time.perf_counter()
    for i in range(reader.num_shards):
        reader.read_shard(i)
    return time.perf_counter() - start


def measure_teacher(args, work: Path, tag: str, ref_url: str, vocab: int) -> list[dict]:
    ref = CacheReader(ref_url)
    temps = ref.manifest.sparsifier.tail_temperatures or ()
    shards, ids128, lp128, tail128 = load_all(ref)
    n = ids128.shape[0]
    settings = [(k, label, dtype, step, growth) for k in args.k for label, dtype, step, growth in ENCODINGS
                if k == 64 or label in EVERY_K]
    cut = {k: [at_k(s, k, temps) for s in shards] for k in args.k}
    urls = {s: str(work / f"{tag}-k{s[0]}-{s[1].split()[0]}-{s[3]}-{s[4]}") for s in settings}
    writes = {s: [] for s in settings}
    reads = {s: [] for s in settings}
    for _ in range(args.repeats):  # alternate the settings, round by round
        for s in settings:
            writes[s].append(write_cache(urls[s], ref, cut[s[0]], s[0], s[2], s[3], s[4]))
        for s in settings:
            reads[s].append(read_pass(urls[s]))
    rows = []
    for s in settings:
        k, label = s[0], s[1]
        _, ids, lp, tail = load_all(CacheReader(urls[s]))
        lp_ref = lp128[:, :k]
        tail_ref = np.logaddexp(tail128, np.logaddexp.reduce(lp128[:, k:], axis=1))
        kl = bucket_kl(lp_ref, tail_ref, lp, tail)
        top1 = ids[np.arange(n), lp.argmax(axis=1)] == ids128[:, 0]
        total, sparse, targets = cache_bytes(urls[s])
        rows.append(dict(teacher=tag, method="kdcache", k=k, setting=label, all_bytes=total / targets,
                         sparse_bytes=sparse / targets, kl_mean=float(kl.mean()), kl_p99=float(np.quantile(kl, 0.99)),
                         top1=float(top1.mean()), write_ms_per_1k=1e3 * statistics.median(writes[s]) / targets * 1e3,
                         read_targets_per_s=targets / statistics.median(reads[s]), targets=targets))
    if storage_peer.available():
        for setting in storage_peer.SETTINGS:
            out = storage_peer.run(setting, ids128, lp128.astype(np.float32), vocab)
            k = out["k"]
            lp_ref = lp128[:, :k]
            tail_ref = np.logaddexp(tail128, np.logaddexp.reduce(lp128[:, k:], axis=1))
            lp = out["logprobs"].astype(np.float64)
            order = np.argsort(out["ids"], axis=1)  # match DistillKit's ids to the reference's, entry by entry
            ref_order = np.argsort(ids128[:, :k], axis=1)
            same_ids = np.array_equal(np.take_along_axis(out["ids"], order, 1),
                                      np.take_along_axis(ids128[:, :k].astype(np.int64), ref_order, 1))
            lp_matched = np.take_along_axis(np.take_along_axis(lp, order, 1), np.argsort(ref_order, 1), 1)
            tail = np.log(np.clip(-np.expm1(np.logaddexp.reduce(lp, axis=1)), 1e-30, None))
            kl = bucket_kl(lp_ref, tail_ref, lp_matched, tail)
            top1 = out["ids"][np.arange(n), lp.argmax(axis=1)] == ids128[:, 0]
            rows.append(dict(teacher=tag, method="DistillKit", k=k, setting=setting, all_bytes=out["parquet"] / n,
                             sparse_bytes=out["payload"] / n, kl_mean=float(kl.mean()),
                             kl_p99=float(np.quantile(kl, 0.99)), top1=float(top1.mean()), same_ids=same_ids,
                             write_ms_per_1k=1e3 * out["encode_s"] / n * 1e3,
                             read_targets_per_s=n / out["decode_s"], targets=n))
    return rows


def id_layouts(ids: np.ndarray) -> dict[str, float]:
    """Bytes per target of [N, k] int32 top-k ids under Blosc-zstd in candidate layouts (one chunk, as a shard)."""
    from numcodecs import Blosc

    def size(a: np.ndarray, shuffle: int) -> int:
        return len(Blosc(cname="zstd", clevel=3, shuffle=shuffle).encode(np.ascontiguousarray(a)))

    n = ids.shape[0]
    order = np.argsort(ids, axis=1, kind="stable")
    ranked = np.take_along_axis(ids, order, 1)
    gaps = np.diff(ranked, axis=1, prepend=0).astype(np.uint32)
    permutation = np.argsort(order, axis=1).astype(np.uint8)  # rank of each sorted id
    return {
        "int32, byte shuffle (before)": size(ids.astype(np.int32), Blosc.SHUFFLE) / n,
        "int32, bit shuffle": size(ids.astype(np.int32), Blosc.BITSHUFFLE) / n,
        "int32 columns (rank-major), bit shuffle": size(ids.astype(np.int32).T, Blosc.BITSHUFFLE) / n,
        "sorted gaps uint32 + permutation uint8, bit shuffle":
            (size(gaps, Blosc.BITSHUFFLE) + size(permutation, Blosc.BITSHUFFLE)) / n,
        "low uint16 + high uint8 planes, bit shuffle":
            (size((ids & 0xFFFF).astype(np.uint16), Blosc.BITSHUFFLE)
             + size((ids >> 16).astype(np.uint8), Blosc.BITSHUFFLE)) / n,
    }


def print_table(rows: list[dict]) -> None:
    print(f"\n{'teacher':<10} {'method':<10} {'k':>4} {'setting':<24} {'B/tgt all':>9} {'B/tgt sparse':>12} "
          f"{'KL mean':>9} {'KL p99':>9} {'top-1':>7} {'write ms/1k':>11} {'read tgt/s':>11}")
    for r in rows:
        print(f"{r['teacher']:<10} {r['method']:<10} {r['k']:>4} {r['setting']:<24} {r['all_bytes']:>9.1f} "
              f"{r['sparse_bytes']:>12.1f} {r['kl_mean']:>9.2e} {r['kl_p99']:>9.2e} {100 * r['top1']:>6.2f}% "
              f"{r['write_ms_per_1k']:>11.1f} {r['read_targets_per_s']:>11,.0f}")
    print("(DistillKit: 'B/tgt all' is its Parquet file, 'B/tgt sparse' its packed payload; write/read are its "
          "compress/decompress)")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = qwen25_tokenizer(work / "qwen25")
    texts = gloss_texts()
    teacher = train_teacher(tokenizer, texts[:40000], work / "teacher", steps=args.teacher_steps)
    rows_text = texts[-args.rows:]
    raw_url = reference_cache(work, teacher, rows_text, "raw")
    candidates = [1.0, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1]
    entropies = mean_entropies(CacheReader(raw_url), teacher, candidates)
    temperature = next(t for t, h in zip(candidates, entropies) if h < args.max_entropy)
    print(f"teacher {teacher}: vocabulary {len(tokenizer):,}; mean entropy {entropies[0]:.2f} nats raw, "
          f"{dict(zip(candidates, entropies))[temperature]:.2f} at T = {temperature} (sharpened)")
    sharp = sharpened_copy(teacher, work / f"sharp-{temperature}", temperature)
    sharp_url = reference_cache(work, sharp, rows_text, f"sharp-{temperature}")
    results, layouts = [], {}
    for tag, url in (("raw", raw_url), ("sharpened", sharp_url)):
        results += measure_teacher(args, work, tag, url, len(tokenizer))
        ids = load_all(CacheReader(url))[1][:, :64]
        layouts[tag] = id_layouts(ids)
    print_table(results)
    print("\nk = 64 ids, bytes per target:")
    for name in layouts["raw"]:
        print(f"  {name:<52} raw {layouts['raw'][name]:6.1f}   sharpened {layouts['sharpened'][name]:6.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(entropy_raw=entropies[0], temperature=temperature,
                                                   entropy_sharpened=dict(zip(candidates, entropies))[temperature],
                                                   rows=results, id_layouts=layouts), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
