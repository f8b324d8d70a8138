"""Where a run's figures go: ``metrics.jsonl`` always, and the experiment trackers named in ``report_to``.

One record per optimizer step (losses, lr, grad_norm, tokens_per_s, loader_wait_s, step_s) and one per held-out
evaluation (heldout_*) is written to ``metrics.jsonl``; every tracker gets the same scalars under the same names,
:func:`scalars` (``loss`` -> ``train/loss``, ``heldout_kd`` -> ``heldout/kd``, a named cache's figures under
``heldout/LABEL/...``), at the record's step. One class per tracker (:data:`TRACKERS`), each through the tracker's
own library:

- ``tensorboard``: ``OUT/tensorboard`` event files (the default; a warning, not an error, when the package is
  missing, so a default run trains anyway).
- ``wandb``: a Weights & Biases run (project ``$WANDB_PROJECT`` or ``kdcache``, named after the run folder, files
  in ``$WANDB_DIR`` or ``OUT``); ``WANDB_MODE=offline`` logs without a network, ``wandb sync`` uploads later.
- ``mlflow``: an MLflow run (tracking URI ``$MLFLOW_TRACKING_URI`` or the file store ``OUT/mlruns``, experiment
  ``$MLFLOW_EXPERIMENT_NAME`` or ``kdcache``), the train config as the artifact ``train_config.json``.

A resumed run continues the same W&B and MLflow runs (their ids are kept in ``OUT/trackers.json``). Only rank 0
writes (a no-op on the other ranks under DDP).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import ClassVar

from kdcache.errors import BadInputError

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
TRACKER_IDS = "trackers.json"  # the W&B and MLflow run ids of a run folder, so a resume continues them

log = logging.getLogger(__name__)


def scalar_tag(key: str) -> str:
    """The tracker name of a metrics record key: heldout_* under heldout/, everything else under train/."""
    return f"heldout/{key[len('heldout_'):]}" if key.startswith("heldout_") else f"train/{key}"


def scalars(record: dict) -> dict[str, float]:
    """The scalars every tracker logs for one metrics.jsonl record: each number but ``step`` under
    :func:`scalar_tag`, and each named cache's held-out figures (``heldout_caches``) under ``heldout/LABEL/``."""
    out = {scalar_tag(key): value for key, value in record.items()
           if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
    for label, figures in record.get("heldout_caches", {}).items():
        for key, value in figures.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"heldout/{label}/{key.removeprefix('heldout_')}"] = value
    return out


class MetricsLog:
    """metrics.jsonl (one line per step or evaluation), trimmed to the checkpoint's step on resume."""

    def __init__(self, out: Path, resume_step: int):
        self.path = out / METRICS
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _missing(name: str, extra: str) -> BadInputError:
    return BadInputError(f"report_to names {name} but the {extra} package is not installed: pip install "
                         f"'kdcache[{extra}]', or drop {name} from report_to / --report-to")


def _run_ids(out: Path) -> dict:
    try:
        return json.loads((out / TRACKER_IDS).read_text())
    except (OSError, ValueError):
        return {}


def _keep_run_id(out: Path, name: str, run_id: str) -> None:
    ids = _run_ids(out)
    if ids.get(name) != run_id:
        (out / TRACKER_IDS).write_text(json.dumps({**ids, name: run_id}, indent=2) + "\n")


class Tracker:
    """One experiment tracker: `log` a step's scalars, `flush` before a checkpoint, `close` at the end."""

    name: ClassVar[str]

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """``OUT/tensorboard`` through torch's SummaryWriter. ``purge_step`` drops the events a killed run wrote after
    its last checkpoint, so a resumed curve has no doubles."""

    name = "tensorboard"
    warned_missing: ClassVar[bool] = False  # one warning per process when the package is missing

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, out: Path, resume_step: int, config: dict) -> TensorBoardTracker | None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if not cls.warned_missing:
                log.warning("report_to has tensorboard but the tensorboard package is not installed, so no "
                            "TensorBoard logs are written (metrics.jsonl still is): pip install tensorboard, or drop "
                            "it from report_to (tensorboard=false)")
                cls.warned_missing = True
            return None
        return cls(SummaryWriter(str(out / TENSORBOARD), purge_step=resume_step + 1 if resume_step else None))

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A Weights & Biases run through ``wandb``; its id is kept in OUT/trackers.json so a resume continues it (W&B
    ignores steps at or below the last one it holds)."""

    name = "wandb"

    def __init__(self, run):
        self.run = run

    @classmethod
    def open(cls, out: Path, resume_step: int, config: dict) -> WandbTracker:
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "kdcache", name=out.resolve().name,
                         id=_run_ids(out).get(cls.name), resume="allow", config=config, reinit="create_new",
                         dir=None if os.environ.get("WANDB_DIR") else str(out))
        _keep_run_id(out, cls.name, run.id)
        return cls(run)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker(Tracker):
    """An MLflow run through ``mlflow`` (mlflow-skinny is enough); its id is kept in OUT/trackers.json so a resume
    continues it."""

    name = "mlflow"

    def __init__(self, client, run_id: str, logged: dict[str, int] | None = None):
        self.client, self.run_id = client, run_id
        self.logged = logged or {}  # tag -> the last step the run already holds (a resumed run replays steps)

    @classmethod
    def open(cls, out: Path, resume_step: int, config: dict) -> MlflowTracker:
        try:
            import mlflow
        except ImportError:
            raise _missing("mlflow", "mlflow") from None
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out.resolve() / "mlruns").as_uri()
        if uri.startswith("file:") or "://" not in uri:  # MLflow 3 refuses its file store unless asked for it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = mlflow.MlflowClient(tracking_uri=uri)
        run_id = _run_ids(out).get(cls.name)
        if run_id is not None and not _mlflow_run_exists(client, run_id):  # another tracking URI than before
            log.warning("the MLflow run %s of %s is not at %s: starting a new one", run_id, out, uri)
            run_id = None
        if run_id is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "kdcache"
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(experiment)
            run_id = client.create_run(experiment_id, run_name=out.resolve().name).info.run_id
            client.log_dict(run_id, config, "train_config.json")
            _keep_run_id(out, cls.name, run_id)
            return cls(client, run_id)
        client.update_run(run_id, status="RUNNING")
        # A kill between checkpoints left steps past the checkpoint in the run; the resumed run computes them again
        # (equal, as resume is exact): each tag skips the steps it holds, as W&B does, instead of logging them twice.
        logged = {tag: max(m.step for m in client.get_metric_history(run_id, tag))
                  for tag in client.get_run(run_id).data.metrics}
        return cls(client, run_id, logged)

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, float(value), now, step) for tag, value in values.items()
                   if step > self.logged.get(tag, -1)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _mlflow_run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True


#: The trackers `report_to` may name, in the order they are opened.
TRACKERS: dict[str, type[Tracker]] = {t.name: t for t in (TensorBoardTracker, WandbTracker, MlflowTracker)}


def check_trackers(names: list[str]) -> None:
    """Refuse, before any model is loaded, a tracker of `names` whose library is not installed (TensorBoard only
    warns when it is opened)."""
    for name in names:
        if name != TensorBoardTracker.name:
            try:
                __import__(name)
            except ImportError:
                raise _missing(name, name) from None


def open_trackers(names: list[str], out: Path, resume_step: int, config: dict) -> list[Tracker]:
    """The trackers of `names` (report_to) for run folder `out`, each opened once; a missing optional library is a
    BadInputError naming its extra (TensorBoard, on by default, only warns)."""
    opened = [TRACKERS[name].open(out, resume_step, config) for name in TRACKERS if name in names]
    return [tracker for tracker in opened if tracker is not None]


class RunLog:
    """metrics.jsonl and the trackers of `report_to`, written by rank 0 only (a no-op elsewhere)."""

    def __init__(self, out: Path, resume_step: int, report_to: list[str], active: bool, config: dict | None = None):
        self.metrics = MetricsLog(out, resume_step) if active else None
        self.trackers = open_trackers(report_to, out, resume_step, config or {}) if active else []

    def write(self, record: dict) -> None:
        if self.metrics is None:
            return
        self.metrics.write(record)
        values = scalars(record)
        for tracker in self.trackers:
            tracker.log(values, record["step"])

    def flush(self) -> None:
        for tracker in self.trackers:
            tracker.flush()

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
