"""Experiments: a grid or seeded random search over config keys, repeated over seeds and folds, resumable.

A sweep is a folder, ``<save_dir>/sweeps/<name>/``, holding its state (``sweep.json``),
every trial's run (``models/<config name>/trial-NNN``, ``log/...``) and the summary
(``summary.csv``, ``summary.md``). Each trial is an ordinary ``train.py`` run in a
subprocess, so a crash, an out-of-memory error or a diverged loss fails that trial only
(recorded with its reason) and the sweep goes on. Running the same command again resumes
the sweep: finished and failed trials are kept, an interrupted trial continues from its
newest checkpoint (``train.py -r auto``).

The trials are a pure function of the command: the grid's product, or ``--trials`` draws
from a generator seeded with ``--sweep-seed``; each repeated for every ``--seeds`` value and
every fold of ``--folds``.
"""

import csv
import hashlib
import io
import itertools
import json
import math
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from utils.config import apply_overrides, check_path_component, load_config, parse_value, validate_config
from utils.errors import UserError
from utils.io import write_json

ROOT = Path(__file__).resolve().parent.parent
STATE = "sweep.json"


# --------------------------------------------------------------------------- the trials


def parse_grid(items):
    """``["optimizer.args.lr=0.1,0.01", ...]`` -> ``{"optimizer.args.lr": [0.1, 0.01], ...}``."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise UserError(f"--grid {item!r}: expected key.path=V1,V2,... (for example optimizer.args.lr=0.1,0.01)")
        grid[key] = [parse_value(v) for v in _split_values(values)]
    return grid


def _split_values(text):
    # Commas inside brackets belong to a value: hidden_sizes=[16,16],[32] is two values.
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{" and 1 or (-1 if ch in "]}" else 0)
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    return values + [current]


DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")


def parse_random(items):
    """``["optimizer.args.lr=loguniform:1e-4:1e-1", "arch.args.width=choice:16,32"]`` -> ``{key: (kind, args)}``."""
    space = {}
    for item in items:
        key, sep, spec = item.partition("=")
        kind, _, rest = spec.partition(":")
        if not sep or kind not in DISTRIBUTIONS or not rest:
            raise UserError(f"--random {item!r}: expected key.path=DIST:ARGS with DIST one of {', '.join(DISTRIBUTIONS)}"
                            " (uniform:LOW:HIGH, loguniform:LOW:HIGH, int:LOW:HIGH, choice:A,B,C)")
        if kind == "choice":
            space[key] = (kind, [parse_value(v) for v in _split_values(rest)])
            continue
        try:
            low, high = (float(v) for v in rest.split(":"))
        except ValueError:
            raise UserError(f"--random {item!r}: {kind} takes LOW:HIGH numbers") from None
        if not low < high or (kind == "loguniform" and low <= 0):
            raise UserError(f"--random {item!r}: need LOW < HIGH{' and LOW > 0' if kind == 'loguniform' else ''}")
        space[key] = (kind, (low, high))
    return space


def _draw(rng, kind, args):
    if kind == "choice":
        return rng.choice(args)
    low, high = args
    if kind == "uniform":
        return rng.uniform(low, high)
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.randint(int(low), int(high))


def configurations(grid=None, space=None, trials=None, sweep_seed=0):
    """The list of configurations (each a dict of key -> value) a sweep tries, in order."""
    if space:
        rng = random.Random(sweep_seed)
        return [{key: _draw(rng, *space[key]) for key in sorted(space)} for _ in range(trials)]
    if grid:
        keys = list(grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    return [{}]


def expand(configs, seeds=None, folds=None):
    """Every trial: a configuration with its seed and fold, as ``{"config": ..., "seed": ..., "fold": ...}``."""
    trials = []
    for number, config in enumerate(configs):
        for seed in seeds or [None]:
            for fold in range(folds) if folds else [None]:
                trials.append({"configuration": number, "params": config, "seed": seed, "fold": fold})
    return trials


def trial_overrides(trial, folds):
    overrides = [f"{k}={json.dumps(v)}" for k, v in trial["params"].items()]
    if trial["seed"] is not None:
        overrides.append(f"seed={trial['seed']}")
    if trial["fold"] is not None:
        overrides.append(f"data_loader.args.fold=[{trial['fold']},{folds}]")
    return overrides


# --------------------------------------------------------------------------- running


class Sweep:
    """A sweep's folder and state; :meth:`run` runs what is left of it."""

    def __init__(self, config_path, overrides, grid=None, space=None, trials=None, sweep_seed=0, seeds=None,
                 folds=None, name=None, nproc=None, save_dir=None):
        self.config_path, self.overrides = str(config_path), list(overrides)
        base = apply_overrides(load_config(config_path), self.overrides)
        from trainer.build import registries

        self.base = validate_config(base, registries())  # a typo fails the sweep before any trial
        self.folds, self.nproc = folds, nproc
        spec = {"config": self.config_path, "overrides": self.overrides, "grid": grid, "random": space,
                "trials": trials, "sweep_seed": sweep_seed, "seeds": seeds, "folds": folds}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:8]
        name = name or f"{self.base['name']}-{digest}"
        if problem := check_path_component(name, "--name"):
            raise UserError(problem)
        self.folder = Path(save_dir or self.base["trainer"]["save_dir"]) / "sweeps" / name
        trials_list = expand(configurations(grid, space, trials, sweep_seed), seeds, folds)
        for i, trial in enumerate(trials_list):
            trial.update(id=f"trial-{i:03d}", status="pending", overrides=trial_overrides(trial, folds))
        self.state = {"spec": spec, "trials": trials_list}
        previous = self.folder / STATE
        if previous.is_file():
            saved = json.loads(previous.read_text())
            if saved.get("spec") != spec:
                raise UserError(f"{self.folder} holds a sweep of another command; give --name to start a new one")
            self.state = saved

    def save(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / STATE, self.state)

    def run_dir(self, trial):
        return self.folder / "models" / self.base["name"] / trial["id"]

    def run(self, out=None):
        """Run every trial not yet done or failed; returns the summary rows. Ctrl-C stops after saving the state."""
        from tqdm import tqdm

        out = out or sys.stdout
        self.save()
        todo = [t for t in self.state["trials"] if t["status"] not in ("done", "failed")]
        bar = tqdm(total=len(self.state["trials"]), initial=len(self.state["trials"]) - len(todo), desc="sweep",
                   file=out, disable=None)
        try:
            for trial in todo:
                self._run_trial(trial, out)
                bar.update()
        finally:
            bar.close()
            self.save()
        return self.summarize()

    def _command(self, trial):
        # -r auto: a trial started before (the sweep was interrupted) continues from its newest checkpoint,
        # a new one starts; a finished one says so and exits 0.
        launcher = [sys.executable]
        if self.nproc:
            launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={self.nproc}"]
        return launcher + [str(ROOT / "train.py"), "-c", self.config_path, *self.overrides, *trial["overrides"],
                           f"trainer.save_dir={self.folder}", "--run-id", trial["id"], "-r", "auto"]

    def _run_trial(self, trial, out):
        trial["status"] = "running"
        self.save()
        started = time.perf_counter()
        proc = subprocess.run(self._command(trial), cwd=ROOT, capture_output=True, text=True)
        trial["seconds"] = round(time.perf_counter() - started + trial.get("seconds", 0), 3)
        if proc.returncode in (130, 143, -signal.SIGINT, -signal.SIGTERM):  # the sweep itself is being stopped
            trial["status"] = "interrupted"
            self.save()
            raise KeyboardInterrupt
        result = self.run_dir(trial) / "result.json"
        if proc.returncode == 0 and result.is_file():
            trial["status"], trial["result"] = "done", json.loads(result.read_text())
            value = trial["result"].get("best")
            if value is None:
                value = trial["result"]["final"].get("val_loss", trial["result"]["final"].get("loss"))
            shown = f"{trial['result']['monitor'] or 'loss'} {value:.6g}"
        else:
            lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
            trial["status"], trial["reason"] = "failed", (lines[-1] if lines else f"exit code {proc.returncode}")[:500]
            shown = f"FAILED ({trial['reason']})"
        self.save()
        from tqdm import tqdm

        tqdm.write(f"{trial['id']}  {' '.join(trial['overrides']) or '(base config)'}  {shown}  {trial['seconds']:.1f} s",
                   file=out)

    # ------------------------------------------------------------------ the summary

    def summarize(self):
        """Group finished trials by configuration: n, mean and std of the best monitored value and every final
        and test metric; best configuration first. Writes ``summary.csv`` and ``summary.md``."""
        mode = "max" if str(self.base["trainer"]["monitor"]).startswith("max") else "min"
        groups = {}
        for trial in self.state["trials"]:
            if trial["status"] == "done":
                groups.setdefault(trial["configuration"], []).append(trial)
        rows = []
        for number, trials in groups.items():
            values = {}
            for trial in trials:
                result = trial["result"]
                flat = {"best": result.get("best")}
                flat.update({k: v for k, v in result["final"].items() if k != "epoch"})
                flat.update({f"test_{k}": v for k, v in (result.get("test") or {}).items() if k != "n_samples"})
                for key, value in flat.items():
                    if isinstance(value, (int, float)) and value is not None:
                        values.setdefault(key, []).append(float(value))
            row = {"configuration": number, "params": trials[0]["params"], "n": len(trials)}
            for key, series in values.items():
                row[key] = (statistics.fmean(series), statistics.stdev(series) if len(series) > 1 else 0.0)
            rows.append(row)
        key = "best" if any("best" in r for r in rows) else "val_loss"
        rows.sort(key=lambda r: r.get(key, (math.inf,))[0] * (-1 if mode == "max" and key == "best" else 1))
        self._write_summary(rows)
        return rows

    def _write_summary(self, rows):
        metrics = sorted({k for r in rows for k in r if k not in ("configuration", "params", "n")},
                         key=lambda k: (k != "best", k))
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["configuration", "params", "n", *(f"{m}_{s}" for m in metrics for s in ("mean", "std"))])
        for r in rows:
            writer.writerow([r["configuration"], json.dumps(r["params"]), r["n"],
                             *(f"{v:.6g}" for m in metrics for v in r.get(m, (float("nan"), float("nan"))))])
        md = ["| configuration | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
        for r in rows:
            params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "(base config)"
            cells = [f"{r[m][0]:.4g} ± {r[m][1]:.2g}" if m in r else "" for m in metrics]
            md.append(f"| {params} | {r['n']} | " + " | ".join(cells) + " |")
        failed = [t for t in self.state["trials"] if t["status"] == "failed"]
        if failed:
            md += ["", "Failed trials:", *(f"- {t['id']} ({' '.join(t['overrides'])}): {t['reason']}" for t in failed)]
        self.folder.mkdir(parents=True, exist_ok=True)
        from utils.io import atomic_write

        with atomic_write(self.folder / "summary.csv", "w") as f:
            f.write(buffer.getvalue())
        with atomic_write(self.folder / "summary.md", "w") as f:
            f.write("\n".join(md) + "\n")


def sweep_command(argv=None):
    """``python sweep.py ...``; returns the exit code."""
    from trainer.cli import CommandParser, _run

    parser = CommandParser(description="Run a sweep of trials (grid or random search, seeds, folds).")
    parser.add_argument("-c", "--config", required=True, help="the base config")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="a key and its values")
    parser.add_argument("--random", action="append", default=[], metavar="KEY=DIST:ARGS",
                        help="uniform:LOW:HIGH, loguniform:LOW:HIGH, int:LOW:HIGH or choice:A,B")
    parser.add_argument("--trials", type=int, help="number of random draws (with --random)")
    parser.add_argument("--sweep-seed", type=int, default=0, help="seed of the random search (default 0)")
    parser.add_argument("--seeds", help="comma-separated seeds: every configuration runs once per seed")
    parser.add_argument("--folds", type=int, help="K-fold cross-validation: every configuration runs on each fold")
    parser.add_argument("--name", help="the sweep's folder name (default: the config's name and a hash of the command)")
    parser.add_argument("--nproc", type=int, help="run each trial under torchrun with this many processes")
    parser.add_argument("overrides", nargs="*", metavar="key.path=VALUE", help="applied to every trial")
    args = parser.parse_intermixed_args(argv)

    def run():
        for flag, value in (("--trials", args.trials), ("--nproc", args.nproc)):
            if value is not None and value < 1:
                raise UserError(f"{flag}: got {value}, expected 1 or more")
        if args.grid and args.random:
            raise UserError("give --grid or --random, not both")
        if args.random and not args.trials:
            raise UserError("--random needs --trials N")
        if args.folds is not None and args.folds < 2:
            raise UserError(f"--folds: got {args.folds}, expected 2 or more")
        try:
            seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        except ValueError:
            raise UserError(f"--seeds: got {args.seeds!r}, expected comma-separated integers such as 0,1,2") from None
        sweep = Sweep(args.config, args.overrides, grid=parse_grid(args.grid), space=parse_random(args.random),
                      trials=args.trials, sweep_seed=args.sweep_seed, seeds=seeds, folds=args.folds, name=args.name,
                      nproc=args.nproc)
        print(f"Sweep {sweep.folder}: {len(sweep.state['trials'])} trials")
        rows = sweep.run()
        print((sweep.folder / "summary.md").read_text(), end="")
        print(f"Summary: {sweep.folder / 'summary.csv'}")
        return rows

    return _run(run)

