"""Experiments: a grid or seeded random search over config keys, repeated over seeds and folds, or an Optuna
study; resumable. The command is ``sweep.py``.

A part (utils/parts.py): delete this file, ``sweep.py``, tests/parts/test_sweep.py and
tests/parts/test_optuna.py, and training is as before. It owns one config key,
``trainer.optuna_trial``, which only the sweep sets: it tells a trial's run which study to
report its epochs to (:class:`StudyReport`).

A sweep is a folder, ``<save_dir>/sweeps/<name>/``, holding its state (``sweep.json``),
every trial's run (``models/<config name>/trial-NNN``, ``log/...``), the summary
(``summary.csv``, ``summary.md``) and a plot of the monitored value against each swept key
(``plot.png``, with matplotlib). Each trial is an ordinary ``train.py`` run in a
subprocess, so a crash, an out-of-memory error or a diverged loss fails that trial only
(recorded with its reason) and the sweep goes on. Running the same command again resumes
the sweep: finished, failed and pruned trials are kept, an interrupted trial continues from
its newest checkpoint (``train.py -r auto``).

The trials of a grid or random search are a pure function of the command: the grid's
product, or ``--trials`` draws from a generator seeded with ``--sweep-seed``; each repeated
for every ``--seeds`` value and every fold of ``--folds``. An Optuna study
(:class:`OptunaSweep`) asks for its trials one at a time, and keeps them in ``study.db``.
"""

import csv
import hashlib
import io
import itertools
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from base.base_hook import Hook
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
        _new_key(grid, key, "--grid", item)
        grid[key] = [parse_value(v) for v in _split_values(values, "--grid", item)]
    return grid


def _new_key(space, key, flag, item):
    if key in space:  # (the second would silently replace the first)
        raise UserError(f"{flag} {item!r}: {key} is swept twice; give each key once, with all its values")


def _split_values(text, flag, item):
    # Commas inside brackets belong to a value: hidden_sizes=[16,16],[32] is two values.
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{" and 1 or (-1 if ch in "]}" else 0)
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    values.append(current)
    if any(not v.strip() for v in values):  # 0.1,,0.2 or a trailing comma: a typo, not an empty string
        raise UserError(f"{flag} {item!r}: value {values.index(next(v for v in values if not v.strip())) + 1} is"
                        ' empty; separate the values with single commas (an empty string is written "")')
    if len(set(map(str.strip, values))) < len(values):
        raise UserError(f"{flag} {item!r}: a value is repeated; give each value once")
    return values


DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")


def parse_random(items, flag="--random"):
    """``["optimizer.args.lr=loguniform:1e-4:1e-1", "arch.args.width=choice:16,32"]`` -> ``{key: (kind, args)}``."""
    space = {}
    for item in items:
        key, sep, spec = item.partition("=")
        kind, _, rest = spec.partition(":")
        if not sep or not key or kind not in DISTRIBUTIONS or not rest:
            raise UserError(f"{flag} {item!r}: expected key.path=DIST:ARGS with DIST one of {', '.join(DISTRIBUTIONS)}"
                            " (uniform:LOW:HIGH, loguniform:LOW:HIGH, int:LOW:HIGH, choice:A,B,C)")
        _new_key(space, key, flag, item)
        if kind == "choice":
            space[key] = (kind, [parse_value(v) for v in _split_values(rest, flag, item)])
            continue
        try:
            low, high = (float(v) for v in rest.split(":"))
        except ValueError:
            raise UserError(f"{flag} {item!r}: {kind} takes LOW:HIGH numbers") from None
        if not (math.isfinite(low) and math.isfinite(high)):
            raise UserError(f"{flag} {item!r}: LOW and HIGH must be finite numbers")
        if kind == "int" and not (low.is_integer() and high.is_integer()):  # (randint would truncate 1.5 to 1)
            raise UserError(f"{flag} {item!r}: int takes whole-number bounds, such as int:1:8")
        if not low < high or (kind == "loguniform" and low <= 0):
            raise UserError(f"{flag} {item!r}: need LOW < HIGH{' and LOW > 0' if kind == 'loguniform' else ''}")
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


def short(override):
    """``key=VALUE`` for reading: a drawn float to 4 significant digits (the trial itself used every digit)."""
    key, _, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    return f"{key}={number:.4g}" if "." in value or "e" in value.lower() else override


def trial_overrides(trial, folds):
    overrides = [f"{k}={json.dumps(v)}" for k, v in trial["params"].items()]
    if trial["seed"] is not None:
        overrides.append(f"seed={trial['seed']}")
    if trial["fold"] is not None:
        overrides.append(f"data_loader.args.fold=[{trial['fold']},{folds}]")
    return overrides


# --------------------------------------------------------------------------- running

FINISHED = ("done", "failed", "pruned")  # a trial in one of these states is never run again
STUDY, PLOT = "study.db", "plot.png"
PRUNED = "pruned by the study of sweep.py --optuna"  # a pruned trial's result.json "ended_by" (StudyReport)


def monitored_value(result):
    """What a finished trial is judged by (its ``result.json``): the best monitored value, else its final
    ``val_loss`` (or ``loss``) when nothing is monitored."""
    if result.get("best") is not None:
        return result["best"]
    value = result["final"].get("val_loss", result["final"].get("loss"))
    return float("nan") if value is None else value  # (result.json writes a non-finite value as null)


def _read_state(path, study):
    """A sweep's ``sweep.json``: ``{"spec": ..., "trials": [...]}``. Raises UserError (one line, with what to do)
    when it is damaged: unreadable, truncated, or not a sweep's state."""
    try:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
        problem = None if isinstance(state, dict) and isinstance(state.get("trials"), list) and "spec" in state \
            and all(isinstance(t, dict) and "status" in t for t in state["trials"]) else "not a sweep's state"
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        problem = " ".join(str(err).split())[:200] or type(err).__name__
    if problem is None:
        return state
    todo = (f"delete the folder {Path(path).parent} to start the study over" if study else
            "delete it and run the same command again (each finished trial is read back from its run folder, not"
            " trained again)")
    raise UserError(f"{path} is damaged ({problem}): {todo}, or give --name to start another sweep")


class SweepFailed(UserError):
    """Every trial of a sweep failed: exit code 1 (its summary is written; each trial's reason is in it)."""

    exit_code = 1


class Sweep:
    """A sweep's folder and state; :meth:`run` runs what is left of it."""

    def __init__(self, config_path, overrides, grid=None, space=None, trials=None, sweep_seed=0, seeds=None,
                 folds=None, name=None, nproc=None, save_dir=None):
        self._load_config(config_path, overrides, nproc)
        self.folds = folds
        self.swept = {key: kind for key, (kind, _) in space.items()} if space else dict.fromkeys(grid or {}, "grid")
        spec = {"config": self.config_path, "overrides": self.overrides, "grid": grid, "random": space,
                "trials": trials, "sweep_seed": sweep_seed, "seeds": seeds, "folds": folds}
        trials_list = expand(configurations(grid, space, trials, sweep_seed), seeds, folds)
        for i, trial in enumerate(trials_list):
            trial.update(id=f"trial-{i:03d}", status="pending", overrides=trial_overrides(trial, folds))
        self._check_trials([(t["id"], t["overrides"]) for t in trials_list])
        self._open(spec, trials_list, name, save_dir)

    def _load_config(self, config_path, overrides, nproc):
        self.config_path, self.overrides, self.nproc = str(config_path), list(overrides), nproc
        base = apply_overrides(load_config(config_path), self.overrides)
        from trainer.build import registries

        self.base = validate_config(base, registries())  # a typo fails the sweep before any trial
        self.monitor = self.base["trainer"]["monitor"]

    def _check_trials(self, trials, shown=10):
        """Check the config of every ``(name, overrides)`` trial before any runs; all problems at once, each
        naming its first trials (a key the base config lacks, a value no trial may take).

        Raises:
            UserError: one line per distinct problem (at most ``shown``, then how many more).
        """
        from trainer.build import registries

        fixed = {item.partition("=")[0] for item in self.overrides}
        both = sorted(fixed & {item.partition("=")[0] for _, overrides in trials for item in overrides})
        if both:  # (the trial's value would silently win)
            raise UserError(f"{', '.join(both)}: both swept and set by an override; drop the override, or sweep"
                            " only the values you want")
        base, found = apply_overrides(load_config(self.config_path), self.overrides), {}
        for name, overrides in trials:
            try:
                validate_config(apply_overrides(base, overrides), registries())
            except UserError as err:
                for problem in err.problems:
                    found.setdefault(problem, []).append(f"{name} ({' '.join(map(short, overrides))})")
        lines = [f"{problem} [in {', '.join(names[:2])}{f' and {len(names) - 2} more' if len(names) > 2 else ''}]"
                 for problem, names in found.items()]
        if lines:
            more = [f"... and {len(lines) - shown} more problems"] if len(lines) > shown else []
            raise UserError(*lines[:shown], *more)

    def _open(self, spec, trials, name, save_dir):
        """Name the folder (by the command's hash unless ``name``); take its state when it holds this command's sweep."""
        spec = json.loads(json.dumps(spec, default=str))  # as sweep.json keeps it (a tuple is a list there)
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
        name = name or f"{self.base['name']}-{digest}"
        if problem := check_path_component(name, "--name"):
            raise UserError(problem)
        self.folder = Path(save_dir or self.base["trainer"]["save_dir"]) / "sweeps" / name
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"{self.folder} is a file, not a sweep's folder; give --name to name another")
        self.state = {"spec": spec, "trials": trials}
        previous = self.folder / STATE
        if os.path.lexists(previous):
            saved = _read_state(previous, "optuna" in spec)
            if saved.get("spec") != spec:
                raise UserError(f"{self.folder} holds a sweep of another command; give --name to start a new one")
            self.state = saved

    def save(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / STATE, self.state)

    def run_dir(self, trial):
        return self.folder / "models" / self.base["name"] / trial["id"]

    def run(self, out=None):
        """Run every trial not yet finished; returns the summary rows. Ctrl-C stops after saving the state."""
        out = out or sys.stdout
        self.save()
        todo = [t for t in self.state["trials"] if t["status"] not in FINISHED]
        bar = _progress_bar(len(self.state["trials"]), len(self.state["trials"]) - len(todo), out)
        try:
            for trial in todo:
                self._run_trial(trial, out)
                bar.update()
        finally:
            bar.close()
            self.save()
        return self.summarize()

    def _command(self, trial, extra=()):
        # -r auto: a trial started before (the sweep was interrupted) continues from its newest checkpoint,
        # a new one starts; a finished one says so and exits 0.
        launcher = [sys.executable]
        if self.nproc:
            launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={self.nproc}"]
        return launcher + [str(ROOT / "train.py"), "-c", self.config_path, *self.overrides, *trial["overrides"],
                           *extra, f"trainer.save_dir={self.folder}", "--run-id", trial["id"], "-r", "auto"]

    def _run_trial(self, trial, out, extra=()):
        """Run one trial (``extra``: overrides of this run alone) and record how it ended; raises KeyboardInterrupt
        (state saved) when the sweep is stopped."""
        trial["status"] = "running"
        self.save()
        started = time.perf_counter()
        try:
            # (in the sweep's own folder: -c, save_dir and the config's data paths mean what they meant to the sweep)
            proc = subprocess.run(self._command(trial, extra), capture_output=True, text=True)
        except KeyboardInterrupt:  # Ctrl-C reached the sweep while it waited: the trial is cut short with it
            proc = None
        trial["seconds"] = round(time.perf_counter() - started + trial.get("seconds", 0), 3)
        if proc is None or proc.returncode in (130, 143, -signal.SIGINT, -signal.SIGTERM):
            trial["status"] = "interrupted"
            self.save()
            raise KeyboardInterrupt
        result = self.run_dir(trial) / "result.json"
        if proc.returncode == 0 and result.is_file():
            trial["result"] = json.loads(result.read_text())
            shown = f"{trial['result']['monitor'] or 'loss'} {monitored_value(trial['result']):.6g}"
            trial["status"] = "done"
            if trial["result"].get("ended_by") == PRUNED:
                trial["status"] = "pruned"
                shown = f"PRUNED after epoch {trial['result']['epochs']} ({shown})"
        else:
            lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
            trial["status"], trial["reason"] = "failed", (lines[-1] if lines else f"exit code {proc.returncode}")[:500]
            shown = f"FAILED ({trial['reason']})"
        self.save()
        from tqdm import tqdm

        tqdm.write(f"{trial['id']}  {' '.join(map(short, trial['overrides'])) or '(base config)'}  {shown}  {trial['seconds']:.1f} s",
                   file=out)

    # ------------------------------------------------------------------ the summary and the plot

    def summarize(self):
        """Group finished trials by configuration: n, mean and std of the best monitored value and every final
        and test metric; best configuration first. Writes ``summary.csv`` and ``summary.md``."""
        mode = "max" if str(self.monitor).startswith("max") else "min"
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
            params = ", ".join(short(f"{k}={v}") for k, v in r["params"].items()) or "(base config)"
            cells = [("" if m not in r else f"{r[m][0]:.4g}" if r["n"] == 1 else f"{r[m][0]:.4g} ± {r[m][1]:.2g}")
                     for m in metrics]  # (no spread from one trial; summary.csv keeps every digit)
            md.append(f"| {params} | {r['n']} | " + " | ".join(cells) + " |")
        pruned = [t for t in self.state["trials"] if t["status"] == "pruned"]
        if pruned:
            md += ["", "Pruned trials (stopped early by the study's pruner; not in the table):",
                   *(f"- {t['id']} ({' '.join(t['overrides'])}): after epoch {t['result']['epochs']},"
                     f" {t['result']['monitor']} {monitored_value(t['result']):.4g}" for t in pruned)]
        failed = [t for t in self.state["trials"] if t["status"] == "failed"]
        if failed:
            md += ["", "Failed trials:", *(f"- {t['id']} ({' '.join(t['overrides'])}): {t['reason']}" for t in failed)]
        self.folder.mkdir(parents=True, exist_ok=True)
        from utils.io import atomic_write

        with atomic_write(self.folder / "summary.csv", "w") as f:
            f.write(buffer.getvalue())
        with atomic_write(self.folder / "summary.md", "w") as f:
            f.write("\n".join(md) + "\n")

    def plot(self):
        """``plot.png``: the monitored value of every finished trial against each swept key. Returns the line
        to print (where it is, or why there is none), or None when no key was swept."""
        trials = [t for t in self.state["trials"] if t["status"] in ("done", "pruned")]
        if not self.swept or not trials:
            return None
        try:
            from matplotlib.figure import Figure  # (no pyplot: nothing global changes, no display needed)
        except ImportError:
            return "Plot skipped: matplotlib is not installed (pip install matplotlib)"
        from utils.io import atomic_write

        monitor = self.monitor.split()[-1] if self.monitor != "off" else "val_loss"
        figure = plot_figure(Figure, trials, self.swept, f"best {monitor}" if self.monitor != "off" else monitor)
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.folder / PLOT, "wb") as f:
            figure.savefig(f, format="png", dpi=100)
        return f"Plot: {self.folder / PLOT}"


def plot_figure(figure_class, trials, swept, label):
    """One panel per swept key: each trial's monitored value against its value of the key (a pruned trial as a
    grey cross). The x axis is logarithmic for a loguniform key, and for a grid of positive numbers spanning
    a factor of 100 or more; values that are not numbers are categories."""
    figure = figure_class(figsize=(4 * len(swept), 3.4), layout="constrained")
    for ax, (key, kind) in zip(figure.subplots(1, len(swept), squeeze=False)[0], swept.items()):
        for status, style in (("done", {"marker": "o"}), ("pruned", {"marker": "x", "color": "grey"})):
            chosen = [t for t in trials if t["status"] == status]
            if chosen:
                ax.scatter([_plotted(t["params"][key]) for t in chosen],
                           [monitored_value(t["result"]) for t in chosen], label=status, **style)
        numbers = [v for t in trials if isinstance(v := _plotted(t["params"][key]), float)]
        if kind == "loguniform" or (kind == "grid" and numbers and min(numbers) > 0
                                    and max(numbers) >= 100 * min(numbers)):
            ax.set_xscale("log")
            ax.tick_params(axis="x", which="minor", labelbottom=False)  # (labelled minor ticks overlap)
        ax.set_xlabel(key)
        ax.set_ylabel(label)
        if any(t["status"] == "pruned" for t in trials):
            ax.legend(fontsize="small")
    return figure


def _plotted(value):
    # a number as a float; anything else (a string, a list, true/false, null) as a category, its JSON text
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else json.dumps(value)


def _progress_bar(total, done, out):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="sweep", unit="trial", file=out, disable=None)


# --------------------------------------------------------------------------- Optuna


def parse_pruner(text):
    """``median``, ``median:STARTUP_TRIALS:WARMUP_EPOCHS`` or ``none`` -> ``("median", 5, 0)`` or ``("none",)``."""
    name, *numbers = text.split(":")
    if name == "none" and not numbers:
        return ("none",)
    if name == "median" and len(numbers) <= 2 and all(n.isdigit() for n in numbers):
        startup, warmup = [int(n) for n in numbers] + [5, 0][len(numbers):]
        return ("median", startup, warmup)
    raise UserError(f"--pruner {text!r}: expected median, median:STARTUP_TRIALS:WARMUP_EPOCHS (for example"
                    " median:5:1) or none")


def make_pruner(text):
    """The Optuna pruner ``--pruner`` names. Median: a trial stops after an epoch whose best value so far is
    worse than the median of the finished trials' values at that epoch, once STARTUP_TRIALS trials have
    finished, and never within its first WARMUP_EPOCHS epochs."""
    import optuna

    parsed = parse_pruner(text)
    if parsed[0] == "none":
        return optuna.pruners.NopPruner()
    # (steps are epochs, counted from 1: a step below n_warmup_steps is never pruned)
    return optuna.pruners.MedianPruner(n_startup_trials=parsed[1], n_warmup_steps=parsed[2] + 1)


def open_study_trial(spec):
    """In a trial's run: the :class:`optuna.trial.Trial` the sweep named (``{"storage", "study", "trial", "pruner"}``)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(spec["storage"])
    study = optuna.load_study(study_name=spec["study"], storage=storage, pruner=make_pruner(spec["pruner"]),
                              sampler=optuna.samplers.RandomSampler())  # (it samples nothing here)
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(spec["study"]),
                                                               spec["trial"])
    return optuna.trial.Trial(study, trial_id)


# ------------------------------------------------------------------ in a trial's run: trainer.optuna_trial

TRIAL_KEY = "optuna_trial"  # trainer.optuna_trial: {"storage", "study", "trial", "pruner"}, set by the sweep


def check(config):
    """``trainer.optuna_trial``, as :meth:`OptunaSweep._run_study_trial` sets it (null when the run is no trial)."""
    value = config["trainer"].get(TRIAL_KEY)
    ok = (isinstance(value, dict) and set(value) == {"storage", "study", "trial", "pruner"}
          and isinstance(value["storage"], str) and isinstance(value["study"], str) and isinstance(value["pruner"], str)
          and isinstance(value["trial"], int) and not isinstance(value["trial"], bool) and value["trial"] >= 0)
    if ok:
        try:
            parse_pruner(value["pruner"])
        except UserError:
            ok = False
    return [] if ok else [f"trainer.{TRIAL_KEY}: got {json.dumps(value)}, expected null, or what sweep.py --optuna"
                          ' sets: {"storage": URL, "study": NAME, "trial": NUMBER, "pruner": PRUNER}']


def hooks(config, parts, run):
    cfg = config["trainer"]
    if not cfg.get(TRIAL_KEY) or cfg["monitor"] == "off" or not run.writes:  # (a dry run reports nothing)
        return []
    return [StudyReport(cfg[TRIAL_KEY], run.dist)]


class StudyReport(Hook):
    """A trial of ``sweep.py --optuna``: each epoch's monitored value goes to the Optuna study, and an
    epoch the study's pruner rejects is the run's last (``trainer.end_run``: ``result.json`` says
    ``"ended_by": PRUNED``, which the sweep reads).

    The sweep names the study and the trial in ``trainer.optuna_trial``. Rank 0 talks to the study
    (one database write and read per epoch, nothing per step); under torchrun it tells the other
    processes whether to stop.
    """

    def __init__(self, spec, info):
        self.info = info
        self.trial = open_study_trial(spec) if info.is_main else None

    def after_epoch(self, trainer, epoch, result):
        from utils import dist_round

        pruned = False
        if self.trial is not None and trainer.monitor_key in result:
            self.trial.report(float(result[trainer.monitor_key]), epoch)
            pruned = self.trial.should_prune()
        if dist_round.broadcast_object(pruned, self.info) and not trainer.finished:
            trainer.end_run(PRUNED)
            trainer.logger.info(f"{trainer.monitor_key} {result[trainer.monitor_key]:.6g} at epoch {epoch}: the"
                                " study's pruner stops this trial")


def _category(value):
    # Optuna's categories are None, bools, numbers and strings: a list is kept as its JSON text
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


class OptunaSweep(Sweep):
    """``--optuna``: an Optuna study (TPE sampler, median pruner) over config keys, each trial a ``train.py`` run.

    The study is ``study.db`` (SQLite) in the sweep's folder, named after the folder; it
    minimizes or maximizes each trial's best monitored value, as ``trainer.monitor`` says.
    A trial's run reports every epoch's monitored value to the study and stops when the pruner
    says so (:class:`StudyReport`, which the sweep turns on in the trial's run with
    ``trainer.optuna_trial``): that trial is recorded as pruned. Running the same command again
    resumes the study: finished trials are kept, an interrupted trial is run again under its own
    trial number and parameters (continuing from its newest checkpoint, its earlier epochs'
    reports kept), and then new trials are asked for until the study has ``--trials`` of them;
    a larger ``--trials`` extends a finished study.
    """

    def __init__(self, config_path, overrides, space, trials, direction="auto", pruner="median", sweep_seed=0,
                 name=None, nproc=None, save_dir=None):
        self._load_config(config_path, overrides, nproc)
        if self.monitor == "off":
            raise UserError('--optuna: the study optimizes the monitored value, and trainer.monitor is "off"; set'
                            ' one, for example trainer.monitor="min val_loss"')
        mode = self.monitor.split()[0]
        if direction not in ("auto", mode):
            raise UserError(f"--direction {direction}: the study follows trainer.monitor ({self.monitor!r}); to"
                            f' {direction}imize, set trainer.monitor="{direction} KEY"')
        self.folds, self.space, self.total, self.sweep_seed, self.pruner = None, space, trials, sweep_seed, pruner
        self.direction = "minimize" if mode == "min" else "maximize"
        self.swept = {key: kind for key, (kind, _) in space.items()}
        # The study draws its trials later: every choice, and each end of every range, is checked now.
        ends = [(key, value) for key, (kind, args) in space.items()
                for value in (args if kind == "choice" else [int(a) for a in args] if kind == "int" else args)]
        self._check_trials([("the study's space", [f"{key}={json.dumps(value)}"]) for key, value in ends])
        # (--trials is not part of it: the same command with a larger --trials extends the study)
        # The monitor too: the config file it comes from may be edited, and a study's direction is fixed.
        spec = {"config": self.config_path, "overrides": self.overrides, "optuna": space, "pruner": pruner,
                "sweep_seed": sweep_seed, "monitor": self.monitor}
        self._open(spec, [], name, save_dir)
        self.storage = "sqlite:///" + str((self.folder / STUDY).resolve())

    def run(self, out=None):
        import optuna

        out = out or sys.stdout
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own line per trial
        self.save()
        study = optuna.create_study(storage=self.storage, study_name=self.folder.name, direction=self.direction,
                                    pruner=make_pruner(self.pruner), load_if_exists=True)
        if study.direction.name.lower() != self.direction:  # (an existing study keeps its own)
            raise UserError(f"{self.storage}: the study there is to {study.direction.name.lower()}, but"
                            f" trainer.monitor is {self.monitor!r}; start another sweep (--name) for this one")
        self._reconcile(study)
        # Seeded by the number of trials so far: a resumed study does not draw its first trials' values again.
        study.sampler = optuna.samplers.TPESampler(seed=self.sweep_seed + len(study.trials))
        trials = self.state["trials"]
        bar = _progress_bar(max(self.total, len(trials)), sum(t["status"] in FINISHED for t in trials), out)
        try:
            for trial in [t for t in trials if t["status"] not in FINISHED]:  # interrupted before: resumed
                self._run_study_trial(study, trial, out)
                bar.update()
            while self._asked(study) < self.total:
                asked = study.ask(self._distributions())
                trials.append(self._new_trial(asked.number, asked.params))
                self._run_study_trial(study, trials[-1], out)
                bar.update()
        finally:
            bar.close()
            self.save()
        return self.summarize()

    def _asked(self, study):
        from optuna.trial import TrialState

        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
        return len(study.get_trials(deepcopy=False, states=states))

    def _distributions(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        made = {}
        for key, (kind, args) in self.space.items():
            if kind == "choice":
                made[key] = CategoricalDistribution([_category(v) for v in args])
            elif kind == "int":
                made[key] = IntDistribution(int(args[0]), int(args[1]))
            else:
                made[key] = FloatDistribution(args[0], args[1], log=kind == "loguniform")
        return made

    def _new_trial(self, number, study_params):
        params = {}
        for key, value in study_params.items():
            kind, args = self.space[key]
            params[key] = args[[_category(v) for v in args].index(value)] if kind == "choice" else value
        trial = {"id": f"trial-{number:03d}", "number": number, "configuration": number, "params": params,
                 "seed": None, "fold": None, "status": "pending"}
        trial["overrides"] = trial_overrides(trial, None)
        return trial

    def _reconcile(self, study):
        """Make sweep.json and the study agree after the sweep was killed between writing one and the other."""
        from optuna.trial import TrialState

        known = {t["number"]: t for t in self.state["trials"]}
        for frozen in study.get_trials(deepcopy=False):
            trial = known.get(frozen.number)
            if trial is None and frozen.state == TrialState.RUNNING:  # asked for, not yet in sweep.json
                self.state["trials"].append(self._new_trial(frozen.number, frozen.params))
            elif trial is not None and trial["status"] in FINISHED and frozen.state == TrialState.RUNNING:
                self._tell(study, trial)  # run, but the study was not told
        self.state["trials"].sort(key=lambda t: t["number"])

    def _run_study_trial(self, study, trial, out):
        spec = {"storage": self.storage, "study": self.folder.name, "trial": trial["number"], "pruner": self.pruner}
        # Ctrl-C: _run_trial raises, and the study's trial stays running, to be resumed by the next run
        self._run_trial(trial, out, extra=[f"trainer.{TRIAL_KEY}={json.dumps(spec)}"])
        self._tell(study, trial)

    def _tell(self, study, trial):
        from optuna.trial import TrialState

        value = monitored_value(trial["result"]) if trial["status"] == "done" else None
        if value is not None and math.isfinite(value):
            study.tell(trial["number"], value, skip_if_finished=True)
        else:  # (a pruned trial's value is its last reported one, which the study has)
            state = TrialState.PRUNED if trial["status"] == "pruned" else TrialState.FAIL
            study.tell(trial["number"], state=state, skip_if_finished=True)


def sweep_command(argv=None):
    """``python sweep.py ...``; returns the exit code."""
    from trainer.cli import CommandParser, run_command

    parser = CommandParser(description="Run a sweep of trials (grid or random search, seeds, folds, an Optuna study).")
    parser.add_argument("-c", "--config", required=True, help="the base config")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="a key and its values")
    parser.add_argument("--random", action="append", default=[], metavar="KEY=DIST:ARGS",
                        help="uniform:LOW:HIGH, loguniform:LOW:HIGH, int:LOW:HIGH or choice:A,B")
    parser.add_argument("--optuna", action="append", default=[], metavar="KEY=DIST:ARGS",
                        help="a key of an Optuna study, in --random's distributions (needs pip install optuna)")
    parser.add_argument("--trials", type=int, help="number of random draws (--random), or of the study's trials"
                        " (--optuna: a larger number on a later run extends the study)")
    parser.add_argument("--direction", choices=("auto", "min", "max"),
                        help="with --optuna: the study follows trainer.monitor; min or max only confirms it")
    parser.add_argument("--pruner", help="with --optuna: median (default; median:STARTUP_TRIALS:WARMUP_EPOCHS, e.g."
                        " median:5:1) or none")
    parser.add_argument("--sweep-seed", type=int, default=0, help="seed of the random search or sampler (default 0)")
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
        if sum(map(bool, (args.grid, args.random, args.optuna))) > 1:
            raise UserError("give one of --grid, --random and --optuna")
        for flag, value in (("--random", args.random), ("--optuna", args.optuna)):
            if value and not args.trials:
                raise UserError(f"{flag} needs --trials N")
        if args.folds is not None and args.folds < 2:
            raise UserError(f"--folds: got {args.folds}, expected 2 or more")
        if args.trials is not None and not (args.random or args.optuna):
            raise UserError("--trials is the number of draws of --random or --optuna; a --grid runs each combination")
        seeds = None
        if args.seeds is not None:  # (an empty --seeds "" is a mistake, not "no seeds")
            try:
                seeds = [int(s) for s in args.seeds.split(",")]
            except ValueError:
                raise UserError(f"--seeds: got {args.seeds!r}, expected comma-separated integers such as 0,1,2")\
                    from None
            if len(set(seeds)) < len(seeds):
                raise UserError(f"--seeds: got {args.seeds!r}, which repeats a seed; give each seed once")
        if args.optuna:
            sweep = _optuna_sweep(args, seeds)
            print(f"Sweep {sweep.folder}: an Optuna study of {args.trials} trials ({sweep.direction} the best"
                  f" {sweep.monitor.split()[1]}), kept in {STUDY}")
        else:
            for flag in ("direction", "pruner"):
                if getattr(args, flag) is not None:
                    raise UserError(f"--{flag} is for an Optuna study (--optuna)")
            sweep = Sweep(args.config, args.overrides, grid=parse_grid(args.grid), space=parse_random(args.random),
                          trials=args.trials, sweep_seed=args.sweep_seed, seeds=seeds, folds=args.folds,
                          name=args.name, nproc=args.nproc)
            print(f"Sweep {sweep.folder}: {len(sweep.state['trials'])} trials")
        rows = sweep.run()
        print((sweep.folder / "summary.md").read_text(), end="")
        print(f"Summary: {sweep.folder / 'summary.csv'}")
        if line := sweep.plot():
            print(line)
        if any((sweep.folder / "log").rglob("events.out.tfevents.*")):
            print(f"TensorBoard (its HParams tab compares the trials): tensorboard --logdir {sweep.folder / 'log'}")
        trials = sweep.state["trials"]
        if trials and all(t["status"] == "failed" for t in trials):
            first = trials[0]["reason"].removeprefix("error: ")
            raise SweepFailed(f"every trial failed ({len(trials)} of {len(trials)}); the first: {first}")
        return rows

    return run_command(run)


def _optuna_sweep(args, seeds):
    """The checks of an Optuna command line, then its :class:`OptunaSweep` (nothing written yet)."""
    import importlib.util

    if seeds or args.folds:
        raise UserError("--optuna runs each trial once: --seeds and --folds are for --grid and --random")
    space = parse_random(args.optuna, flag="--optuna")
    pruner = args.pruner or "median"
    parse_pruner(pruner)
    if importlib.util.find_spec("optuna") is None:
        raise UserError("--optuna needs the optuna package: pip install optuna")
    return OptunaSweep(args.config, args.overrides, space, args.trials, direction=args.direction or "auto",
                       pruner=pruner, sweep_seed=args.sweep_seed, name=args.name, nproc=args.nproc)
