"""The console a person reads (trainer.verbosity), and the monitor on a small validation set (ties, its step size)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from base.base_hook import Hook
from conftest import make_config, with_changes
from trainer import cli

ROOT = Path(__file__).resolve().parents[1]


def run_cli(tmp_path, capsys, config, *extra):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    code = cli.train_command(["-c", str(path), *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def with_hook(monkeypatch, hook):
    from trainer import trainer as trainer_module

    original = trainer_module.hooks_for
    monkeypatch.setattr(trainer_module, "hooks_for", lambda *args: [*original(*args), hook])


def test_the_default_run_prints_a_line_per_epoch_and_the_end_block(tmp_path):
    """``python train.py -c config.json`` for 2 epochs: the start (3 lines), one line per epoch, the end block (4):
    no step lines, no block of values per epoch (it printed 30 lines before; the 15-epoch default run 153)."""
    out = subprocess.run([sys.executable, "train.py", "-c", "config.json", "trainer.epochs=2",
                          f"trainer.save_dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = (out.stdout + out.stderr).splitlines()
    assert len(lines) <= 10, "\n".join(lines)
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/2", "2/2"], lines
    assert all("loss " in line and "val_loss " in line and "val_accuracy " in line and re.search(r" \d+\.\d s", line)
               for line in epochs), epochs
    assert " accuracy " not in epochs[0]  # the training metrics are in TensorBoard and, at verbosity 3, the log
    assert lines[-1].startswith("Test split (") and any(line.startswith("Finished ") for line in lines)


def test_verbosity_0_still_prints_the_end_block(tmp_path, capsys):
    code, out = run_cli(tmp_path, capsys, make_config(tmp_path / "saved", verbosity=0), "--run-id", "quiet")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("Finished tiny/quiet in ") and lines[-1].startswith("Test split (64 samples"), lines
    assert "epoch 1/2" not in out and "Run tiny/" not in out


def test_verbosity_3_adds_every_value_and_the_step_lines(tmp_path, capsys):
    config = make_config(tmp_path / "saved", verbosity=3, log_every_n_steps=4)
    code, out = run_cli(tmp_path, capsys, config, "--run-id", "loud")
    assert code == 0
    assert re.search(r"^epoch 1 batch \d+/\d+ step 4 loss ", out, re.M), out
    assert re.search(r"^    accuracy +: ", out, re.M) and re.search(r"^epoch 2/2  loss ", out, re.M), out
    info = (tmp_path / "saved/log/tiny/loud/info.log").read_text()
    assert " DEBUG epoch 1 batch " in info and " RESULT Finished tiny/loud" in info


def test_verbosity_1_shows_the_epoch_lines_without_the_steps(tmp_path, capsys):
    config = make_config(tmp_path / "saved", verbosity=1, log_every_n_steps=4)
    code, out = run_cli(tmp_path, capsys, config, "--run-id", "one")
    assert code == 0 and re.search(r"^epoch 2/2  loss ", out, re.M) and " step 4 loss" not in out, out
    # Every value is still in the run's info.log (and TensorBoard): the console shows less, the file as much.
    info = (tmp_path / "saved/log/tiny/one/info.log").read_text()
    assert re.search(r"    accuracy +: ", info) and " step 4 loss " in info


class StopAt(Hook):
    """Asks the run to stop after optimizer step ``step`` (as a signal or trainer.max_time would)."""

    def __init__(self, step):
        self.step = step

    def after_step(self, trainer, epoch, batch_idx):
        if trainer.global_step == self.step:
            trainer.ask_to_stop(75, "as the test asked")


def test_the_stop_and_the_resume_name_the_same_place_to_continue_at(tmp_path, capsys, monkeypatch):
    config = make_config(tmp_path / "saved", epochs=3, verbosity=1, monitor="off")
    stop = StopAt(20)
    with_hook(monkeypatch, stop)
    code, out = run_cli(tmp_path, capsys, config, "--run-id", "s")
    assert code == 75
    said = re.search(r"Stopped as the test asked after step 20; a resume continues at (epoch \d+, batch \d+ of \d+)\.",
                     out)
    assert said, out
    per_epoch = int(said.group(1).split()[-1])
    assert said.group(1) == f"epoch {20 // per_epoch + 1}, batch {20 % per_epoch + 1} of {per_epoch}"
    stop.step = None
    code, out = run_cli(tmp_path, capsys, config, "--run-id", "s", "-r", "auto")
    assert code == 0 and f"Resumed after step 20: continuing at {said.group(1)}" in out, out


# --------------------------------------------------------------------------- the monitor on a small validation set


class Scores(Hook):
    """Replaces validation's accuracy and loss by the given ones per epoch (no val_ prefix yet)."""

    def __init__(self, by_epoch):
        self.by_epoch = by_epoch

    def after_validation(self, trainer, epoch, result):
        result["accuracy"], result["loss"] = self.by_epoch[epoch]


TIES = {1: (0.9, 0.5), 2: (0.9, 0.3), 3: (0.9, 0.4), 4: (0.8, 0.1)}  # epoch 2 ties epoch 1 with a lower loss


def tie_config(tmp_path, epochs=4):
    return make_config(tmp_path / "saved", epochs=epochs, verbosity=1, monitor="max val_accuracy", early_stop=5,
                       save_period=1)


def test_a_tie_of_the_monitored_value_goes_to_the_lower_val_loss_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    with_hook(monkeypatch, Scores(TIES))
    code, out = run_cli(tmp_path, capsys, tie_config(tmp_path), "--run-id", "whole")
    assert code == 0
    folder = tmp_path / "saved/models/tiny"
    best = torch.load(folder / "whole/model_best.pth", weights_only=True)
    assert best["epoch"] == 2 and best["best_val_loss"] == 0.3, (best["epoch"], best["best_val_loss"])
    assert re.search(r"^epoch 2/4 .* -> model_best\.pth$", out, re.M) and "Best val_accuracy 0.9 at epoch 2" in out
    whole = torch.load(folder / "whole/checkpoint-epoch4.pth", weights_only=True)
    assert whole["not_improved_count"] == 2

    # Stopped after epoch 1 and resumed: the tie-break's state came through the checkpoint.
    assert run_cli(tmp_path, capsys, tie_config(tmp_path, epochs=1), "--run-id", "parts")[0] == 0
    assert run_cli(tmp_path, capsys, tie_config(tmp_path), "--run-id", "parts", "-r", "auto")[0] == 0
    resumed = torch.load(folder / "parts/checkpoint-epoch4.pth", weights_only=True)
    assert torch.load(folder / "parts/model_best.pth", weights_only=True)["epoch"] == 2
    for key in ("monitor_best", "best_val_loss", "best_epoch", "not_improved_count"):
        assert resumed[key] == whole[key], key
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])


def test_a_checkpoint_without_the_tie_break_state_still_resumes(tmp_path, capsys, monkeypatch):
    with_hook(monkeypatch, Scores(TIES))
    assert run_cli(tmp_path, capsys, tie_config(tmp_path, epochs=1), "--run-id", "old")[0] == 0
    path = tmp_path / "saved/models/tiny/old/checkpoint-epoch1.pth"
    state = torch.load(path, weights_only=True)
    del state["best_val_loss"]  # as written before ties were broken
    torch.save(state, path)
    code, out = run_cli(tmp_path, capsys, tie_config(tmp_path), "--run-id", "old", "-r", "auto")
    assert code == 0 and "Resumed after step" in out, out
    # Its loss at the best value is unknown, so the tie counts as no improvement (as before).
    assert torch.load(path.parent / "model_best.pth", weights_only=True)["epoch"] == 1


def test_a_small_validation_set_is_said_to_move_accuracy_in_steps(tmp_path, capsys):
    config = make_config(tmp_path / "saved", epochs=1, verbosity=1, monitor="max val_accuracy")
    code, out = run_cli(tmp_path, capsys, config, "--run-id", "small")
    n = int(re.search(r"(\d+) validation samples", out).group(1))
    assert code == 0 and n < 100
    said = [line for line in out.splitlines() if "moves in steps" in line]
    assert said == [f"val_accuracy on {n} validation samples moves in steps of 1/{n} = {1 / n:.3g}: of equal values"
                    " the one with the lower val_loss counts as the best (model_best.pth)"], out
    for other, changes in (("loss", dict(trainer__monitor="min val_loss")),
                           ("large", dict(data_loader__args__num_samples=2000))):
        code, out = run_cli(tmp_path, capsys, with_changes(config, **changes), "--run-id", other)
        assert code == 0 and "moves in steps" not in out, out


class _Failing:
    """A console stream whose writes fail as a real one does at the worst moments."""

    def __init__(self, error, fd):
        self.error, self.fd = error, fd

    def write(self, text):
        raise self.error

    def flush(self):
        pass

    def fileno(self):
        return self.fd


def test_the_console_survives_a_signal_handlers_line_and_a_closed_pipe(tmp_path, capsys):
    """A Ctrl-C's "stopping after the current step" line arriving while the main thread is writing (Python: "reentrant
    call") still reaches the console, through the file descriptor; a reader gone away (`train.py | head`) mutes the
    console instead of printing a logging traceback for every later line."""
    import logging
    import os

    from logger.logger import _ConsoleHandler

    record = logging.LogRecord("train", logging.WARNING, __file__, 1, "SIGINT received: stopping", None, None)
    out = tmp_path / "console.txt"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT)
    try:
        handler = _ConsoleHandler(_Failing(RuntimeError("reentrant call inside <_io.BufferedWriter name='<stdout>'>"), fd))
        handler.emit(record)
    finally:
        os.close(fd)
    assert out.read_text() == "SIGINT received: stopping\n"
    handler = _ConsoleHandler(_Failing(BrokenPipeError(32, "Broken pipe"), -1))
    handler.emit(record)
    handler.handle(record)  # (handle checks the level: muted)
    assert "Logging error" not in capsys.readouterr().err
