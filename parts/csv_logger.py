"""``trainer.loggers`` ``"csv"``: every value a run logs, as rows of ``metrics.csv`` in its log folder.

A part (utils/parts.py): delete this file and tests/parts/test_csv_logger.py, and runs that do
not name ``"csv"`` log as before. In a config::

    "trainer": {"loggers": ["tensorboard", "csv"]}

The file is in long format, one row per value: ``step,epoch,tag,value,wall_time``, the same
columns for every run and every resume (a new tag is new rows, never a new column).
:func:`read_metrics_csv` reads it back.
"""

import csv
import os
import time
from pathlib import Path

from logger.writers import Writer


def check(config):
    """``"csv"`` takes no args."""
    return [f'trainer.loggers: csv takes no args (got {", ".join(map(str, entry["args"]))})'
            for entry in config["trainer"]["loggers"]
            if isinstance(entry, dict) and entry.get("type") == "csv" and isinstance(entry.get("args"), dict) and entry["args"]]


def writer(name, settings, context):
    epoch = context.state["epoch"] + 1 if context.state else 1
    return CsvWriter(context.log_dir, purge_step=context.purge_step, epoch=epoch, logger=context.logger)


class CsvWriter(Writer):
    """``metrics.csv`` in the run's log folder, one row per value logged.

    ``epoch`` is the epoch the step belongs to; the epoch's own values (tags ``epoch/...``)
    are logged at its last step. On resume the rows of steps at or after ``purge_step``
    (those the interrupted process wrote after the checkpoint) are removed first, so no
    step appears twice. The end of a run adds its final values (``hparam/...``) at the last step.

    Rows go through Python's file buffer and reach the disk at the end of each epoch.
    """

    COLUMNS = ["step", "epoch", "tag", "value", "wall_time"]

    def __init__(self, log_dir, purge_step=None, epoch=1, logger=None):
        self.path = Path(log_dir) / "metrics.csv"
        self.epoch = epoch
        self.last_step = 0
        if self.path.exists() and not self._same_columns():
            old = self.path.with_name("metrics.old.csv")
            os.replace(self.path, old)
            if logger:
                logger.warning(f"{self.path} had other columns: moved to {old.name}")
        if purge_step is not None and self.path.exists():
            self._drop_from(purge_step)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.file = open(self.path, "a", newline="", encoding="utf-8")
        self.rows = csv.writer(self.file, lineterminator="\n")
        if new:
            self.rows.writerow(self.COLUMNS)

    def _same_columns(self):
        with open(self.path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), self.COLUMNS) == self.COLUMNS

    def _drop_from(self, purge_step):
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        kept = [rows[0]] + [row for row in rows[1:] if row and int(row[0]) < purge_step]
        temp = self.path.with_name(self.path.name + ".tmp")
        with open(temp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\n").writerows(kept)
        os.replace(temp, self.path)  # never a half-written file, whatever kills the process

    def add_scalar(self, tag, value, step):
        self.last_step = step
        self.rows.writerow([step, self.epoch, tag, repr(float(value)), f"{time.time():.3f}"])
        if tag == "epoch/epoch":  # the last value logged for an epoch: what follows is the next one's
            self.epoch = int(value) + 1

    def add_hparams(self, hparams, metrics):
        for tag, value in metrics.items():
            self.add_scalar(tag, value, self.last_step)

    def flush(self):
        if not self.file.closed:
            self.file.flush()

    def close(self):
        self.file.close()


def read_metrics_csv(path):
    """``metrics.csv`` as a list of dicts with ``step``/``epoch`` as ints and ``value``/``wall_time`` as floats."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{"step": int(r["step"]), "epoch": int(r["epoch"]), "tag": r["tag"], "value": float(r["value"]),
                 "wall_time": float(r["wall_time"])} for r in csv.DictReader(f)]
