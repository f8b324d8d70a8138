"""Benchmark the vLLM teacher backend: cache-build time / the same engine's time over the same sequences, no logprobs.

Everything is local: a byte-level BPE tokenizer is trained on the shipped UPSC sample (kdcache.tiny), a randomly
initialised Qwen2 of the requested shape is saved to a scratch folder, and ONE vLLM engine is started on it (with
kdcache's worker extension). Engine start-up is never timed.

Timed, alternately (plain, build[route], plain, build[route], ... after one untimed warm-up of each):

* plain: `llm.generate` over exactly the token sequences (prompt + target) the build scores, in the build's own
  batches (shard by shard, longest first, teacher.batch_size at a time), with SamplingParams(max_tokens=1,
  temperature=0, detokenize=False, skip_reading_prefix_cache=True) and no logprobs of any kind: the engine's
  prefill of every sequence plus one sampled token, which is the least any scoring job must do;
* build[exact]: a whole `build_cache` with teacher.backend=vllm (read rows, tokenise, score top-k + tail at the
  target positions inside the workers, write and commit shards, finalize), on the same engine;
* build[prompt_logprobs]: the same with teacher.vllm.scoring=prompt_logprobs (vLLM's public prompt_logprobs = k at
  every position, Python FlatLogprobs, derived tail), for comparison.

The figure asked for is build[exact] / plain at k = 64 (target: at most 1.10). Medians are reported.

Example (the CPU configuration recorded in benchmarks/RESULTS.md):

    python benchmarks/vllm_cache_build.py --backend vllm --k 64 --repeats 5 --json /tmp/vllm_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROMPT, REPO, TARGET, cpu_name, upsc_rows, write_data  # noqa: E402  (benchmarks/common.py)

sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm_cache_build.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backend", choices=["vllm"], default="vllm", help="teacher backend benchmarked")
    m = p.add_argument_group("model (randomly initialised Qwen2, built locally; head_dim = hidden/heads >= 64 on CPU)")
    m.add_argument("--hidden-size", type=int, default=512)
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--heads", type=int, default=8)
    m.add_argument("--tokenizer-vocab", type=int, default=2048)
    m.add_argument("--vocab-size", type=int, default=None, help="LM-head rows (default: the tokenizer's size)")
    d = p.add_argument_group("data and build")
    d.add_argument("--examples", type=int, default=256, help="rows, cycling the 520 UPSC golden+silver rows")
    d.add_argument("--max-length", type=int, default=512)
    d.add_argument("--distill", choices=["target", "all"], default="target")
    d.add_argument("--k", type=int, default=64)
    d.add_argument("--batch-size", type=int, default=256, help="teacher.batch_size: sequences per llm.generate call")
    d.add_argument("--shard-size", type=int, default=256)
    d.add_argument("--chunk-size", type=int, default=1024)
    d.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    d.add_argument("--routes", default="exact,prompt_logprobs", help="scoring routes to time, comma-separated")
    e = p.add_argument_group("engine")
    e.add_argument("--vllm", action="append", default=[], metavar="KEY=VALUE",
                   help="extra vllm.LLM setting (YAML value), repeatable; CPU defaults: enforce_eager=true, "
                        "gpu_memory_utilization=0.2")
    r = p.add_argument_group("measurement")
    r.add_argument("--repeats", type=int, default=5)
    r.add_argument("--workdir", default=None)
    r.add_argument("--json", default=None, metavar="PATH")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import torch
    import yaml

    from kdcache.config import CacheBuildConfig, load_config
    from kdcache.data.sources import read_rows
    from kdcache.teacher.build import build_cache, prepare_rows
    from kdcache.teacher.vllm import VLLMTeacher, start_engine
    from kdcache.tiny import build_qwen2, build_tokenizer, save_model

    args = parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kdcache-vllm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base = upsc_rows()
        tokenizer = build_tokenizer([f"{r['title']} {r['text']} {r['gs_paper']}" for r in base], args.tokenizer_vocab)
        model = build_qwen2(args.vocab_size or len(tokenizer), hidden_size=args.hidden_size, layers=args.layers,
                            heads=args.heads, seed=0)
        teacher = save_model(model, tokenizer, work / "teacher")
        params = sum(p.numel() for p in model.parameters())
        del model
        data = work / "data.jsonl"
        write_data(data, base, args.examples)
        settings = {"enforce_eager": True, "gpu_memory_utilization": 0.2, "max_logprobs": max(args.k, 20)}
        for item in args.vllm:
            key, value = item.split("=", 1)
            settings[key] = yaml.safe_load(value)

        def config(output: str, route: str) -> CacheBuildConfig:
            return load_config(CacheBuildConfig, None, [
                f"output={output}", f"teacher.model={teacher}", "teacher.backend=vllm", f"teacher.dtype={args.dtype}",
                f"teacher.batch_size={args.batch_size}", f"teacher.chunk_size={args.chunk_size}",
                f"teacher.vllm={json.dumps({**settings, 'scoring': route})}",
                f"data.paths=[{data}]", "data.id_field=id", f"template.prompt={json.dumps(PROMPT)}",
                f"template.target={json.dumps(TARGET)}", f"template.distill={args.distill}", f"sparsifier.k={args.k}",
                f"max_length={args.max_length}", f"shard_size={args.shard_size}", "progress=false",
            ])

        probe = config(str(work / "probe"), "exact")
        t0 = time.perf_counter()
        llm = start_engine(probe.teacher, args.k)
        startup = time.perf_counter() - t0
        routes = [r for r in args.routes.split(",") if r]
        backends = {route: VLLMTeacher(probe.teacher, len(tokenizer), llm=llm, scoring=route) for route in routes}
        score_time = {route: 0.0 for route in routes}  # time inside backend.score (the rest is kdcache's own work)
        for route, backend in backends.items():
            def timed(ids, masks, sparsify, _score=backend.score, _route=route):
                t = time.perf_counter()
                try:
                    return _score(ids, masks, sparsify)
                finally:
                    score_time[_route] += time.perf_counter() - t
            backend.score = timed

        # The build's own batches: shard by shard, longest first, batch_size at a time.
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        rows, _ = read_rows(probe.data)
        batches, tokens, targets = [], 0, 0
        for start in range(0, len(rows), probe.shard_size):
            examples, _ = prepare_rows(probe, tokenizer, rows[start : start + probe.shard_size], start)
            examples.sort(key=lambda e: -len(e.encoded.input_ids))
            for b in range(0, len(examples), probe.teacher.batch_size):
                chunk = examples[b : b + probe.teacher.batch_size]
                batches.append([TokensPrompt(prompt_token_ids=list(e.encoded.input_ids)) for e in chunk])
                tokens += sum(len(e.encoded.input_ids) for e in chunk)
                targets += sum(sum(e.encoded.target_mask) for e in chunk)
        # No prefix-cache reads: the plain pass repeats the same sequences, and a cached prefix would skip its prefill
        # (a scoring request never reads the prefix cache, since its prompt rows must be computed).
        plain_params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, skip_reading_prefix_cache=True)

        def plain() -> float:
            t = time.perf_counter()
            for batch in batches:
                llm.generate(batch, plain_params, use_tqdm=False)
            return time.perf_counter() - t

        def build(route: str) -> float:
            out = work / f"cache-{route}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            before = score_time[route]
            result = build_cache(config(str(out), route), backend=backends[route], tokenizer=tokenizer)
            elapsed = time.perf_counter() - t
            assert result.finalized
            scored[route].append(score_time[route] - before)
            return elapsed

        times: dict[str, list[float]] = {"plain": [], **{route: [] for route in routes}}
        scored: dict[str, list[float]] = {route: [] for route in routes}
        plain()  # warm-up
        for route in routes:
            build(route)
        for _ in range(args.repeats):
            times["plain"].append(plain())
            for route in routes:
                times[route].append(build(route))
                times["plain"].append(plain())
        for route in routes:
            del scored[route][0]  # the warm-up build
        med = {name: statistics.median(values) for name, values in times.items()}
        score_med = {route: statistics.median(values) for route, values in scored.items()}
        from kdcache.store.diff import diff_caches

        agreement = None
        if len(routes) > 1:
            report = diff_caches(str(work / f"cache-{routes[0]}"), str(work / f"cache-{routes[1]}"))
            agreement = {"top1_agreement": report.top1_agreement, "max_logprob_diff": report.max_logprob_diff,
                         "max_tail_diff": report.max_tail_diff}
        import vllm

        cpu = cpu_name()
        result = {
            "machine": f"{cpu}, {os.cpu_count()} cores, vllm {vllm.__version__}, torch {torch.__version__}, "
                       f"Python {platform.python_version()}",
            "model": {"hidden": args.hidden_size, "layers": args.layers, "heads": args.heads,
                      "vocab": args.vocab_size or len(tokenizer), "parameters": params, "dtype": args.dtype},
            "data": {"examples": args.examples, "tokens": tokens, "targets": targets, "distill": args.distill,
                     "k": args.k, "batches": len(batches)},
            "engine": settings, "startup_s": startup, "repeats": args.repeats,
            "times_s": times, "median_s": med,
            "ratio": {route: med[route] / med["plain"] for route in routes},
            "score_median_s": score_med,
            "score_ratio": {route: score_med[route] / med["plain"] for route in routes},
            "route_agreement": agreement,
        }
        print(f"machine      {result['machine']}")
        print(f"model        Qwen2 hidden {args.hidden_size}, {args.layers} layers, {args.heads} heads, vocab "
              f"{result['model']['vocab']} ({params:,} parameters, {args.dtype})")
        print(f"data         {args.examples} examples, {tokens} tokens, {targets} target tokens, distill="
              f"{args.distill}, k={args.k}, {len(batches)} generate calls")
        print(f"engine       start-up {startup:.1f} s (not timed below); settings {settings}")
        print(f"plain        median {med['plain']:.3f} s  {['%.3f' % t for t in times['plain']]}")
        for route in routes:
            print(f"build[{route}] median {med[route]:.3f} s  {['%.3f' % t for t in times[route]]}  "
                  f"ratio build/plain = {result['ratio'][route]:.3f}")
            print(f"  of which in backend.score: median {score_med[route]:.3f} s, ratio score/plain = "
                  f"{result['score_ratio'][route]:.3f} (the rest: rows, tokenising, writing shards, finalize)")
        if agreement:
            print(f"routes agree top-1 {agreement['top1_agreement']:.6f}, max |dlogprob| "
                  f"{agreement['max_logprob_diff']:.2e}, max |dtail| {agreement['max_tail_diff']:.2e}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return result
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
