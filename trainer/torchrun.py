"""What setting up a run adds under torchrun (several processes); imported by ``trainer/run.py`` only then.

The processes agree on one run folder, the launch is checked for what several processes cannot do, and at the
end each process lets go of the process group in an order that cannot abort it.
"""

import gc
import sys
import traceback

from utils import dist_round
from utils.errors import ConfigError, UserError
from trainer.trainer import EpochMetric


def agree_on_run(choose, info):
    """Rank 0's ``choose()`` (the run folders) on every rank, or the same error on every rank."""
    chosen = None
    if info.is_main:
        try:
            chosen = choose()
        except UserError as err:
            chosen = str(err)
    chosen = dist_round.broadcast_object(chosen, info)
    if isinstance(chosen, str):
        raise UserError(chosen)
    return chosen


def check_launch(config, parts, info):
    """Raise a one-line ConfigError for what a run of several processes cannot do.

    ``trainer.skip_nonfinite`` would need every process to agree on each step. And an epoch metric
    (a macro F1) gathers every process's validation share, so each needs one sample: validation is
    sharded without padding (no sample counted twice), and a gather of an empty state may fail
    (torchmetrics' of a list state does).
    """
    if info.enabled and config["trainer"]["skip_nonfinite"]:
        raise ConfigError("trainer.skip_nonfinite: not supported under torchrun (every process would have to"
                          " agree on each step); leave it false there, so a non-finite loss stops the run")
    valid = parts.valid_data_loader
    epoch_metrics = [fn.__name__ for fn in parts.metric_fns if isinstance(fn, EpochMetric)]
    if not info.enabled or valid is None or not epoch_metrics:
        return
    held_out = len(valid.sampler)
    if held_out < info.world_size:
        raise ConfigError(f"data_loader.args.validation_split: {held_out} validation samples for {info.world_size}"
                          f" processes, and the epoch metrics ({', '.join(epoch_metrics)}) need at least one on every"
                          f" process; hold out at least {info.world_size} samples")


def let_go():
    """Leave the process group. The run's objects hold it (DDP's reducer does) and sit in reference cycles: left to
    the interpreter's exit, gloo's threads would be torn down with it, which can abort the process ("terminate
    called without an active exception") after a run that succeeded. So they are let go first (the caller has
    dropped its references)."""
    if sys.exc_info()[1] is not None:  # (an error's traceback holds the frames that hold them)
        traceback.clear_frames(sys.exc_info()[1].__traceback__)
    gc.collect()
    dist_round.cleanup()
