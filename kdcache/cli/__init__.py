"""The `kdcache` command line: cache build|info|verify|finalize|diff|import|export, augment, train, ablate, export,
eval, compare, demo.

One module per subject: cache.py (the `cache` group), train.py (train, ablate, export), eval.py (eval, compare),
demo.py. Options that set config keys are declared with `options.config_option` and become `key=value` overrides
through `options.options_to_overrides`; errors are printed in one line by `kdcache.errors.friendly_errors`.
Torch, transformers and the rest are imported inside the commands, so `kdcache --help` starts fast.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from kdcache.cli.augment import augment_command
from kdcache.cli.cache import cache
from kdcache.cli.demo import demo_command
from kdcache.cli.eval import compare_command, eval_command, export_harness_command
from kdcache.cli.train import ablate_command, export_command, train_command

__all__ = ["main"]


def quiet_library_progress_bars() -> None:
    """Hide transformers' and huggingface_hub's own progress bars ("Loading weights", "Writing model shards"), which
    would mix into kdcache's; kdcache's bars (tqdm) and --no-progress are unaffected."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is first imported
    if "huggingface_hub" in sys.modules:  # already imported (tests, or a caller's own code)
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="kdcache")
@click.option("-v", "--verbose", is_flag=True,
              help="Also show the progress bars of transformers and huggingface_hub (loading weights, writing shards).")
def main(verbose: bool) -> None:
    """kdcache: run a large teacher once into a sparse soft-label cache, then distill small students from it.

    \b
    New here: `kdcache demo`, then docs/quickstart.md. Then `kdcache cache build --help`; the cache format is
    described in docs/format.md, every config key in docs/config.md.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not verbose:
        quiet_library_progress_bars()


for _command in (cache, augment_command, train_command, ablate_command, export_command, eval_command, compare_command,
                 export_harness_command, demo_command):
    main.add_command(_command)
