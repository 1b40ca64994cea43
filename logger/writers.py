"""The writer interface a logger implements (:class:`Writer`), and several loggers as one (:class:`Writers`).

Imported by the logger parts and by a run that has not exactly one logger; the default run's TensorBoard
writer (logger/logger.py) implements the interface without it.

The interface (a :class:`Writer`'s methods do nothing unless a logger overrides them): ``add_scalar(tag,
value, step)`` and ``add_scalars(values, step, prefix)``, ``add_histogram`` and ``add_images`` (tensors on
the run's device), ``add_hparams(hparams, metrics)`` once, when the run (or a resumed segment) ends normally
(the config as ``{"dotted.key": value}``, and final values), ``flush()`` at each epoch's end, ``close()``;
``bool(writer)``: whether it records anything (hooks skip their pictures when not). A logger that keeps a run
of its own adds ``checkpoint_state()`` (kept in each checkpoint under ``"trackers"``, given back on resume as
``context.saved(name)``), ``run_ids()`` (for manifest.json) and ``finish(checkpoint_dir)`` (after
``add_hparams``); the run calls those only on a writer that has them.

What every logger promises: it acts only when called, at those moments (a run pays nothing per step for it);
a resumed run continues the same logger's run, and what an interrupted process logged after the checkpoint
resumed from is superseded (``context.purge_step``), so each reader sees one history with no step twice; a
logger that fails (a server gone) warns and never stops training. A logger of your own (W&B, say) is a part:
a :class:`Writer` subclass, ``writer(name, settings, context)`` returning it (``settings``: the entry's
``"args"``; ``context``: a ``logger.logger.WriterContext``), optionally ``check(config)``, and a row in
utils/parts.py's ``PARTS`` with ``loggers=("wandb",)``.
"""


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

    def flush(self):
        pass

    def close(self):
        pass


class Writers:
    """Each call of the writer interface goes to every logger. Of none, it records nothing (and is false)."""

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
