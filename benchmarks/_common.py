"""What the benchmark scripts share: paths, tables, JSON results, a terminal for tqdm,
call counting, ratio summaries, and building the project's Trainer the way ``trainer.run.train`` does.

Nothing here is imported by the project itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS_DIR = ROOT / "benchmarks" / "results"  # ignored by git (.gitignore: benchmarks/results/)


# --------------------------------------------------------------------------- output


def write_results(name: str, data: dict, out_dir=None) -> Path:
    """Write ``data`` as ``<out_dir>/<name>.json`` (default ``benchmarks/results/``); returns the path."""
    folder = Path(out_dir) if out_dir is not None else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def environment() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def table(headers, rows) -> str:
    """A plain-text table: right-aligned columns, a rule under the headers."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- a terminal for tqdm


class _FakeTTY(io.TextIOWrapper):
    """/dev/null that says it is a terminal (fallback where no pseudo-terminal can be opened)."""

    def isatty(self):
        return True


@contextlib.contextmanager
def terminal(columns=120, rows=40):
    """``sys.stderr`` and ``sys.stdout`` go to a pseudo-terminal for the duration.

    tqdm turns itself off (``disable=None``) when its file is not a TTY, so under a pipe
    (this script's usual way to run, and CI) the trainer's progress bar would cost
    nothing. To measure the default as a user at a terminal sees it, the bar writes to a
    real pty (``os.openpty``), whose other end a thread drains, as a terminal emulator
    would. Where no pty can be opened, /dev/null posing as a TTY stands in.
    Yields a description of what stands in.
    """
    old_out, old_err = sys.stdout, sys.stderr
    master = slave = None
    drainer = None
    try:
        master, slave = os.openpty()
        try:
            import fcntl
            import struct
            import termios

            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        except (ImportError, OSError):
            pass
        stream = open(slave, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        kind = "pty"

        def drain():
            while True:
                try:
                    if not os.read(master, 65536):
                        return
                except OSError:
                    return

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
    except (OSError, AttributeError):
        stream = _FakeTTY(open(os.devnull, "wb"), encoding="utf-8", line_buffering=True)  # noqa: SIM115
        kind = "devnull posing as a TTY"
    sys.stdout = sys.stderr = stream
    try:
        yield kind
    finally:
        sys.stdout, sys.stderr = old_out, old_err
        stream.close()
        if slave is not None:
            os.close(slave)  # the drainer's read then fails and it returns
        if drainer is not None:
            drainer.join(timeout=1)
        if master is not None:
            os.close(master)


# --------------------------------------------------------------------------- counting calls


def count_calls(fn, *args, **kwargs):
    """Run ``fn`` under ``sys.setprofile``; returns ``(result, {"call": n, "c_call": m})``.

    ``call`` events are Python-level function calls (a generator's resumption counts as
    one, as a profiler sees it); ``c_call`` events are calls of built-in / C functions
    made from Python code. Only the calling thread is counted.
    """
    counts = {"call": 0, "c_call": 0}

    def profiler(frame, event, arg):
        if event in counts:
            counts[event] += 1

    sys.setprofile(profiler)
    try:
        result = fn(*args, **kwargs)
    finally:
        sys.setprofile(None)
    return result, counts


def calls_per_step(run_steps, short, long):
    """Calls per step as the slope between two epoch lengths, so that per-epoch set-up cancels.

    ``run_steps(n)`` runs an epoch of ``n`` steps. Returns the slopes of ``call``,
    ``c_call`` and their sum, and the raw counts.
    """
    # The fewest calls of three epochs of each length: a progress bar redraws on a timer, so a slow moment
    # (a busy machine) can add a redraw's calls to one epoch; the minimum is the epoch without one.
    a = min((count_calls(run_steps, short)[1] for _ in range(3)), key=lambda c: c["call"] + c["c_call"])
    b = min((count_calls(run_steps, long)[1] for _ in range(3)), key=lambda c: c["call"] + c["c_call"])
    slope = {k: (b[k] - a[k]) / (long - short) for k in a}
    slope["total"] = slope["call"] + slope["c_call"]
    return {"per_step": slope, "short": {"steps": short, **a}, "long": {"steps": long, **b}}


# --------------------------------------------------------------------------- paired timing


def summary(samples):
    return {"median_s": statistics.median(samples), "min_s": min(samples), "samples_s": samples}


def paired_ratio(numerator, denominator):
    """Median of the per-round ratios (each pair measured back to back), and ratios of medians and minima."""
    per_round = [a / b for a, b in zip(numerator, denominator)]
    return {
        "median_of_paired": statistics.median(per_round),
        "of_medians": statistics.median(numerator) / statistics.median(denominator),
        "of_minima": min(numerator) / min(denominator),
        "per_round": per_round,
    }


# --------------------------------------------------------------------------- the project's Trainer


def base_config(name, arch, data_args, optimizer, save_dir, loss="cross_entropy", metrics=("accuracy",), device="cpu",
                **trainer):
    """A config dict in ``config.json``'s format. Trainer settings not given keep the project's defaults."""
    return {
        "name": name,
        "seed": 0,
        "device": device,
        "n_gpu": 1,
        "arch": arch,
        "data_loader": {"type": "SyntheticDataLoader", "args": dict(data_args)},
        "optimizer": optimizer,
        "loss": loss,
        "metrics": list(metrics),
        "trainer": {"save_dir": str(save_dir), **trainer},
    }


def build_trainer(config, run_id="bench", prepare_model=None):
    """The project's :class:`trainer.trainer.Trainer` built from ``config`` as ``trainer.run.train`` builds it.

    The same steps in the same order (check the config, seed, build loader, model, loss,
    metrics, optimizer and scheduler, the run's folders, logging, a real TensorBoard
    writer, move to the device, wrap for ``trainer.compile``), without the manifest and
    without starting ``train()``: the benchmark calls ``train_epoch`` itself, so that
    validation and epoch-end checkpoints stay out of the timing.
    ``prepare_model(model)`` runs after the model is moved to the device (channels_last, say).

    Returns a namespace with ``trainer``, ``model``, ``loader``, ``writer``, ``logger``,
    ``config``, ``device`` and ``close()``.
    """
    from trainer import build
    from trainer.run import checked_parts, open_run
    from trainer.trainer import Trainer
    from utils.config import validate_config
    from utils.dist import DistInfo

    config = validate_config(config, build.registries())
    device = build.resolve_device(config["device"])
    parts, _ = checked_parts(config, device, DistInfo())  # seeded, built, checked (the dry batch), placed
    opened = contextlib.ExitStack()  # closed by close()
    run = opened.enter_context(open_run(config, run_id))  # console handler on the current sys.stdout
    if prepare_model is not None:
        prepare_model(parts.model)
    trainer = Trainer(config, parts, run)
    model, loader, writer, logger, optimizer = parts.model, parts.data_loader, run.writer, run.logger, parts.optimizer

    return SimpleNamespace(trainer=trainer, model=model, loader=loader, writer=writer, logger=logger,
                           config=config, device=device, optimizer=optimizer, close=opened.close)


def fmt_ms(seconds):
    return f"{seconds * 1e3:.3f}"
