"""TensorBoard logging through ``torch.utils.tensorboard``, imported only when it is on."""

import io
import os
import time
from pathlib import Path

HPARAMS_FOLDER = "hparams"  # <log_dir>/hparams/: the run's one HParams record (TensorboardWriter.add_hparams)


class TensorboardWriter:
    """A ``SummaryWriter`` for the run's log folder, or a writer that does nothing.

    ``purge_step`` is given when resuming: TensorBoard then drops the events that the
    interrupted run wrote after its checkpoint, so curves continue instead of doubling.
    """

    def __init__(self, log_dir, enabled=True, purge_step=None, logger=None):
        self.writer = None
        if not enabled:
            return
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
            self.writer.add_scalar(tag, value, step)

    def add_scalars(self, values, step, prefix=""):
        if self.writer:
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

    def add_hparams(self, hparams, metrics, step=0):
        """The run's one HParams record: its config and final values, with the values as scalars at ``step``.

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
