"""`kdcache eval` (one model on a labelled dataset) and `kdcache compare` (two eval runs, criteria, cascade)."""

from __future__ import annotations

import functools
import sys

import click

from kdcache.cli.options import config_file_option, config_option, options_to_overrides, set_option
from kdcache.config import EvalConfig
from kdcache.errors import friendly_errors

_option = functools.partial(config_option, EvalConfig)

# Options `kdcache eval` and `kdcache export-harness` share, declared once: docs/config.md reads one help per key.
_labels = _option("labels", "--labels", metavar="LABEL",
                  help="A label string to score (repeat for each, e.g. --labels GS1 --labels GS2 ... --labels none).")
_label_field = _option("label_field", "--label-field", help="Field holding the gold label (or the reference answer).")
_mode = _option("mode", "--mode", help="Label scoring, or greedy generation parsed to a label (with text metrics "
                                       "vs the gold field).")
_max_new_tokens = _option("max_new_tokens", "--max-new-tokens", help="Generation length (generate mode).")
_system = _option("system", "--system", help="System message (with chat templates).")
_chat = _option("chat", "--chat", help="Wrap the prompt in the tokenizer's chat template.")
_id_field = _option("id_field", "--id-field",
                    help="Field with a unique example id [id when present, else the row number].")
_limit = _option("limit", "--limit", help="Evaluate the first N examples only.")


@click.command("eval")
@config_file_option
@click.option("--from-cache", "from_cache", metavar="CACHE",
              help="Take --prompt, --system, --chat, --label-prefix and (for a one-field target such as ' {gs_paper}') "
                   "--label-field from the plan of the cache the model was trained on, so train and eval cannot "
                   "drift; options given here still override them.")
@_option("model", "--model", needed=True,
         help="A model folder, a LoRA adapter folder (base + adapter are loaded), or a hub id whose weights are "
              "already local.")
@_option("data", "--data", needed=True, help="JSONL / CSV / Parquet file or glob, `datasets` folder or hub "
                                             "dataset id (repeatable; docs/data.md).")
@_labels
@_label_field
@_option("prompt", "--prompt", help="Prompt template over the row's fields, e.g. "
                                    "$'Title: {title}\\nArticle: {text}\\nWhich GS paper?' (bash's $'...' makes "
                                    "\\n a line break; or use --from-cache).")
@_option("out", "--out", needed=True, type=click.Path(file_okay=False),
         help="Folder for metrics.json, predictions.parquet and report.md.")
@_option("negative_label", "--negative-label", help="The label meaning 'not relevant' (e.g. none): adds relevance "
                                                    "metrics.")
@_limit
@_option("batch_size", "--batch-size", help="Examples per forward pass (each is scored with every label).")
@_option("device", "--device", help="cpu, cuda, cuda:1 or auto.")
@_option("dtype", "--dtype", help="Model dtype.")
@_mode
@_max_new_tokens
@_option("label_prefix", "--label-prefix",
         help="Text between prompt and label, as in the training target (' {gs_paper}' -> ' ').")
@_option("label_eos", "--label-eos/--no-label-eos",
         help="Score each label followed by the EOS token (the label and nothing after it).")
@_system
@_chat
@_id_field
@_option("tokenizer", "--tokenizer", help="Tokenizer, when not the model's own.")
@_option("base", "--base", help="Base model of an adapter, when not the one its adapter_config.json names.")
@_option("max_length", "--max-length", help="Prompt + label tokens; prompts are cut from the left to fit.")
@_option("n_bins", "--bins", help="Calibration bins (equal width).")
@_option("warmup", "--no-warmup", sets=False, help="Do not run one untimed warm-up batch first.")
@_option("plots", "--no-plots", sets=False, help="Do not write PNG plots.")
@_option("progress", "--no-progress", sets=False, help="No progress bar.")
@set_option("bleu_smoothing=none")
@friendly_errors
def eval_command(config_path, from_cache, overrides, **options) -> None:
    """Evaluate one model on a labelled dataset: metrics.json, predictions.parquet, report.md (+ plots).

    \b
    Each label's log-likelihood after the prompt is scored and the best one is predicted; the softmax over
    the labels is the confidence. Example, with the prompt the student was trained on (from its cache):
      kdcache eval --from-cache storage/caches/upsc-tiny --model storage/runs/upsc-tiny/final \\
        --data examples/upsc/golden.jsonl --labels GS1 --labels GS2 --labels GS3 --labels GS4 --labels none \\
        --negative-label none --out storage/eval/student
    Without a cache, give the template with real line breaks (bash): --label-field gs_paper
      --prompt $'Title: {title}\\nArticle: {text}\\nWhich GS paper?'
    """
    from kdcache.config import load_config
    from kdcache.eval.from_cache import overrides_from_cache
    from kdcache.eval.runner import run_eval

    from_cache_overrides = overrides_from_cache(from_cache) if from_cache else []
    config = load_config(EvalConfig, config_path,
                         [*from_cache_overrides, *options_to_overrides(options), *overrides])
    result = run_eval(config)
    metrics = result.metrics
    parts = [f"{metrics['n']} examples"]
    if "accuracy" in metrics:
        parts.append(f"accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}")
    if "relevance" in metrics:
        rel = metrics["relevance"]
        parts.append(f"relevance P {rel['precision']:.4f} R {rel['recall']:.4f}")
    if "generation" in metrics:
        gen = metrics["generation"]
        parts.append(f"EM {gen['exact_match']:.4f}, F1 {gen['token_f1']:.4f}, ROUGE-L {gen['rouge_l']:.4f}, "
                     f"BLEU {gen['bleu']:.4f}, chrF {gen['chrf']:.4f}")
    speed = metrics["speed"]
    parts.append(f"{1000 * speed['latency_mean_s']:.2f} ms/example")
    if speed.get("prompt_tokens_per_s"):
        parts.append(f"{speed['prompt_tokens_per_s']:,.0f} prompt tokens/s")
    parts.append(f"wall time {speed['wall_s']:.1f} s")
    click.echo("; ".join(parts))
    click.echo(f"wrote {', '.join(p.name for p in result.files)} to {result.out}")


@click.command("compare")
@click.argument("run_a", type=click.Path(exists=True, file_okay=False))
@click.argument("run_b", type=click.Path(exists=True, file_okay=False))
@click.option("--names", nargs=2, metavar="NAME_A NAME_B", help="Names for the runs, e.g. --names teacher student.")
@click.option("--criteria", "criteria_file", type=click.Path(dir_okay=False),
              help="YAML success criteria (docs/evaluation.md); exit 1 when one fails.")
@click.option("--out", type=click.Path(file_okay=False), help="Folder for report.md, comparison.json and plots.")
@click.option("--target-accuracy", type=float, help="Cascade: the accuracy to reach with the least deferral (0..1).")
@click.option("--no-plots", is_flag=True, help="Do not write PNG plots.")
@friendly_errors
def compare_command(run_a, run_b, names, criteria_file, out, target_accuracy, no_plots) -> None:
    """Compare two eval runs: RUN_A is the reference (e.g. the teacher), RUN_B the candidate (e.g. the student).

    \b
    Prints (and with --out writes) a side-by-side table with differences and B's retention of A's accuracy,
    the cascade (B answers when confident, A the rest) and the success criteria. Exit status: 0 when every
    criterion holds (or none is given), 1 when one fails, 2 on bad input.
    """
    from kdcache.eval.compare import compare_runs
    from kdcache.eval.criteria import load_criteria

    criteria = load_criteria(criteria_file) if criteria_file else None
    result = compare_runs(run_a, run_b, tuple(names) if names else None, criteria, out, target_accuracy,
                          plots=not no_plots)
    if out is None:
        click.echo(result.markdown)
    else:
        click.echo(f"wrote {', '.join(p.name for p in result.files)} to {out}")
        if result.retention.get("accuracy") is not None:
            click.echo(f"accuracy retention (B / A): {100 * result.retention['accuracy']:.1f}%")
        if result.agreement and result.agreement["agreement"] is not None:
            click.echo(f"A and B predict the same label on {100 * result.agreement['agreement']:.1f}% of "
                       f"{result.agreement['n']} examples (per class: report.md, Agreement)")
        chosen = (result.cascade or {}).get("chosen")
        if chosen and chosen["threshold"] is not None:
            click.echo(f"cascade: keep B when confidence >= {chosen['threshold']!r} -> B keeps "
                       f"{100 * chosen['kept_share']:.1f}%, accuracy {100 * chosen['accuracy']:.1f}%")
        elif result.cascade and result.cascade.get("target_accuracy") is not None and chosen is None:
            click.echo("cascade: no threshold reaches the target accuracy")
    if result.checks is not None:
        for check in result.checks:
            click.echo(check.line())
        failed = [c for c in result.checks if not c.passed]
        if failed:
            click.echo(f"{len(failed)} of {len(result.checks)} success criteria failed", err=True)
            sys.exit(1)
        click.echo(f"all {len(result.checks)} success criteria hold")


@click.command("export-harness")
@config_file_option
@click.option("--from-cache", "from_cache", metavar="CACHE",
              help="Take --prompt, --system, --chat, --label-prefix and --label-field from the cache's plan (as "
                   "`kdcache eval --from-cache`).")
@click.option("--out", "harness_out", required=True, type=click.Path(file_okay=False),
              help="Folder for TASK.yaml and TASK.jsonl (and kdcache_harness.py for a generation task); give it "
                   "to lm_eval as --include_path.")
@click.option("--task", "task", required=True, help="The harness task name (letters, digits, '_', '-', '.').")
@_option("data", "--data", help="JSONL / CSV / Parquet file or glob, `datasets` folder or hub dataset id.")
@_labels
@_label_field
@_option("prompt", "--prompt", help="Prompt template over the row's fields (as for `kdcache eval`).")
@_mode
@_max_new_tokens
@_option("label_prefix", "--label-prefix", help="Text between prompt and label (the harness' target_delimiter).")
@_system
@_chat
@_id_field
@_limit
@set_option("rouge_stemmer=false")
@friendly_errors
def export_harness_command(config_path, from_cache, harness_out, task, overrides, **options) -> None:
    """Write a `kdcache eval` task as an lm-evaluation-harness task: TASK.yaml + TASK.jsonl in --out.

    \b
    The prompts are rendered by kdcache into TASK.jsonl, so the harness scores the same prompts `kdcache eval`
    does: label scoring becomes a multiple_choice task (acc), generation a generate_until task scored with
    kdcache's metrics (exact_match, token_f1, rouge_l, bleu, chrf; 0..1). Then, on a trained (or exported) model:
      kdcache export-harness --config jobs/accounting-gpt2-large-to-distilgpt2/eval-bleu.yaml \\
        --out storage/harness --task accounting_qa
      lm_eval --model hf --model_args pretrained=storage/runs/accounting-distilgpt2/best \\
        --include_path storage/harness --tasks accounting_qa
    The YAML names TASK.jsonl by its absolute path: re-export after moving the folder. The options mean what
    they mean for `kdcache eval`; --mode score gives a multiple_choice task, generate a generate_until one. With
    the chat template (--chat) or a --system message, run lm_eval with --apply_chat_template (and
    --system_instruction): the exported prompts are plain text (docs/evaluation.md).
    """
    from kdcache.config import load_config
    from kdcache.eval.from_cache import overrides_from_cache
    from kdcache.eval.harness import export_harness_task

    from_cache_overrides = overrides_from_cache(from_cache) if from_cache else []
    config = load_config(EvalConfig, config_path,
                         [*from_cache_overrides, *options_to_overrides(options), *overrides])
    exported = export_harness_task(config, harness_out, task)
    click.echo(f"wrote {exported.output_type} task {exported.task!r} ({exported.n} examples): {exported.yaml_path}, "
               f"{exported.data_path}")
    for note in exported.notes:
        click.echo(f"note: {note}")
    click.echo(f"run: lm_eval --model hf --model_args pretrained=MODEL --include_path {harness_out} "
               f"--tasks {exported.task}")
