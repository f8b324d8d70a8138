"""`kdcache cache build|info|verify|finalize|diff|import|export`: write a teacher cache, inspect, check or compare
caches, and convert them from and to other tools' formats (kdcache.interop)."""

from __future__ import annotations

import functools
import json
import sys

import click

from kdcache.cli.options import config_file_option, config_option, options_to_overrides, set_option
from kdcache.config import CacheBuildConfig
from kdcache.errors import KdcacheError, friendly_errors

_option = functools.partial(config_option, CacheBuildConfig)


@click.group()
def cache() -> None:
    """Build, inspect, verify, finalize and compare teacher caches; import and export other tools' formats."""


@cache.command("build")
@config_file_option
@_option("output", "--output", "-o", needed=True, help="Cache folder or fsspec URL to write (resumed when it exists).")
@_option("teacher.model", "--teacher", needed=True,
         help="Teacher model: a local folder or a hub id with weights available locally.")
@_option("teacher.backend", "--backend", help="Teacher backend.")
@_option("teacher.dtype", "--dtype", help="Teacher dtype.")
@_option("teacher.device", "--device", help="cpu, cuda, cuda:1 or auto.")
@_option("teacher.batch_size", "--batch-size", help="Sequences per teacher batch.")
@_option("tokenizer", "--tokenizer", help="Tokenizer, when not the teacher's own.")
@_option("data.paths", "--data", help="A JSONL/CSV/Parquet file or glob, a `datasets` folder, or a hub dataset id "
                                     "(repeatable; docs/data.md).")
@_option("data.format", "--data-format", help="Format of the data files (auto: from the file name).")
@_option("data.id_field", "--id-field", help="Field holding a stable example id.")
@_option("data.label_fields", "--label-field", help="Field copied into the records as a label (repeatable).")
@_option("template.prompt", "--prompt",
         help="Prompt template, e.g. $'Article: {text}\\nGS paper:' (bash's $'...' makes \\n a line break; in a "
              "YAML job spec use double quotes).")
@_option("template.target", "--target", help="Target template, e.g. ' {gs_paper}'.")
@_option("template.distill", "--distill", help="Distill the target only, or every token.")
@_option("sparsifier.kind", "--sparsifier", help="Keep top-k + tail, or sampled tokens.")
@_option("sparsifier.k", "--k", help="Top-k entries (or draws, for sample) per target position.")
@_option("max_length", "--max-length", help="Longest sequence in tokens; prompts are cut from the left.")
@_option("shard_size", "--shard-size", help="Examples per shard.")
@_option("num_workers", "--num-workers", help="Total workers writing this cache (one per node).")
@_option("worker_index", "--worker-index", help="This worker's index in [0, num-workers).")
@_option("generate.enabled", "--generate", sets=True,
         help="Teacher-generated targets: the teacher writes each answer (a silver set); see generate.* keys.")
@_option("generate.num_samples", "--num-samples", help="With --generate: answers per prompt.")
@_option("generate.max_new_tokens", "--max-new-tokens", help="With --generate: longest answer in tokens.")
@_option("generate.temperature", "--gen-temperature", help="With --generate: sampling temperature, 0 = greedy.")
@_option("skip_bad_rows", "--skip-bad-rows", sets=True, help="Skip rows that cannot be used, and count them.")
@_option("strict", "--strict", sets=True,
         help="Refuse rows without an id or with a repeated id (--id-field), instead of warning with counts.")
@_option("progress", "--no-progress", sets=False, help="No progress bar.")
@set_option("teacher.chunk_size=512")
@friendly_errors
def cache_build(config_path, overrides, **options) -> None:
    """Run a teacher over a dataset and write its sparse soft labels into a sharded cache.

    \b
    Only the target positions are scored, chunk by chunk, so full-vocabulary logits are never held for a batch.
    Re-running the same command resumes after the last complete shard. With --num-workers N, run one command
    per node with --worker-index 0..N-1 on the same --output: each writes its own shards, and the last to finish
    writes the manifest (or run `kdcache cache finalize`).
    """
    from kdcache.config import load_config
    from kdcache.teacher.build import build_cache

    config = load_config(CacheBuildConfig, config_path, [*options_to_overrides(options), *overrides])
    result = build_cache(config)
    if result.bad_rows:
        click.echo(f"skipped {len(result.bad_rows)} bad rows; the first ones:", err=True)
        for bad in result.bad_rows[:5]:
            click.echo(f"  {bad}", err=True)
    click.echo(
        f"wrote {len(result.shards_written)} shards, {len(result.shards_skipped)} already done "
        f"(worker {config.worker_index} of {config.num_workers}) to {config.output}"
    )
    if result.shards_written:
        click.echo(f"wall time {result.wall_s:.1f} s: {result.tokens_per_s:,.0f} tokens/s, "
                   f"{result.targets_written / result.wall_s:,.0f} target tokens/s")
    if result.finalized:
        counts = result.manifest.counts
        click.echo(f"cache complete: {counts.num_examples} examples, {counts.num_targets} target tokens")
    else:
        click.echo("other workers' shards are still missing; the last worker to finish writes the manifest")


@cache.command("info")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--no-verify-checksums", "skip_checksums", is_flag=True,
              help="Skip the sha256 of each shard file read (for a cache `kdcache cache verify` has checked).")
@friendly_errors
def cache_info(path, as_json, skip_checksums) -> None:
    """Print a cache's manifest summary and statistics (examples, tokens, bytes per target token, mass, entropy)."""
    from kdcache.store.reader import CacheReader
    from kdcache.store.stats import cache_stats

    reader = CacheReader(path, verify_checksums=not skip_checksums)
    stats = cache_stats(reader)
    manifest = reader.manifest
    if as_json:
        summary = {key: value for key, value in manifest.to_dict().items() if key != "shards"}
        click.echo(json.dumps({"manifest": summary, "stats": stats}, indent=2, sort_keys=True))
        return
    teacher, tokenizer, dataset = manifest.teacher, manifest.tokenizer, manifest.dataset
    sparsifier = manifest.sparsifier
    lines = [
        f"cache           {path}",
        f"format          {manifest.format} v{manifest.format_version}",
        f"teacher         {teacher.model} ({teacher.backend}, {teacher.dtype})",
        f"tokenizer       {tokenizer.name} ({tokenizer.vocab_size} tokens, {tokenizer.fingerprint[:19]}...)",
        f"dataset         {', '.join(dataset.sources)} ({dataset.num_rows} rows, {dataset.fingerprint[:19]}...)",
        f"template        distill={manifest.template.distill} chat={manifest.template.chat_template_used}",
        f"sparsifier      {sparsifier.kind} k={sparsifier.k} logprobs={sparsifier.logprob_dtype}",
        *([f"imported        from {manifest.imported.format} (tail: {manifest.imported.tail}; docs/interop.md)"]
          if manifest.imported else []),
        f"shards          {stats['shards']}",
        f"examples        {stats['examples']} (skipped rows: {stats['skipped_rows']})",
        f"tokens          {stats['tokens']}",
        f"target tokens   {stats['target_tokens']}",
        f"size            {stats['bytes']:,} bytes, {stats['bytes_per_target_token']:.1f} bytes per target token",
    ]
    if stats["mean_sparse_mass"] is not None:
        label = "mean top-k mass" if sparsifier.kind == "topk" else "mean sampled mass"
        lines.append(f"{label:<16}{stats['mean_sparse_mass']:.4f}")
        entropy_kind = "of the k+1 buckets, a lower bound" if sparsifier.kind == "topk" else "Monte-Carlo estimate"
        lines.append(f"teacher entropy {stats['mean_teacher_entropy']:.4f} nats per target token ({entropy_kind})")
    click.echo("\n".join(lines))


@cache.command("verify")
@click.argument("path")
@friendly_errors
def cache_verify(path) -> None:
    """Check every shard's checksums and invariants; exit 1 naming the first bad shard. Never changes the cache."""
    from tqdm import tqdm

    from kdcache.store.location import CacheLocation
    from kdcache.store.manifest import read_manifest
    from kdcache.store.verify import verify_cache

    try:
        total = read_manifest(CacheLocation(path)).num_shards
    except KdcacheError:
        total = None
    with tqdm(total=total, unit="shard", desc="verify", disable=total is None) as bar:
        report = verify_cache(path, on_shard=lambda _: bar.update(1))
    if report.ok:
        click.echo(f"ok: {report.shards_checked} shards verified in {path}")
        return
    click.echo(f"corrupt: {report.first_problem}", err=True)
    sys.exit(1)


@cache.command("finalize")
@click.argument("path")
@friendly_errors
def cache_finalize(path) -> None:
    """Write the manifest of a cache whose shards were written by several workers (fails while any is missing)."""
    from kdcache.store.location import CacheLocation
    from kdcache.store.manifest import finalize

    manifest = finalize(CacheLocation(path))
    click.echo(f"finalized {path}: {manifest.num_shards} shards, {manifest.counts.num_examples} examples")



@cache.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--atol", type=float, default=1e-3, show_default=True,
              help="Largest log-probability (and tail) difference that still counts as agreement.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--show", type=int, default=10, show_default=True, help="Top-1 disagreements listed.")
@friendly_errors
def diff_command(a, b, atol, as_json, show) -> None:
    """Report where two caches differ: settings, examples, tokens, top-1, top-k overlap, log-prob and tail.

    \b
    Exit status: 0 when the caches agree (same examples and tokens, same top-1 everywhere, log-probabilities
    and tails within --atol), 1 when they differ or when nothing could be compared (no example with the same
    tokens in both: the report says so), 2 when one cannot be read.
    """
    from kdcache.store.diff import diff_caches

    report = diff_caches(a, b, max_examples=show)
    if as_json:
        click.echo(json.dumps({**report.to_dict(), "agrees": report.agrees(atol), "atol": atol}, indent=2))
    else:
        click.echo(report.summary(atol))
    sys.exit(0 if report.agrees(atol) else 1)


@cache.command("import")
@click.argument("paths", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(["vllm", "axolotl", "distillkit"]), required=True,
              help="vllm: dumps of RequestOutput.prompt_logprobs; axolotl: Axolotl KD rows (target_token_ids, "
                   "target_logprobs); distillkit: a DistillKit compressed logit dataset folder.")
@click.option("--output", "-o", required=True, help="Cache folder to write (an interrupted import resumes).")
@click.option("--tokenizer", required=True, help="The tokenizer the files' token ids belong to (the teacher's).")
@click.option("--teacher", default="unknown", show_default=True, help="Teacher name recorded in the plan.")
@click.option("--teacher-dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="Teacher dtype recorded in the plan (the files do not say).")
@click.option("--k", type=int, default=None, help="Keep the top k entries per position (default: all the files hold).")
@click.option("--compression-config", default=None,
              help="distillkit: its compression_config.yaml (default: the one beside the data).")
@click.option("--shard-size", type=int, default=1000, show_default=True, help="Sequences per shard.")
@click.option("--no-progress", "no_progress", is_flag=True, help="No progress bar.")
@friendly_errors
def cache_import(paths, fmt, output, tokenizer, teacher, teacher_dtype, k, compression_config, shard_size,
                 no_progress) -> None:
    """Import another tool's top-k teacher log-probs as a kdcache cache (verify, resume and train as any cache).

    \b
    No imported format has the teacher's exact tail: it is derived as log(1 - sum p_topk) and the plan is marked
    so (imported.tail; teacher.vllm.scoring=prompt_logprobs), so reverse KL and T != 1 with an exact tail are
    refused. Axolotl's renormalised top-k carry no tail mass at all (imported.tail = none). docs/interop.md.
    """
    from kdcache.interop import import_cache
    from kdcache.modeling import load_tokenizer

    manifest = import_cache(fmt, list(paths), output, load_tokenizer(tokenizer), tokenizer, k=k,
                            compression_config=compression_config, teacher=teacher, teacher_dtype=teacher_dtype,
                            shard_size=shard_size, progress=not no_progress)
    click.echo(f"imported {manifest.counts.num_examples} sequences, {manifest.counts.num_targets} target tokens "
               f"(k={manifest.sparsifier.k}, tail: {manifest.imported.tail}) into {output}")


@cache.command("export")
@click.argument("path")
@click.option("--format", "fmt", type=click.Choice(["axolotl", "distillkit", "parquet"]), required=True,
              help="axolotl: KD rows for Axolotl's kd plugin; distillkit: a compressed logit dataset folder; "
                   "parquet: one plain per-position table.")
@click.option("--output", "-o", required=True,
              help="axolotl: a .parquet or .jsonl file; distillkit: a folder; parquet: a .parquet file.")
@click.option("--renormalize", is_flag=True, help="axolotl: renormalise each top-k to sum to 1 (drops the tail mass).")
@click.option("--compression-config", default=None,
              help="distillkit: a compression_config.yaml (default: every log-prob kept exact, float32).")
@friendly_errors
def cache_export(path, fmt, output, renormalize, compression_config) -> None:
    """Write a cache in another tool's format. The tail, the tail-temperature grid, spans and hidden states are
    dropped by axolotl and distillkit (docs/interop.md lists what each keeps)."""
    from kdcache.interop import export_cache

    rows = export_cache(path, fmt, output, renormalize=renormalize, compression_config=compression_config)
    click.echo(f"wrote {rows} rows ({fmt}) to {output}")
