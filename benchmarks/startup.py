"""Time to the first training step, and the default config's time to its final accuracy.

    python benchmarks/startup.py            # the full run (1 to 3 minutes on 2 CPU cores)
    python benchmarks/startup.py --smoke    # one run of each, a one-epoch training: checks it runs

Everything runs in fresh subprocesses, as a user's command does, from the repository root:

* interpreter start-up: ``python -c pass``; ``python -c "import torch"``; ``python -c "import train"``;
* time to first step of ``python train.py -c config.json trainer.save_dir=<temp>``: a
  small driver (``-c`` code, nothing added to the project) calls ``trainer.cli.train_command`` with
  those arguments after wrapping ``Trainer.train_epoch`` (set-up is done when it is first
  entered) and ``Trainer.optimizer_step`` (the first step is done when it first
  returns; the process then exits at once). The phases reported: interpreter start,
  ``import train``, importing torch and the trainer, ``main()``'s set-up (config check,
  data, model, run folder, manifest, TensorBoard, logging) and the first step. Wall
  clock (``time.time``) from just before the subprocess is spawned;
* time to accuracy: ``python train.py -c config.json trainer.save_dir=<temp>`` to its end
  (all 15 epochs, validation and checkpoints included), then ``python test.py -r
  <temp>/.../model_best.pth``; wall seconds of each and the test accuracy. Run as a user
  would (torch's default thread count), and again with ``OMP_NUM_THREADS=1``: on a small
  machine that other work shares, the default intra-op threads can make this tiny CNN
  many times slower.

Repeats take the median; the OS file cache is warm after the first run.
Results: a table on stdout and ``benchmarks/results/startup.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as C

ROOT = C.ROOT
PYTHON = sys.executable

# Run as `python -c DRIVER ROOT STAMPS_JSON train.py-arguments...`.
FIRST_STEP_DRIVER = r"""
import json, os, sys, time
stamps = {"start": time.time()}
root, out_path, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, root)
os.chdir(root)
from trainer.cli import train_command
stamps["import_train"] = time.time()
from trainer.trainer import Trainer
stamps["import_trainer"] = time.time()
_epoch, _step = Trainer.train_epoch, Trainer.optimizer_step

def train_epoch(self, *args, **kwargs):
    stamps.setdefault("setup_done", time.time())
    return _epoch(self, *args, **kwargs)

def optimizer_step(self, *args, **kwargs):
    result = _step(self, *args, **kwargs)
    stamps["first_step"] = time.time()
    with open(out_path, "w") as f:
        json.dump(stamps, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

Trainer.train_epoch, Trainer.optimizer_step = train_epoch, optimizer_step
sys.exit(train_command(argv))
"""

PHASES = [
    ("interpreter start", "spawn", "start"),
    ("import train", "start", "import_train"),
    ("import torch, trainer", "import_train", "import_trainer"),
    ("main() set-up", "import_trainer", "setup_done"),
    ("first step", "setup_done", "first_step"),
    ("total to first step", "spawn", "first_step"),
]


def run(cmd, env=None, timeout=600):
    """Wall seconds of a subprocess in the repository root; raises with its output if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return elapsed, proc


def interpreter_startup(repeats):
    out = {}
    for label, code in (("python -c pass", "pass"), ("python -c 'import torch'", "import torch"),
                        ("python -c 'import train'", "import train")):
        times = [run([PYTHON, "-c", code])[0] for _ in range(repeats)]
        out[label] = {"median_s": statistics.median(times), "samples_s": times}
    return out


def first_step(repeats, tmp, config="config.json", extra=()):
    runs = []
    for i in range(repeats):
        stamps_path = Path(tmp) / f"first_step_{i}.json"
        save_dir = Path(tmp) / f"first_step_{i}"
        cmd = [PYTHON, "-c", FIRST_STEP_DRIVER, str(ROOT), str(stamps_path), "-c", config, "--run-id", "first_step",
               f"trainer.save_dir={save_dir}", *extra]
        spawn = time.time()
        run(cmd)
        stamps = {"spawn": spawn, **json.loads(stamps_path.read_text())}
        runs.append({label: stamps[b] - stamps[a] for label, a, b in PHASES})
    return {label: {"median_s": statistics.median(r[label] for r in runs), "samples_s": [r[label] for r in runs]}
            for label, _, _ in PHASES}


def time_to_accuracy(tmp, label, env_extra=None, overrides=()):
    env = {**os.environ, **(env_extra or {})}
    save_dir = Path(tmp) / f"accuracy_{label}"
    train_s, _ = run([PYTHON, "train.py", "-c", "config.json", "--run-id", "bench", f"trainer.save_dir={save_dir}",
                         *overrides], env=env)
    config = json.loads((ROOT / "config.json").read_text())
    best = save_dir / "models" / config["name"] / "bench" / "model_best.pth"
    test_s, _ = run([PYTHON, "test.py", "-r", str(best)], env=env)
    metrics = json.loads(best.with_suffix(".test.json").read_text())
    epochs = json.loads((best.parent / "result.json").read_text())["epochs"]  # (the console's format may change)
    return {"train_s": train_s, "test_s": test_s, "total_s": train_s + test_s, "epochs": epochs,
            "test_accuracy": metrics["accuracy"], "test_loss": metrics["loss"], "test_samples": metrics["n_samples"],
            "env": env_extra or {}, "overrides": list(overrides)}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Time to first step and time to accuracy of the default config.")
    parser.add_argument("--smoke", action="store_true", help="one run of each; a one-epoch training")
    parser.add_argument("--out", help="folder for startup.json (default benchmarks/results/)")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the time-to-accuracy runs")
    parser.add_argument("--repeats", type=int, help="runs of each start-up measurement (default 3; 1 with --smoke)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.smoke else 3)
    out = sys.stdout

    def log(message):
        print(message, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        log("interpreter start-up")
        startup = interpreter_startup(repeats) if not args.smoke else {}
        if args.smoke:  # the import of torch is in the first-step phases anyway
            times = [run([PYTHON, "-c", "pass"])[0]]
            startup["python -c pass"] = {"median_s": times[0], "samples_s": times}
        log("time to first step of train.py -c config.json")
        first = first_step(repeats, tmp)
        accuracy = {}
        overrides = ("trainer.epochs=1",) if args.smoke else ()
        variants = [("default threads", None)] if args.smoke else [("default threads", None),
                                                                    ("OMP_NUM_THREADS=1", {"OMP_NUM_THREADS": "1"})]
        for label, env in variants if not args.no_accuracy else ():
            log(f"time to accuracy: train.py -c config.json, then test.py ({label})")
            accuracy[label] = time_to_accuracy(tmp, label.split()[0].replace("=", ""), env, overrides)

    data = {
        "benchmark": "startup",
        "smoke": args.smoke,
        "environment": C.environment(),
        "repeats": repeats,
        "interpreter": startup,
        "first_step": first,
        "time_to_accuracy": accuracy,
    }
    path = C.write_results("startup", data, args.out)

    rows = [[label, f"{r['median_s']:.3f}"] for label, r in startup.items()]
    rows += [[f"train.py -c config.json: {label}", f"{r['median_s']:.3f}"] for label, r in first.items()]
    print(C.table(["start-up (fresh process)", f"seconds (median of {repeats})"], rows), file=out)
    print(file=out)
    rows = [[label, r["epochs"], f"{r['train_s']:.1f}", f"{r['test_s']:.1f}", f"{r['total_s']:.1f}",
             f"{r['test_accuracy']:.4f}", r["test_samples"]] for label, r in accuracy.items()]
    if rows:
        print(C.table(["config.json, train.py then test.py", "epochs", "train s", "test s", "total s",
                       "test accuracy", "test samples"], rows), file=out)
    print(f"results: {path}", file=out)
    return data


if __name__ == "__main__":
    main()
