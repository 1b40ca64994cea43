"""The SLURM part (slurm/train.sbatch): the script's requeue and resume lines, and the script against a real
one-node SLURM cluster (issue 14): warned, requeued, resumed, finished.

The cluster test needs root and a cluster started by tests/parts/slurm/start_slurm.sh (``make test-slurm`` does
both, installing Debian's slurm-wlm and munge where they are missing); ``make test`` skips it, saying why. It takes
about a minute per case.

Each case submits two jobs of the same tiny CPU config (3 epochs): one left alone, and one that SLURM warns
(``scancel --signal=USR1 --batch``, what ``--signal=B:USR1@120`` sends before the time limit) after step 20.
The warned job must write ``last.pth`` at step 20, requeue itself, start again as the same job (``Restarts=1``),
continue with ``-r auto`` in the same run folder and TensorBoard run, and end with the model and optimizer
state of the job left alone: bit-identical (``torch.equal``), since the data order is a function of the seed
and the epoch. The warned job waits at step 20 until the signal has reached it (tests/parts/slurm/train_held.py),
so where it stops does not depend on the machine's speed.

SLURM holds a requeued job until the credential of its first start has expired on the node (two minutes by
default); the test cluster's slurm.conf sets that lifetime to 10 s (``AuthInfo=cred_expire=10``). Lifting the
hold by hand (``scontrol update StartTime=now``) was tried: the job then started while its old credential was
still revoked on the node, and SLURM failed it ("Job credential revoked").
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_states_identical

REPO = Path(__file__).resolve().parents[2]
HOLD_AT_STEP = 20
EPOCHS = 3
JOB_TIMEOUT_S = 600  # for each wait on the cluster: generous, the machine is shared


def _not_ready():
    """Why the SLURM test cannot run here (a line), or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (slurmd starts the jobs); run `make test-slurm` as root"
    missing = [c for c in ("sbatch", "scontrol", "scancel") if shutil.which(c) is None]
    if missing:
        return f"SLURM is not installed ({missing[0]} not found); `make test-slurm` installs and starts a one-node cluster"
    conf = os.environ.get("SLURM_CONF")
    if not conf or not Path(conf).is_file():
        return "no test cluster (SLURM_CONF is not set to its slurm.conf); `make test-slurm` starts one"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return f"the SLURM cluster of {conf} does not answer (scontrol ping timed out); `make test-slurm` starts one"
    if ping.returncode or "UP" not in ping.stdout:
        return f"the SLURM cluster of {conf} is not up (scontrol ping); `make test-slurm` starts it"
    return None


_REASON = _not_ready()
needs_the_cluster = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def load(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what, timeout=JOB_TIMEOUT_S):
    """Poll ``condition`` until it returns something true; fail naming ``what`` after ``timeout`` seconds."""
    give_up = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > give_up:
            pytest.fail(f"waited {timeout} s for {what}")
        time.sleep(0.5)  # a polling interval, not a wait for something to happen


def job(job_id):
    """``scontrol show job``'s fields of one job, as a dict (``JobState``, ``Restarts``, ``ExitCode``, ...)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def finished(job_id):
    fields = job(job_id)
    return fields if fields["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                            "OUT_OF_MEMORY") else None


def submit(tmp, config_path, nproc, label, **env):
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", f"--job-name={label}",
           f"--chdir={REPO}", f"--output={tmp}/{label}-%j.out", str(REPO / "slurm" / "train.sbatch"),
           str(config_path)]
    environ = {k: v for k, v in os.environ.items()
               if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    environ.update(NPROC_PER_NODE=str(nproc), PYTHON=sys.executable, RDZV_PORT=str(free_port()),
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MAX_RESTARTS="0", **env)
    out = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def test_the_batch_script_requeues_and_resumes_automatically():
    script = REPO / "slurm" / "train.sbatch"
    text = script.read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@120"):
        assert line in text.splitlines()
    assert '--run-id "$SLURM_JOB_ID" -r auto' in text and '--rdzv_id="$SLURM_JOB_ID"' in text
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


@pytest.mark.slurm
@needs_the_cluster
@pytest.mark.parametrize("nproc", [2, 1], ids=["2-processes", "1-process"])
def test_a_warned_job_requeues_itself_resumes_and_ends_as_if_left_alone(tmp_path, nproc):
    from tests.test_distributed import NAME, tiny_config

    save_dir = tmp_path / "saved"
    config = tiny_config(save_dir, epochs=EPOCHS, log_every_n_steps=5)  # (SIGUSR1 at step 20 writes last.pth)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))

    alone = submit(tmp_path, config_path, nproc, "alone")
    reached = tmp_path / "held"
    warned = submit(tmp_path, config_path, nproc, "warned", TRAIN_SCRIPT=str(REPO / "tests/parts/slurm/train_held.py"),
                    HOLD_AT_STEP=str(HOLD_AT_STEP), HOLD_REACHED=str(reached))

    wait_for(reached.exists, f"job {warned} to reach step {HOLD_AT_STEP}")
    subprocess.run(["scancel", "--signal=USR1", "--batch", warned], check=True, timeout=60)
    wait_for(lambda: job(warned)["Restarts"] == "1", f"job {warned} to be requeued")
    end_warned = wait_for(lambda: finished(warned), f"job {warned} to finish")
    end_alone = wait_for(lambda: finished(alone), f"job {alone} to finish")

    out_warned = (tmp_path / f"warned-{warned}.out").read_text()
    out_alone = (tmp_path / f"alone-{alone}.out").read_text()
    print(f"--- job {warned} (warned), {end_warned['JobState']}, Restarts={end_warned['Restarts']}:\n"
          + "\n".join(line for line in out_warned.splitlines()
                      if re.match(r"(job |USR1|SIGUSR1|Stopped|training exited|requeueing|Resumed|Continuing|Finished)",
                                  line)))
    assert (end_warned["JobState"], end_warned["ExitCode"], end_warned["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        out_warned[-6000:]
    assert (end_alone["JobState"], end_alone["ExitCode"], end_alone["Restarts"]) == ("COMPLETED", "0:0", "0"), \
        out_alone[-6000:]
    assert "requeueing" not in out_alone

    # The first start: warned at step 20, stopped there with last.pth, requeued by the batch script.
    assert f"job {warned} on " in out_warned and "restart 0," in out_warned and "restart 1," in out_warned
    assert re.search(rf"Stopped by SIGUSR1 after step {HOLD_AT_STEP}; a resume continues at epoch \d+, batch \d+ of",
                     out_warned), out_warned[-6000:]
    assert out_warned.count(f"requeueing job {warned}") == 1
    # The second start: -r auto from that last.pth, in the same run folder; its manifest records the requeue.
    per_epoch = 14 * 2 // nproc  # 224 samples in batches of 8 per process
    assert (f"Resumed after step {HOLD_AT_STEP}: continuing at epoch {HOLD_AT_STEP // per_epoch + 1},"
            f" batch {HOLD_AT_STEP % per_epoch + 1} of {per_epoch}") in out_warned
    models = save_dir / "models" / NAME
    assert sorted(p.name for p in models.iterdir()) == sorted([alone, warned])  # no branch folder
    manifest = json.loads((models / warned / "manifest.json").read_text())
    (entry,) = manifest["resume_history"]
    assert Path(entry["checkpoint"]).name == "last.pth"
    assert (entry["slurm_job_id"], entry["slurm_restart_count"]) == (warned, 1)

    # One TensorBoard run: the same folder, every logged step once.
    from tensorboard.backend.event_processing import event_accumulator

    logs = save_dir / "log" / NAME
    assert sorted(p.name for p in logs.iterdir()) == sorted([alone, warned])
    acc = event_accumulator.EventAccumulator(str(logs / warned), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    total = EPOCHS * per_epoch
    assert steps == list(range(5, total + 1, 5))

    # The same final state as the job left alone, bit for bit.
    final, reference = (load(models / run / f"checkpoint-epoch{EPOCHS}.pth") for run in (warned, alone))
    assert final["global_step"] == total
    assert_states_identical(reference, final)
