"""Training under torchrun: 2 CPU processes (gloo) against 1 process.

What is checked: per-process batch B/2 on 2 processes reaches the weights of batch B on
1 process (also with gradient accumulation, and with a frozen layer unfrozen mid-run);
validation is sharded and reduced by sample count (no padded sample counted twice); only
rank 0 writes (one run folder, one event file); every rank agrees on the run id and gets
the same reduced metrics; checkpoint keys carry no ``module.`` prefix; a 2-process resume
(at an epoch's end and mid-epoch) continues exactly; a resume under another world size
warns and works; SIGTERM leaves one resumable ``last.pth`` and no process behind.

Each torchrun launch costs a few seconds of imports, so one launch (a driver script
calling ``trainer.run.train`` several times) serves most tests, through module-scoped fixtures.
"""

import contextlib
import copy
import importlib.util
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NAME = "dist_tiny"
N_TRAIN, N_VALID = 224, 33  # 224 = 14 global batches of 16: no padding; 33 = 17 + 16 per rank, 3 and 2 batches of 8
WORLD = 2
PER_PROCESS_BATCH = 8
# The "part" run also logs to metrics.csv (only rank 0 may write it), where the csv logger part is in the project.
HAS_CSV = importlib.util.find_spec("parts.csv_logger") is not None
CSV = ["tensorboard", "csv"] if HAS_CSV else ["tensorboard"]
UNFREEZE = {"freeze": ["net.1.*"], "unfreeze_at_epoch": 2}  # the hidden layer trains from epoch 2 on

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

# Rank r of launch writes <out>.rank<r>.json per job. Several main() calls in one torchrun launch
# rely on utils.dist.setup joining a fresh process group after the previous main()'s cleanup.
# A job's "save_last_every": a resumable last.pth every that many optimizer steps (conftest's save_last_hook).
DRIVER = """
import gc, json, os, sys
sys.path.insert(0, {repo!r})
import torch
from tests.conftest import add_hooks, save_last_hook
from trainer import run as train, torchrun

seen = []
if hasattr(torchrun, "agree_on_run"):  # record the run id each rank ends up with
    _agree = torchrun.agree_on_run

    def _spy(*args, **kwargs):
        run = _agree(*args, **kwargs)
        seen.append(run[0])
        return run

    torchrun.agree_on_run = _spy

rank = int(os.environ["RANK"])
for job in json.load(open(sys.argv[1])):
    del seen[:]
    undo = add_hooks(save_last_hook(job["save_last_every"])) if job.get("save_last_every") else lambda: None
    metrics = train.train(job["config"], resume=job.get("resume"), run_id=job.get("run_id"))
    undo()
    # DDP models still alive once train() has returned (without a gc run): they hold the process group
    ddp = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
    with open(f"{{job['out']}}.rank{{rank}}.json", "w") as f:
        json.dump({{"metrics": metrics, "run_ids": list(seen), "ddp_alive": ddp}}, f)
"""


def tiny_config(save_dir, batch_size=PER_PROCESS_BATCH, epochs=2, **trainer):
    """A run of a fraction of a second: an MLP on 224 + 33 synthetic samples, 4x4 inputs, 3 classes."""
    return {
        "name": NAME,
        "seed": 7,
        "device": "cpu",
        "arch": {"type": "MLP", "args": {"input_size": 16, "hidden_sizes": [8], "num_classes": 3}},
        "data_loader": {
            "type": "SyntheticDataLoader",
            "args": {"num_samples": N_TRAIN + N_VALID, "input_shape": [1, 4, 4], "num_classes": 3, "noise": 3.0,
                     "test_fraction": 0.0, "batch_size": batch_size, "shuffle": True, "validation_split": N_VALID},
        },
        "optimizer": {"type": "SGD", "args": {"lr": 0.1, "momentum": 0.9}},
        "loss": "logsumexp_cross_entropy",
        "metrics": ["accuracy"],
        "trainer": {"epochs": epochs, "save_dir": str(save_dir), "save_period": 1, "verbosity": 1,
                    "tensorboard": True, "monitor": "min val_loss", "log_every_n_steps": 5, **trainer},
    }


def results(out):
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(WORLD)]


def run_folders(save_dir):
    models = sorted(p for p in (Path(save_dir) / "models" / NAME).iterdir())
    logs = sorted(p for p in (Path(save_dir) / "log" / NAME).iterdir())
    return models, logs


def model_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=f"{key} differs")


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory, torchrun):
    """Launch 1: an uninterrupted 2-epoch run (run id chosen by rank 0, a mid-epoch ``last.pth`` at
    step 20 of 28), a 1-epoch run, a run with gradient accumulation, a run unfreezing a layer at
    epoch 2. Launch 2: the 1-epoch run resumed to epoch 2, and the mid-epoch ``last.pth`` resumed."""
    import shutil

    tmp = tmp_path_factory.mktemp("dist")
    full, part, mid = tmp / "full", tmp / "part", tmp / "mid"
    output = torchrun.jobs(tmp, DRIVER, [
        {"config": tiny_config(full), "save_last_every": 20, "out": str(tmp / "full")},
        {"config": tiny_config(part, epochs=1, loggers=CSV), "run_id": "part", "out": str(tmp / "part")},
        {"config": tiny_config(tmp / "accum", batch_size=PER_PROCESS_BATCH // 2, accumulate_grad_batches=2,
                               tensorboard=False, verbosity=0), "run_id": "accum", "out": str(tmp / "accum")},
        {"config": tiny_config(tmp / "unfreeze", tensorboard=False, verbosity=0, **UNFREEZE),
         "run_id": "unfreeze", "out": str(tmp / "unfreeze")},
    ], "first", check=True).output
    (full_run,), _ = run_folders(full)
    resume_from = part / "models" / NAME / "part" / "checkpoint-epoch1.pth"
    assert resume_from.is_file() and (full_run / "last.pth").is_file(), output[-4000:]
    (mid / "models" / NAME / "mid").mkdir(parents=True)
    shutil.copy(full_run / "last.pth", mid / "models" / NAME / "mid" / "last.pth")
    resume_output = torchrun.jobs(tmp, DRIVER, [
        {"config": tiny_config(part, epochs=2, loggers=CSV), "resume": str(resume_from), "out": str(tmp / "resumed")},
        {"config": tiny_config(mid), "resume": str(mid / "models" / NAME / "mid" / "last.pth"),
         "out": str(tmp / "mid")},
    ], "resume", check=True).output
    return {"tmp": tmp, "full": full, "part": part, "mid": mid, "output": output, "resume_output": resume_output}


@pytest.fixture(scope="module")
def single_proc(tmp_path_factory):
    """The same 2 epochs in this process, with the global batch (2 x 8) as the one process's batch."""
    from trainer.run import train as main

    save_dir = tmp_path_factory.mktemp("single")
    config = tiny_config(save_dir, batch_size=WORLD * PER_PROCESS_BATCH, verbosity=0, tensorboard=False)
    metrics = main(copy.deepcopy(config), run_id="single")
    unfreeze = tiny_config(save_dir, batch_size=WORLD * PER_PROCESS_BATCH, verbosity=0, tensorboard=False, **UNFREEZE)
    main(unfreeze, run_id="unfreeze")
    return {"metrics": metrics, "checkpoint_dir": save_dir / "models" / NAME / "single",
            "unfreeze_dir": save_dir / "models" / NAME / "unfreeze"}


def _full_run_dir(two_proc):
    (models,), _ = run_folders(two_proc["full"])
    return models


# ---------------------------------------------------------------- equivalence with one process


def test_two_processes_reach_the_weights_of_one_process_with_the_global_batch(two_proc, single_proc):
    run_dir = _full_run_dir(two_proc)
    for epoch in (1, 2):
        assert_same_weights(model_state(run_dir / f"checkpoint-epoch{epoch}.pth"),
                            model_state(single_proc["checkpoint_dir"] / f"checkpoint-epoch{epoch}.pth"))


def test_gradient_accumulation_skips_the_all_reduce_without_changing_the_step(two_proc, single_proc):
    """2 processes x 2 accumulated batches of 4 = the one process's batch of 16 (DDP ``no_sync``)."""
    run_dir = two_proc["tmp"] / "accum" / "models" / NAME / "accum"
    for epoch in (1, 2):
        assert_same_weights(model_state(run_dir / f"checkpoint-epoch{epoch}.pth"),
                            model_state(single_proc["checkpoint_dir"] / f"checkpoint-epoch{epoch}.pth"))


def test_unfreezing_under_ddp_keeps_the_processes_in_step(two_proc, single_proc):
    run_dir = two_proc["tmp"] / "unfreeze" / "models" / NAME / "unfreeze"
    for epoch in (1, 2):
        assert_same_weights(model_state(run_dir / f"checkpoint-epoch{epoch}.pth"),
                            model_state(single_proc["unfreeze_dir"] / f"checkpoint-epoch{epoch}.pth"))


def test_training_metrics_are_reduced_over_processes(two_proc, single_proc):
    dist_metrics = results(two_proc["tmp"] / "full")[0]["metrics"]
    ref = single_proc["metrics"]
    assert dist_metrics["epoch"] == ref["epoch"] == 2
    assert dist_metrics["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert dist_metrics["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-9)


def test_validation_is_sharded_and_reduced_by_sample_count(two_proc):
    """33 validation samples: 17 on rank 0, 16 on rank 1; the reduced numbers are those of all 33, once each."""
    from trainer import build
    from trainer.trainer import evaluate

    metrics = results(two_proc["tmp"] / "full")[0]["metrics"]
    state = torch.load(_full_run_dir(two_proc) / "checkpoint-epoch2.pth", map_location="cpu", weights_only=True)
    config = state["config"]
    model = build.build_model(config)
    model.load_state_dict(state["model"])
    model.eval()
    valid = build.build_data_loader(config).split_validation()
    assert len(valid.sampler) == N_VALID

    inputs, targets = valid.dataset.tensors()
    idx = valid.sampler.indices
    with torch.no_grad():
        logits = model(inputs[idx]).double()
    correct = int((logits.argmax(1) == targets[idx]).sum())
    loss = torch.nn.functional.cross_entropy(logits, targets[idx]).item()
    assert round(metrics["val_accuracy"] * N_VALID, 6) == correct
    assert metrics["val_accuracy"] == pytest.approx(correct / N_VALID, abs=1e-7)
    assert metrics["val_loss"] == pytest.approx(loss, rel=1e-6)

    ref = evaluate(model, valid, build.build_loss(config), build.build_metrics(config), torch.device("cpu"))
    assert metrics["val_loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert metrics["val_accuracy"] == pytest.approx(ref["accuracy"], abs=1e-7)


def test_every_rank_gets_the_same_metrics_and_run_id(two_proc):
    for label in ("full", "part", "resumed", "mid", "accum", "unfreeze"):
        ranks = results(two_proc["tmp"] / label)
        assert ranks[1]["metrics"] == ranks[0]["metrics"], label
        assert ranks[1]["run_ids"] == ranks[0]["run_ids"], label
    run_dir = _full_run_dir(two_proc)
    assert results(two_proc["tmp"] / "full")[1]["run_ids"] in ([run_dir.name], [])  # [] if the spy found nothing


def test_a_run_lets_go_of_its_process_group_before_it_returns(two_proc):
    """Nothing of a finished run keeps the process group alive (DDP's reducer holds it, in reference cycles):
    left to the interpreter's exit, gloo's threads can abort the process after a run that succeeded."""
    for label in ("full", "part", "resumed", "mid", "accum", "unfreeze"):
        assert [r["ddp_alive"] for r in results(two_proc["tmp"] / label)] == [0, 0], label


def test_start_of_run_summary_gives_world_size_and_global_batch(two_proc):
    output = two_proc["output"]
    assert "world size 2" in output
    assert f"Batch size {PER_PROCESS_BATCH} per process, {WORLD * PER_PROCESS_BATCH} per optimizer step" in output


def test_start_of_run_summary_counts_each_validation_sample_once(two_proc):
    assert f"{N_VALID} validation samples" in two_proc["output"]


# ---------------------------------------------------------------- only rank 0 writes


def test_one_run_folder_and_one_event_file(two_proc):
    models, logs = run_folders(two_proc["full"])
    assert len(models) == 1 and len(logs) == 1
    assert models[0].name == logs[0].name
    assert sorted(p.name for p in (two_proc["full"]).iterdir()) == ["log", "models"]
    events = list(logs[0].glob("events.out.tfevents*"))
    assert len(events) == 1, events
    assert (logs[0] / "info.log").is_file()
    files = {p.name for p in models[0].iterdir()}
    assert {"checkpoint-epoch1.pth", "checkpoint-epoch2.pth", "last.pth", "model_best.pth", "config.json",
            "manifest.json"} <= files
    assert not [name for name in files if name.startswith(".") and name != ".lock"], files  # no temporary file left
    assert torch.load(models[0] / "model_best.pth", map_location="cpu", weights_only=True)["run_id"] == models[0].name


@pytest.mark.skipif(not HAS_CSV, reason="the csv logger part is not in this project")
def test_only_rank_0_writes_the_csv_log_across_a_resume(two_proc):
    """The "part" run (1 epoch, then resumed to 2) logs to metrics.csv too: one file, written by rank 0 alone.

    Two writers would duplicate rows (or interleave them); the resumed segment appends to the same file.
    """
    import csv

    _, (log_dir,) = run_folders(two_proc["part"])
    assert sorted(p.name for p in log_dir.glob("*.csv")) == ["metrics.csv"]
    with open(log_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keys = [(row["step"], row["tag"]) for row in rows]
    assert len(keys) == len(set(keys)), "a (step, tag) pair was logged twice"
    steps_per_epoch = N_TRAIN // (WORLD * PER_PROCESS_BATCH)
    epoch_rows = {(int(row["epoch"]), row["tag"]): float(row["value"]) for row in rows if row["tag"].startswith("epoch/")}
    assert {epoch for epoch, _ in epoch_rows} == {1, 2}
    for (epoch, tag), value in epoch_rows.items():
        assert int(next(r["step"] for r in rows if r["tag"] == tag and int(r["epoch"]) == epoch)) == epoch * steps_per_epoch
    final = results(two_proc["tmp"] / "resumed")[0]["metrics"]
    val_loss = next(v for (epoch, tag), v in epoch_rows.items() if epoch == 2 and tag.endswith("val_loss"))
    assert val_loss == pytest.approx(final["val_loss"], rel=1e-6)


def test_checkpoint_keys_have_no_module_prefix(two_proc, single_proc):
    for path in _full_run_dir(two_proc).glob("*.pth"):
        keys = list(model_state(path))
        assert keys and not [k for k in keys if k.startswith("module.")], (path.name, keys)
        assert keys == list(model_state(single_proc["checkpoint_dir"] / "checkpoint-epoch1.pth"))


# ---------------------------------------------------------------- resume


def test_resumed_two_process_run_matches_the_uninterrupted_one(two_proc):
    models, logs = run_folders(two_proc["part"])
    assert [p.name for p in models] == ["part"] and [p.name for p in logs] == ["part"]  # continued in its folder
    resumed = model_state(models[0] / "checkpoint-epoch2.pth")
    assert_same_weights(resumed, model_state(_full_run_dir(two_proc) / "checkpoint-epoch2.pth"), atol=1e-7)
    full_metrics = results(two_proc["tmp"] / "full")[0]["metrics"]
    resumed_metrics = results(two_proc["tmp"] / "resumed")[0]["metrics"]
    assert resumed_metrics == pytest.approx(full_metrics, rel=1e-7)
    state = torch.load(models[0] / "checkpoint-epoch2.pth", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and state["run_id"] == "part"


def test_mid_epoch_resume_reaches_the_same_weights(two_proc):
    """``last.pth`` of step 20 (epoch 2, batch 6 of 14) resumed by 2 processes: the weights of the run left alone."""
    assert torch.load(two_proc["mid"] / "models" / NAME / "mid" / "last.pth", weights_only=True)["batch_in_epoch"] == 6
    assert_same_weights(model_state(two_proc["mid"] / "models" / NAME / "mid" / "checkpoint-epoch2.pth"),
                        model_state(_full_run_dir(two_proc) / "checkpoint-epoch2.pth"), atol=1e-7)


def test_mid_epoch_resume_reports_the_same_training_metrics(two_proc):
    full_metrics = results(two_proc["tmp"] / "full")[0]["metrics"]
    assert results(two_proc["tmp"] / "mid")[0]["metrics"] == pytest.approx(full_metrics, rel=1e-7)


def test_resume_under_another_world_size_warns_and_continues(two_proc, tmp_path):
    """A 2-process checkpoint resumed by 1 process: it loads (no prefixes to strip) and trains on."""
    import shutil

    from trainer.run import train as main

    run_dir = tmp_path / "models" / NAME / "moved"
    run_dir.mkdir(parents=True)
    checkpoint = run_dir / "checkpoint-epoch1.pth"
    shutil.copy(_full_run_dir(two_proc) / "checkpoint-epoch1.pth", checkpoint)
    config = tiny_config(tmp_path, epochs=2, verbosity=0, tensorboard=False)
    metrics = main(config, resume=str(checkpoint))
    assert metrics["epoch"] == 2
    assert torch.load(run_dir / "checkpoint-epoch2.pth", map_location="cpu", weights_only=True)["epoch"] == 2
    log = (tmp_path / "log" / NAME / "moved" / "info.log").read_text()
    warnings = [line for line in log.splitlines() if " WARNING " in line and "process" in line.lower()]
    assert warnings, "no warning that the world size (and so the data order) changed:\n" + log


# ---------------------------------------------------------------- interruption


def _children(pid):
    """(pid, RANK) of the processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                env = dict(v.split("=", 1) for v in (entry / "environ").read_text().split("\0") if "=" in v)
                found.append((int(entry.name), env.get("RANK")))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc")
def test_sigterm_writes_one_resumable_checkpoint_and_every_rank_exits(tmp_path, torchrun):
    """SIGTERM reaches rank 1 first (the race a job-wide SIGTERM can lose), then the whole job (torchrun forwards it
    to the workers), as a scheduler's kill does."""
    config = tiny_config(tmp_path, epochs=10_000, verbosity=1, tensorboard=False, monitor="off", save_period=10_000)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    run_dir = tmp_path / "models" / NAME / "term"
    log = tmp_path / "log" / NAME / "term" / "info.log"
    with torchrun.start(tmp_path, REPO / "train.py", "-c", config_path, "--run-id", "term", stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, start_new_session=True) as proc:
        deadline = time.monotonic() + torchrun.timeout
        # Training is under way once rank 0 has logged an epoch's results.
        while not (log.is_file() and "val_loss" in log.read_text()):
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        workers = _children(proc.pid)
        assert sorted(rank for _, rank in workers) == ["0", "1"], workers
        os.kill(next(pid for pid, rank in workers if rank == "1"), signal.SIGTERM)
        time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    time.sleep(0.1)
    for pid, _ in workers:  # both workers are gone (torchrun itself has been waited for)
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", pid
    assert proc.returncode != 0, output[-4000:]
    assert (run_dir / "last.pth").is_file(), output[-4000:]
    state = torch.load(run_dir / "last.pth", map_location="cpu", weights_only=True)
    assert state["epoch"] >= 1 and not any(k.startswith("module.") for k in state["model"])
    assert "Resume with" in log.read_text(), output[-4000:]
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".") and p.name != ".lock"]  # no torn temp file
