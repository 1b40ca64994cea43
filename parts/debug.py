"""Debug modes for a run that misbehaves: ``trainer.fast_dev_run``, ``overfit_batches``, ``limit_train_batches``,
``limit_val_batches`` and ``detect_anomaly``, each checked here and honoured through the core's own knobs.

A part (utils/parts.py): delete this file and tests/parts/test_debug.py, and runs without these keys
train as before (the shortcuts ``--fast-dev-run``, ``--overfit-batches`` and ``--detect-anomaly``
then get the line saying the part is gone). In a config::

    "trainer": {"fast_dev_run": 3}             one epoch of 3 training and 3 validation batches, nothing written
    "trainer": {"overfit_batches": 2}          train and validate on the same 2 batches, unshuffled, unaugmented
    "trainer": {"limit_train_batches": 0.25}   epochs of a quarter of a pass over the data (or a count: 20)
    "trainer": {"limit_val_batches": 5}        validate on the first 5 batches (or a fraction)
    "trainer": {"detect_anomaly": true}        name the backward operation that made a NaN, and its forward line

The core has one knob for the batches of an epoch, ``trainer.len_epoch`` (``Trainer.len_epoch``);
``limit_train_batches`` is another way to give it, resolved here (:func:`train_batches`) and
nowhere else, as ``fast_dev_run``'s N is. Validation's is ``Trainer.val_batch_limit``. A dry
run (``fast_dev_run``) is the core's ``Run.writes`` False: no folder, checkpoint, log file or
event, and the log says what would have been written.
"""

import contextlib
import json

import torch

from base.base_hook import Hook
from base.splits import fix_to
from utils.config import boolean, non_negative_int
from utils.config_extra import optional

# The keys whose change in the middle of an epoch would change which sample comes next (see utils/resume.py), and
# the counts of batches that a batch split scales.
FIXED_MID_EPOCH = ("trainer.limit_train_batches",)
BATCH_COUNTS = ("trainer.limit_train_batches", "trainer.fast_dev_run")


def _count(v):
    return isinstance(v, int) and not isinstance(v, bool)


def batch_limit(v):
    ok = (_count(v) and v > 0) or (isinstance(v, float) and 0 < v <= 1)
    return None if ok else "a number of batches (an integer > 0) or a fraction of them in (0, 1]"


def true_or_count(v):
    return None if isinstance(v, bool) or (_count(v) and v >= 0) else "true, false or a number of batches (an integer >= 0)"


CHECKS = {"fast_dev_run": true_or_count, "overfit_batches": non_negative_int,
          "limit_train_batches": optional(batch_limit), "limit_val_batches": optional(batch_limit),
          "detect_anomaly": boolean}


def check(config):
    """Each key's value; ``overfit_batches`` with ``limit_train_batches`` is refused (both pick the batches)."""
    cfg = config["trainer"]
    problems = [f"trainer.{key}: got {json.dumps(cfg[key])}, expected {wanted}"
                for key, check_value in CHECKS.items() if key in cfg and (wanted := check_value(cfg[key]))]
    if not problems and cfg.get("overfit_batches") and cfg.get("limit_train_batches") is not None:
        problems.append("trainer.limit_train_batches: set together with trainer.overfit_batches, which picks the"
                        " training batches itself; leave one of them")
    return problems


def writes(config):
    """A ``fast_dev_run`` writes nothing."""
    return not config["trainer"].get("fast_dev_run")


def prepare(config, parts):
    """Fix the batches of ``overfit_batches``; before the dry batch."""
    if config["trainer"].get("overfit_batches"):
        overfit(parts, config["trainer"]["overfit_batches"])


def hooks(config, parts, run):
    return [DebugModes(config["trainer"])]


def overfit(parts, n_batches):
    """Train on the first ``n_batches`` batches of the training split, in a fixed order, without augmentation,
    and validate on the same batches: a model that can learn at all gets them right."""
    loader = parts.data_loader
    parts.valid_data_loader = fix_to(loader, loader.sampler.indices[: n_batches * loader.batch_size])


def limited(limit, total):
    """How many of ``total`` batches a limit allows: a count (at most ``total``), a fraction (at least 1), or None (all)."""
    if limit is None or limit is False:
        return total
    if isinstance(limit, float):
        return max(1, min(total, int(total * limit)))
    return min(int(limit), total)


def _fast(cfg):
    fast = cfg.get("fast_dev_run")
    return 1 if fast is True else fast or None


def train_batches(cfg, loader):
    """The batches of an epoch (``Trainer.len_epoch``) that ``cfg`` asks for, or None (the core's ``len_epoch``
    stands): ``fast_dev_run``'s N, else ``limit_train_batches`` of ``len_epoch`` or one pass over ``loader``."""
    limit = _fast(cfg) or cfg.get("limit_train_batches")
    return None if limit is None else limited(limit, cfg["len_epoch"] or len(loader))


class DebugModes(Hook):
    """The keys above, at their moments: anomaly mode around training, the batch counts before each epoch."""

    def __init__(self, cfg):
        self.fast = _fast(cfg)
        self.val_limit = self.fast or cfg.get("limit_val_batches")
        self.anomaly = cfg.get("detect_anomaly")

    def training(self, trainer):
        if self.fast:
            trainer.epochs = trainer.epoch + 1  # one epoch: the first, or the one a resume continues
            trainer.logger.info(f"fast_dev_run: {self.fast} training and {self.fast} validation batches, one"
                                " epoch; nothing is written")
        if self.val_limit and trainer.valid_data_loader is not None:
            trainer.val_batch_limit = limited(self.val_limit, len(trainer.valid_data_loader))
        # Anomaly mode: a backward pass that produces NaN raises, naming the operation and where its forward ran.
        return torch.autograd.set_detect_anomaly(True) if self.anomaly else contextlib.nullcontext()

    def before_epoch(self, trainer, epoch):
        # From the config each epoch: after a batch split (auto_accumulate) its counts are of the new batches.
        count = train_batches(trainer.config["trainer"], trainer.data_loader)
        if count is not None:
            trainer.len_epoch = count
