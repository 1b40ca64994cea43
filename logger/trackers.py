"""Where a run's numbers go: TensorBoard, a CSV file, MLflow, or a tracker of your own.

A tracker is one small class (:class:`Tracker`): ``log_scalar(tag, value, step)``,
``log_params(flat)`` once at the start, ``log_artifact(path)``, ``flush()``, ``close()``;
pictures (``log_images``, ``log_histogram``) only where ``takes_pictures`` is true. The
trainer never sees trackers: it calls the :class:`RunWriter` that :func:`build_writer`
makes from ``trainer.loggers``, which has the methods the trainer always called on its
TensorBoard writer (``add_scalar``, ``add_scalars``, ``add_histogram``, ``add_images``,
``add_hparams``, ``flush``, ``close``) and hands each call to every tracker.

What a tracker promises:

- It acts only when called, and it is called only at the logging interval
  (``trainer.log_every_n_steps``), at the end of an epoch and at checkpoints: a run pays
  nothing per step for it.
- A resumed run continues the same tracker run. What a tracker must remember for that (the
  MLflow run id) is returned by ``checkpoint_state()``, kept in every checkpoint under
  ``"trackers"``, and handed back to the tracker's constructor on resume.
- Steps logged by an interrupted process after the checkpoint it is resumed from are
  superseded: TensorBoard drops their events (``purge_step``), ``metrics.csv`` drops their
  rows, and MLflow never received them (it is sent only what a checkpoint covers, see
  :class:`MlflowTracker`). So each reader sees one history with no step twice.
- A tracker that fails (a server that went away) never stops training: it warns and retries.

To add a tracker (W&B, say): subclass :class:`Tracker`, add it to :data:`TRACKERS`, and
name it in ``trainer.loggers``.
"""

import csv
import difflib
import importlib.util
import json
import os
import time
from pathlib import Path


class Tracker:
    """Base class: every method does nothing. Override what your tracker records."""

    takes_pictures = False  # whether log_images / log_histogram do anything (they cost a device-to-host copy)

    def log_scalar(self, tag, value, step):
        pass

    def log_params(self, params):
        """The run's config as ``{"dotted.key": value}``, once at the start."""

    def log_images(self, tag, images, step):
        pass

    def log_histogram(self, tag, values, step):
        pass

    def log_artifact(self, path):
        pass

    def log_hparams(self, hparams, metrics):
        """The end of a successful run: its hyperparameters and final values (already sent as scalars)."""

    def finish(self, checkpoint_dir):
        """The run ended normally; ``checkpoint_dir`` holds its config.json, manifest.json and checkpoints."""

    def flush(self):
        pass

    def close(self):
        pass

    def checkpoint_state(self):
        """Called as a checkpoint is written: what the checkpoint must keep to continue this tracker's run."""
        return {}

    def run_id(self):
        """The tracker's own id of this run (for the manifest), or None."""
        return None


# --------------------------------------------------------------------------- TensorBoard


class TensorboardTracker(Tracker):
    """TensorBoard event files in the run's log folder (:class:`logger.visualization.TensorboardWriter`)."""

    takes_pictures = True

    def __init__(self, log_dir, purge_step=None, logger=None):
        from logger.visualization import TensorboardWriter

        self.writer = TensorboardWriter(log_dir, True, purge_step=purge_step, logger=logger)
        self.last_step = 0

    def __bool__(self):
        return bool(self.writer)  # False when the tensorboard package is missing (a warning said so)

    def log_scalar(self, tag, value, step):
        self.last_step = step
        self.writer.add_scalar(tag, value, step)

    def log_images(self, tag, images, step):
        self.writer.add_images(tag, images, step)

    def log_histogram(self, tag, values, step):
        self.writer.add_histogram(tag, values, step)

    def log_hparams(self, hparams, metrics):
        self.writer.add_hparams(hparams, metrics, self.last_step)  # replaces the record of a run segment before

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


# --------------------------------------------------------------------------- CSV


class CsvTracker(Tracker):
    """``metrics.csv`` in the run's log folder, in long format: one row per value logged.

    Columns: ``step,epoch,tag,value,wall_time``, the same for every run and every resume
    (a new tag is new rows, never a new column). ``epoch`` is the epoch the step belongs to;
    the epoch's own values (tags ``epoch/...``) are logged at its last step. On resume the
    rows of steps at or after ``purge_step`` (those the interrupted process wrote after
    the checkpoint) are removed first, so no step appears twice.

    Rows go through Python's file buffer and reach the disk at the end of each epoch.
    """

    COLUMNS = ["step", "epoch", "tag", "value", "wall_time"]

    def __init__(self, log_dir, purge_step=None, epoch=1, logger=None):
        self.path = Path(log_dir) / "metrics.csv"
        self.epoch = epoch
        if self.path.exists() and not self._same_columns():
            old = self.path.with_name("metrics.old.csv")
            os.replace(self.path, old)
            if logger:
                logger.warning(f"{self.path} had other columns: moved to {old.name}")
        if purge_step is not None and self.path.exists():
            self._drop_from(purge_step)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.file = open(self.path, "a", newline="", encoding="utf-8")
        self.rows = csv.writer(self.file, lineterminator="\n")
        if new:
            self.rows.writerow(self.COLUMNS)

    def _same_columns(self):
        with open(self.path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), self.COLUMNS) == self.COLUMNS

    def _drop_from(self, purge_step):
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        kept = [rows[0]] + [row for row in rows[1:] if row and int(row[0]) < purge_step]
        temp = self.path.with_name(self.path.name + ".tmp")
        with open(temp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\n").writerows(kept)
        os.replace(temp, self.path)  # never a half-written file, whatever kills the process

    def log_scalar(self, tag, value, step):
        self.rows.writerow([step, self.epoch, tag, repr(float(value)), f"{time.time():.3f}"])
        if tag == "epoch/epoch":  # the last value logged for an epoch: what follows is the next one's
            self.epoch = int(value) + 1

    def flush(self):
        if not self.file.closed:
            self.file.flush()

    def close(self):
        self.file.close()


def read_metrics_csv(path):
    """``metrics.csv`` as a list of dicts with ``step``/``epoch`` as ints and ``value``/``wall_time`` as floats."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{"step": int(r["step"]), "epoch": int(r["epoch"]), "tag": r["tag"], "value": float(r["value"]),
                 "wall_time": float(r["wall_time"])} for r in csv.DictReader(f)]


# --------------------------------------------------------------------------- MLflow


MLFLOW_DEFAULTS = {"tracking_uri": None, "experiment": None, "log_checkpoints": True}


class MlflowTracker(Tracker):
    """An MLflow run: the config as params, every scalar as a metric history, the run's files as artifacts.

    ``tracking_uri`` defaults to a SQLite database, ``<save_dir>/mlflow.db`` (artifacts in
    ``<save_dir>/mlartifacts``): a real MLflow store, no server needed
    (``mlflow ui --backend-store-uri sqlite:///saved/mlflow.db`` shows it). An ``http://``
    URI talks to a running ``mlflow server``. ``experiment`` defaults to the config's name.

    Values are held here and sent when a checkpoint is written (every epoch with the
    default ``save_period``) and at the end. So MLflow holds exactly the steps up to the
    newest checkpoint: a process killed after it never sent the steps a resume repeats,
    and the resumed run (the same MLflow run, re-opened by the id the checkpoint keeps)
    has one history. What a failed send leaves (server unreachable) is kept in the
    checkpoint and sent at the next one: a warning, never a stop.

    At the end: ``config.json``, ``manifest.json`` and ``model_best.pth`` (unless
    ``log_checkpoints`` is false) as artifacts, and the run marked FINISHED. A run that
    stops early (Ctrl-C, a crash) is marked KILLED; its resume marks it RUNNING again.
    """

    def __init__(self, save_dir, experiment, run_name, tracking_uri=None, log_checkpoints=True, state=None,
                 branched_from=None, logger=None):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri or "sqlite:///" + str((Path(save_dir) / "mlflow.db").resolve())
        self.remote = self.uri.startswith(("http://", "https://"))
        if self.remote:  # fail fast when the server is gone (mlflow's defaults retry for minutes)
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        else:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
        self.artifact_root = None if self.remote else (Path(save_dir) / "mlartifacts").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment, self.run_name, self.log_checkpoints = experiment, run_name, log_checkpoints
        self.logger = logger
        state = state or {}
        self.id = state.get("run_id") if state.get("tracking_uri", self.uri) == self.uri else None
        self.reopen = self.id is not None
        self.branched_from = branched_from
        self.metrics = [tuple(m) for m in state.get("pending", [])]  # (key, value, timestamp_ms, step)
        self.params, self.known, self.artifacts = {}, {}, []
        self.failing = False
        self.ended = False
        self._send()  # open (or re-open) the run now, so that the manifest can name it

    def run_id(self):
        return self.id

    def log_scalar(self, tag, value, step):
        self.metrics.append((tag, float(value), int(time.time() * 1000), int(step)))

    def log_params(self, params):
        self.params.update({k: _param_text(v) for k, v in params.items()})
        self._send()

    def log_artifact(self, path):
        self.artifacts.append(str(path))

    def checkpoint_state(self):
        self._send()
        return {"run_id": self.id, "tracking_uri": self.uri, "pending": [list(m) for m in self.metrics]}

    def finish(self, checkpoint_dir):
        for name in ("config.json", "manifest.json") + (("model_best.pth",) if self.log_checkpoints else ()):
            if (Path(checkpoint_dir) / name).is_file():
                self.log_artifact(Path(checkpoint_dir) / name)
        self.ended = self._send()
        self._terminate("FINISHED" if self.ended else "KILLED")

    def close(self):
        # Values logged after the newest checkpoint are not sent: a resume logs those steps again.
        if not self.ended:
            self._terminate("KILLED")
            self.ended = True

    def _terminate(self, status):
        if self.id is None:
            return
        try:
            self.client.set_terminated(self.id, status)
        except Exception as err:  # noqa: BLE001 - a tracker never stops the run
            self._warn(err)

    def _open(self):
        if self.reopen:
            try:
                self.known = dict(self.client.get_run(self.id).data.params)
                self.client.update_run(self.id, status="RUNNING")
                self.reopen = False
                return
            except Exception as err:  # noqa: BLE001
                if getattr(err, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                if self.logger:
                    self.logger.warning(f"MLflow run {self.id} is gone from {self.uri}: starting a new one")
                self.reopen, self.id = False, None
        experiment = self.client.get_experiment_by_name(self.experiment)
        experiment_id = (experiment.experiment_id if experiment else
                         self.client.create_experiment(self.experiment, artifact_location=self.artifact_root))
        tags = {"branched_from": self.branched_from} if self.branched_from else None
        self.id = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags).info.run_id
        self.known = {}

    def _send(self):
        """Send what is held; returns whether everything went. Failure: a warning (once per outage), kept for later."""
        from mlflow.entities import Metric, Param

        try:
            if self.id is None or self.reopen:
                self._open()
            for key, value in list(self.params.items()):
                if key in self.known:  # a resumed run: MLflow params are immutable, so a changed one is a tag
                    if self.known[key] != value:
                        self.client.set_tag(self.id, f"resumed.{key}", value)
                    del self.params[key]
            while self.params:
                chunk = dict(list(self.params.items())[:100])  # MLflow's limit per batch
                self.client.log_batch(self.id, params=[Param(k, v) for k, v in chunk.items()])
                for key in chunk:
                    del self.params[key]
                self.known.update(chunk)
            while self.metrics:
                chunk = self.metrics[:1000]
                self.client.log_batch(self.id, metrics=[Metric(k, v, t, s) for k, v, t, s in chunk])
                del self.metrics[:len(chunk)]
            while self.artifacts:
                self.client.log_artifact(self.id, self.artifacts[0])
                self.artifacts.pop(0)
        except Exception as err:  # noqa: BLE001 - a tracker never stops the run
            self._warn(err)
            return False
        if self.failing and self.logger:
            self.logger.warning(f"MLflow at {self.uri} is reachable again: the values held back are sent")
        self.failing = False
        return True

    def _warn(self, err):
        if not self.failing and self.logger:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self.logger.warning(f"MLflow at {self.uri} failed ({first[:200]}): training goes on; {len(self.metrics)}"
                                " values are held (and in metrics.csv with the csv logger) and retried at the next"
                                " checkpoint")
        self.failing = True


def _param_text(value):
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 6000 else text[:5997] + "..."  # MLflow's limit on a param's value


# --------------------------------------------------------------------------- the writer the trainer calls


class RunWriter:
    """Hands each of the trainer's writer calls to every tracker of the run.

    Has the methods the trainer and hooks call on ``run.writer`` (those of
    :class:`logger.visualization.TensorboardWriter`); false when the run has no tracker.
    """

    def __init__(self, trackers=()):
        self.trackers = [tracker for tracker in trackers if tracker]
        self.pictures = [tracker for tracker in self.trackers if tracker.takes_pictures]
        self.last_step = 0

    def __bool__(self):
        return bool(self.trackers)

    def add_scalar(self, tag, value, step):
        self.last_step = step
        for tracker in self.trackers:
            tracker.log_scalar(tag, value, step)

    def add_scalars(self, values, step, prefix=""):
        for tag, value in values.items():
            self.add_scalar(prefix + tag, value, step)

    def add_histogram(self, tag, values, step):
        for tracker in self.pictures:
            tracker.log_histogram(tag, values, step)

    def add_images(self, tag, images, step):
        for tracker in self.pictures:
            tracker.log_images(tag, images, step)

    def add_params(self, params):
        for tracker in self.trackers:
            tracker.log_params(params)

    def add_hparams(self, hparams, metrics):
        """The end of a run (or of a resumed segment of it): its config and final values. TensorBoard keeps one
        record per run in its HParams tab, replaced at each end; the others get the values as scalars at the last step."""
        for tracker in self.trackers:
            if isinstance(tracker, TensorboardTracker):
                tracker.log_hparams(hparams, metrics)
            else:
                for tag, value in metrics.items():
                    tracker.log_scalar(tag, value, self.last_step)
                tracker.log_hparams(hparams, metrics)

    def finish(self, checkpoint_dir):
        """The run ended normally: trackers send their artifacts and mark the run finished."""
        for tracker in self.trackers:
            tracker.finish(checkpoint_dir)

    def flush(self):
        for tracker in self.trackers:
            tracker.flush()

    def close(self):
        for tracker in self.trackers:
            tracker.close()
        self.trackers, self.pictures = [], []

    def checkpoint_state(self):
        """``{tracker name: state}`` for the checkpoint being written (see :meth:`Tracker.checkpoint_state`)."""
        return {name: state for name, tracker in self._named() if (state := tracker.checkpoint_state())}

    def run_ids(self):
        """``{tracker name: its run id}`` for the manifest."""
        return {name: run_id for name, tracker in self._named() if (run_id := tracker.run_id())}

    def _named(self):
        names = {cls: name for name, cls in TRACKERS.items()}
        return [(names.get(type(tracker), type(tracker).__name__), tracker) for tracker in self.trackers]


# --------------------------------------------------------------------------- from the config

# The names trainer.loggers may use. A tracker of your own: add it here; its constructor gets log_dir and its
# "args" (give TRACKER_ARGS an entry to have them checked with the config, NEEDS to name its package).
TRACKERS = {
    "tensorboard": TensorboardTracker,
    "csv": CsvTracker,
    "mlflow": MlflowTracker,
}
TRACKER_ARGS = {"tensorboard": {}, "csv": {}, "mlflow": MLFLOW_DEFAULTS}
NEEDS = {"tensorboard": None, "csv": None, "mlflow": "mlflow"}
_ARG_CHECKS = {
    "tracking_uri": lambda v: v is None or (isinstance(v, str) and v),
    "experiment": lambda v: v is None or (isinstance(v, str) and v),
    "log_checkpoints": lambda v: isinstance(v, bool),
}
_ARG_WANTED = {"tracking_uri": "a URI or null", "experiment": "a name or null", "log_checkpoints": "true or false"}


def check_loggers(value):
    """Config check of ``trainer.loggers``: None when valid, else what was expected (one line)."""
    wanted = 'a list of "tensorboard", "csv" or {"type": "mlflow", "args": {...}}'
    if not isinstance(value, list):
        return wanted
    for item in value:
        name = item.get("type") if isinstance(item, dict) else item
        if not isinstance(name, str):
            return wanted
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, list(TRACKERS), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"{wanted} ({name!r} is none of them{hint})"
        if isinstance(item, dict):
            extra = set(item) - {"type", "args"}
            args = item.get("args") or {}
            if extra or not isinstance(args, dict):
                return f'{wanted} ({name}: only "type" and "args", a mapping)'
            for key, arg in args.items() if name in TRACKER_ARGS else ():
                if key not in TRACKER_ARGS[name]:
                    close = difflib.get_close_matches(key, list(TRACKER_ARGS[name]), n=1, cutoff=0.6)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    valid = ", ".join(TRACKER_ARGS[name]) or "none"
                    return f"{wanted} ({name} takes no argument {key!r}{hint} valid: {valid})"
                if key in _ARG_CHECKS and not _ARG_CHECKS[key](arg):
                    return f"{wanted} ({name}.args.{key} to be {_ARG_WANTED[key]})"
    return None


def logger_specs(cfg):
    """``[(name, args)]`` of ``config["trainer"]``: its ``loggers``, less TensorBoard when ``tensorboard`` is false."""
    specs = []
    for item in cfg.get("loggers", ["tensorboard"]):
        name, args = (item["type"], dict(item.get("args") or {})) if isinstance(item, dict) else (item, {})
        if name == "tensorboard" and not cfg.get("tensorboard", True):
            continue
        specs.append((name, {**TRACKER_ARGS.get(name, {}), **args}))
    return specs


def check_installed(cfg):
    """Raise ConfigError (exit 2, before anything is written) when a named tracker's package is missing."""
    from utils.config import ConfigError

    for name, _ in logger_specs(cfg):
        module = NEEDS.get(name)
        if module and importlib.util.find_spec(module) is None:
            raise ConfigError(f"trainer.loggers: {name} is not installed; pip install {module}"
                              f" (or remove {name} from trainer.loggers)")


def build_writer(config, log_dir, enabled=True, state=None, purge_step=None, run_id=None, branched=False,
                 logger=None):
    """The run's :class:`RunWriter`, with the trackers ``trainer.loggers`` names (none when not ``enabled``:
    under torchrun only rank 0 logs).

    Args:
        state: the checkpoint resumed from, or None. A resume in the run's own folder
            continues its tracker runs; a ``branched`` one starts new ones (tagged with the
            run they came from).
        purge_step: the first step whose values the interrupted process's trackers hold and
            the resumed run will log again (``global_step + 1``); they are dropped.
    """
    if not enabled:
        return RunWriter()
    cfg = config["trainer"]
    saved = (state or {}).get("trackers") or {}
    epoch = state["epoch"] + 1 if state else 1
    trackers = []
    for name, args in logger_specs(cfg):
        if name == "tensorboard":
            trackers.append(TensorboardTracker(log_dir, purge_step=purge_step, logger=logger))
        elif name == "csv":
            trackers.append(CsvTracker(log_dir, purge_step=purge_step, epoch=epoch, logger=logger))
        elif name == "mlflow":
            previous = saved.get("mlflow") or {}
            trackers.append(MlflowTracker(
                cfg["save_dir"], args["experiment"] or config["name"], run_id, args["tracking_uri"],
                args["log_checkpoints"], state=None if branched else previous,
                branched_from=previous.get("run_id") if branched else None, logger=logger))
        else:  # a tracker of your own: TRACKERS[name](log_dir=..., **args)
            trackers.append(TRACKERS[name](log_dir=log_dir, **args))
    writer = RunWriter(trackers)
    from utils.config import flatten

    writer.add_params(flatten(config))  # a resumed MLflow run keeps its params; changed ones become tags
    return writer
