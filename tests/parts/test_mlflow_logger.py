"""The MLflow logger part (parts/mlflow_logger.py): one MLflow run per run folder, after a run, a resume, an outage.

The tiny run (conftest's): 13 optimizer steps per epoch, 2 epochs = steps 1..26; with
``log_every_n_steps`` 4 the logged steps are 4, 8, ..., 24 and the epochs end at steps
13 and 26. The crash: a last.pth every 8 steps (conftest's save_last_every) at steps 8, 16 and 24;
the process dies at step 20 (after logging it), resumes from last.pth (step 16) and runs
to the end. Each MLflow history is checked against the csv logger's metrics.csv of the
same run: one value per step and tag, the same values.
"""

import importlib.util
import json
import os
import signal
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import make_config
from trainer import cli
from trainer.run import train
from trainer.trainer import Trainer

read_metrics_csv = pytest.importorskip("parts.csv_logger", reason="the csv logger part is not in this project").read_metrics_csv

LOGGED_STEPS = [4, 8, 12, 16, 20, 24]
CRASH_STEP, RESUMED_FROM = 20, 16


def config_with(tmp_path, loggers, **trainer):
    return make_config(tmp_path / "saved", loggers=loggers, log_every_n_steps=4, **trainer)


def crashed_and_resumed(tmp_path, monkeypatch, loggers):
    """Run to step CRASH_STEP, die (an exception, as a crash would), resume from last.pth (step RESUMED_FROM)."""
    config = config_with(tmp_path, loggers)  # (the test has armed save_last_every(8))
    original = Trainer.log_step

    def log_then_crash(self, *args):
        original(self, *args)
        if self.global_step == CRASH_STEP:
            raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "log_step", log_then_crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(config, run_id="r")
    folder = tmp_path / "saved/models/tiny/r"
    assert torch.load(folder / "last.pth", weights_only=True)["global_step"] == RESUMED_FROM
    metrics = train(None, resume=folder / "last.pth")
    return metrics, folder, tmp_path / "saved/log/tiny/r"


def one_error_line(tmp_path, capsys, config):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    assert cli.train_command(["-c", str(path)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: trainer.loggers: mlflow "), lines
    assert not (tmp_path / "saved").exists()
    return lines[0]


@pytest.fixture
def installed(monkeypatch):
    """Whether mlflow seems installed, for the config's check, whatever this machine has."""
    real = importlib.util.find_spec

    def pretend(present):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: (real("json") if present else None) if name == "mlflow" else real(name, *a))
    return pretend


# --------------------------------------------------------------------------- config


def test_mlflow_args_are_checked_one_line_each(tmp_path, capsys, installed):
    installed(True)
    assert "did you mean 'experiment'" in one_error_line(
        tmp_path, capsys, config_with(tmp_path, [{"type": "mlflow", "args": {"experimnt": "x"}}]))
    assert one_error_line(tmp_path, capsys, config_with(tmp_path, [{"type": "mlflow", "args": {"log_checkpoints": 1}}])
                          ).endswith("mlflow args.log_checkpoints: got 1, expected true or false")
    from parts.mlflow_logger import check

    good = {"type": "mlflow", "args": {"tracking_uri": "http://h:5000", "experiment": "e", "log_checkpoints": False}}
    assert check({"trainer": {"loggers": ["tensorboard", "mlflow", good]}}) == []


def test_missing_mlflow_is_exit_2_naming_the_install_before_anything_is_written(tmp_path, capsys, installed):
    installed(False)
    line = one_error_line(tmp_path, capsys, config_with(tmp_path, ["csv", {"type": "mlflow"}]))
    assert "pip install mlflow" in line


# --------------------------------------------------------------------------- MLflow (SQLite store)

needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                  reason="mlflow is optional and not installed (pip install mlflow)")


def client_for(save_dir):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri="sqlite:///" + str((Path(save_dir) / "mlflow.db").resolve()))


def history(client, run_id, tag):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, tag))


@needs_mlflow
def test_mlflow_run_in_the_default_sqlite_store(tmp_path):
    metrics = train(config_with(tmp_path, ["csv", {"type": "mlflow"}]), run_id="m")
    folder = tmp_path / "saved/models/tiny/m"
    run_id = json.loads((folder / "manifest.json").read_text())["trackers"]["mlflow"]
    assert torch.load(folder / "model_best.pth", weights_only=True)["trackers"]["mlflow"]["run_id"] == run_id
    client = client_for(tmp_path / "saved")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "m"
    assert client.get_experiment(run.info.experiment_id).name == "tiny"  # the config's name
    assert run.data.params["optimizer.args.lr"] == "0.1" and run.data.params["arch.type"] == "MLP"
    assert run.data.params["trainer.loggers"].startswith('["csv"')
    # every scalar the CSV has, the same history in MLflow
    rows = read_metrics_csv(tmp_path / "saved/log/tiny/m/metrics.csv")
    for tag in ("train/loss", "lr/group0", "epoch/val_loss", "hparam/best_val_loss"):
        assert history(client, run_id, tag) == [(r["step"], r["value"]) for r in rows if r["tag"] == tag]
    assert [s for s, _ in history(client, run_id, "train/loss")] == LOGGED_STEPS
    assert run.data.metrics["hparam/val_loss"] == metrics["val_loss"]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert artifacts == {"config.json", "manifest.json", "model_best.pth"}
    assert Path(tmp_path / "saved/mlartifacts").is_dir()  # under save_dir, not ./mlruns


@needs_mlflow
def test_mlflow_log_checkpoints_false_skips_the_weights(tmp_path):
    train(config_with(tmp_path, [{"type": "mlflow", "args": {"log_checkpoints": False, "experiment": "e"}}]),
          run_id="n")
    client = client_for(tmp_path / "saved")
    (run,) = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.json", "manifest.json"}


@needs_mlflow
def test_mlflow_resume_is_the_same_run_with_one_history(tmp_path, monkeypatch, save_last_every):
    save_last_every(8)
    loggers = ["csv", {"type": "mlflow"}]
    metrics, folder, log_dir = crashed_and_resumed(tmp_path, monkeypatch, loggers)
    client = client_for(tmp_path / "saved")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len(runs) == 1, "the resume made a second MLflow run"
    run_id = runs[0].info.run_id
    assert json.loads((folder / "manifest.json").read_text())["trackers"]["mlflow"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    # Step 20 was logged by the process that died, after its last checkpoint (step 16): MLflow never got it
    # from that process, so the history has each step once, the resumed run's values (= the CSV's).
    rows = read_metrics_csv(log_dir / "metrics.csv")
    for tag in ("train/loss", "epoch/loss", "lr/group0"):
        got = client.get_metric_history(run_id, tag)
        assert len({m.step for m in got}) == len(got), f"{tag}: a step twice"
        assert sorted((m.step, m.value) for m in got) == [(r["step"], r["value"]) for r in rows if r["tag"] == tag]
    assert client.get_run(run_id).data.metrics["epoch/val_loss"] == metrics["val_loss"]


@needs_mlflow
def test_mlflow_unreachable_never_stops_training(tmp_path, caplog):
    # Nothing listens on this port: every send fails at once (connection refused).
    port = _free_port()
    config = config_with(tmp_path, ["csv", {"type": "mlflow", "args": {"tracking_uri": f"http://127.0.0.1:{port}"}}],
                         verbosity=1)
    metrics = train(config, run_id="u")
    log = (tmp_path / "saved/log/tiny/u/info.log").read_text()
    assert log.count("MLflow at http://127.0.0.1") == 1, "warn once per outage, not at every retry"
    assert "training goes on" in log
    rows = read_metrics_csv(tmp_path / "saved/log/tiny/u/metrics.csv")
    assert [r["value"] for r in rows if r["tag"] == "epoch/val_loss"][-1] == metrics["val_loss"]
    # what could not be sent is kept in the checkpoint, for the next try
    pending = torch.load(tmp_path / "saved/models/tiny/u/checkpoint-epoch2.pth", weights_only=True)["trackers"]["mlflow"]["pending"]
    assert {p[0] for p in pending} >= {"train/loss", "epoch/val_loss"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- a real MLflow server


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    proc = subprocess.Popen([exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                             "--artifacts-destination", str(tmp_path / "server-artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):  # up to a minute: the server creates its database first
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("mlflow server exited at start")
            time.sleep(0.1)
    else:
        stop(proc)
        pytest.fail("mlflow server did not answer within a minute")
    yield url, proc
    stop(proc)


def stop(proc):
    """Kill the server and its workers (its own process group), and wait for it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@needs_mlflow
def test_real_mlflow_server_stopped_mid_run(tmp_path, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    url, proc = mlflow_server
    original = Trainer.log_step

    def stop_server_at_step_16(self, *args):
        original(self, *args)
        if self.global_step == 16 and proc.poll() is None:  # after the epoch-1 checkpoint was sent
            stop(proc)

    monkeypatch.setattr(Trainer, "log_step", stop_server_at_step_16)
    config = config_with(tmp_path, ["csv", {"type": "mlflow", "args": {"tracking_uri": url}}], verbosity=1)
    metrics = train(config, run_id="s")  # finishes although the server is gone
    assert metrics["epoch"] == 2
    log = (tmp_path / "saved/log/tiny/s/info.log").read_text()
    assert f"MLflow at {url} failed" in log and "training goes on" in log
    rows = read_metrics_csv(tmp_path / "saved/log/tiny/s/metrics.csv")
    assert [r["step"] for r in rows if r["tag"] == "train/loss"] == LOGGED_STEPS  # the CSV has everything
    # What the server got before it stopped: epoch 1 (sent with the epoch-1 checkpoint), one history
    run_id = json.loads((tmp_path / "saved/models/tiny/s/manifest.json").read_text())["trackers"]["mlflow"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/server.db")
    assert [m.step for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)] == [4, 8, 12]
