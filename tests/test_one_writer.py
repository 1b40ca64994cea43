"""Never lose a run (issue 24): one writer per run folder, and ``-r auto`` starts nothing on top of damage.

A run holds an OS lock (``flock``) on its checkpoint folder while it writes there (utils/io.py: lock_folder). A
second process that would write there is refused with one ``error:`` line naming the folder and the holder's PID,
exit 2, before it writes anything; the OS drops the lock when the holder dies, even by SIGKILL. No test sleeps a
fixed time: each waits for a line, a file or an exit, with a generous timeout.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_config, with_changes
from trainer import run
from trainer.cli import train_command
from utils.errors import UserError
from utils.io import lock_folder

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # s: a start of train.py takes 5-30 s on two busy cores

# Takes the lock the way a run does, says so, and holds it until its stdin closes (or it is killed).
HOLDER = """
import sys
sys.path.insert(0, sys.argv[1])
from utils.io import lock_folder
lock = lock_folder(sys.argv[2])
print("locked", flush=True)
sys.stdin.read()
"""

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fcntl locks: POSIX only")


def write_config(tmp_path, config, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


def snapshot(folder):
    """Every file under ``folder`` with its size and modification time: what a refused process must not change."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).rglob("*")}


def refusal(err, folder, pid):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: run folder {folder} is in use by another process (PID {pid})"), err


def test_a_second_writer_is_refused_before_it_writes_and_the_lock_dies_with_its_holder(tmp_path, capsys):
    save_dir = tmp_path / "saved"
    config = make_config(save_dir, epochs=1, save_period=1)
    path = write_config(tmp_path, config)
    assert train_command(["-c", path, "--run-id", "x"]) == 0  # (and lets go of the lock when it ends)
    folder = save_dir / "models" / "tiny" / "x"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ROOT), str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert (folder / ".lock").read_text().strip() == str(holder.pid)
        before = snapshot(save_dir)
        capsys.readouterr()

        # -r auto of the same run id, as its own process: refused before it writes anything.
        second = subprocess.run([sys.executable, "train.py", "-c", path, "--run-id", "x", "-r", "auto",
                                 "trainer.epochs=2"], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
        assert second.returncode == 2, second.stderr
        refusal(second.stderr, folder, holder.pid)
        # -r CHECKPOINT, which would continue in place (no later checkpoint there), and in this process: the same.
        assert train_command(["-r", str(folder / "checkpoint-epoch1.pth"), "trainer.epochs=2"]) == 2
        refusal(capsys.readouterr().err, folder, holder.pid)
        with pytest.raises(UserError, match=f"PID {holder.pid}"):
            lock_folder(folder)
        assert snapshot(save_dir) == before  # no log file, no config.json, no event file, no checkpoint

        holder.kill()  # SIGKILL: no clean-up of its own; the OS lets go of the lock
        holder.wait(timeout=TIMEOUT)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert train_command(["-r", str(folder / "checkpoint-epoch1.pth"), "trainer.epochs=2"]) == 0  # the next goes on
    assert (folder / "checkpoint-epoch2.pth").is_file()
    assert (folder / ".lock").read_text().strip() == str(os.getpid())


def test_two_auto_runs_of_one_id_started_together_give_one_run_and_one_error(tmp_path):
    save_dir = tmp_path / "saved"
    config = make_config(save_dir, epochs=100_000, save_period=100_000, monitor="off")  # runs until killed
    paths = [write_config(tmp_path, with_changes(config, optimizer__args__lr=lr), f"lr{lr}.json") for lr in (0.1, 0.2)]
    procs = [subprocess.Popen([sys.executable, "train.py", "-c", path, "--run-id", "both", "-r", "auto"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for path in paths]
    folder = save_dir / "models" / "tiny" / "both"
    try:
        deadline = time.time() + TIMEOUT
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.1)
        ended = [i for i, p in enumerate(procs) if p.poll() is not None]
        assert len(ended) == 1, "neither refused the other in time" if not ended else "both ended"
        loser, winner = procs[ended[0]], procs[1 - ended[0]]
        _, err = loser.communicate()
        assert loser.returncode == 2, err
        refusal(err, folder, winner.pid)
        while not (folder / "config.json").is_file() and winner.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        saved = json.loads((folder / "config.json").read_text())
        assert saved["optimizer"]["args"]["lr"] == (0.1, 0.2)[1 - ended[0]]  # the winner's run, not a mix
        assert winner.poll() is None  # still training, alone
        os.killpg(winner.pid, signal.SIGKILL)
        winner.communicate(timeout=TIMEOUT)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    # The lock died with the killed run: -r auto of the same id goes on (it saved no checkpoint: it starts again).
    run.train(with_changes(config, trainer__epochs=1), resume="auto", run_id="both")
    assert (folder / "checkpoint-epoch1.pth").is_file()


def test_auto_over_only_damaged_checkpoints_starts_nothing_and_keeps_the_manifest(tmp_path, capsys):
    save_dir = tmp_path / "saved"
    config = make_config(save_dir, epochs=1, save_period=1)
    path = write_config(tmp_path, config)
    assert train_command(["-c", path, "--run-id", "d", "-r", "auto"]) == 0
    folder = save_dir / "models" / "tiny" / "d"
    damaged = sorted(p.name for p in folder.glob("*.pth"))
    assert damaged == ["checkpoint-epoch1.pth", "model_best.pth"]
    for name in damaged:
        (folder / name).write_bytes(b"damaged")
    manifest = (folder / "manifest.json").read_bytes()
    before = snapshot(save_dir)
    capsys.readouterr()

    assert train_command(["-c", path, "--run-id", "d", "-r", "auto", "trainer.epochs=2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: -r auto: every checkpoint of run {folder} is damaged"
                                                   " (checkpoint-epoch1.pth, model_best.pth)"), lines
    assert "--overwrite" in lines[0] and "--run-id" in lines[0], lines
    assert snapshot(save_dir) == before and (folder / "manifest.json").read_bytes() == manifest

    # Starting over is a deliberate choice.
    assert train_command(["-c", path, "--run-id", "d", "-r", "auto", "--overwrite"]) == 0
    assert (folder / "checkpoint-epoch1.pth").read_bytes() != b"damaged"


LOCK_TRY = """
import sys
sys.path.insert(0, sys.argv[1])
from utils.errors import UserError
from utils.io import lock_folder
try:
    lock_folder(sys.argv[2])
    print("locked")
except UserError as err:
    print(err)
"""


def test_under_torchrun_the_main_process_alone_makes_and_locks_the_run_folder(tmp_path, monkeypatch):
    """Rank 0 chooses, makes and locks the folders; every other rank is handed them (trainer/torchrun.py:
    agree_on_run, whose broadcast is stood in for here) and makes, locks and writes nothing itself."""
    import trainer.torchrun
    from trainer import build
    from utils.config import validate_config
    from utils.dist import DistInfo

    config = validate_config(make_config(tmp_path / "saved", epochs=1), build.registries())
    folder = tmp_path / "saved" / "models" / "tiny" / "x"
    handed = ("x", folder, tmp_path / "saved" / "log" / "tiny" / "x", None)  # what rank 0 would broadcast
    chose = []
    monkeypatch.setattr(trainer.torchrun, "agree_on_run",
                        lambda choose, info: chose.append(info.rank) or (choose() if info.is_main else handed))
    with run.open_run(config, run_id="x", info=DistInfo(rank=1, world_size=2)) as other:
        assert other.checkpoint_dir == folder
    assert chose == [1] and not (tmp_path / "saved").exists()  # rank 1: no folder made, no lock taken
    with run.open_run(config, run_id="x", info=DistInfo(rank=0, world_size=2)) as main:
        assert main.checkpoint_dir == folder  # (reading .lock here would drop the lock: closing any descriptor of a
        # file drops the POSIX locks a process holds on it; the other process reads it)
        other = subprocess.run([sys.executable, "-c", LOCK_TRY, str(ROOT), str(folder)], capture_output=True,
                               text=True, timeout=TIMEOUT)
        assert f"in use by another process (PID {os.getpid()})" in other.stdout, other.stdout + other.stderr
