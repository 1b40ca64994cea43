"""Hardening at the level of a whole run (issue 11): what used to pass the checks and break mid-run.

Config reading and checkpoint structure are in test_hardening.py; here, runs: values that
fail only once objects run, non-finite states never saved, interrupts, a full disk, leftovers.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from base.base_trainer import RunStopped
from conftest import make_config, with_changes
from trainer import cli, evaluate_cli, run
from base.base_hook import Hook
from trainer.trainer import hooks_for

ROOT = Path(__file__).resolve().parents[1]


def run_cli(tmp_path, capsys, config, *extra):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    code = cli.train_command(["-c", str(path), *extra])
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line]


def add_hook(monkeypatch, hook, first=False):
    import trainer.trainer

    monkeypatch.setattr(trainer.trainer, "hooks_for", lambda *a: [hook, *hooks_for(*a)] if first else [*hooks_for(*a), hook])


# --------------------------------------------------------------------------- values that would fail mid-run

STEPLR = {"type": "StepLR", "args": {"step_size": 1}}
MID_RUN = {
    "step_size 0": (dict(lr_scheduler={"type": "StepLR", "args": {"step_size": 0}}), "step_size"),
    "step_size as text": (dict(lr_scheduler={"type": "StepLR", "args": {"step_size": "2"}}), "step_size"),
    "plateau per step": (dict(lr_scheduler={"type": "ReduceLROnPlateau", "interval": "step", "args": {}}),
                         "ReduceLROnPlateau steps on a validation metric"),
    "one-cycle too short": (dict(lr_scheduler={"type": "OneCycleLR", "interval": "step",
                                               "args": {"max_lr": 0.1, "total_steps": 10}}), "total_steps 10"),
    "one-cycle per epoch too short": (dict(lr_scheduler={"type": "OneCycleLR", "args": {"max_lr": 0.1, "total_steps": 1}}),
                                      "takes 2 epochs"),
    "LBFGS": (dict(optimizer={"type": "LBFGS", "args": {"lr": 0.1}}), "closure"),
    "SparseAdam": (dict(optimizer={"type": "SparseAdam", "args": {"lr": 0.1}}), "sparse gradients"),
    "param group lr as text": (dict(optimizer={"type": "SGD", "args": {"lr": 0.1},
                                               "param_groups": [{"params": ["net.*"], "lr": "0.1"}]}), "lr"),
    "negative test fraction": (dict(data_loader__args__test_fraction=-0.1), "test_fraction"),
    "prefetch 0": (dict(data_loader__args__prefetch_factor=0, data_loader__args__num_workers=2), "prefetch_factor"),
    "unreduced loss": (dict(loss={"type": "cross_entropy", "args": {"reduction": "none"}}), "not a single value"),
    "loss argument it does not take": (dict(loss={"type": "logsumexp_cross_entropy", "args": {"smoothing": 0.1}}),
                                       "smoothing"),
    "lr true": (dict(optimizer={"type": "SGD", "args": {"lr": True}}), "lr"),
    "shuffle as text": (dict(data_loader__args__shuffle="no"), "shuffle"),
    "an epoch of 0 batches": (dict(data_loader__args__batch_size=1000, data_loader__args__drop_last=True),
                              "0 batches"),
    "early_stop negative": (dict(trainer__early_stop=-1), "early_stop"),
}


@pytest.mark.parametrize("case", list(MID_RUN))
def test_values_that_would_fail_mid_run_are_config_errors_before_anything_is_written(case, tmp_path, capsys):
    changes, fragment = MID_RUN[case]
    save_dir = tmp_path / "saved"
    code, lines = run_cli(tmp_path, capsys, with_changes(make_config(save_dir), **changes))
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert not save_dir.exists()


def test_a_one_cycle_schedule_as_long_as_the_run_is_accepted(tmp_path):
    # 256 training samples, batch 16: 16 steps an epoch, 2 epochs.
    config = with_changes(make_config(tmp_path / "saved"),
                          lr_scheduler={"type": "OneCycleLR", "interval": "step", "args": {"max_lr": 0.1, "total_steps": 32}})
    assert run.train(config)["epoch"] == 2


# --------------------------------------------------------------------------- non-finite states are never saved


class PoisonWeights(Hook):
    """Set a weight to NaN at a chosen moment (what a blown-up step does)."""

    def __init__(self, moment, when):
        self.moment, self.when = moment, when

    def _poison(self, trainer):
        with torch.no_grad():
            next(trainer.model.parameters()).view(-1)[0] = float("nan")

    def after_train_epoch(self, trainer, epoch, last_batch):
        if self.moment == "epoch end" and epoch == self.when:
            self._poison(trainer)

    def after_step(self, trainer, epoch, batch_idx):
        if self.moment == "step" and trainer.global_step == self.when:
            self._poison(trainer)


def test_a_nonfinite_validation_loss_stops_the_run_without_a_checkpoint(tmp_path, monkeypatch):
    add_hook(monkeypatch, PoisonWeights("epoch end", 2))
    config = make_config(tmp_path / "saved", epochs=4)
    with pytest.raises(RunStopped, match="val_loss = nan at the end of epoch 2"):
        run.train(config, run_id="n")
    folder = tmp_path / "saved/models/tiny/n"
    assert sorted(p.name for p in folder.glob("*.pth")) == ["checkpoint-epoch1.pth", "model_best.pth"]
    best = torch.load(folder / "model_best.pth", weights_only=True)
    assert all(torch.isfinite(t).all() for t in best["model"].values())


def test_nonfinite_weights_are_never_written_to_last_pth(tmp_path, monkeypatch, save_last_every):
    add_hook(monkeypatch, PoisonWeights("step", 8), first=True)  # right before step 8's last.pth
    save_last_every(4)  # (after add_hook, which replaces the run's hooks where this adds to them)
    config = make_config(tmp_path / "saved", epochs=2)
    with pytest.raises(RunStopped, match="weights became non-finite"):
        run.train(config, run_id="n")
    last = torch.load(tmp_path / "saved/models/tiny/n/last.pth", weights_only=True)
    assert last["global_step"] == 4  # the good one from step 4; step 8's was refused
    assert all(torch.isfinite(t).all() for t in last["model"].values())


def test_skipped_steps_are_counted_at_the_end(tmp_path, monkeypatch, capsys):
    import trainer.build

    real = trainer.build.build_loss
    calls = {"n": 0}

    def some_nan(config, device=None):
        loss = real(config, device)

        def fn(output, target):
            value = loss(output, target)
            if torch.is_grad_enabled():
                calls["n"] += 1
                if calls["n"] % 4 == 0:
                    return value * float("nan")
            return value

        return fn

    monkeypatch.setattr(trainer.build, "build_loss", some_nan)
    config = make_config(tmp_path / "saved", epochs=1, skip_nonfinite=True, verbosity=1)
    code, _ = run_cli(tmp_path, capsys, config, "--run-id", "s")
    assert code == 0
    log = (tmp_path / "saved/log/tiny/s/info.log").read_text()
    assert calls["n"] // 4 >= 2 and f"Skipped {calls['n'] // 4} steps with a non-finite loss" in log  # every 4th


# --------------------------------------------------------------------------- early stopping


@pytest.mark.parametrize("early_stop,epochs,stops_at", [(1, 50, 3), (2, 50, 4), (0, 6, 6), (None, 6, 6)])
def test_early_stop_means_what_it_says_and_writes_the_last_epoch(tmp_path, early_stop, epochs, stops_at):
    # lr 0: nothing improves after epoch 1. early_stop N allows N misses; 0 or null (victoresque's "off"): never stops.
    config = make_config(tmp_path / "saved", epochs=epochs, save_period=100, early_stop=early_stop)
    config["optimizer"] = {"type": "SGD", "args": {"lr": 0.0}}
    config["lr_scheduler"] = None
    metrics = run.train(config, run_id="e")
    assert metrics["epoch"] == stops_at
    assert (tmp_path / f"saved/models/tiny/e/checkpoint-epoch{stops_at}.pth").is_file()


# --------------------------------------------------------------------------- a full disk


def test_a_full_disk_mid_run_is_one_line_with_its_own_exit_code(tmp_path, monkeypatch, capsys):
    import utils.io as io_utils

    real_fsync, full = io_utils.os.fsync, {"on": False}

    def fsync(fd):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    class FillDisk(Hook):
        def before_epoch(self, trainer, epoch):
            full["on"] = epoch == 2

    monkeypatch.setattr(io_utils.os, "fsync", fsync)
    add_hook(monkeypatch, FillDisk())
    code, lines = run_cli(tmp_path, capsys, make_config(tmp_path / "saved", epochs=3), "--run-id", "d")
    folder = tmp_path / "saved/models/tiny/d"
    assert code == 28 and len(lines) == 1 and str(folder) in lines[0], lines
    assert torch.load(folder / "checkpoint-epoch1.pth", weights_only=True)["epoch"] == 1  # intact
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- interrupts and leftovers


def _wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    return path.exists()


def test_sigterm_to_the_whole_process_group_with_workers_still_writes_last(tmp_path):
    """What Slurm and systemd do: every process of the group, DataLoader workers included, gets SIGTERM."""
    config = make_config(tmp_path / "saved", epochs=10_000, save_period=1, monitor="off")
    config["data_loader"]["args"].update(num_workers=2, in_memory=False)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen([sys.executable, "train.py", "-c", str(path), "--run-id", "g"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    last, epoch1 = tmp_path / "saved/models/tiny/g/last.pth", tmp_path / "saved/models/tiny/g/checkpoint-epoch1.pth"
    try:
        assert _wait_for(epoch1, proc), proc.communicate()[0]  # training is under way, its handlers installed
        first = torch.load(epoch1, weights_only=True)["global_step"]
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "Traceback" not in out and "killed by signal" not in out, out
    assert torch.load(last, weights_only=True)["global_step"] >= first


# Ctrl-C while torch is being imported: the KeyboardInterrupt is raised at the import, as a SIGINT would.
INTERRUPT_AT_IMPORT = """
import builtins, runpy, sys
real = builtins.__import__
def interrupted_import(name, *args, **kwargs):
    if name.split(".")[0] == "torch":
        builtins.__import__ = real
        raise KeyboardInterrupt
    return real(name, *args, **kwargs)
builtins.__import__ = interrupted_import
sys.argv = ["train.py", "-c", sys.argv[1]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_ctrl_c_while_starting_up_prints_no_traceback(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(make_config(tmp_path / "saved", epochs=1)))
    proc = subprocess.run([sys.executable, "-c", INTERRUPT_AT_IMPORT, str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 130 and proc.stderr.strip() == "interrupted", proc.stderr
    assert not (tmp_path / "saved").exists()


def test_temporary_files_of_a_killed_write_are_removed_when_the_run_continues(tmp_path):
    config = make_config(tmp_path / "saved", epochs=1)
    run.train(config, run_id="t")
    folder = tmp_path / "saved/models/tiny/t"
    stale = folder / ".last.pth.k3j4h5g6.tmp"
    stale.write_bytes(b"half a checkpoint")
    keep = folder / "notes.tmp"
    keep.write_text("the user's own file")
    run.train(with_changes(config, trainer__epochs=2), resume=folder / "checkpoint-epoch1.pth")
    assert not stale.exists() and keep.exists()


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run.train(make_config(tmp_path / "saved", epochs=1), run_id="u")
    finally:
        os.umask(old)
    folder = tmp_path / "saved/models/tiny/u"
    for name in ("checkpoint-epoch1.pth", "config.json", "manifest.json"):
        assert (folder / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.parametrize("where", ["model", "optimizer"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_nonfinite_weights_is_refused_at_load_naming_the_tensor(tmp_path, capsys, where, value):
    """test.py, --init-from and -r on weights (or, to resume, optimizer state) holding NaN or an infinity: one line
    naming the first such tensor, before anything is written (no .test.json of NaN scores, no run folder)."""
    config = make_config(tmp_path / "saved", epochs=1)
    run.train(config, run_id="n")
    folder = tmp_path / "saved/models/tiny/n"
    state = torch.load(folder / "checkpoint-epoch1.pth", weights_only=True)
    if where == "model":
        state["model"]["net.4.weight"][0, 0] = value
        want = "model weight 'net.4.weight' holds "
    else:
        state["optimizer"]["state"][1]["momentum_buffer"][0] = value
        want = "optimizer state 'momentum_buffer' of parameter 1 holds "
    want += "NaN" if value != value else "an infinity"
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    commands = [(cli.train_command, ["-r", str(bad)])]
    if where == "model":
        commands += [(evaluate_cli.test_command, ["-r", str(bad)]),
                     (cli.train_command, ["-c", str(folder / "config.json"), "--init-from", str(bad), "--run-id", "i"])]
    for command, argv in commands:
        assert command(argv) == 2, argv
        err = [line for line in capsys.readouterr().err.splitlines() if line]
        assert len(err) == 1 and want in err[0] and str(bad) in err[0], err
    assert not bad.with_suffix(".test.json").exists()
    assert sorted(p.name for p in (tmp_path / "saved/models/tiny").iterdir()) == ["n"]


def test_write_json_never_writes_nan(tmp_path):
    """JSON has no NaN: a non-finite number (a metric that came out NaN) is written as null and named under
    "nonfinite", so the file stays valid JSON for any reader."""
    from utils.io import write_json

    path = tmp_path / "r.json"
    write_json(path, {"final": {"loss": 0.5, "val_r2": float("nan")}, "best": float("-inf"), "test": [1.0, float("inf")]})
    def refuse(token):
        raise AssertionError(f"{token} written as a bare JSON constant")

    data = json.loads(path.read_text(), parse_constant=refuse)
    assert data["final"] == {"loss": 0.5, "val_r2": None} and data["best"] is None and data["test"] == [1.0, None]
    assert data["nonfinite"] == {"final.val_r2": "NaN", "best": "-Infinity", "test[1]": "Infinity"}
    write_json(path, {"a": 1.0})
    assert json.loads(path.read_text()) == {"a": 1.0}
