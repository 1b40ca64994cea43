"""``trainer.loggers`` ``{"type": "mlflow", "args": {...}}``: a run as an MLflow run (``pip install mlflow``).

A part (utils/parts.py): delete this file and tests/parts/test_mlflow_logger.py, and runs that
do not name ``"mlflow"`` log as before. In a config::

    "trainer": {"loggers": ["tensorboard", "mlflow"]}                                   the defaults below
    "trainer": {"loggers": [{"type": "mlflow", "args": {"tracking_uri": "http://host:5000"}}]}

``args``: ``tracking_uri`` (default: a SQLite store under ``trainer.save_dir``), ``experiment``
(default: the config's name), ``log_checkpoints`` (upload ``model_best.pth`` at the end; true).
"""

import importlib.util
import json
import os
import time
from pathlib import Path

from logger.writers import Writer
from utils.config import did_you_mean, flatten

DEFAULTS = {"tracking_uri": None, "experiment": None, "log_checkpoints": True}
CHECKS = {
    "tracking_uri": lambda v: None if v is None or (isinstance(v, str) and v) else "a URI or null",
    "experiment": lambda v: None if v is None or (isinstance(v, str) and v) else "a name or null",
    "log_checkpoints": lambda v: None if isinstance(v, bool) else "true or false",
}


def check(config):
    """Each mlflow entry's ``args`` (one line per problem), and that mlflow is installed: exit 2 before anything is written."""
    problems = []
    for entry in config["trainer"]["loggers"]:
        args = entry.get("args") if isinstance(entry, dict) and entry.get("type") == "mlflow" else None
        for key, value in args.items() if isinstance(args, dict) else ():  # (a malformed entry: the core's line)
            if key not in DEFAULTS:
                problems.append(f"trainer.loggers: mlflow takes no argument {key!r}{did_you_mean(key, DEFAULTS)}"
                                f" valid: {', '.join(DEFAULTS)}")
            elif wanted := CHECKS[key](value):
                problems.append(f"trainer.loggers: mlflow args.{key}: got {json.dumps(value)}, expected {wanted}")
    if not problems and importlib.util.find_spec("mlflow") is None:
        problems.append("trainer.loggers: mlflow is not installed; pip install mlflow (or remove mlflow from"
                        " trainer.loggers)")
    return problems


def writer(name, settings, context):
    """The run's MLflow run: a resume in the run's own folder continues it; a branched one starts a new one."""
    args = {**DEFAULTS, **settings}
    config, previous = context.config, context.saved(name)
    return MlflowWriter(
        config["trainer"]["save_dir"], args["experiment"] or config["name"], context.run_id, args["tracking_uri"],
        args["log_checkpoints"], state=None if context.branched else previous,
        branched_from=previous.get("run_id") if context.branched else None, params=flatten(config),
        logger=context.logger)


class MlflowWriter(Writer):
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

    At the end: the final values as metrics at the last step; ``config.json``, ``manifest.json``
    and ``model_best.pth`` (unless ``log_checkpoints`` is false) as artifacts, and the run marked
    FINISHED. A run that stops early (Ctrl-C, a crash) is marked KILLED; its resume marks it RUNNING again.
    A resumed run keeps its params; a changed one becomes a tag (``resumed.<key>``).
    """

    def __init__(self, save_dir, experiment, run_name, tracking_uri=None, log_checkpoints=True, state=None,
                 branched_from=None, params=None, logger=None):
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
        self.params = {k: _param_text(v) for k, v in (params or {}).items()}
        self.known, self.artifacts = {}, []
        self.last_step = 0
        self.failing = False
        self.ended = False
        self._send()  # open (or re-open) the run now, with its params, so that the manifest can name it

    def run_ids(self):
        return {"mlflow": self.id} if self.id else {}

    def add_scalar(self, tag, value, step):
        self.last_step = step
        self.metrics.append((tag, float(value), int(time.time() * 1000), int(step)))

    def add_hparams(self, hparams, metrics):
        for tag, value in metrics.items():
            self.add_scalar(tag, value, self.last_step)

    def checkpoint_state(self):
        self._send()
        return {"mlflow": {"run_id": self.id, "tracking_uri": self.uri, "pending": [list(m) for m in self.metrics]}}

    def finish(self, checkpoint_dir):
        for name in ("config.json", "manifest.json") + (("model_best.pth",) if self.log_checkpoints else ()):
            if (Path(checkpoint_dir) / name).is_file():
                self.artifacts.append(str(Path(checkpoint_dir) / name))
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
        except Exception as err:  # noqa: BLE001 - a logger never stops the run
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
        except Exception as err:  # noqa: BLE001 - a logger never stops the run
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
