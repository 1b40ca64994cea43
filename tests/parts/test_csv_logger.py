"""The csv logger part (parts/csv_logger.py): metrics.csv after a run, and after a crash and resume.

The tiny run (conftest's): 13 optimizer steps per epoch, 2 epochs = steps 1..26; with
``log_every_n_steps`` 4 the logged steps are 4, 8, ..., 24 and the epochs end at steps
13 and 26. The crash: a last.pth every 8 steps (conftest's save_last_every) at steps 8, 16 and 24;
the process dies at step 20 (after logging it), resumes from last.pth (step 16) and runs
to the end. Resuming on the CPU is bit-exact, so the resumed run's values equal an
uninterrupted run's, and the file must show exactly those: one value per step and tag.
"""

import json

import pytest
import torch

from conftest import make_config
from parts.csv_logger import read_metrics_csv
from trainer import cli
from trainer.run import train
from trainer.trainer import Trainer

LOGGED_STEPS = [4, 8, 12, 16, 20, 24]
EPOCH_ENDS = [13, 26]
CRASH_STEP, RESUMED_FROM = 20, 16


def config_with(tmp_path, loggers, **trainer):
    return make_config(tmp_path / "saved", loggers=loggers, log_every_n_steps=4, **trainer)


def crash_at(monkeypatch, step):
    """Make the run die (an exception, as a crash would) right after it logged optimizer step ``step``."""
    original = Trainer.log_step

    def log_then_crash(self, *args):
        original(self, *args)
        if self.global_step == step:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(Trainer, "log_step", log_then_crash)


def crashed_and_resumed(tmp_path, monkeypatch, loggers):
    """Run to step CRASH_STEP, die, resume from last.pth; returns (metrics, run folder, log folder)."""
    config = config_with(tmp_path, loggers)  # (the test has armed save_last_every(8))
    with monkeypatch.context() as patch:
        crash_at(patch, CRASH_STEP)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(config, run_id="r")
    folder = tmp_path / "saved/models/tiny/r"
    assert torch.load(folder / "last.pth", weights_only=True)["global_step"] == RESUMED_FROM
    metrics = train(None, resume=folder / "last.pth")
    return metrics, folder, tmp_path / "saved/log/tiny/r"


def key(rows):
    return [(r["step"], r["tag"]) for r in rows]


def run_cli(tmp_path, capsys, config):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    code = cli.train_command(["-c", str(path)])
    return code, [line for line in capsys.readouterr().err.splitlines() if line]


# --------------------------------------------------------------------------- config


def test_csv_takes_no_args_one_error_line_and_exit_2(tmp_path, capsys):
    code, lines = run_cli(tmp_path, capsys, config_with(tmp_path, [{"type": "csv", "args": {"path": "x.csv"}}]))
    assert code == 2 and lines == ["error: trainer.loggers: csv takes no args (got path)"]
    assert not (tmp_path / "saved").exists()


def test_confusion_matrix_is_refused_when_only_csv_logs(tmp_path, capsys):
    # (the matrix is a TensorBoard image: a run that logs to metrics.csv alone would count it for nothing)
    pytest.importorskip("parts.confusion")  # another part: its files may be deleted
    code, lines = run_cli(tmp_path, capsys, config_with(tmp_path, ["csv"], confusion_matrix=True))
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("error: trainer.confusion_matrix: it is logged as a TensorBoard image"), lines
    assert not (tmp_path / "saved").exists()


# --------------------------------------------------------------------------- a run


def test_csv_rows_and_columns_after_a_run(tmp_path):
    metrics = train(config_with(tmp_path, ["csv"]), run_id="a")
    path = tmp_path / "saved/log/tiny/a/metrics.csv"
    assert path.read_text().splitlines()[0] == "step,epoch,tag,value,wall_time"
    rows = read_metrics_csv(path)
    assert len(set(key(rows))) == len(rows), "a step and tag logged twice"
    by_tag = {}
    for row in rows:
        by_tag.setdefault(row["tag"], []).append(row)
    assert [r["step"] for r in by_tag["train/loss"]] == LOGGED_STEPS
    assert [r["epoch"] for r in by_tag["train/loss"]] == [1, 1, 1, 2, 2, 2]
    assert [r["step"] for r in by_tag["lr/group0"]] == sorted(LOGGED_STEPS + EPOCH_ENDS)  # also at each epoch's end
    assert [(r["step"], r["epoch"]) for r in by_tag["epoch/val_loss"]] == list(zip(EPOCH_ENDS, [1, 2]))
    assert by_tag["epoch/val_loss"][-1]["value"] == metrics["val_loss"]  # full precision (repr)
    assert by_tag["train/grad_norm"] and all(r["value"] > 0 for r in by_tag["train/grad_norm"])
    # the end of the run: final and best monitored values, at the last step
    assert by_tag["hparam/val_loss"][0]["value"] == metrics["val_loss"]
    assert by_tag["hparam/best_val_loss"][0]["step"] == EPOCH_ENDS[-1]
    assert not list((tmp_path / "saved/log/tiny/a").glob("events.out.tfevents*")), "TensorBoard was not named"
    assert torch.load(tmp_path / "saved/models/tiny/a/model_best.pth", weights_only=True)["trackers"] == {}


def test_csv_beside_tensorboard_gets_the_same_scalars(tmp_path):
    # Two loggers: each call goes to both (logger/writers.py's Writers).
    from tensorboard.backend.event_processing import event_accumulator

    train(config_with(tmp_path, ["tensorboard", "csv"], tensorboard=True), run_id="b")
    log_dir = tmp_path / "saved/log/tiny/b"
    rows = read_metrics_csv(log_dir / "metrics.csv")
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    for tag in ("train/loss", "epoch/val_loss", "lr/group0"):
        events = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert events == [(r["step"], pytest.approx(r["value"])) for r in rows if r["tag"] == tag], tag


def test_csv_after_a_crash_and_mid_epoch_resume_has_each_step_once(tmp_path, monkeypatch, save_last_every):
    save_last_every(8)
    reference = read_metrics_csv(_run_to_end(tmp_path / "ref", ["csv"]) / "metrics.csv")
    metrics, _, log_dir = crashed_and_resumed(tmp_path / "crash", monkeypatch, ["csv"])
    rows = read_metrics_csv(log_dir / "metrics.csv")
    # The rows the dead process wrote after step 16 (step 20's) were dropped and written again by the resume:
    # the file has the uninterrupted run's rows, in the same order, with the same values (resume is exact).
    assert key(rows) == key(reference)
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in reference]
    exact = lambda rows: [(r["tag"], r["value"]) for r in rows if not r["tag"].startswith("perf/")]  # noqa: E731
    assert exact(rows) == exact(reference)  # (perf/ values are timings)
    assert rows[-1]["wall_time"] >= rows[0]["wall_time"]


def _run_to_end(root, loggers):
    train(config_with(root, loggers), run_id="r")
    return root / "saved/log/tiny/r"
