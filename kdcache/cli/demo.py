"""`kdcache demo`: the whole pipeline on the shipped sample, on a CPU, with nothing downloaded."""

from __future__ import annotations

import click

from kdcache.errors import friendly_errors


@click.command("demo")
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
