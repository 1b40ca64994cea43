"""TensorBoard logging through ``torch.utils.tensorboard``, imported only when it is on."""


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

    def add_hparams(self, hparams, metrics):
        """Record the run's hyperparameters and final metrics in the HParams tab, in this run's own event file."""
        if not self.writer:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        for summary in hparams_summary(hparams, metrics):
            self.writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value)

    def flush(self):
        if self.writer:
            self.writer.flush()

    def close(self):
        if self.writer:
            self.writer.close()
            self.writer = None
