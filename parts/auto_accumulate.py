"""Debugging and tuning a run: debug modes, the model summary, out-of-memory recovery, the learning-rate range test.

- Debug modes (``trainer.fast_dev_run``, ``overfit_batches``, ``limit_train_batches``,
  ``limit_val_batches``): :func:`prepare` fixes the batches of ``overfit_batches`` before
  the dry batch; :func:`limited` is how many batches a limit allows. ``fast_dev_run`` is
  honoured where files would be written (the Trainer's ``save``, ``open_run``,
  ``write_run_files``).
- :func:`summary_lines`: the per-layer table of a model, from one batch.
- :func:`shrink_batch`: ``trainer.auto_accumulate``. An out-of-memory error in a step's
  forward or backward divides the per-process batch by its smallest factor (2 for an even
  batch) and multiplies ``accumulate_grad_batches`` by it, so every optimizer step still
  sees the same samples; the step's window is then redone. The change goes into the run's
  config (so checkpoints, and a resume, carry the smaller batch), the log and the manifest.
- :func:`fit_batch_together`: ``auto_accumulate`` under torchrun. A process out of memory
  in a step cannot tell the others, which wait for it in the gradient all-reduce, and
  agreeing after every step would cost a collective per step. So the batch is fitted
  once, before the first step (and after a resume): a forward and backward of a full
  batch on every process without communication, one agreement, and the same switch on
  every process where any of them ran out. An out-of-memory error later in the run
  (inputs that vary in size) stops every process (:func:`stop_out_of_step`), without a
  checkpoint, saying how to resume with the smaller batch.
- :func:`lr_range_test`: the exponential learning-rate range test, on copies.
"""

import contextlib
import copy
import functools
import math
import time
from pathlib import Path

import torch

from utils.errors import UserError
from utils.seed import rng_state, set_rng_state

# The exit code of a run that out-of-memory errors stopped (under torchrun, or a batch of 1 that does not fit):
# ENOMEM's number, as a full disk exits with ENOSPC's (utils/errors.py), so a script can tell "resume with a
# smaller batch" from other failures.
EXIT_OUT_OF_MEMORY = 12

# --------------------------------------------------------------------------- debug modes


def prepare(config, parts):
    """Fix the batches of ``overfit_batches``; before the dry batch."""
    cfg = config["trainer"]
    if cfg["overfit_batches"]:
        overfit(parts, cfg["overfit_batches"])


def overfit(parts, n_batches):
    """Train on the first ``n_batches`` batches of the training split, in a fixed order, without augmentation,
    and validate on the same batches: a model that can learn at all gets them right."""
    from base.base_data_loader import EpochSampler

    loader = parts.data_loader
    indices = loader.sampler.indices[: n_batches * loader.batch_size]
    # The loader's own fields, set as split_validation() sets them: a fixed order and the eval transforms.
    loader.sampler = EpochSampler(indices, shuffle=False, seed=loader.seed)
    loader.shuffle, loader._pipeline, loader._loader = False, loader._pipelines["eval"], None
    valid = copy.copy(loader)
    valid.sampler = EpochSampler(indices, shuffle=False, seed=loader.seed, pad=False)
    valid.drop_last, valid.valid_idx, valid.start_batch = False, None, 0
    parts.valid_data_loader = valid


def limited(limit, total):
    """How many of ``total`` batches a limit allows: a count (at most ``total``), a fraction (at least 1), or None (all)."""
    if limit is None or limit is False:
        return total
    if isinstance(limit, float):
        return max(1, min(total, int(total * limit)))
    return min(int(limit), total)


def train_limit(cfg):
    """The training batches per epoch a config allows (None: all): ``fast_dev_run``'s N wins over ``limit_train_batches``."""
    fast = cfg["fast_dev_run"]
    return (1 if fast is True else fast) if fast else cfg["limit_train_batches"]


def val_limit(cfg):
    fast = cfg["fast_dev_run"]
    return (1 if fast is True else fast) if fast else cfg["limit_val_batches"]


# --------------------------------------------------------------------------- the model summary


def summary_lines(model, data):
    """A table of ``model``'s layers: name, type, output shape (from one forward of ``data``), parameters, trainable.

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
            model(data)
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


# --------------------------------------------------------------------------- out-of-memory recovery


def smaller_batch(batch_size):
    """``(new batch size, factor)``: the batch divided by its smallest factor, so that ``factor`` batches of the
    new size hold exactly the samples of one old batch; None for a batch of 1."""
    for factor in range(2, batch_size + 1):
        if batch_size % factor == 0:
            return batch_size // factor, factor
    return None


def recoverable(err):
    """Whether an out-of-memory error came from a forward or backward pass (redo the window) rather than the
    optimizer step itself (which may have changed some weights already, so the step cannot be redone)."""
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in ("optimizer_step", "after_step"):
            return False
        tb = tb.tb_next
    return True


def shrink_batch(trainer, epoch, err):
    """Switch ``trainer`` to a smaller batch and more accumulation after ``err``; returns the batch to restart from.

    Raises:
        the error itself when it cannot be recovered from (a batch of 1, or an error in the optimizer step).
    """
    loader = trainer.data_loader
    smaller = smaller_batch(loader.batch_size)
    if smaller is None or not recoverable(err):
        trainer.logger.error("auto_accumulate: out of memory " + ("in the optimizer step, which cannot be redone"
                             if smaller is not None else "with a batch of 1 sample; nothing left to divide"))
        raise err
    switch_batch(trainer, epoch, *smaller, where=f"at epoch {epoch}, step {trainer.global_step + 1}",
                 then="; the step is redone")
    return trainer.batch_in_epoch * smaller[1]


def smaller_settings(trainer, factor):
    """The config values (dotted keys) that a batch ``factor`` times smaller changes: the batch, the accumulation,
    and the counts of batches (``len_epoch``, ``limit_train_batches``, ``fast_dev_run``), so an epoch and an
    optimizer step hold the same samples as before."""
    cfg = trainer.config["trainer"]
    changed = {"data_loader.args.batch_size": trainer.data_loader.batch_size // factor,
               "trainer.accumulate_grad_batches": trainer.accumulate * factor}
    for key in ("len_epoch", "limit_train_batches", "fast_dev_run"):
        if isinstance(cfg[key], int) and not isinstance(cfg[key], bool):
            changed[f"trainer.{key}"] = cfg[key] * factor
    return changed


def switch_batch(trainer, epoch, new_batch, factor, where, then=""):
    """Divide the per-process batch by ``factor`` and multiply the accumulation by it; log the change, record it in
    the config (so checkpoints carry it), the checkpoints' ``batch_changes`` and the run's manifest."""
    loader, config = trainer.data_loader, trainer.config
    cfg = config["trainer"]
    old = (loader.batch_size, trainer.accumulate)
    for key, value in smaller_settings(trainer, factor).items():
        section, *rest = key.split(".")
        node = config[section]
        for part in rest[:-1]:
            node = node[part]
        node[rest[-1]] = value
    loader.batch_size, loader._loader = new_batch, None
    trainer.accumulate = cfg["accumulate_grad_batches"]
    # Counts of batches are counts of the old size: scaled so an epoch holds the same samples.
    if trainer.len_epoch:
        trainer.len_epoch = cfg["len_epoch"]
    if isinstance(trainer.train_batch_limit, int) and not isinstance(trainer.train_batch_limit, bool):
        trainer.train_batch_limit *= factor
    trainer.optimizer.zero_grad(set_to_none=True)
    if trainer.device.type == "cuda":
        torch.cuda.empty_cache()
    event = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "epoch": epoch, "global_step": trainer.global_step,
             "batch_size": [old[0], new_batch], "accumulate_grad_batches": [old[1], trainer.accumulate]}
    trainer.batch_changes.append(event)
    if trainer.is_main:  # (under torchrun every process switches; one line says so)
        trainer.logger.warning(
            f"out of memory {where} with a batch of {old[0]} per process: continuing with batches of {new_batch}"
            f" and accumulate_grad_batches {trainer.accumulate} (the same {old[0] * old[1]} samples per process and"
            f" optimizer step){then}")
    if trainer.is_main and not cfg["fast_dev_run"]:
        record_in_manifest(trainer.run.checkpoint_dir, config, event)
    return event


# --------------------------------------------------------------------------- out-of-memory recovery under torchrun


def fit_batch_together(trainer):
    """``auto_accumulate`` under torchrun: before the first step (of a run, or of a resume), a batch every process fits.

    Every process runs a forward and backward of one full batch (:func:`out_of_memory_in_probe`: no
    communication, and nothing it touches changes the run), then they agree in one small
    collective whether any of them ran out of memory; if so, all switch to the smaller batch
    (:func:`switch_batch`, recorded as a switch in a step is) and try again.

    Raises:
        RunStopped: (every process, exit code 12) a batch of 1 sample does not fit.
    """
    from base.base_trainer import RunStopped
    from utils import dist

    epoch, loader = trainer.epoch + 1, trainer.data_loader
    rank, world_size = trainer.run.dist.rank, trainer.world_size
    while True:
        failed = out_of_memory_in_probe(trainer, epoch)
        if trainer.device.type == "cuda":
            torch.cuda.empty_cache()  # (the probe's tensors are gone with its frame)
        short = [r for r, flag in enumerate(dist.max_over_ranks(*(failed and r == rank for r in range(world_size))))
                 if flag]
        if not short:
            return
        which = f"process{'es' if len(short) > 1 else ''} {', '.join(map(str, short))} of {world_size}"
        smaller = smaller_batch(loader.batch_size)
        if smaller is None:
            message = (f"auto_accumulate: out of memory on {which} with a batch of 1 sample per process, in the memory"
                       " check before the first step; nothing left to divide: the model does not fit this device's"
                       " memory (use a smaller model, trainer.amp, or devices with more memory)")
            if trainer.is_main:
                trainer.logger.error(message)
            raise RunStopped(message, exit_code=EXIT_OUT_OF_MEMORY, logged=True)  # every process, at the same point
        switch_batch(trainer, epoch, *smaller,
                     where=f"on {which} in the memory check before epoch {epoch}, step {trainer.global_step + 1}",
                     then=" on every process")
        trainer.batch_in_epoch *= smaller[1]  # a mid-epoch resume: the same samples done, in batches of the new size


def out_of_memory_in_probe(trainer, epoch):
    """Whether one forward and backward of a full batch of ``epoch`` (its first) runs out of memory here.

    Under DDP's ``no_sync`` (no gradient all-reduce: a process out of memory leaves no other
    waiting). On an accelerator, memory for the optimizer's state is held meanwhile when the
    optimizer has none yet (a fresh run: it is made at the first step, and the steps after it
    run beside it). Everything the probe touches is put back: every RNG state, the buffers
    (batch-norm statistics), the gradients (None, as at the start of a step), the data order.
    """
    model, loader, device = trainer.model, trainer.data_loader, trainer.device
    saved_rng = rng_state()
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        loader.set_epoch(epoch, 0)  # (every epoch sets its own order and start again: trainer._batches)
        iterator = iter(loader)
        data, target = next(iterator)
        del iterator  # frees non-persistent workers now
        data, target = data.to(device), target.to(device)
        reserve = None
        if device.type != "cpu" and (size := optimizer_state_bytes(trainer.optimizer)):
            reserve = torch.empty(size, dtype=torch.uint8, device=device)
        with trainer.no_sync(False), trainer.autocast:
            loss = trainer.criterion(trainer.forward_model(data), target)
        with trainer.no_sync(False):
            loss.backward()
        del reserve
        return False
    except torch.OutOfMemoryError:
        return True
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for live, saved in buffers:
                live.copy_(saved)
        set_rng_state(saved_rng)


def optimizer_state_bytes(optimizer):
    """The bytes of the state ``optimizer`` makes at its first step (momentum, Adam's two moments); 0 when it has
    state already or the amount cannot be told.

    Found by stepping an optimizer of the same type and settings over stand-ins on the meta device:
    no memory, no computation, and the real optimizer (and any hook on it) sees nothing.
    """
    if optimizer.state:
        return 0
    skip = ("params", "initial_lr", "fused", "foreach", "capturable", "differentiable")
    groups = []
    for group in optimizer.param_groups:
        stand_ins = []
        for p in group["params"]:
            stand_in = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            if p.requires_grad:  # (a frozen parameter gets no gradient, so no state)
                stand_in.grad = torch.empty_like(stand_in)
            stand_ins.append(stand_in)
        groups.append({**{k: v for k, v in group.items() if k not in skip}, "params": stand_ins})
    try:
        trial = type(optimizer)(groups)
        with torch.no_grad():
            trial.step()
    except Exception:  # an optimizer that cannot run on stand-ins: the probe goes without the reserve
        return 0
    return sum(t.numel() * t.element_size() for state in trial.state.values() for t in state.values()
               if isinstance(t, torch.Tensor) and t.device.type == "meta")


def stop_out_of_step(trainer, epoch, err):
    """The :class:`RunStopped` for an error in a step under torchrun with ``auto_accumulate``, or None (re-raise it).

    An out-of-memory error here (the memory check before the first step passed: inputs that vary
    in size, say) leaves this process out of step with the others, which wait for it in the
    gradient all-reduce: they cannot switch to a smaller batch together, and no checkpoint of
    this moment would be consistent. This process leaves its message for the others
    (:func:`utils.dist.tell_others`) and stops alone, without saving; the others stop when their
    next collective fails (this function again, with that error: they find the message). The
    message says how to resume from the newest checkpoint with the smaller batch.
    """
    from base.base_trainer import RunStopped
    from utils import dist

    if not isinstance(err, torch.OutOfMemoryError):
        told = dist.told_by_others()
        if told is None:
            return None
        message = f"another process stopped: {told}"
    else:
        rank, batch = trainer.run.dist.rank, trainer.data_loader.batch_size
        where = f"out of memory on process {rank} at epoch {epoch}, step {trainer.global_step + 1}, with a batch of {batch}"
        smaller = smaller_batch(batch)
        if not recoverable(err):
            message = (f"{where}, in the optimizer step: the optimizer's state does not fit, and a smaller batch would"
                       " not change that; stopping every process without saving")
        elif smaller is None:
            message = f"{where}: nothing left to divide; stopping every process without saving"
        else:
            message = (f"{where}, after the memory check at the start passed (do the batches vary in size?). Under"
                       " torchrun the processes cannot switch to a smaller batch in the middle of a run (the others"
                       " wait in the gradient all-reduce), so every process stops without saving. "
                       + resume_advice(trainer, smaller[1]))
        dist.tell_others(message)
        dist.stop_the_launch(message)  # a torchrun restart would resume the same checkpoint and run out again
    trainer.logger.error(message)
    return RunStopped(message, exit_code=EXIT_OUT_OF_MEMORY, logged=True, together=False)


def resume_advice(trainer, factor):
    """How to continue with a batch ``factor`` times smaller: the command that resumes the newest checkpoint (a
    mid-epoch one too: a batch split is the one data change a mid-epoch resume takes, utils.resume.batch_split)."""
    settings = " ".join(f"{k}={v}" for k, v in smaller_settings(trainer, factor).items())
    checkpoint = newest_checkpoint(trainer.run.checkpoint_dir)
    if checkpoint is None:
        return f"Start the run again with {settings}"
    return f"Resume with the smaller batch: python train.py -r {checkpoint} {settings}"


def newest_checkpoint(folder):
    """The checkpoint of ``folder`` with the most steps (as ``-r auto`` ranks them), or None."""
    from utils.resume import newest_first

    ranked, _ = newest_first(folder)
    return ranked[0] if ranked else None


def record_in_manifest(folder, config, event):
    """Add a batch change to the run's ``manifest.json`` (and its config) and ``config.json``."""
    import json

    from utils.io import write_json

    path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    manifest["config"] = config
    manifest.setdefault("batch_changes", []).append(event)
    write_json(path, manifest)
    write_json(Path(folder) / "config.json", config)


# --------------------------------------------------------------------------- the learning-rate range test


def lr_range_test(model, optimizer, criterion, loader, device, min_lr=1e-7, max_lr=10.0, steps=100,
                  smoothing=0.98, diverge=4.0, autocast=None):
    """The exponential learning-rate range test (Smith, 2017) on copies of ``model`` and ``optimizer``.

    Trains ``steps`` batches with the learning rate rising geometrically from ``min_lr`` to
    ``max_lr`` (every parameter group scaled alike, keeping their ratios), recording the
    smoothed loss, and stops early once it exceeds ``diverge`` times its lowest value. The
    model, optimizer and RNG states the caller holds are left exactly as they were.

    Returns:
        ``(lrs, losses, suggestion)``: the learning rates tried, the smoothed losses, and the
        learning rate where the loss fell fastest (the steepest negative slope against log lr),
        or None when too few steps ran to tell.
    """
    if not 0 < min_lr < max_lr:
        raise UserError(f"the range test needs 0 < min_lr < max_lr, got {min_lr} and {max_lr}")
    model_copy, opt_copy = copy.deepcopy((model, optimizer))  # one deepcopy: the copy's optimizer holds the copy's weights
    saved_rng = rng_state()
    base = [group["lr"] for group in opt_copy.param_groups]
    ratios = [lr / base[0] if base[0] else 1.0 for lr in base]
    autocast = autocast or contextlib.nullcontext()
    lrs, losses, best, average = [], [], math.inf, 0.0
    model_copy.train()
    try:
        batches = _cycle(loader)
        for i in range(steps):
            lr = min_lr * (max_lr / min_lr) ** (i / max(steps - 1, 1))
            for group, ratio in zip(opt_copy.param_groups, ratios):
                group["lr"] = lr * ratio
            data, target = next(batches)
            data, target = data.to(device), target.to(device)
            opt_copy.zero_grad(set_to_none=True)
            with autocast:
                loss = criterion(model_copy(data), target)
            value = loss.item()
            if not math.isfinite(value):
                break
            loss.backward()
            opt_copy.step()
            average = smoothing * average + (1 - smoothing) * value
            smoothed = average / (1 - smoothing ** (i + 1))  # the running mean without its bias towards 0
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            if smoothed > diverge * best:
                break
    finally:
        set_rng_state(saved_rng)
    return lrs, losses, suggest(lrs, losses)


def _cycle(loader):
    epoch = 1
    while True:
        loader.set_epoch(epoch, 0)
        yield from loader
        epoch += 1


def suggest(lrs, losses, skip_begin=10, skip_end=1):
    """The learning rate where the smoothed loss falls fastest against log(lr); None with fewer than 3 points left."""
    points = list(zip(lrs, losses))[skip_begin: len(lrs) - skip_end]
    if len(points) < 3:
        return None
    x = [math.log(lr) for lr, _ in points]
    y = [loss for _, loss in points]
    slopes = [(y[i + 1] - y[i - 1]) / (x[i + 1] - x[i - 1]) for i in range(1, len(points) - 1)]
    return points[1 + min(range(len(slopes)), key=slopes.__getitem__)][0]


def plot_png(path, lrs, losses, suggestion=None, title="learning-rate range test"):
    """Write a line plot of ``losses`` against ``lrs`` (log scale) to ``path`` with Pillow; a dot marks ``suggestion``."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 720, 440, 70, 20, 36, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 10), title, fill="black")
    x0, x1 = math.log10(min(lrs)), math.log10(max(lrs))
    shown = sorted(losses)[: max(1, int(len(losses) * 0.98))]  # the divergence at the end would flatten the rest
    y0, y1 = min(losses), max(shown) if len(shown) > 1 else max(losses)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def at(lr, loss):
        px = left + (math.log10(lr) - x0) / (x1 - x0) * (width - left - right)
        py = top + (1 - (min(loss, y1) - y0) / (y1 - y0)) * (height - top - bottom)
        return px, py

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for decade in range(math.ceil(x0), math.floor(x1) + 1):
        px = at(10.0 ** decade, y0)[0]
        draw.line([px, height - bottom, px, height - bottom + 5], fill="black")
        draw.text((px - 14, height - bottom + 8), f"1e{decade}", fill="black")
    for k in range(5):
        loss = y0 + (y1 - y0) * k / 4
        py = at(10.0 ** x0, loss)[1]
        draw.line([left - 5, py, left, py], fill="black")
        draw.text((4, py - 6), f"{loss:.4g}", fill="black")
    draw.text((width // 2 - 60, height - 18), "learning rate (log scale)", fill="black")
    if len(lrs) > 1:
        draw.line([at(lr, loss) for lr, loss in zip(lrs, losses)], fill=(31, 119, 180), width=2)
    if suggestion is not None:
        px, py = at(suggestion, losses[lrs.index(suggestion)])
        draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=(214, 39, 40))
        draw.text((px + 8, py - 16), f"suggested {suggestion:.3g}", fill=(214, 39, 40))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
