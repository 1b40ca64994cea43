"""``trainer.model_summary``: a table of the model's layers at the start of a run, from one batch.

A part (utils/parts.py): delete this file and tests/parts/test_model_summary.py, and runs train
as before. Every run logs its parameter counts (trainable, frozen); with ``"model_summary": true``
it also logs, before the first step, a row per layer: name, type, the output shape of the first
batch, parameters and whether they train. The batch goes through the model once, in eval mode,
without gradients, and every RNG state is put back, so training is the same with or without it.
"""

import functools
import json

import torch

from base.base_hook import Hook
from base.base_task import to_device

from base.base_trainer import rng_state, set_rng_state


def check(config):
    value = config["trainer"]["model_summary"]
    return [] if isinstance(value, bool) else [f"trainer.model_summary: got {json.dumps(value)}, expected true or false"]


def hooks(config, parts, run):
    return [ModelSummary()] if run.dist.is_main else []


class ModelSummary(Hook):
    """Logs :func:`summary_lines` of the first batch once training starts (of a run, or of a resume)."""

    def training(self, trainer):
        try:
            loader = trainer.valid_data_loader or trainer.data_loader
            loader.set_epoch(1, 0)  # the first epoch's first batch
            batch = to_device(next(iter(loader)), trainer.device)
            lines = summary_lines(trainer.model, *(trainer.task.inputs(batch) if trainer.task else batch[:-1]))
        except Exception as err:  # a summary must never stop a run that passed the dry batch
            lines = [f"(no layer table: {type(err).__name__}: {err})"]
        trainer.logger.info("\n".join(["Layers (output shapes of one batch):", *lines]))
        return super().training(trainer)


def summary_lines(model, *inputs):
    """A table of ``model``'s layers: name, type, output shape (from one ``model(*inputs)``), parameters, trainable.

    Rows are the modules without children, and any module holding parameters of its own. The
    forward runs in eval mode without gradients and every RNG state is restored, so training
    is unaffected.
    """
    rows, shapes, handles = [], {}, []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if next(module.children(), None) is not None and not own:
            continue
        rows.append((name or "(model)", module, own))
        handles.append(module.register_forward_hook(functools.partial(_record_shape, shapes, name or "(model)")))
    saved, was_training = rng_state(), model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        set_rng_state(saved)
    table = [("layer", "type", "output shape", "parameters", "trainable")]
    for name, module, own in rows:
        count = sum(p.numel() for p in own)
        trainable = sum(p.numel() for p in own if p.requires_grad)
        flag = "-" if not count else "yes" if trainable == count else "no" if not trainable else "partly"
        table.append((name, type(module).__name__, shapes.get(name, "(not called)"), f"{count:,}", flag))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    return ["  ".join(cell.rjust(w) if i == 3 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
            for row in table]


def _record_shape(shapes, name, module, inputs, output):
    shapes.setdefault(name, _shape_of(output))  # returns None: a forward hook's return value replaces the output


def _shape_of(output):
    if isinstance(output, torch.Tensor):
        return "[" + ", ".join(map(str, output.shape)) + "]"
    if isinstance(output, (tuple, list)) and output:
        return "(" + ", ".join(_shape_of(o) for o in output) + ")"
    return type(output).__name__
