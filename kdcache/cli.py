"""The `kdcache` command line: cache build|info|verify|finalize, train, ablate, export, eval, compare."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from kdcache.errors import KdcacheError, friendly_errors




@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="kdcache")
def main() -> None:
    """kdcache: run a large teacher once into a sparse soft-label cache, then distill small students from it.

    \b
    Start with `kdcache cache build --help`. The format is described in docs/format.md.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")


@main.group()
def cache() -> None:
    """Build, inspect, verify and finalize teacher caches."""


# (option name, config key) pairs: each given option becomes a `key=value` override after the YAML file.
_BUILD_OPTIONS = {
    "output": "output",
    "teacher": "teacher.model",
    "backend": "teacher.backend",
    "dtype": "teacher.dtype",
    "device": "teacher.device",
    "batch_size": "teacher.batch_size",
    "tokenizer": "tokenizer",
    "data_format": "data.format",
    "id_field": "data.id_field",
    "prompt": "template.prompt",
    "target": "template.target",
    "distill": "template.distill",
    "sparsifier": "sparsifier.kind",
    "k": "sparsifier.k",
    "max_length": "max_length",
    "shard_size": "shard_size",
    "num_workers": "num_workers",
    "worker_index": "worker_index",
    "generate": "generate.enabled",
    "num_samples": "generate.num_samples",
    "max_new_tokens": "generate.max_new_tokens",
    "gen_temperature": "generate.temperature",
}


@cache.command("build")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML job spec (see jobs/).")
@click.option("--output", "-o", help="Cache folder or fsspec URL to write (resumed when it exists).")
@click.option("--teacher", help="Teacher model: a local folder or a hub id with weights available locally.")
@click.option("--backend", type=click.Choice(["hf", "vllm"]), help="Teacher backend [hf].")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Teacher dtype [float32].")
@click.option("--device", help="cpu, cuda, cuda:1 or auto [auto].")
@click.option("--batch-size", type=int, help="Sequences per teacher batch [8].")
@click.option("--tokenizer", help="Tokenizer, when not the teacher's own.")
@click.option("--data", "data_paths", multiple=True, help="A JSONL/CSV/Parquet file or `datasets` folder (repeatable).")
@click.option("--data-format", type=click.Choice(["auto", "jsonl", "csv", "parquet", "datasets"]))
@click.option("--id-field", help="Field holding a stable example id.")
@click.option("--label-field", "label_fields", multiple=True, help="Field copied into the records as a label (repeatable).")
@click.option("--prompt", help="Prompt template, e.g. 'Article: {text}\\nGS paper:'.")
@click.option("--target", help="Target template, e.g. ' {gs_paper}'.")
@click.option("--distill", type=click.Choice(["target", "all"]), help="Distill the target only, or every token.")
@click.option("--sparsifier", type=click.Choice(["topk", "sample"]), help="Keep top-k + tail, or sampled tokens [topk].")
@click.option("--k", type=int, help="Top-k entries (or draws, for sample) per target position [64].")
@click.option("--max-length", type=int, help="Longest sequence in tokens; prompts are cut from the left [1024].")
@click.option("--shard-size", type=int, help="Examples per shard [1024].")
@click.option("--num-workers", type=int, help="Total workers writing this cache (one per node) [1].")
@click.option("--worker-index", type=int, help="This worker's index in [0, num-workers) [0].")
@click.option("--generate", is_flag=True, default=None,
              help="Teacher-generated targets: the teacher writes each answer (a silver set); see generate.* keys.")
@click.option("--num-samples", type=int, help="With --generate: answers per prompt [1].")
@click.option("--max-new-tokens", type=int, help="With --generate: longest answer in tokens [256].")
@click.option("--gen-temperature", type=float, help="With --generate: sampling temperature, 0 = greedy [0].")
@click.option("--skip-bad-rows", is_flag=True, default=None, help="Skip rows that cannot be used, and count them.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any config key, e.g. teacher.chunk_size=512.")
@friendly_errors
def cache_build(config_path, data_paths, label_fields, skip_bad_rows, no_progress, overrides, **options) -> None:
    """Run a teacher over a dataset and write its sparse soft labels into a sharded cache.

    \b
    Only the target positions are scored, chunk by chunk, so full-vocabulary logits are never held for a batch.
    Re-running the same command resumes after the last complete shard. With --num-workers N, run one command
    per node with --worker-index 0..N-1 on the same --output: each writes its own shards, and the last to finish
    writes the manifest (or run `kdcache cache finalize`).
    """
    from kdcache.config import CacheBuildConfig, load_config
    from kdcache.teacher.build import build_cache

    assignments = [f"{_BUILD_OPTIONS[name]}={json.dumps(value)}" for name, value in options.items() if value is not None]
    if data_paths:
        assignments.append(f"data.paths={json.dumps(list(data_paths))}")
    if label_fields:
        assignments.append(f"data.label_fields={json.dumps(list(label_fields))}")
    if skip_bad_rows:
        assignments.append("skip_bad_rows=true")
    if no_progress:
        assignments.append("progress=false")
    config = load_config(CacheBuildConfig, config_path, [*assignments, *overrides])
    result = build_cache(config)
    if result.bad_rows:
        click.echo(f"skipped {len(result.bad_rows)} bad rows; the first ones:", err=True)
        for bad in result.bad_rows[:5]:
            click.echo(f"  {bad}", err=True)
    click.echo(
        f"wrote {len(result.shards_written)} shards, {len(result.shards_skipped)} already done "
        f"(worker {config.worker_index} of {config.num_workers}) to {config.output}"
    )
    if result.finalized:
        counts = result.manifest.counts
        click.echo(f"cache complete: {counts.num_examples} examples, {counts.num_targets} target tokens")
    else:
        click.echo("other workers' shards are still missing; the last worker to finish writes the manifest")


@cache.command("info")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@friendly_errors
def cache_info(path, as_json) -> None:
    """Print a cache's manifest summary and statistics (examples, tokens, bytes per target token, mass, entropy)."""
    from kdcache.store.reader import CacheReader
    from kdcache.store.stats import cache_stats

    reader = CacheReader(path)
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


_TRAIN_OPTIONS = {
    "cache_path": "cache",
    "student": "student",
    "out": "out",
    "loss": "loss.kind",
    "temperature": "loss.temperature",
    "alpha": "loss.alpha",
    "top_k": "loss.top_k",
    "lora_r": "lora.r",
    "profile": "profile",
    "batch_size": "batch_size",
    "max_steps": "max_steps",
    "lr": "lr",
}


@main.command("train")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML job spec (see jobs/).")
@click.option("--cache", "cache_path", help="Cache folder or fsspec URL written by `kdcache cache build`.")
@click.option("--student", help="Student model: a local folder or a hub id with weights available locally.")
@click.option("--out", help="Run folder: checkpoints, metrics.jsonl, best/ and final/ (resumed when it exists).")
@click.option("--loss", type=click.Choice(["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd",
                                           "tv", "topk_forward_kl", "sampled_ce"]), help="Distillation loss [forward_kl].")
@click.option("--temperature", type=float, help="Distillation temperature T [1.0].")
@click.option("--alpha", type=float, help="Weight of cross-entropy on the target tokens; 1 - alpha goes to KD [0.5].")
@click.option("--top-k", type=int, help="Use only the first k' <= k cached entries.")
@click.option("--lora-r", type=int, help="LoRA rank [16]; --set lora.enabled=false for full fine-tuning.")
@click.option("--profile", type=click.Choice(["auto", "cpu", "t4", "bf16"]), help="Precision profile [auto].")
@click.option("--batch-size", type=int, help="Examples per micro-batch [8].")
@click.option("--max-steps", type=int, help="Optimizer steps [100].")
@click.option("--lr", type=float, help="Peak learning rate [2e-4].")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any config key, e.g. grad_accum=4.")
@friendly_errors
def train_command(config_path, no_progress, overrides, **options) -> None:
    """Distill a student from a cache alone: the teacher is never loaded.

    \b
    Re-running the same command resumes from the last checkpoint (model, optimizer, scaler, scheduler, RNG and
    loader position). The held-out split of the cache is evaluated every eval_every steps. Several GPUs (DDP):
    torchrun --nproc_per_node N -m kdcache.cli train ... (the same options).
    """
    from kdcache.config import TrainConfig, load_config
    from kdcache.train.trainer import train

    assignments = [f"{_TRAIN_OPTIONS[name]}={json.dumps(value)}" for name, value in options.items() if value is not None]
    if no_progress:
        assignments.append("progress=false")
    config = load_config(TrainConfig, config_path, [*assignments, *overrides])
    result = train(config)
    if not result.is_main:  # under torchrun, rank 0 reports for the job
        return
    click.echo(f"trained to step {result.step} in {result.out}" + (" (stopped early)" if result.stopped_early else ""))
    if result.evals:
        last = result.evals[-1]
        click.echo(f"held-out KD loss {last['heldout_kd']:.4f}, top-1 agreement with the teacher "
                   f"{last['heldout_top1_agreement']:.3f} at step {last['step']}")


@main.command("ablate")
@click.option("--cache", "cache_path", required=True, help="The cache every run trains from.")
@click.option("--grid", "grid_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="YAML with `base:` settings and a `grid:` of config keys to lists of values (jobs/ablation-*.yaml).")
@click.option("--out", required=True, help="Folder for the runs and the table (ablation.csv, ablation.md).")
@click.option("--search", type=click.Choice(["grid", "optuna"]), default="grid", show_default=True)
@click.option("--trials", type=int, default=10, show_default=True, help="Trials for --search optuna.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a key in every run.")
@friendly_errors
def ablate_command(cache_path, grid_path, out, search, trials, overrides) -> None:
    """Train one student per grid point (or per Optuna trial) from the same cache; write one table of metrics.

    \b
    Grid keys may be any config key: loss.kind, loss.temperature, loss.alpha, loss.top_k (k' <= the cache's k),
    loss.skew, lora.r, lr, ... Re-running skips finished runs and resumes unfinished ones.
    """
    from kdcache.train.ablate import run_grid, run_optuna

    rows = (run_grid(cache_path, grid_path, out, overrides) if search == "grid"
            else run_optuna(cache_path, grid_path, out, trials, overrides))
    click.echo(f"{len(rows)} runs; table in {out}/ablation.md and {out}/ablation.csv")
    click.echo((Path(out) / "ablation.md").read_text())


@main.command("export")
@click.option("--adapter", required=True, type=click.Path(exists=True, file_okay=False), help="A LoRA adapter folder (a run's final/ or best/).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the merged model.")
@click.option("--base", help="Base model, when not the one named in the adapter's config.")
@friendly_errors
def export_command(adapter, out, base) -> None:
    """Merge a LoRA adapter into its base model and save a plain transformers model for deployment."""
    from kdcache.train.export import merge_adapter

    merge_adapter(adapter, out, base)
    click.echo(f"merged {adapter} into {out}")


@main.command("demo")
@click.option("--out", default="storage/demo", show_default=True, help="Folder for everything the demo writes.")
@click.option("--size", type=click.Choice(["smallest", "default"]), default="default", show_default=True,
              help="Model and run sizes (smallest: about a minute, for tests).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@friendly_errors
def demo_command(out, size, no_progress) -> None:
    """The whole pipeline on the shipped UPSC sample, on a CPU, in minutes, with nothing downloaded.

    \b
    Builds a small teacher and student from Qwen2 configs, trains the teacher briefly (it stands in for
    Qwen2.5-72B-Instruct), caches its top-k + tail, distills the student from the cache alone, trains a
    hard-label student for comparison, and evaluates all of them side by side.
    """
    from kdcache.demo import run_demo

    run_demo(out, size, progress=not no_progress)


def _register_subcommands() -> None:
    from kdcache.eval.commands import compare_command, eval_command
    from kdcache.store.diff import diff_command

    cache.add_command(diff_command)
    main.add_command(eval_command)
    main.add_command(compare_command)


_register_subcommands()

if __name__ == "__main__":
    main()
