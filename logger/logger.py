"""A run's console and file logging, and the writer its numbers go to (TensorBoard, and the logger parts).

Both are set up by ``trainer.run.open_run``. ``trainer.loggers`` names the run's loggers: ``"tensorboard"``
(here) and the parts'; :func:`open_writer` hands the run one writer (``run.writer``). The writer interface
and how to add a logger: logger/writers.py.
"""

import io
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HPARAMS_FOLDER = "hparams"  # <log_dir>/hparams/: the run's one HParams record (TensorboardWriter.add_hparams)
RESULT = logging.INFO + 5  # the end block's level: shown at every verbosity, even 0


def setup_logging(log_dir=None, verbosity=2, name="train"):
    """Log to the console at ``verbosity`` (0: warnings and the end block, :data:`RESULT`; 1 and 2: also the start and
    a line per epoch; 3: also DEBUG, every value and the step lines) and, when ``log_dir`` is given, everything to
    ``log_dir/info.log``. Calling it again (a second run in one process, as the tests do) replaces the handlers."""
    close_logging(name)
    logging.addLevelName(RESULT, "RESULT")
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    console = _ConsoleHandler(sys.stdout)
    console.setLevel({0: RESULT, 1: logging.INFO, 2: logging.INFO, 3: logging.DEBUG}[verbosity])
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if log_dir is not None:
        file = logging.FileHandler(f"{log_dir}/info.log", encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file)
    return logger


def close_logging(name="train"):
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


class _ConsoleHandler(logging.StreamHandler):
    """Writes through tqdm, which lifts an active progress bar off the line and redraws it below the message."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RuntimeError:  # "reentrant call": a signal handler's line while this thread was writing one
            try:
                os.write(self.stream.fileno(), f"{self.format(record)}\n".encode())
            except (OSError, ValueError):
                pass
        except BrokenPipeError:  # the reader went away (train.py | head): the rest is in info.log
            self.setLevel(logging.CRITICAL + 1)
        except Exception:
            self.handleError(record)


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
    """The run's writer, with the loggers ``trainer.loggers`` names (none when not ``enabled``: under torchrun only
    rank 0 logs, and a ``fast_dev_run`` writes nothing). A logger that is off (TensorBoard without its package:
    a warning says so, or a part's writer that is false) is left out."""
    from utils import parts
    from utils.config import logger_entries

    writers = []
    for name, settings in logger_entries(config["trainer"]) if enabled else ():
        if name != "tensorboard":
            writer = parts.provider("loggers", name)(name, settings, context)
        else:
            try:
                writer = TensorboardWriter(context.log_dir, purge_step=context.purge_step)
            except ImportError:
                if context.logger:
                    context.logger.warning("tensorboard is not installed: TensorBoard logging is off"
                                           " (pip install tensorboard)")
                continue
        if writer:
            writers.append(writer)
    if len(writers) == 1:
        return writers[0]
    from logger.writers import Writers

    return Writers(writers)


class TensorboardWriter:
    """``"tensorboard"``: event files in the run's log folder, through ``torch.utils.tensorboard`` (ImportError
    without the tensorboard package); the writer interface of logger/writers.py. ``purge_step`` (resuming):
    TensorBoard drops the events the interrupted run wrote after its checkpoint."""

    def __init__(self, log_dir, purge_step=None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        self.last_step = 0  # of the newest scalar: where add_hparams puts the final values

    def add_scalar(self, tag, value, step):
        self.last_step = step
        self.writer.add_scalar(tag, value, step)

    def add_scalars(self, values, step, prefix=""):
        self.last_step = step
        for tag, value in values.items():
            self.writer.add_scalar(prefix + tag, value, step)

    def add_histogram(self, tag, values, step):
        self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def add_images(self, tag, images, step):
        images = images.detach().float().cpu()  # each image scaled to [0, 1] on its own
        low, high = images.amin(dim=(1, 2, 3), keepdim=True), images.amax(dim=(1, 2, 3), keepdim=True)
        self.writer.add_images(tag, (images - low) / (high - low).clamp(min=1e-12), step)

    def add_hparams(self, hparams, metrics):
        """The run's one HParams record, its config and final values (also as scalars at the last step): the only
        event file of ``<log_dir>/hparams/`` (a TensorBoard run of its own), replaced at each call, so a resumed
        run still shows one row. Written under a name TensorBoard ignores, then renamed: never read half-written."""
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary
        from torch.utils.tensorboard.summary import scalar

        from utils.io import atomic_write

        now, buffer = time.time(), io.BytesIO()
        summaries = [*hparams_summary(hparams, metrics), *(scalar(tag, value) for tag, value in metrics.items())]
        records = RecordWriter(buffer)
        for event in [Event(wall_time=now, file_version="brain.Event:2"),
                      *(Event(wall_time=now, step=self.last_step, summary=summary) for summary in summaries)]:
            records.write(event.SerializeToString())
        folder = Path(self.writer.log_dir) / HPARAMS_FOLDER
        folder.mkdir(exist_ok=True)
        with atomic_write(folder / "record.partial", "wb") as f:  # no "tfevents" in the name: TensorBoard skips it
            f.write(buffer.getvalue())
        name = f"events.out.tfevents.{time.time_ns():020d}.hparams"
        os.replace(folder / "record.partial", folder / name)
        for older in folder.glob("events.out.tfevents.*"):
            if older.name != name:
                older.unlink(missing_ok=True)

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()  # (closing again does nothing)
