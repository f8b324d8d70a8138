"""`kdcache demo`: the whole pipeline on the shipped sample, on a CPU, with nothing downloaded."""

from __future__ import annotations

import click

from kdcache.errors import friendly_errors


@click.command("demo")
@click.option("--out", default="storage/demo", show_default=True, help="Folder for everything the demo writes.")
@click.option("--size", type=click.Choice(["tiny", "smallest", "default"]), default="default", show_default=True,
              help="Model and run sizes (smallest: about a minute; tiny: seconds, a smoke run whose figures mean "
                   "nothing).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@friendly_errors
def demo_command(out, size, no_progress) -> None:
    """The whole pipeline on the shipped UPSC sample, on a CPU, in minutes, with nothing downloaded.

    \b
    The silver-data setting: a small teacher built from a Qwen2 config is trained on 200 labelled rows (it stands
    in for Qwen2.5-72B-Instruct); the students get the other 200 rows, only 10% of them with gold labels. The
    teacher writes an answer to every student row and its top-k + tail is cached there; one student is distilled
    from that cache alone, the same student is fine-tuned on the gold 10% for comparison, and all are evaluated
    side by side on golden.jsonl, which none of them trained on.
    """
    from kdcache.demo import run_demo

    run_demo(out, size, progress=not no_progress)
