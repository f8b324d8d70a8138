"""The `kdcache` command line: cache build|info|verify|finalize|diff, train, ablate, export, eval, compare, demo.

One module per subject: cache.py (the `cache` group), train.py (train, ablate, export), eval.py (eval, compare),
demo.py. Options that set config keys are declared with `options.config_option` and become `key=value` overrides
through `options.options_to_overrides`; errors are printed in one line by `kdcache.errors.friendly_errors`.
Torch, transformers and the rest are imported inside the commands, so `kdcache --help` starts fast.
"""

from __future__ import annotations

import logging

import click

from kdcache.cli.cache import cache
from kdcache.cli.demo import demo_command
from kdcache.cli.eval import compare_command, eval_command
from kdcache.cli.train import ablate_command, export_command, train_command

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="kdcache")
def main() -> None:
    """kdcache: run a large teacher once into a sparse soft-label cache, then distill small students from it.

    \b
    Start with `kdcache cache build --help`. The format is described in docs/format.md.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")


for _command in (cache, train_command, ablate_command, export_command, eval_command, compare_command, demo_command):
    main.add_command(_command)
