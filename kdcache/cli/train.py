"""`kdcache train`, `kdcache ablate` and `kdcache export`: students from a cache, grids of them, merged adapters."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from kdcache.cli.options import config_file_option, config_option, options_to_overrides, set_option
from kdcache.config import TrainConfig
from kdcache.errors import BadInputError, friendly_errors

_option = functools.partial(config_option, TrainConfig)


@click.command("train")
@config_file_option
@_option("cache", "--cache", needed=True, multiple=True,
         help="Cache folder or fsspec URL written by `kdcache cache build`. Repeat it to train from several caches "
              "(config key caches): each batch comes from one of them, drawn by weight.")
@click.option("--cache-weight", "cache_weights", multiple=True, type=float, metavar="W",
              help="With several --cache: each one's sampling weight, in the same order (default: 1 each).")
@_option("student", "--student", needed=True,
         help="Student model: a local folder or a hub id with weights available locally.")
@_option("out", "--out", needed=True,
         help="Run folder: checkpoints, metrics.jsonl, best/ and final/ (resumed when it exists).")
@_option("loss.kind", "--loss", help="Distillation loss (docs/losses.md).")
@_option("loss.temperature", "--temperature", help="Distillation temperature T.")
@_option("loss.kd_weight", "--kd-weight", help="Weight of the distillation term; 1 - it goes to cross-entropy on "
                                               "the target tokens (torchtune's kd_ratio).")
@_option("loss.alpha", "--alpha", help="Another name for loss.ce_weight (= 1 - kd_weight), kept for older commands.")
@_option("loss.top_k", "--top-k", help="Use only the first k' <= k cached entries.")
@_option("lora.r", "--lora-r", help="LoRA rank; --set lora.enabled=false for full fine-tuning.")
@_option("profile", "--profile", help="Precision profile.")
@_option("batch_size", "--batch-size", help="Examples per micro-batch.")
@_option("max_steps", "--max-steps", help="Optimizer steps (default 100).")
@_option("num_epochs", "--num-epochs", help="Passes over the train split instead of --max-steps.")
@_option("lr", "--lr", help="Peak learning rate.")
@_option("allow_config_change", "--allow-config-change", sets=True,
         help="Resume a run folder whose checkpoint was trained with other settings (the old ones are kept).")
@_option("progress", "--no-progress", sets=False, help="No progress bar.")
@_option("report_to", "--report-to",
         help="Experiment tracker that gets the metrics.jsonl scalars; repeat it for several (the list replaces the "
              "default): wandb and mlflow need pip install 'kdcache[wandb]' / 'kdcache[mlflow]' (docs/training.md).")
@set_option("grad_accum=4")
@friendly_errors
def train_command(config_path, overrides, cache_weights, **options) -> None:
    """Distill a student from a cache alone: the teacher is never loaded.

    \b
    Re-running the same command resumes from the last checkpoint (model, optimizer, scaler, scheduler, RNG and
    loader position); a resume with other settings is refused, listing them, unless --allow-config-change. The
    held-out split of the cache is evaluated every eval_every steps. Several GPUs (DDP):
    torchrun --nproc_per_node N -m kdcache.cli train ... (the same options); a student larger than one GPU:
    add --set distributed.strategy=fsdp (sharded weights, gradients and optimizer states; docs/training.md).
    """
    from kdcache.config import load_config
    from kdcache.train.trainer import train

    caches = cache_overrides(options.pop("cache"), cache_weights)
    config = load_config(TrainConfig, config_path, [*caches, *options_to_overrides(options), *overrides])
    result = train(config)
    if not result.is_main:  # under torchrun, rank 0 reports for the job
        return
    click.echo(f"trained to step {result.step} in {result.out}" + (" (stopped early)" if result.stopped_early else ""))
    if result.evals:
        last = result.evals[-1]
        click.echo(f"held-out at step {last['step']}, all {last['heldout_targets']} targets: KD loss "
                   f"{last['heldout_kd']:.4f}, forward KL {last['heldout_forward_kl']:.4f}, top-1 agreement with the "
                   f"teacher {last['heldout_top1_agreement']:.3f}")
        for label, figures in last.get("heldout_caches", {}).items():
            if figures.get("heldout_targets"):
                click.echo(f"  {label}, {figures['heldout_targets']} targets: KD loss {figures['heldout_kd']:.4f}"
                           + (f", top-1 agreement {figures['heldout_top1_agreement']:.3f}"
                              if "heldout_top1_agreement" in figures else ""))
        if last.get("heldout_answer_targets"):
            click.echo(f"  answer tokens only (no EOS), {last['heldout_answer_targets']} targets: KD loss "
                       f"{last['heldout_kd_answer']:.4f}, forward KL {last['heldout_forward_kl_answer']:.4f}, "
                       f"top-1 agreement {last['heldout_top1_agreement_answer']:.3f}")
    summary = result.summary
    if summary:
        click.echo(f"held out: {summary['heldout']}")
        if summary["steps_this_run"]:
            click.echo(f"wall time {summary['wall_s']:.1f} s for {summary['steps_this_run']} steps, "
                       f"{summary['tokens_per_s']:,.0f} tokens/s (run_summary.json)")


def cache_overrides(paths: tuple[str, ...], weights: tuple[float, ...]) -> list[str]:
    """The overrides of `--cache` given once (`cache`) or several times with `--cache-weight`s (`caches`); either
    replaces both keys of a job spec."""
    if weights and len(weights) != len(paths):
        raise BadInputError(f"--cache-weight must be given once per --cache ({len(paths)} times), got "
                            f"{len(weights)} weight(s)")
    if not paths:
        return []
    if len(paths) == 1 and not weights:
        return [f"cache={json.dumps(paths[0])}", "caches=[]"]
    weights = weights or (1.0,) * len(paths)
    return ["cache=''", f"caches={json.dumps([{'path': p, 'weight': w} for p, w in zip(paths, weights)])}"]


@click.command("ablate")
@click.option("--cache", "cache_path", required=True, help="The cache every run trains from.")
@click.option("--grid", "grid_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="YAML with `base:` settings and a `grid:` of config keys to lists of values (jobs/ablation-*.yaml).")
@click.option("--out", required=True, help="Folder for the runs and the table (ablation.csv, ablation.md).")
@click.option("--search", type=click.Choice(["grid", "optuna"]), default="grid", show_default=True,
              help="Every grid point, or a seeded Optuna TPE search over the grid's values and {low, high} ranges, "
                   "pruned on held-out KL, saved in OUT/study.db: re-running resumes it (pip install "
                   "'kdcache[optuna]').")
@click.option("--trials", type=int, default=10, show_default=True, help="Finished trials --search optuna runs to (counting those already in OUT/study.db).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a key in every run.")
@friendly_errors
def ablate_command(cache_path, grid_path, out, search, trials, overrides) -> None:
    """Train one student per grid point (or per Optuna trial) from the same cache; write one table of metrics.

    \b
    Grid keys may be any config key: loss.kind, loss.temperature, loss.kd_weight (or loss.alpha), loss.top_k
    (k' <= the cache's k), loss.skew, lora.r, lr, ... Re-running skips finished runs and resumes unfinished ones.
    Runs are ranked by held-out forward KL to the teacher; with an `eval:` section in the grid file (kdcache eval
    keys on a labelled split, plus `metric: accuracy` or macro_f1, ...; see jobs/ablation-upsc-tiny-cpu.yaml),
    each final model is evaluated and the runs are ranked by that task metric, the KL beside it.
    """
    from kdcache.train.ablate import run_grid
    from kdcache.train.search import run_optuna

    rows = (run_grid(cache_path, grid_path, out, overrides) if search == "grid"
            else run_optuna(cache_path, grid_path, out, trials, overrides))
    click.echo(f"{len(rows)} runs; table in {out}/ablation.md and {out}/ablation.csv")
    click.echo((Path(out) / "ablation.md").read_text())


@click.command("export")
@click.option("--adapter", required=True, type=click.Path(exists=True, file_okay=False),
              help="A LoRA adapter folder (a run's final/ or best/).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the exported model.")
@click.option("--base", help="Base model to load, when not the one named in the adapter's config.")
@click.option("--base-model-id", metavar="HUB_ID",
              help="The base's hub id, written instead of a local path (adapter/model config, card). Default: found "
                   "from the base, the run's student, a hub cache path, or the base's config.json.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]),
              help="Dtype of the merged weights (merged in fp32, then cast). Default: the base's own.")
@click.option("--no-merge", is_flag=True, help="Export the adapter alone (for peft on the base) instead of merging.")
@click.option("--compare", "compare_dir", type=click.Path(exists=True, file_okay=False),
              help="A `kdcache compare --out` folder: its results go into the model card.")
@click.option("--push-to-hub", "repo", metavar="REPO",
              help="Then upload the folder to this hub model repo (created if new) with huggingface_hub; needs a "
                   "token (hf auth login or HF_TOKEN).")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@friendly_errors
def export_command(adapter, out, base, base_model_id, dtype, no_merge, compare_dir, repo, private) -> None:
    """Merge a LoRA adapter into its base model and save a plain transformers model for deployment (or, with
    --no-merge, the adapter alone), with a README.md model card: the teacher, the cache's fingerprint (plan hash)
    and format, the student base, the loss and its settings, the steps, and the compare results when given."""
    from kdcache.train.export import export
    from kdcache.train.hub import check_repo_id, push_to_hub

    if repo:
        check_repo_id(repo)
    done = export(adapter, out, base, merge=not no_merge, dtype=dtype, base_model_id=base_model_id,
                  compare=compare_dir)
    named = done.base_model_id or f"{done.base} (no hub id found: pass --base-model-id)"
    click.echo(f"{'merged' if done.dtype else 'copied'} {adapter} into {out}"
               + (f" ({done.dtype})" if done.dtype else "") + f"; base model {named}")
    if repo:
        click.echo(f"pushed {out} to {repo}: {push_to_hub(out, repo, private)}")
