"""The moments of a run at which optional behaviour acts (:class:`Hook`), and what a hook may use of the Trainer.

Imported only by a run that has hooks (a part's, a freezing schedule, histograms): a default run has none.
"""

import contextlib


class Hook:
    """Optional behaviour at a fixed moment of a run; every moment does nothing unless overridden.

    A part returns hooks from its ``hooks()`` (utils/parts.py). A hook may use the trainer's public attributes and
    methods: ``global_step``, ``batch_in_epoch``, ``batches_per_epoch()``, ``valid_epoch(epoch)``, ``step(model,
    batch, criterion)`` and ``criterion`` (the step's forward and loss), ``update_monitor(result)``,
    ``save_resumable(name)`` (a mid-epoch checkpoint), ``end_run(reason)`` and ``finished``, ``ask_to_stop(exit_code,
    why)``, ``no_sync(last)``, ``autocast``, ``train_metrics``, ``epoch_metrics``; it may set ``epochs``,
    ``len_epoch`` (None: one pass over the data), ``val_batch_limit`` (None: all), ``accumulate`` and ``params``
    (what is clipped). ``trainer.run.writes`` is False in a dry run.
    """

    def training(self, trainer):
        """A context manager around the whole of training, its checkpoint restored (anomaly mode, say)."""
        return contextlib.nullcontext()

    def before_epoch(self, trainer, epoch):
        """Before the epoch's first batch (a freezing schedule)."""

    def after_step(self, trainer, epoch, batch_idx):
        """After each optimizer step. Only hooks overriding it are called, so a run without them pays nothing per
        step; it must take negligible time unless it acts."""

    def on_train_error(self, trainer, epoch, error):
        """An exception left the epoch's steps. None lets it propagate; a hook that can recover returns a function,
        called once the failed step's frames (and tensors) are gone, returning the batch to redo the epoch from."""
        return None

    def after_train_epoch(self, trainer, epoch, last_inputs):
        """After the epoch's last step, before validation; ``last_inputs``: the model's inputs of the last batch (a
        tuple: ``model(*last_inputs)``), None when the epoch had no batch."""

    def validating(self, trainer):
        """A context manager around each validation (an EMA scores its averaged weights inside it)."""
        return contextlib.nullcontext()

    def after_validation(self, trainer, epoch, result):
        """After each validation, before its values (no ``val_`` prefix) are used: a part's metric of
        ``Parts.valid_metric_fns`` is taken out here (the confusion matrix)."""

    def after_epoch(self, trainer, epoch, result):
        """After validation and the monitor's update, before the epoch's checkpoints (``val_*`` in ``result``)."""

    def state_dict(self):
        """The top-level keys this hook adds to a checkpoint."""
        return {}

    def load_state_dict(self, trainer, state):
        """Restore them; runs before the model and optimizer are, as a hook may change the parameter groups."""
