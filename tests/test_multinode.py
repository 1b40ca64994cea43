"""torchrun restarts on two nodes (issue 25): two torchrun agents on this machine, one process each, stand for two
machines (``--nnodes=2 --rdzv-backend=c10d``, a localhost endpoint).

A worker is killed with SIGKILL (the first node is the one of rank 0): on the second node after step 17 (epoch 2
of 3, batch 3 of 14; the newest checkpoint is last.pth of step 16), on the first node at the same step, or on the
second node before it joins the process group. torchrun restarts the workers of both nodes but counts the restart
only on the node whose worker failed, so the nodes' ``TORCHELASTIC_RESTART_COUNT`` differ in the next round: the
round must join at once all the same (utils/dist_round.py), resume the newest checkpoint, and end bit-identical to
the two-node run left alone.

The workers' process-group timeout is cut to ``PG_TIMEOUT`` seconds (torch's default is 30 minutes), and the resumed
round must take its first step within ``RESUMED_WITHIN`` seconds of the kill, below that timeout: a round whose
processes do not find each other (keys named by the per-node restart count, as before issue 25) fails the test in
``RESUMED_WITHIN`` seconds instead of hanging the suite.
"""

import json
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_states_identical, kill_tree

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

PG_TIMEOUT = 90  # s: the workers' process-group (and store) timeout
RESUMED_WITHIN = 60  # s from the kill to the resumed round's first step
LAUNCH_TIMEOUT = 300  # s for a whole two-node launch
KILL_AT_STEP = 17

# Runs train.py's command line with test instruments chosen by the environment:
# PG_TIMEOUT: the process group's timeout, and its store's (torch's default is 30 minutes);
# SAVE_LAST_EVERY: a resumable last.pth every that many optimizer steps (conftest's save_last_hook);
# KILLED (a file), VICTIM_RANK, KILL_AT_STEP: once in the launch (while KILLED does not exist), rank VICTIM_RANK
# writes the time to KILLED and kills itself with SIGKILL: right after that optimizer step, or at 0 before it joins
# the process group; a process started after that writes the time and the step of its first optimizer step to
# KILLED.resumed.rank<RANK> (and the time the process started).
DRIVER = """
import time
started = time.time()
import datetime, json, os, signal, sys
sys.path.insert(0, {repo!r})
import torch.distributed as td
from tests.conftest import add_hooks, save_last_hook
from trainer import trainer as tt
from trainer.cli import train_command

short = datetime.timedelta(seconds=float(os.environ["PG_TIMEOUT"]))
_rendezvous, _init = td.rendezvous, td.init_process_group
td.rendezvous = lambda url, *args, **kwargs: _rendezvous(url, *args, **{{"timeout": short, **kwargs}})
td.init_process_group = lambda *args, **kwargs: _init(*args, **{{"timeout": short, **kwargs}})

rank, killed = int(os.environ["RANK"]), os.environ["KILLED"]
victim, kill_at = int(os.environ.get("VICTIM_RANK", -1)), int(os.environ.get("KILL_AT_STEP", -1))
resumed = os.path.exists(killed)

def write(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)

def kill():
    write(killed, repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)

if rank == victim and kill_at == 0 and not resumed:
    kill()
_step, first = tt.Trainer.optimizer_step, []

def step(self, *args):
    _step(self, *args)
    if resumed and not first:  # (global_step counts the step once the optimizer's step is done)
        first.append(self.global_step + 1)
        record = {{"time": time.time(), "started": started, "step": first[0]}}
        write(f"{{killed}}.resumed.rank{{rank}}", json.dumps(record))
    if rank == victim and self.global_step + 1 == kill_at and not os.path.exists(killed):
        kill()

tt.Trainer.optimizer_step = step
add_hooks(save_last_hook(int(os.environ["SAVE_LAST_EVERY"])))
sys.exit(train_command(sys.argv[1:]))
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, seconds, launch):
    """Poll ``condition`` until it holds (True) or ``seconds`` have passed or both agents have exited (False)."""
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        if condition():
            return True
        if all(agent.poll() is not None for agent in launch):
            return condition()
        time.sleep(0.05)  # polling for files the workers write
    return False


def logs(tmp, label):
    return "\n".join(f"--- node {n}:\n" + (tmp / f"{label}.node{n}.log").read_text()[-5000:] for n in range(2))


def two_nodes(tmp, label, torchrun, **env):
    """Start the two torchrun agents of launch ``label`` (one worker each, ``--max-restarts=2``) in ``tmp``; the
    launch's run id is ``label``. Returns the two ``Popen``s; their output goes to ``<label>.node<n>.log``."""
    from tests.test_cluster import dist_config, train_args

    config = dist_config(tmp / "saved", epochs=3)
    script = tmp / "driver.py"
    script.write_text(DRIVER.format(repo=str(REPO)))
    port, launch = free_port(), []
    environ = torchrun.environment({"PG_TIMEOUT": str(PG_TIMEOUT), "SAVE_LAST_EVERY": "4",
                                    "KILLED": str(tmp / f"{label}.killed"), **env})
    for node in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={label}",
                   f"--rdzv-conf=is_host={int(node == 0)}", "--max-restarts=2", str(script),
                   *map(str, train_args(tmp, config, label))]
        with open(tmp / f"{label}.node{node}.log", "w") as log:
            launch.append(subprocess.Popen(command, cwd=tmp, env=environ, stdout=log, stderr=subprocess.STDOUT))
    return launch


def finish(tmp, label, launch, kill_time=None):
    """Wait for both agents of ``launch`` to exit 0 (failing the test with their logs otherwise)."""
    try:
        if not wait_for(lambda: all(agent.poll() is not None for agent in launch), LAUNCH_TIMEOUT, launch):
            pytest.fail(f"the two-node launch {label} ran past {LAUNCH_TIMEOUT} s:\n{logs(tmp, label)}")
    finally:
        for agent in launch:
            if agent.poll() is None:
                kill_tree(agent.pid)
            agent.wait()
    codes = [agent.returncode for agent in launch]
    assert codes == [0, 0], f"the agents of {label} exited with {codes}:\n{logs(tmp, label)}"


def final_state(tmp, label):
    return torch.load(tmp / "saved/models/dist_tiny" / label / "checkpoint-epoch3.pth", weights_only=True)


@pytest.fixture(scope="module")
def left_alone(tmp_path_factory, torchrun):
    """The final checkpoint of the same two-node run, not interrupted."""
    tmp = tmp_path_factory.mktemp("two-nodes")
    finish(tmp, "whole", two_nodes(tmp, "whole", torchrun))
    return final_state(tmp, "whole")


@pytest.mark.slow  # ~45 s a case on two busy cores (two two-node launches for the first)
@pytest.mark.parametrize("victim, kill_at, resumes_at", [
    pytest.param(1, KILL_AT_STEP, KILL_AT_STEP, id="second-node-mid-epoch"),
    pytest.param(0, KILL_AT_STEP, KILL_AT_STEP, id="first-node-mid-epoch"),
    pytest.param(1, 0, 1, id="second-node-before-joining"),
])
def test_a_round_restarted_after_a_failure_on_one_node_joins_at_once(tmp_path, torchrun, left_alone, victim, kill_at,
                                                                     resumes_at):
    label = f"killed{victim}at{kill_at}"
    launch = two_nodes(tmp_path, label, torchrun, VICTIM_RANK=str(victim), KILL_AT_STEP=str(kill_at))
    killed = tmp_path / f"{label}.killed"
    resumed = [Path(f"{killed}.resumed.rank{rank}") for rank in range(2)]
    try:
        assert wait_for(killed.exists, LAUNCH_TIMEOUT, launch), f"no worker was killed:\n{logs(tmp_path, label)}"
        if not wait_for(lambda: all(path.exists() for path in resumed), RESUMED_WITHIN, launch):
            pytest.fail(f"the round after the kill took no step within {RESUMED_WITHIN} s (the process-group"
                        f" timeout is {PG_TIMEOUT} s):\n{logs(tmp_path, label)}")
    finally:
        if not all(path.exists() for path in resumed):
            for agent in launch:
                kill_tree(agent.pid)
    finish(tmp_path, label, launch)
    firsts = [json.loads(path.read_text()) for path in resumed]
    took = max(first["time"] for first in firsts) - float(killed.read_text())
    starting = max(first["time"] - first["started"] for first in firsts)
    print(f"\n{label}: {took:.1f} s from the kill to the resumed round's first step ({starting:.1f} s of it from the"
          " start of the restarted processes)")
    # The newest checkpoint at the kill was last.pth of step 16 (or none before the first step): resumed from it.
    assert [first["step"] for first in firsts] == [resumes_at] * 2
    folder = tmp_path / "saved/models/dist_tiny" / label
    history = json.loads((folder / "manifest.json").read_text()).get("resume_history", [])
    assert [Path(entry["checkpoint"]).name for entry in history] == (["last.pth"] if kill_at else [])
    assert_states_identical(final_state(tmp_path, label), left_alone)


def test_a_number_an_earlier_round_left_in_the_store_is_not_taken():
    """utils/dist_round.py in one process, ranks as threads: rank 1 of a new round reads the number rank 0 of the
    round before posted (and died without confirming anyone), posts its ticket under it, and still joins this
    round's number once rank 0 posts it, late; a second group of the same processes gets a number of its own."""
    from utils.dist_round import fresh_prefix

    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=60))
    other = torch.distributed.TCPStore("127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=60))
    store.set("utils.dist/round", str(store.add("utils.dist/rounds", 1)))  # the earlier round's rank 0, gone
    got = {}
    for group in range(2):  # (each rank a client of its own: one client's waiting get holds its connection)
        rank1 = threading.Thread(target=lambda: got.update({1: fresh_prefix(other, 1, 2)}))
        rank1.start()
        give_up = time.monotonic() + 60
        while not store.check([f"utils.dist/round{group + 1}/rank1"]) and time.monotonic() < give_up:
            time.sleep(0.01)  # polling for rank 1's ticket under the stale number
        got[0] = fresh_prefix(store, 0, 2)
        rank1.join(60)
        assert got == {0: f"utils.dist/round{group + 2}/", 1: f"utils.dist/round{group + 2}/"}
