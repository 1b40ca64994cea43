"""Where a run's numbers go: the writer the trainer and hooks call, and TensorBoard, the core's one logger.

``trainer.loggers`` names the run's loggers: ``"tensorboard"`` (here) and those of the optional
parts (utils/parts.py: a Part row's ``loggers``; ``parts/csv_logger.py``, ``parts/mlflow_logger.py``).
:func:`open_writer` builds each and hands the run one writer (``run.writer``): the one logger
itself, :class:`Writers` when several are on, and a :class:`Writers` of none when none is.

The writer interface (:class:`Writer`; each method does nothing unless a logger overrides it):

- ``add_scalar(tag, value, step)``, ``add_scalars(values, step, prefix="")``: at the logging
  interval (``trainer.log_every_n_steps``), at an epoch's end and at step validations.
- ``add_histogram(tag, values, step)``, ``add_images(tag, images, step)``: tensors on the
  run's device; a logger that takes pictures copies them to the host itself.
- ``add_hparams(hparams, metrics)``: once, when the run (or a resumed segment of it) ends
  normally: its config as ``{"dotted.key": value}`` and its final values (``hparam/...``).
- ``finish(checkpoint_dir)``: right after ``add_hparams``; the folder holds the run's
  config.json, manifest.json and checkpoints by then.
- ``checkpoint_state() -> {logger name: state}``: called as each checkpoint is written; kept
  in it under ``"trackers"`` and given back to the logger on resume (``context.saved(name)``).
- ``run_ids() -> {logger name: id}``: the logger's own id of the run, for manifest.json.
- ``flush()`` (at each epoch's end), ``close()`` (the run ended, however it ended).
- ``bool(writer)``: whether it records anything at all (false: hooks skip their pictures).

What every logger promises:

- It acts only when called, and it is called only at the moments above: a run pays nothing
  per step for it.
- A resumed run continues the same logger's run, and the steps an interrupted process logged
  after the checkpoint it is resumed from are superseded (``context.purge_step``): TensorBoard
  drops their events, ``metrics.csv`` drops their rows, MLflow never received them. So each
  reader sees one history with no step twice.
- A logger that fails (a server that went away) never stops training: it warns and retries.

A logger of your own (W&B, say) is a part: a module under ``parts/`` with a :class:`Writer`
subclass and ``writer(name, settings, context)`` returning it (``settings``: the entry's
``"args"``; ``context``: a :class:`WriterContext`), optionally ``check(config)`` for its
args, and a row in utils/parts.py's ``PARTS`` with ``loggers=("wandb",)``.
"""

import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HPARAMS_FOLDER = "hparams"  # <log_dir>/hparams/: the run's one HParams record (TensorboardWriter.add_hparams)


class Writer:
    """The writer interface (see the module's docstring): every method does nothing."""

    def add_scalar(self, tag, value, step):
        pass

    def add_scalars(self, values, step, prefix=""):
        for tag, value in values.items():
            self.add_scalar(prefix + tag, value, step)

    def add_histogram(self, tag, values, step):
        pass

    def add_images(self, tag, images, step):
        pass

    def add_hparams(self, hparams, metrics):
        pass

    def finish(self, checkpoint_dir):
        pass

    def checkpoint_state(self):
        return {}

    def run_ids(self):
        return {}

    def flush(self):
        pass

    def close(self):
        pass


class Writers(Writer):
    """Several loggers as one writer: each call goes to every one. Of none, it records nothing (and is false)."""

    def __init__(self, writers=()):
        self.writers = list(writers)

    def __bool__(self):
        return bool(self.writers)

    def add_scalar(self, tag, value, step):
        for writer in self.writers:
            writer.add_scalar(tag, value, step)

    def add_scalars(self, values, step, prefix=""):
        for writer in self.writers:
            writer.add_scalars(values, step, prefix)

    def add_histogram(self, tag, values, step):
        for writer in self.writers:
            writer.add_histogram(tag, values, step)

    def add_images(self, tag, images, step):
        for writer in self.writers:
            writer.add_images(tag, images, step)

    def add_hparams(self, hparams, metrics):
        for writer in self.writers:
            writer.add_hparams(hparams, metrics)

    def finish(self, checkpoint_dir):
        for writer in self.writers:
            writer.finish(checkpoint_dir)

    def checkpoint_state(self):
        return {name: state for writer in self.writers for name, state in writer.checkpoint_state().items()}

    def run_ids(self):
        return {name: run_id for writer in self.writers for name, run_id in writer.run_ids().items()}

    def flush(self):
        for writer in self.writers:
            writer.flush()

    def close(self):
        for writer in self.writers:
            writer.close()
        self.writers = []


@dataclass
class WriterContext:
    """What a logger is told about the run it logs (``writer(name, settings, context)`` of a logger part)."""

    config: dict  # the checked config
    log_dir: Path  # the run's log folder (created)
    run_id: str
    state: Any = None  # the checkpoint resumed from, or None
    purge_step: Any = None  # resuming: the first step logged again; what a logger holds from it on is superseded
    branched: bool = False  # a resume into a new run folder: start new runs (tagged with the one it came from)
    logger: Any = None

    def saved(self, name):
        """What logger ``name``'s ``checkpoint_state()`` kept in the checkpoint resumed from (``{}`` if nothing)."""
        return ((self.state or {}).get("trackers") or {}).get(name) or {}


def open_writer(config, context, enabled=True):
    """The run's writer, with the loggers ``trainer.loggers`` names (none when not ``enabled``: under
    torchrun only rank 0 logs, and a ``fast_dev_run`` writes nothing).

    TensorBoard is built here; every other name is a part's (utils/parts.py), which builds its own.
    A logger that turned itself off (TensorBoard without its package: a warning said so) is left out.
    """
    from utils import parts
    from utils.config import logger_entries

    writers = []
    for name, settings in logger_entries(config["trainer"]) if enabled else ():
        if name == "tensorboard":
            writer = TensorboardWriter(context.log_dir, purge_step=context.purge_step, logger=context.logger)
        else:
            writer = parts.provider("loggers", name)(name, settings, context)
        if writer:
            writers.append(writer)
    return writers[0] if len(writers) == 1 else Writers(writers)


class TensorboardWriter(Writer):
    """``"tensorboard"``: event files in the run's log folder, through ``torch.utils.tensorboard`` (imported here).

    Without the tensorboard package it warns and does nothing (and is false). ``purge_step``
    is given when resuming: TensorBoard then drops the events that the interrupted run wrote
    after its checkpoint, so curves continue instead of doubling.
    """

    def __init__(self, log_dir, purge_step=None, logger=None):
        self.writer = None
        self.last_step = 0  # of the newest scalar: where add_hparams puts the final values
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if logger:
                logger.warning("tensorboard is not installed: TensorBoard logging is off (pip install tensorboard)")
            return
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def __bool__(self):
        return self.writer is not None

    def add_scalar(self, tag, value, step):
        if self.writer:
            self.last_step = step
            self.writer.add_scalar(tag, value, step)

    def add_scalars(self, values, step, prefix=""):
        if self.writer:
            self.last_step = step
            for tag, value in values.items():
                self.writer.add_scalar(prefix + tag, value, step)

    def add_histogram(self, tag, values, step):
        if self.writer:
            self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def add_images(self, tag, images, step):
        if self.writer:
            images = images.detach().float().cpu()
            low = images.amin(dim=(1, 2, 3), keepdim=True)
            high = images.amax(dim=(1, 2, 3), keepdim=True)
            self.writer.add_images(tag, (images - low) / (high - low).clamp(min=1e-12), step)

    def add_hparams(self, hparams, metrics):
        """The run's one HParams record: its config and final values, with the values as scalars at the last step.

        The record is the only event file of ``<log_dir>/hparams/`` (a TensorBoard run of its own,
        ``<run>/hparams``), and each call replaces it. So a resumed run still shows one row in the
        HParams tab, with the config and values of its last segment, and no scalar twice at a step.
        The file is written under a name TensorBoard ignores, then renamed: a reader never sees half of it.
        """
        if not self.writer:
            return
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary
        from torch.utils.tensorboard.summary import scalar

        from utils.io import atomic_write

        now = time.time()
        events = [Event(wall_time=now, file_version="brain.Event:2")]
        step = self.last_step
        events += [Event(wall_time=now, step=step, summary=summary) for summary in hparams_summary(hparams, metrics)]
        events += [Event(wall_time=now, step=step, summary=scalar(tag, value)) for tag, value in metrics.items()]
        buffer = io.BytesIO()
        records = RecordWriter(buffer)
        for event in events:
            records.write(event.SerializeToString())
        folder = Path(self.writer.log_dir) / HPARAMS_FOLDER
        folder.mkdir(exist_ok=True)
        partial = folder / "record.partial"  # no "tfevents" in the name: TensorBoard does not read it
        with atomic_write(partial, "wb") as f:
            f.write(buffer.getvalue())
        name = f"events.out.tfevents.{time.time_ns():020d}.hparams"
        os.replace(partial, folder / name)
        for older in folder.glob("events.out.tfevents.*"):
            if older.name != name:
                older.unlink(missing_ok=True)

    def flush(self):
        if self.writer:
            self.writer.flush()

    def close(self):
        if self.writer:
            self.writer.close()
            self.writer = None
