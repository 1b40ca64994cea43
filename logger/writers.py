"""Several loggers as one writer: imported only by a run that has not exactly one logger (logger/logger.py)."""


class Writers:
    """Each call of the writer interface (logger.logger.Writer) goes to every logger. Of none, it records nothing
    (and is false)."""

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

    # The optional methods of a logger with a run of its own: only on those that have them.
    def finish(self, checkpoint_dir):
        for writer in self.writers:
            if hasattr(writer, "finish"):
                writer.finish(checkpoint_dir)

    def checkpoint_state(self):
        return {name: state for writer in self.writers if hasattr(writer, "checkpoint_state")
                for name, state in writer.checkpoint_state().items()}

    def run_ids(self):
        return {name: run_id for writer in self.writers if hasattr(writer, "run_ids")
                for name, run_id in writer.run_ids().items()}

    def flush(self):
        for writer in self.writers:
            writer.flush()

    def close(self):
        for writer in self.writers:
            writer.close()
        self.writers = []
