"""Runs that outlive the machine (issue 14): ``-r auto``, ``trainer.max_time``, no per-step agreement under
torchrun, torchrun's restarts.

What is compared: a run cut short (by its time budget, by a kill -9 of one worker) and continued with
``-r auto`` ends with the model and optimizer state of the run left alone: bit-identical in one
process (``torch.equal``), and to ``1e-7`` under 2 gloo processes, as the existing mid-epoch resume
tests of tests/test_distributed.py require. No test waits for wall-clock time: the time budget is
spent on a fake clock that advances one second per step, and the kill is the worker's own, at a
given step.
"""

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from base.base_trainer import RunStopped
from conftest import assert_states_identical, make_config, with_changes
from trainer import run
from trainer.cli import train_command
from utils.cluster import EXIT_OUT_OF_TIME, cluster_context, parse_duration, spent_in_this_launch
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


@pytest.fixture
def fake_clock(monkeypatch):
    """``trainer.hooks``' clock, advanced one second by each read: ``max_time`` of N seconds runs out at step N."""
    now = [1000.0]

    def monotonic():
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr("trainer.hooks.time", types.SimpleNamespace(monotonic=monotonic))
    return now


def write_config(tmp_path, config):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


# ---------------------------------------------------------------- trainer.max_time


@pytest.mark.parametrize("value, seconds", [("00:00:00:10", 10), ("01:02:03:04", 93784), ("0:23:59:59", 86399)])
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["00:24:00:00", "00:00:60:00", "10:00", "00:00:00:00", "1d", 5])
def test_max_time_refuses_what_is_not_a_duration_in_one_line(tmp_path, config, value, capsys):
    code = train_command(["-c", write_config(tmp_path, config), f"trainer.max_time={json.dumps(value)}"])
    err = capsys.readouterr().err
    assert code == 2
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.strip()]
    assert "trainer.max_time" in err and "DD:HH:MM:SS" in err
    assert not Path(config["trainer"]["save_dir"]).exists()  # nothing written


def test_max_time_stops_with_a_resumable_checkpoint_and_its_own_exit_code(tmp_path, config, fake_clock, capsys):
    reference = uninterrupted(config)
    path = write_config(tmp_path, with_changes(config, trainer__max_time="00:00:00:15"))
    code = train_command(["-c", path, "--run-id", "timed", "-r", "auto"])
    assert code == EXIT_OUT_OF_TIME, capsys.readouterr().err
    assert code not in (0, 1, 2)
    folder = models_dir(config, "timed")
    last = load(folder / "last.pth")
    assert last["global_step"] == 15 and last["batch_in_epoch"] > 0  # the first step boundary past the budget: mid-epoch
    assert "out of time" in (Path(config["trainer"]["save_dir"]) / "log/tiny/timed/info.log").read_text()

    # The same command again: each run gets a new budget and continues where the last one stopped.
    assert train_command(["-c", path, "--run-id", "timed", "-r", "auto"]) == EXIT_OUT_OF_TIME
    assert load(folder / "last.pth")["global_step"] == 30
    assert train_command(["-c", path, "--run-id", "timed", "-r", "auto"]) == 0  # 9 steps left of 39: done
    assert_states_identical(reference, load(folder / "checkpoint-epoch3.pth"))
    capsys.readouterr()
    assert train_command(["-c", path, "--run-id", "timed", "-r", "auto"]) == 0  # and again: nothing to do
    assert "nothing to resume" in capsys.readouterr().err
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [Path(h["checkpoint"]).name for h in manifest["resume_history"]] == ["last.pth"] * 2
    assert sorted(p.name for p in folder.parent.iterdir()) == ["timed"]  # one run folder throughout


def test_max_time_off_adds_no_step_hook(config):
    from trainer.hooks import MaxTime, hooks_for, step_hooks

    parts = types.SimpleNamespace(frozen=[], model=None, optimizer=None)
    fake_run = types.SimpleNamespace(dist=types.SimpleNamespace(is_main=True), writer=None)
    checked = run.checked_config(config)[0]
    assert step_hooks(hooks_for(checked, parts, fake_run)) == []
    timed = run.checked_config(with_changes(config, trainer__max_time="00:01:00:00"))[0]
    assert [type(h) for h in step_hooks(hooks_for(timed, parts, fake_run))] == [MaxTime]


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
    """Early stopping ends the run at epoch 2 of 6 ("max val_loss" while the loss falls: epoch 1 improves on -inf,
    epoch 2 does not, and early_stop=0 allows no miss). The checkpoint says so: the same command with -r auto, and
    -r on that checkpoint, have nothing to resume (exit 0, nothing written); a raised patience trains on."""
    stopping = with_changes(config, trainer__epochs=6, trainer__early_stop=0, trainer__monitor="max val_loss")
    path = write_config(tmp_path, stopping)
    assert train_command(["-c", path, "--run-id", "es", "-r", "auto"]) == 0
    folder = models_dir(config, "es")
    checkpoint = folder / "checkpoint-epoch2.pth"
    assert load(checkpoint)["stopped_early"] is True and not (folder / "checkpoint-epoch3.pth").exists()
    before = snapshot(folder)
    capsys.readouterr()

    for command in (["-c", path, "--run-id", "es", "-r", "auto"], ["-r", str(checkpoint)],
                    ["-r", str(checkpoint), "trainer.epochs=6"]):
        assert train_command(command) == 0, command
        err = capsys.readouterr().err
        assert "nothing to resume: the run stopped early at epoch 2, step 26" in err, (command, err)
        assert "trainer.early_stop=0 epochs" in err and "raise trainer.early_stop" in err
        assert len(err.strip().splitlines()) == 1
        assert snapshot(folder) == before, command  # nothing written

    # More patience: the run goes on, in place, to its last epoch (val_loss keeps falling: 4 misses, patience 5).
    assert train_command(["-c", path, "--run-id", "es", "-r", "auto", "trainer.early_stop=5"]) == 0
    final = load(folder / "checkpoint-epoch6.pth")
    assert final["stopped_early"] is False and final["epoch"] == 6
    (entry,) = json.loads((folder / "manifest.json").read_text())["resume_history"]
    assert Path(entry["checkpoint"]).name == "checkpoint-epoch2.pth"


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


def test_cluster_context_reads_slurm_and_torchrun():
    env = {"SLURM_JOB_ID": "123", "SLURM_RESTART_COUNT": "2", "TORCHELASTIC_RESTART_COUNT": "1", "HOME": "/"}
    assert cluster_context(env) == {"slurm_job_id": "123", "slurm_restart_count": 2, "torchrun_restart_count": 1}
    assert cluster_context({}) == {}


# ---------------------------------------------------------------- under torchrun (2 CPU processes, gloo)

WORLD = 2
LAUNCH_TIMEOUT = 180

# Runs train.py's command line in each worker, with test instruments chosen by the environment:
# COUNT_OUT: write how often this rank called utils.dist.max_over_ranks, and after how many steps;
# KILL_AT_STEP: on the first attempt, rank 1 kills itself with SIGKILL right after that optimizer step;
# NAN_AT_STEP: rank 1's training loss is NaN at that step;
# FAKE_CLOCK: trainer.hooks' clock advances one second per read (as the fake_clock fixture: max_time of N s is step N);
# SAVE_LAST_EVERY: a resumable last.pth every that many optimizer steps (conftest's save_last_hook);
# RANK1_FIRST_ON_RESTART (a file): in a round torchrun restarted, rank 0 joins the process group only once rank 1
# has begun to (and so looks up rank 0's address in torchrun's store before rank 0 has written this round's).
DRIVER = """
import json, os, signal, sys
sys.path.insert(0, {repo!r})
from utils import dist as udist
from trainer import trainer as tt
from trainer.cli import train_command

rank = int(os.environ["RANK"])
calls, current = [], {{}}
_max = udist.max_over_ranks

def counting(*values):
    calls.append(current["trainer"].global_step if "trainer" in current else -1)
    return _max(*values)

udist.max_over_ranks = counting
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
    _step = tt.Trainer._optimizer_step
    def step(self, *args):
        _step(self, *args)
        if self.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    tt.Trainer._optimizer_step = step
if os.environ.get("FAKE_CLOCK"):
    import types
    from trainer import hooks as th
    clock = [1000.0]
    def monotonic():
        clock[0] += 1.0
        return clock[0]
    th.time = types.SimpleNamespace(monotonic=monotonic)
if os.environ.get("SAVE_LAST_EVERY"):
    from tests.conftest import add_hooks, save_last_hook
    add_hooks(save_last_hook(int(os.environ["SAVE_LAST_EVERY"])))
first = os.environ.get("RANK1_FIRST_ON_RESTART")
if first and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
    import time
    _join = udist._init_group
    def join(*args):
        if rank == 1:
            open(first, "w").close()
        else:
            give_up = time.monotonic() + 120
            while not os.path.exists(first) and time.monotonic() < give_up:
                time.sleep(0.02)  # polling for rank 1's file
        return _join(*args)
    udist._init_group = join
code = train_command(sys.argv[1:])
if os.environ.get("COUNT_OUT"):
    with open(os.environ["COUNT_OUT"] + f".rank{{rank}}.json", "w") as f:
        json.dump({{"calls": calls, "steps": current["trainer"].global_step if "trainer" in current else None}}, f)
sys.exit(code)
"""


def dist_config(save_dir, **trainer):
    from tests.test_distributed import tiny_config

    return tiny_config(save_dir, **{"tensorboard": False, "verbosity": 1, **trainer})


def _env(**extra):
    env = dict(os.environ)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **extra)
    return env


def torchrun(tmp, config, run_id, *torchrun_args, env=None):
    driver = tmp / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO)))
    path = tmp / f"{run_id}.json"
    path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           *torchrun_args, str(driver), "-c", str(path), "--run-id", run_id, "-r", "auto"]
    return run_with_hard_limit(cmd, LAUNCH_TIMEOUT, cwd=tmp, env=_env(**(env or {})))


def _descendants(pid):
    """The ids of every process below ``pid`` (children, grandchildren, ...), from /proc; empty where there is none."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid):
    """SIGKILL ``pid`` and every process below it."""
    import signal

    for victim in [pid, *_descendants(pid)]:  # listed before any dies: an orphan loses its link to the tree
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_with_hard_limit(cmd, limit, **kwargs):
    """``subprocess.run(cmd, capture_output=True, text=True)`` that cannot outlive ``limit`` seconds.

    subprocess.run's own timeout kills torchrun only; its workers (each in a session of its own)
    keep the output pipes open, and collecting the output would then wait for them forever. Here
    torchrun and every process below it are killed, and the test fails with the output so far.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            out, err = "", "(no output: a process still held the pipes)"
        pytest.fail(f"{' '.join(cmd[:6])} ... ran past {limit} s and was killed with its workers; its output:\n"
                    f"{(out + err)[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_kill_tree_reaches_a_worker_in_a_session_of_its_own(tmp_path):
    """What run_with_hard_limit does past its limit: a launcher's worker (started as torchrun starts one, in a new
    session, holding the launcher's output pipe) dies with it, so collecting the output ends."""
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
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"  # gone, or a zombie


gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                          reason="torch.distributed with gloo is not available")


@gloo
def test_processes_agree_at_the_logging_interval_not_every_step(tmp_path):
    """2 epochs of 14 steps, logging every 5: the processes exchange their stop reasons after steps 5, 10, 15, 20
    and 25 and at the 2 epoch ends (7 times, where every step would be 28 + 2), plus once before each step checkpoint."""
    config = dist_config(tmp_path / "saved", log_every_n_steps=5)
    out = tmp_path / "count"
    proc = torchrun(tmp_path, config, "count", env={"COUNT_OUT": str(out), "SAVE_LAST_EVERY": "9"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0]["calls"] == ranks[1]["calls"]  # the same points on every rank
    assert ranks[0]["steps"] == 28
    expected = sorted([5, 10, 15, 20, 25] + [14, 28] + [9, 18, 27])  # log interval, epoch ends, step checkpoints
    assert ranks[0]["calls"] == expected


@gloo
def test_a_nonfinite_loss_on_one_process_stops_every_process_without_a_checkpoint(tmp_path):
    config = dist_config(tmp_path / "saved", log_every_n_steps=5)
    proc = torchrun(tmp_path, config, "nan", env={"NAN_AT_STEP": "6", "SAVE_LAST_EVERY": "4"})
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-4000:]
    assert "non-finite" in output
    folder = tmp_path / "saved" / "models" / "dist_tiny" / "nan"
    # Stopped at the step-8 checkpoint (the first agreement after step 6), before writing it: step 4's is intact.
    assert load(folder / "last.pth")["global_step"] == 4
    assert not list(folder.glob("checkpoint-epoch*.pth"))


@gloo
@pytest.mark.slow  # ~45 s
def test_torchrun_restarts_a_killed_worker_and_the_run_ends_as_if_uninterrupted(tmp_path):
    """kill -9 of rank 1 after step 17 (epoch 2, batch 3 of 14); the newest checkpoint is last.pth of step 16.
    torchrun --max-restarts=1 restarts both workers, ``-r auto`` continues from step 16, and the final weights
    equal those of the same 2-process run left alone (the data order is a function of the seed and epoch, so
    the restarted run sees the same batches).

    torchrun keeps one store for all its rounds, where the processes publish their addresses when they join
    the process group: the restarted round must not find the first round's (utils.dist._init_group). Rank 0
    joins last here, so a rank 1 that looked up the old keys would connect to a process that is gone
    ("connection refused"; or hang: the launches are killed past LAUNCH_TIMEOUT)."""
    config = dist_config(tmp_path / "saved", epochs=3)
    whole = torchrun(tmp_path, config, "whole", env={"SAVE_LAST_EVERY": "4"})
    assert whole.returncode == 0, (whole.stdout + whole.stderr)[-4000:]
    proc = torchrun(tmp_path, config, "killed", "--max-restarts=1", env={
        "KILL_AT_STEP": "17", "RANK1_FIRST_ON_RESTART": str(tmp_path / "rank1-joining"), "SAVE_LAST_EVERY": "4"})
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


@gloo
@pytest.mark.slow  # ~35 s: four rounds of torchrun workers
def test_torchrun_does_not_train_on_after_max_time_ran_out(tmp_path):
    """Out of time under torchrun: the workers stop at step 15 with last.pth and exit 75, which torchrun takes for
    a failure and restarts. The restarted rounds must not train on with a fresh budget: each stops at once (75),
    without writing anything, until torchrun gives up; the launch ends. The same command again (a new launch,
    as a requeued job is) continues from step 15 with a new budget."""
    config = dist_config(tmp_path / "saved", max_time="00:00:00:15", epochs=3)  # 42 steps in all
    proc = torchrun(tmp_path, config, "timed", "--max-restarts=2", env={"FAKE_CLOCK": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-4000:]
    folder = tmp_path / "saved" / "models" / "dist_tiny" / "timed"
    assert load(folder / "last.pth")["global_step"] == 15
    assert load(folder / "last.pth")["out_of_time"]["round"] == 0
    assert output.count("out of time: trainer.max_time ran out earlier in this torchrun launch (round 0)") == 2 * WORLD
    assert "Resumed from" not in output  # the restarted rounds trained nothing
    assert json.loads((folder / "manifest.json").read_text())["resume_history"] == []  # and wrote nothing

    again = torchrun(tmp_path, config, "timed", "--max-restarts=0", env={"FAKE_CLOCK": "1"})
    assert "Resumed from epoch 1, batch 1, step 15" in again.stdout + again.stderr, (again.stdout + again.stderr)[-4000:]
    assert load(folder / "last.pth")["global_step"] == 30


def test_spent_in_this_launch_needs_the_same_launch_and_a_later_round():
    state = {"out_of_time": {"torchrun_run_id": "job7", "round": 0}}
    assert spent_in_this_launch(state, {"TORCHELASTIC_RUN_ID": "job7", "TORCHELASTIC_RESTART_COUNT": "1"})
    assert not spent_in_this_launch(state, {"TORCHELASTIC_RUN_ID": "job7", "TORCHELASTIC_RESTART_COUNT": "0"})  # requeued
    assert not spent_in_this_launch(state, {"TORCHELASTIC_RUN_ID": "other", "TORCHELASTIC_RESTART_COUNT": "1"})
    assert not spent_in_this_launch(state, {})  # plain python train.py
    assert not spent_in_this_launch({"out_of_time": None}, {"TORCHELASTIC_RUN_ID": "job7", "TORCHELASTIC_RESTART_COUNT": "1"})


# ---------------------------------------------------------------- SLURM's warning signal and the batch script


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


def test_the_batch_script_requeues_and_resumes_automatically():
    script = REPO / "slurm" / "train.sbatch"
    text = script.read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@120"):
        assert line in text.splitlines()
    assert '--run-id "$SLURM_JOB_ID" -r auto' in text and '--rdzv_id="$SLURM_JOB_ID"' in text
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
