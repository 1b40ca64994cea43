"""``trainer.val_every_n_steps`` and ``trainer.save_every_n_steps``: validation and a resumable ``last.pth`` every N
optimizer steps, for epochs too long to wait for.

A part (utils/parts.py): delete this file and tests/parts/test_step_schedule.py, and runs without
these keys train as before (a run still validates and saves at each epoch's end, and a signal or
``trainer.max_time`` still writes a resumable ``last.pth``). In a config::

    "trainer": {"val_every_n_steps": 500, "save_every_n_steps": 500}

Each is null or 0 (off, the default) or a number of optimizer steps.
"""

import json

from base.base_hook import Hook
from utils.config import positive_int

KEYS = ("val_every_n_steps", "save_every_n_steps")


def check(config):
    """Both keys: null or 0 (off), or a positive integer; an absent one is filled in as null."""
    problems = []
    for key in KEYS:
        value = config["trainer"].setdefault(key, None)
        if value is not None and value != 0 and positive_int(value):
            problems.append(f"trainer.{key}: got {json.dumps(value)}, expected a positive integer, or null")
    return problems


def hooks(config, parts, run):
    cfg, hooks = config["trainer"], []
    if cfg["val_every_n_steps"]:  # before the step checkpoint: last.pth then holds the validation's outcome
        hooks.append(StepValidation(cfg["val_every_n_steps"]))
    if cfg["save_every_n_steps"]:
        hooks.append(StepCheckpoint(cfg["save_every_n_steps"]))
    return hooks


class StepCheckpoint(Hook):
    """``trainer.save_every_n_steps``: a resumable ``last.pth`` every N optimizer steps (long epochs)."""

    def __init__(self, every):
        self.every = every

    def after_step(self, trainer, epoch, batch_idx):
        if trainer.global_step % self.every == 0:
            trainer.save_resumable("last.pth")


class StepValidation(Hook):
    """``trainer.val_every_n_steps``: validate every N optimizer steps, for epochs too long to wait for.

    Each validation is logged (TensorBoard ``step/val_*``), updates the monitored value, writes
    ``model_best.pth`` when it improves (a resumable checkpoint, mid-epoch like ``last.pth``),
    and counts towards ``early_stop``, which then counts validations, not epochs (checkpoints
    say so: ``"early_stop_counts": "validations"``, for the line of a resume that finds the run
    stopped early). The step that ends an epoch is left to the epoch's own validation, so no
    validation counts twice.
    """

    def __init__(self, every):
        self.every = every

    def after_step(self, trainer, epoch, batch_idx):
        if trainer.global_step % self.every or trainer.batch_in_epoch >= trainer.batches_per_epoch():
            return
        result = {f"val_{k}": v for k, v in trainer.valid_epoch(epoch).items()}  # a collective under torchrun
        trainer.forward_model.train()  # evaluate() left it in eval mode
        step, logger = trainer.global_step, trainer.logger
        if trainer.is_main:
            logger.info(f"step {step} (epoch {epoch}, batch {trainer.batch_in_epoch}): "
                        + "  ".join(f"{k} {v:.6g}" for k, v in result.items()))
            trainer.writer.add_scalars(result, step, prefix="step/")
        if trainer.monitor_key not in result:  # monitor off, or a training metric: monitored at the epoch's end
            return
        if trainer.update_monitor(result):
            trainer.best_epoch = epoch  # the epoch in progress (the update counts the completed ones)
            if trainer.is_main:
                logger.info(f"{trainer.monitor_key} improved to {trainer.monitor_best:.6g} at step {step}: saving"
                            " model_best.pth")
            trainer.save_resumable("model_best.pth")  # every process: the epoch's running sums are gathered
        if trainer.not_improved_count > trainer.early_stop:
            logger.info(f"Validation performance didn't improve for {trainer.early_stop} validations. Training stops.")
            trainer.finished = trainer.stopped_early = True

    def state_dict(self):
        return {"early_stop_counts": "validations"}
