"""Runs that outlive the machine (issue 14): ``-r auto``, validation by step, stop signals (SIGUSR1 too), no
per-step agreement under torchrun, torchrun's restarts. (``trainer.max_time`` is a part: tests/parts/test_max_time.py;
the SLURM batch script too: tests/parts/test_slurm.py.)

What is compared: a run cut short (by a signal, by a kill -9 of one worker) and continued with
``-r auto`` ends with the model and optimizer state of the run left alone: bit-identical in one
process (``torch.equal``), and to ``1e-7`` under 2 gloo processes, as the existing mid-epoch resume
tests of tests/test_distributed.py require. No test waits for wall-clock time: the signal and the
kill are the process's own, at a given step.
"""

import contextlib
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
from conftest import assert_states_identical, kill_tree, make_config, with_changes
from trainer import run
from trainer.cli import train_command
from utils.dist_round import launch_context
from utils.resume import find_resumable

REPO = Path(__file__).resolve().parents[1]


def load(path):
    return torch.load(path, weights_only=True, map_location="cpu")


@pytest.fixture
def config(tmp_path):
    # Shuffling, a validation split, dropout, a scheduler, momentum: everything that can drift on resume.
    return make_config(tmp_path / "saved", epochs=3, save_period=1)


def models_dir(config, run_id):
    return Path(config["trainer"]["save_dir"]) / "models" / config["name"] / run_id


def uninterrupted(config):
    config = with_changes(config, name="whole")
    run.train(config, run_id="w")
    return load(models_dir(config, "w") / f"checkpoint-epoch{config['trainer']['epochs']}.pth")


@contextlib.contextmanager
def signal_at_step(sig, step):
    """Send ``sig`` to this process right after the ``step``-th optimizer step (counted from the start of the block)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    count = [0]

    def hook(opt, args, kwargs):
        count[0] += 1
        if count[0] == step:
            os.kill(os.getpid(), sig)

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def write_config(tmp_path, config):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


# ---------------------------------------------------------------- -r auto


def test_auto_starts_a_run_that_has_nothing_to_resume(tmp_path, config):
    path = write_config(tmp_path, config)
    assert train_command(["-c", path, "--run-id", "new", "-r", "auto"]) == 0
    assert (models_dir(config, "new") / "checkpoint-epoch3.pth").is_file()


def test_auto_restarts_in_a_folder_that_saved_no_checkpoint(tmp_path, config):
    """A job killed before its first checkpoint leaves config.json and the manifest: the restart starts there."""
    folder = models_dir(config, "early")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert train_command(["-c", write_config(tmp_path, config), "--run-id", "early", "-r", "auto"]) == 0
    assert (folder / "checkpoint-epoch3.pth").is_file()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["early"]


def test_auto_of_a_finished_run_does_nothing_and_exits_0(tmp_path, config, capsys):
    path = write_config(tmp_path, config)
    assert train_command(["-c", path, "--run-id", "done", "-r", "auto"]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in models_dir(config, "done").iterdir()}
    capsys.readouterr()
    assert train_command(["-c", path, "--run-id", "done", "-r", "auto"]) == 0
    assert "nothing to resume" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in models_dir(config, "done").iterdir()} == before


def snapshot(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_an_early_stop_is_the_end_of_the_run_for_a_resume(tmp_path, config, capsys):
    """Early stopping ends the run at epoch 3 of 6 ("max val_loss" while the loss falls: epoch 1 improves on -inf,
    epochs 2 and 3 do not, and early_stop=1 allows one miss). The checkpoint says so: the same command with -r auto,
    and -r on that checkpoint, have nothing to resume (exit 0, nothing written); a raised patience trains on."""
    stopping = with_changes(config, trainer__epochs=6, trainer__early_stop=1, trainer__monitor="max val_loss")
    path = write_config(tmp_path, stopping)
    assert train_command(["-c", path, "--run-id", "es", "-r", "auto"]) == 0
    folder = models_dir(config, "es")
    checkpoint = folder / "checkpoint-epoch3.pth"
    assert load(checkpoint)["stopped_early"] is True and not (folder / "checkpoint-epoch4.pth").exists()
    before = snapshot(folder)
    capsys.readouterr()

    for command in (["-c", path, "--run-id", "es", "-r", "auto"], ["-r", str(checkpoint)],
                    ["-r", str(checkpoint), "trainer.epochs=6"]):
        assert train_command(command) == 0, command
        err = capsys.readouterr().err
        assert "nothing to resume: the run stopped early at epoch 3, step 39" in err, (command, err)
        assert "trainer.early_stop=1 epochs" in err and "raise trainer.early_stop" in err
        assert len(err.strip().splitlines()) == 1
        assert snapshot(folder) == before, command  # nothing written

    # More patience: the run goes on, in place, to its last epoch (val_loss keeps falling: 5 misses, patience 5).
    assert train_command(["-c", path, "--run-id", "es", "-r", "auto", "trainer.early_stop=5"]) == 0
    final = load(folder / "checkpoint-epoch6.pth")
    assert final["stopped_early"] is False and final["epoch"] == 6
    (entry,) = json.loads((folder / "manifest.json").read_text())["resume_history"]
    assert Path(entry["checkpoint"]).name == "checkpoint-epoch3.pth"


def test_auto_needs_a_config(capsys):
    with pytest.raises(SystemExit) as exited:
        train_command(["-r", "auto"])
    assert exited.value.code == 2 and "-r auto needs -c CONFIG" in capsys.readouterr().err


def test_find_resumable_takes_the_checkpoint_of_the_latest_step(config, save_last_every):
    from utils.io import save_checkpoint

    save_last_every(5)  # 13 steps an epoch: last.pth of step 35 is older than checkpoint-epoch3.pth's 39
    run.train(config, run_id="r")
    folder = models_dir(config, "r")
    path, state, run_id, skipped = find_resumable(run.checked_config(config)[0], "r")
    assert (path.name, state["global_step"], run_id, skipped) == ("checkpoint-epoch3.pth", 39, "r", [])

    newer = dict(load(folder / "checkpoint-epoch3.pth"), global_step=40)
    save_checkpoint(newer, folder / "last.pth")
    assert find_resumable(run.checked_config(config)[0], "r")[0].name == "last.pth"

    # The newest is damaged (cut short, as by a full disk outside atomic_write): reported, and the next one taken.
    data = (folder / "last.pth").read_bytes()
    (folder / "last.pth").write_bytes(data[: len(data) // 2])
    path, state, _, skipped = find_resumable(run.checked_config(config)[0], "r")
    assert path.name == "checkpoint-epoch3.pth" and state["global_step"] == 39
    assert len(skipped) == 1 and "last.pth" in skipped[0]

    # A file that loads but is no resumable state is skipped too.
    save_checkpoint({"global_step": 99, "model": {}}, folder / "checkpoint-epoch9.pth")
    path, _, _, skipped = find_resumable(run.checked_config(config)[0], "r")
    assert path.name == "checkpoint-epoch3.pth" and len(skipped) == 2


def test_find_resumable_without_a_run_id_takes_the_run_written_last(config):
    assert find_resumable(run.checked_config(config)[0]) == (None, None, None, [])
    run.train(with_changes(config, trainer__epochs=1), run_id="older")
    run.train(with_changes(config, trainer__epochs=1), run_id="newer")
    old = models_dir(config, "older") / "checkpoint-epoch1.pth"
    os.utime(old, (1, 1))  # (modification times of files written in the same second may tie)
    assert find_resumable(run.checked_config(config)[0])[2] == "newer"


def test_auto_resume_logs_the_damaged_file_it_skipped(tmp_path, config):
    path = write_config(tmp_path, with_changes(config, trainer__epochs=1))
    assert train_command(["-c", path, "--run-id", "d", "-r", "auto"]) == 0
    (models_dir(config, "d") / "last.pth").write_bytes(b"not a checkpoint")
    assert train_command(["-c", write_config(tmp_path, config), "--run-id", "d", "-r", "auto"]) == 0
    log = (Path(config["trainer"]["save_dir"]) / "log/tiny/d/info.log").read_text()
    assert "last.pth: cannot be read" in log and "skipped" in log


def test_auto_says_whether_it_resumed_or_started_and_names_a_similar_run_id(tmp_path, config, capsys):
    """-r auto says in one line what it did: started fresh, or resumed from which checkpoint; a run id that looks
    like one with checkpoints (a typo) is named, as the run it starts fresh may not be the one meant."""
    path = write_config(tmp_path, with_changes(config, trainer__epochs=1))
    assert train_command(["-c", path, "--run-id", "exp-lr01", "-r", "auto"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("-r auto:")]
    assert said == [f"-r auto: run {models_dir(config, 'exp-lr01')} does not exist: starting it fresh"]

    assert train_command(["-c", write_config(tmp_path, config), "--run-id", "exp-lr01", "-r", "auto"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("-r auto:")]
    assert said == [f"-r auto: resuming {models_dir(config, 'exp-lr01') / 'checkpoint-epoch1.pth'} (epoch 1, step 13)"]

    assert train_command(["-c", path, "--run-id", "exp-lr1", "-r", "auto"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("-r auto:")]
    assert len(said) == 1 and "exp-lr1 does not exist: starting it fresh" in said[0], said
    assert said[0].endswith("; did you mean --run-id exp-lr01? (that run has checkpoints)"), said


def test_launch_context_reads_slurm_and_torchrun():
    env = {"SLURM_JOB_ID": "123", "SLURM_RESTART_COUNT": "2", "TORCHELASTIC_RESTART_COUNT": "1", "HOME": "/"}
    assert launch_context(env) == {"slurm_job_id": "123", "slurm_restart_count": 2, "torchrun_restart_count": 1}
    assert launch_context({}) == {}


# ---------------------------------------------------------------- under torchrun (2 CPU processes, gloo)

WORLD = 2
LAUNCH_TIMEOUT = 180

# Runs train.py's command line in each worker, with test instruments chosen by the environment:
# COUNT_OUT: write how often this rank called utils.dist_round.max_over_ranks, and after how many steps;
# KILL_AT_STEP: on the first attempt, rank 1 kills itself with SIGKILL right after that optimizer step;
# NAN_AT_STEP: rank 1's training loss is NaN at that step;
# SAVE_LAST_EVERY: a resumable last.pth every that many optimizer steps (conftest's save_last_hook);
# RANK1_FIRST_ON_RESTART (a file): in a round torchrun restarted, rank 0 joins the process group only once rank 1
# has begun to (and so looks up rank 0's address in torchrun's store before rank 0 has written this round's).
DRIVER = """
import json, os, signal, sys
sys.path.insert(0, {repo!r})
from utils import dist_round
from trainer import trainer as tt
from trainer.cli import train_command

rank = int(os.environ["RANK"])
calls, current = [], {{}}
_max = dist_round.max_over_ranks

def counting(*values):
    calls.append(current["trainer"].global_step if "trainer" in current else -1)
    return _max(*values)

dist_round.max_over_ranks = counting
_init = tt.Trainer.__init__

def init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    current["trainer"] = self
    nan_at = int(os.environ.get("NAN_AT_STEP", 0))
    if nan_at and rank == 1:
        criterion = self.criterion
        def poisoned(output, target):
            loss = criterion(output, target)
            return loss * float("nan") if self.model.training and self.global_step + 1 == nan_at else loss
        self.criterion = poisoned

tt.Trainer.__init__ = init
kill_at = int(os.environ.get("KILL_AT_STEP", 0))
if kill_at and rank == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    _step = tt.Trainer.optimizer_step
    def step(self, *args):
        _step(self, *args)
        if self.global_step + 1 == kill_at:  # (counted after the optimizer's step)
            os.kill(os.getpid(), signal.SIGKILL)
    tt.Trainer.optimizer_step = step
if os.environ.get("SAVE_LAST_EVERY"):
    from tests.conftest import add_hooks, save_last_hook
    add_hooks(save_last_hook(int(os.environ["SAVE_LAST_EVERY"])))
first = os.environ.get("RANK1_FIRST_ON_RESTART")
if first and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
    import time
    _join = dist_round.join
    def join(*args):
        if rank == 1:
            open(first, "w").close()
        else:
            give_up = time.monotonic() + 120
            while not os.path.exists(first) and time.monotonic() < give_up:
                time.sleep(0.02)  # polling for rank 1's file
        return _join(*args)
    dist_round.join = join
code = train_command(sys.argv[1:])
if os.environ.get("COUNT_OUT"):
    with open(os.environ["COUNT_OUT"] + f".rank{{rank}}.json", "w") as f:
        json.dump({{"calls": calls, "steps": current["trainer"].global_step if "trainer" in current else None}}, f)
sys.exit(code)
"""


def dist_config(save_dir, **trainer):
    from tests.test_distributed import tiny_config

    return tiny_config(save_dir, **{"tensorboard": False, "verbosity": 1, **trainer})


def train_args(tmp, config, run_id):
    """train.py's command line for DRIVER: ``config`` (written to ``<run_id>.json`` in ``tmp``), ``-r auto``."""
    path = tmp / f"{run_id}.json"
    path.write_text(json.dumps(config))
    return ["-c", path, "--run-id", run_id, "-r", "auto"]


def test_kill_tree_reaches_a_worker_in_a_session_of_its_own(tmp_path):
    """What the torchrun fixture does to a launch past its time limit: a launcher's worker (started as torchrun starts
    one, in a new session, holding the launcher's output pipe) dies with it, so collecting the output ends."""
    pidfile = tmp_path / "worker.pid"
    launcher = ("import subprocess, sys, time\n"
                "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)'], start_new_session=True)\n"
                f"open({str(pidfile)!r} + '.tmp', 'w').write(str(worker.pid))\n"
                f"__import__('os').replace({str(pidfile)!r} + '.tmp', {str(pidfile)!r})\n"
                "time.sleep(3600)\n")
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        give_up = time.monotonic() + LAUNCH_TIMEOUT
        while not pidfile.exists() and time.monotonic() < give_up and proc.poll() is None:
            time.sleep(0.05)  # polling for the file
        worker = int(pidfile.read_text())
    finally:
        kill_tree(proc.pid)
    proc.communicate(timeout=LAUNCH_TIMEOUT)  # returns: no process holds the pipes any more
    stat = Path(f"/proc/{worker}/stat")

    def gone():  # or a zombie; a SIGKILL takes effect asynchronously, so a busy machine may show it running a moment
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    give_up = time.monotonic() + LAUNCH_TIMEOUT
    while not gone() and time.monotonic() < give_up:
        time.sleep(0.05)  # polling for the process to end
    assert gone()


gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                          reason="torch.distributed with gloo is not available")


@gloo
def test_processes_agree_at_the_logging_interval_not_every_step(tmp_path, torchrun):
    """2 epochs of 14 steps, logging every 5: the processes exchange their stop reasons after steps 5, 10, 15, 20
    and 25 and at the 2 epoch ends (7 times, where every step would be 28 + 2), plus once before each step checkpoint."""
    config = dist_config(tmp_path / "saved", log_every_n_steps=5)
    out = tmp_path / "count"
    proc = torchrun(tmp_path, DRIVER, *train_args(tmp_path, config, "count"), env={"COUNT_OUT": str(out), "SAVE_LAST_EVERY": "9"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0]["calls"] == ranks[1]["calls"]  # the same points on every rank
    assert ranks[0]["steps"] == 28
    expected = sorted([5, 10, 15, 20, 25] + [14, 28] + [9, 18, 27])  # log interval, epoch ends, step checkpoints
    assert ranks[0]["calls"] == expected


@gloo
def test_a_nonfinite_loss_on_one_process_stops_every_process_without_a_checkpoint(tmp_path, torchrun):
    config = dist_config(tmp_path / "saved", log_every_n_steps=5)
    proc = torchrun(tmp_path, DRIVER, *train_args(tmp_path, config, "nan"), env={"NAN_AT_STEP": "6", "SAVE_LAST_EVERY": "4"})
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-4000:]
    assert "non-finite" in output
    folder = tmp_path / "saved" / "models" / "dist_tiny" / "nan"
    # Stopped at the step-8 checkpoint (the first agreement after step 6), before writing it: step 4's is intact.
    assert load(folder / "last.pth")["global_step"] == 4
    assert not list(folder.glob("checkpoint-epoch*.pth"))


@gloo
@pytest.mark.slow  # ~45 s
def test_torchrun_restarts_a_killed_worker_and_the_run_ends_as_if_uninterrupted(tmp_path, torchrun):
    """kill -9 of rank 1 after step 17 (epoch 2, batch 3 of 14); the newest checkpoint is last.pth of step 16.
    torchrun --max-restarts=1 restarts both workers, ``-r auto`` continues from step 16, and the final weights
    equal those of the same 2-process run left alone (the data order is a function of the seed and epoch, so
    the restarted run sees the same batches).

    torchrun keeps one store for all its rounds, where the processes publish their addresses when they join
    the process group: the restarted round must not find the first round's (utils.dist_round.join). Rank 0
    joins last here, so a rank 1 that looked up the old keys would connect to a process that is gone
    ("connection refused"; or hang: the torchrun fixture kills a launch past its time limit)."""
    config = dist_config(tmp_path / "saved", epochs=3)
    whole = torchrun(tmp_path, DRIVER, *train_args(tmp_path, config, "whole"), env={"SAVE_LAST_EVERY": "4"})
    assert whole.returncode == 0, (whole.stdout + whole.stderr)[-4000:]
    proc = torchrun(tmp_path, DRIVER, *train_args(tmp_path, config, "killed"), torchrun_args=["--max-restarts=1"],
                    env={"KILL_AT_STEP": "17", "RANK1_FIRST_ON_RESTART": str(tmp_path / "rank1-joining"),
                         "SAVE_LAST_EVERY": "4"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    models = tmp_path / "saved" / "models" / "dist_tiny"
    assert sorted(p.name for p in models.iterdir()) == ["killed", "whole"]  # continued in place, no branch
    final, reference = load(models / "killed" / "checkpoint-epoch3.pth"), load(models / "whole" / "checkpoint-epoch3.pth")
    for key, value in reference["model"].items():
        torch.testing.assert_close(final["model"][key], value, atol=1e-7, rtol=0, msg=key)
    manifest = json.loads((models / "killed" / "manifest.json").read_text())
    (entry,) = manifest["resume_history"]
    assert Path(entry["checkpoint"]).name == "last.pth" and entry["torchrun_restart_count"] == 1
    assert load(models / "killed" / "checkpoint-epoch3.pth")["global_step"] == 42


# ---------------------------------------------------------------- a hook's stop, SLURM's warning signal


def test_a_hook_stops_the_run_with_its_own_exit_code_and_a_resumable_checkpoint(config, monkeypatch):
    """A hook asks the run to stop (trainer.ask_to_stop, as parts/max_time.py does): last.pth after that step, the
    hook's exit code, and the checkpoint says why it was written; -r auto then ends as the run left alone."""
    import trainer.trainer as trainer_module
    from base.base_hook import Hook
    from trainer.trainer import hooks_for

    class StopAtStep17(Hook):
        def after_step(self, trainer, epoch, batch_idx):
            if trainer.global_step == 17:
                trainer.ask_to_stop(42, "as the test asked")

    reference = uninterrupted(config)
    monkeypatch.setattr(trainer_module, "hooks_for", lambda *a: [*hooks_for(*a), StopAtStep17()])
    with pytest.raises(RunStopped) as stopped:
        run.train(config, run_id="asked")
    monkeypatch.undo()
    assert stopped.value.exit_code == 42 and "as the test asked" in str(stopped.value)
    folder = models_dir(config, "asked")
    last = load(folder / "last.pth")
    assert last["global_step"] == 17 and last["stopped_by"] == {"exit_code": 42, "why": "as the test asked"}
    run.train(config, resume="auto", run_id="asked")
    assert_states_identical(reference, load(folder / "checkpoint-epoch3.pth"))


def test_a_stop_agreed_on_under_torchrun_is_known_by_its_exit_code():
    """A process that did not see the stop itself learns only its exit code: a signal's is named, a hook's is not."""
    from base.base_trainer import Stop
    from utils.dist_round import stop_of

    assert stop_of(128 + signal.SIGTERM, Stop) == Stop(143, "by SIGTERM")
    assert stop_of(75, Stop) == Stop(75, "as another process asked (exit code 75)")


def test_sigusr1_stops_with_a_resumable_checkpoint_and_exit_138(config):
    """SLURM's warning (--signal=B:USR1@120, passed on by slurm/train.sbatch) stops the run like SIGTERM."""
    import signal

    from torch.optim.optimizer import register_optimizer_step_post_hook

    reference = uninterrupted(config)
    count = [0]

    def hook(opt, args, kwargs):
        count[0] += 1
        if count[0] == 17:
            os.kill(os.getpid(), signal.SIGUSR1)

    handle = register_optimizer_step_post_hook(hook)
    try:
        with pytest.raises(RunStopped) as stopped:
            run.train(config, run_id="warned")
    finally:
        handle.remove()
    assert stopped.value.exit_code == 128 + signal.SIGUSR1
    folder = models_dir(config, "warned")
    assert load(folder / "last.pth")["global_step"] == 17
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the handler is gone after the run
    run.train(config, resume="auto", run_id="warned")
    assert_states_identical(reference, load(folder / "checkpoint-epoch3.pth"))
