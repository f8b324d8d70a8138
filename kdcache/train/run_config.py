"""train_config.json: the settings a run folder is trained with, and the check that a resume keeps them.

A run resumed from a checkpoint continues what the checkpoint started, so it must use the same settings: a resume
whose settings differ (another loss, learning rate, cache, ...) is refused with the differences listed, unless
``allow_config_change`` (``--allow-config-change``) says the change is meant. Then the differences are logged,
``train_config.json`` gets the new settings, and the old file is kept as ``train_config.NNNNNN.json``: the settings
that trained steps 1 to NNNNNN (the checkpoint's step). A second change resumed from the same checkpoint keeps the
first such file, since the settings in between trained no step that was kept.

Settings that cannot change a trained number are exempt (:data:`EXEMPT`): how progress is shown and logged, how
often checkpoints are written (a resume is bit-identical either way), where the run folder is, and the flag
itself. ``eval_every`` and ``patience`` are not exempt: they choose best/ and when a run stops early. Keys that
only one side knows (written by another kdcache version) are not compared.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.config import TrainConfig, to_dict
from kdcache.errors import BadInputError

CONFIG_FILE = "train_config.json"
EXEMPT = frozenset({"progress", "tensorboard", "report_to", "save_every", "out", "allow_config_change",
                    "verify_checksums"})

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConfigChange:
    """One setting that differs between the run folder's train_config.json and this run's config."""

    key: str  # dotted, e.g. "loss.kind"
    before: Any
    after: Any

    def line(self) -> str:
        return f"{self.key}: {json.dumps(self.before)} -> {json.dumps(self.after)}"


def _flat(config: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict, current: dict) -> list[ConfigChange]:
    """The non-exempt settings that differ between two train configs as JSON, in key order."""
    before, after = _flat(saved), _flat(json.loads(json.dumps(current)))
    return [ConfigChange(key, before[key], after[key]) for key in sorted(before.keys() & after.keys())
            if key.split(".")[0] not in EXEMPT and before[key] != after[key]]


def read_saved_config(out: Path) -> dict | None:
    """The run folder's train_config.json, or None when it has none."""
    path = out / CONFIG_FILE
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path} cannot be read ({exc}), so this resume cannot be checked against the settings "
                            "the run was trained with: restore the file, or delete it to resume without the check"
                            ) from None
    if not isinstance(saved, dict):
        raise BadInputError(f"{path} must hold a JSON object: restore it, or delete it to resume without the check")
    return saved


def check_resume_config(out: Path, config: TrainConfig) -> list[ConfigChange]:
    """The changes of a resume of run folder `out` with `config` (call it when `out` has a checkpoint); refuses
    them unless `config.allow_config_change`."""
    saved = read_saved_config(out)
    if saved is None:
        log.warning("%s has a checkpoint but no %s: this resume cannot be checked against the settings it was "
                    "trained with", out, CONFIG_FILE)
        return []
    changes = config_changes(saved, to_dict(config))
    if changes and not config.allow_config_change:
        shown = "\n  ".join(change.line() for change in changes)
        raise BadInputError(
            f"{out} was trained with other settings than this run's: resume with the same ones, train into a new "
            f"--out, or pass --allow-config-change (config key allow_config_change) to go on with these (both are "
            f"kept). Differences (saved -> now):\n  {shown}"
        )
    return changes


def record_config(out: Path, config: TrainConfig, changes: list[ConfigChange], step: int) -> None:
    """Write train_config.json (atomically, since other ranks may be reading it); after allowed `changes`, keep the
    old one as train_config.<step>.json first."""
    path = out / CONFIG_FILE
    if changes:
        log.warning("resuming %s at step %d with changed settings (allow_config_change):\n  %s", out, step,
                    "\n  ".join(change.line() for change in changes))
        kept = out / f"train_config.{step:06d}.json"
        if not kept.exists() and path.exists():
            shutil.copyfile(path, kept)
    text = json.dumps(to_dict(config), indent=2)
    if path.exists() and path.read_text() == text:
        return
    temporary = out / f".{CONFIG_FILE}.tmp-{uuid.uuid4().hex[:8]}"
    temporary.write_text(text)
    os.replace(temporary, path)
