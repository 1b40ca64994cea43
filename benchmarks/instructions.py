"""Instructions per training step, the Trainer against the bare loop, counted by valgrind's callgrind.

Wall-clock ratios on a shared machine move by more than the few percent they are meant
to resolve (see overhead.py's A/A control). Instruction counts do not: the same program
on the same input executes the same instructions, whatever else the machine is doing.
For a single-threaded CPU workload they are a close proxy for time (memory stalls aside).

Each side (``bare`` or ``trainer``) runs in its own process under callgrind, twice, with
two epoch lengths; the slope between them is the instructions of one step, set-up and
imports cancelling out. Both sides do the same set-up (the Trainer is built in both).
The Trainer runs with its defaults (metrics, TensorBoard every 50 steps) and, since
stderr is not a terminal under callgrind here, with its progress bar off.

    python benchmarks/instructions.py --workloads lenet    # about 10 minutes on 2 cores
    python benchmarks/instructions.py --smoke               # both sides in-process, no valgrind: checks the code

Under callgrind the program runs some 50 times slower: importing torch alone takes
minutes, so this is a benchmark to run by hand, not in the test suite (its smoke mode is).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(side, workload, steps):
    """Run ``steps`` training steps of one side (the process callgrind counts)."""
    import torch

    from benchmarks import _common as C
    from benchmarks import overhead

    torch.set_num_threads(1)
    spec = overhead.CPU_WORKLOADS[workload]
    samples = spec["batch_size"] * steps
    with tempfile.TemporaryDirectory() as tmp:
        config = C.base_config(
            f"instr_{workload}", spec["arch"], overhead.data_args(spec["input_shape"], samples, spec["batch_size"]),
            {"type": "Adam", "args": {"lr": 1e-3}}, Path(tmp), device="cpu", epochs=1, save_period=10**6,
        )
        built = C.build_trainer(config)
        try:
            bare = overhead.make_bare(built, lambda params: torch.optim.Adam(params, lr=1e-3))
            if side == "trainer":
                built.trainer.train_epoch(1)
            else:
                bare.run(steps)
        finally:
            built.close()


def count(side, workload, steps, out_dir):
    """Total instructions callgrind counts for one child run."""
    out = Path(out_dir) / f"callgrind.{side}.{workload}.{steps}"
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
           sys.executable, __file__, "--child", side, workload, str(steps)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    found = re.findall(r"Collected : (\d+)", run.stderr)
    if run.returncode != 0 or not found:
        raise RuntimeError(f"callgrind run failed ({' '.join(cmd)}):\n{run.stderr[-2000:]}")
    return int(found[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "WORKLOAD", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--workloads", default="lenet,mlp")
    parser.add_argument("--steps", default="50,150", help="the two epoch lengths (default 50,150)")
    parser.add_argument("--smoke", action="store_true", help="both sides, 2 steps of the MLP, in-process, no valgrind")
    parser.add_argument("--out", help="folder for instructions.json (default benchmarks/results/)")
    args = parser.parse_args(argv)
    if args.child:
        side, workload, steps = args.child
        child(side, workload, int(steps))
        return 0
    from benchmarks import _common as C

    if args.smoke:
        for side in ("bare", "trainer"):
            child(side, "mlp", 2)
        C.write_results("instructions", {"benchmark": "instructions", "smoke": True, "sides_ran": ["bare", "trainer"]},
                        args.out)
        print("smoke: both sides ran (no instruction counts without valgrind)")
        return 0
    from concurrent.futures import ThreadPoolExecutor

    workloads = args.workloads.split(",")
    short, long = map(int, args.steps.split(","))
    results, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for workload in workloads:
            jobs = {(side, n): pool.submit(count, side, workload, n, tmp) for side in ("bare", "trainer")
                    for n in (short, long)}
            per_step = {}
            for side in ("bare", "trainer"):
                counts = {n: jobs[side, n].result() for n in (short, long)}
                per_step[side] = (counts[long] - counts[short]) / (long - short)
                print(f"{workload} {side}: {counts[short]:,} instructions at {short} steps, {counts[long]:,} at {long}",
                      flush=True)
            ratio = per_step["trainer"] / per_step["bare"]
            results[workload] = {"instructions_per_step": per_step, "ratio": ratio, "steps": [short, long]}
            rows.append([workload, f"{per_step['bare']:,.0f}", f"{per_step['trainer']:,.0f}", f"{ratio:.4f}x"])
    print(C.table(["workload", "bare loop instr/step", "Trainer instr/step", "ratio"], rows))
    C.write_results("instructions", {"benchmark": "instructions", "smoke": args.smoke,
                                     "environment": C.environment(), "workloads": results}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
