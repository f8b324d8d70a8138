"""`kdcache augment`: conversions, typo copies, paraphrases and deduplication into a JSONL for `cache build`."""

from __future__ import annotations

import functools

import click

from kdcache.cli.options import config_file_option, config_option, options_to_overrides, set_option
from kdcache.config_augment import AugmentConfig
from kdcache.errors import friendly_errors

_option = functools.partial(config_option, AugmentConfig)


@click.command("augment")
@config_file_option
@_option("output", "--output", "-o", needed=True, help="The augmented JSONL to write.")
@_option("data.paths", "--data", help="Source rows: a JSONL/CSV/Parquet file or glob, a `datasets` folder or a hub "
                                     "dataset id (repeatable; docs/data.md).")
@_option("data.format", "--data-format", help="Format of the data files (auto: from the file name).")
@_option("data.id_field", "--id-field", help="Field holding each row's id (the copies' source_id); default FILE:ROW.")
@_option("convert.mcq", "--mcq-to-qa", sets=True, help="Turn multiple-choice rows into question/answer rows.")
@_option("convert.blank", "--blank-to-qa", sets=True, help="Turn fill-in-the-blank rows into question/answer rows.")
@_option("typos.copies", "--typo-copies", help="Noisy copies per row.")
@_option("typos.rate", "--typo-rate", help="Typos per word (0.25: one per four words).")
@_option("typos.fields", "--typo-field", help="Field to add typos to (repeatable).")
@_option("paraphrase.versions", "--paraphrases", help="Paraphrases per row, by --paraphrase-model.")
@_option("paraphrase.teacher.model", "--paraphrase-model", help="The local model that writes the paraphrases.")
@_option("paraphrase.teacher.backend", "--backend", help="Backend of the paraphrase model.")
@_option("paraphrase.teacher.device", "--device", help="cpu, cuda, cuda:1 or auto.")
@_option("paraphrase.teacher.dtype", "--dtype", help="Dtype of the paraphrase model.")
@_option("paraphrase.teacher.batch_size", "--batch-size", help="Rows paraphrased per generate call (and per save).")
@_option("dedup", "--dedup", help="Drop repeated rows (normalized: ignoring case, spacing and punctuation).")
@_option("progress", "--no-progress", sets=False, help="No progress bar.")
@set_option("typos.seed=1")
@friendly_errors
def augment_command(config_path, overrides, **options) -> None:
    """Write an augmented copy of a dataset, for `kdcache cache build --data OUT.jsonl`.

    \b
    In order: MCQ -> QA and fill-in-the-blank -> QA conversions (in place), deduplication of the sources, typo
    copies and model paraphrases of each source, deduplication of the copies. Every row keeps `source_id` and
    `augmentation`, which reach the cache's records; the trainer's held-out split hashes the source id, so a
    held-out row's copies stay held out. Paraphrases are saved as they are written (OUT.paraphrases.jsonl): re-run
    the same command after a kill and only the missing ones are generated. See docs/data.md.
    """
    from kdcache.config import load_config
    from kdcache.data.augment import augment

    config = load_config(AugmentConfig, config_path, [*options_to_overrides(options), *overrides])
    click.echo(augment(config).summary())
