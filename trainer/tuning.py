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
- :func:`lr_range_test`: the exponential learning-rate range test, on copies.
"""

import contextlib
import copy
import functools
import math
import time
from pathlib import Path

import torch

from utils.errors import ConfigError, UserError
from utils.seed import rng_state, set_rng_state

# --------------------------------------------------------------------------- debug modes


def prepare(config, parts, info):
    """Refuse the combinations that cannot work, and fix the batches of ``overfit_batches``; before the dry batch.

    Raises:
        ConfigError: ``auto_accumulate`` under torchrun (see the README's "When a run misbehaves").
    """
    cfg = config["trainer"]
    if cfg["auto_accumulate"] and info is not None and info.enabled:
        raise ConfigError("trainer.auto_accumulate: not supported under torchrun yet (a process out of memory cannot"
                          " tell the others, which wait in the gradient all-reduce); lower data_loader.args.batch_size"
                          " and raise trainer.accumulate_grad_batches by the same factor instead")
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
        if tb.tb_frame.f_code.co_name == "_optimizer_step":
            return False
        tb = tb.tb_next
    return True


def shrink_batch(trainer, epoch, err):
    """Switch ``trainer`` to a smaller batch and more accumulation after ``err``; returns the batch to restart from.

    Raises:
        the error itself when it cannot be recovered from (a batch of 1, or an error in the optimizer step).
    """
    loader, config = trainer.data_loader, trainer.config
    smaller = smaller_batch(loader.batch_size)
    if smaller is None or not recoverable(err):
        trainer.logger.error("auto_accumulate: out of memory " + ("in the optimizer step, which cannot be redone"
                             if smaller is not None else "with a batch of 1 sample; nothing left to divide"))
        raise err
    old = (loader.batch_size, trainer.accumulate)
    new_batch, factor = smaller
    loader.batch_size, loader._loader = new_batch, None
    trainer.accumulate *= factor
    cfg = config["trainer"]
    config["data_loader"]["args"]["batch_size"] = new_batch
    cfg["accumulate_grad_batches"] = trainer.accumulate
    # Counts of batches are counts of the old size: scale them so an epoch holds the same samples.
    if trainer.len_epoch:
        trainer.len_epoch = cfg["len_epoch"] = trainer.len_epoch * factor
    if isinstance(trainer.train_batch_limit, int) and not isinstance(trainer.train_batch_limit, bool):
        trainer.train_batch_limit *= factor
    for key in ("fast_dev_run", "limit_train_batches"):
        if isinstance(cfg[key], int) and not isinstance(cfg[key], bool):
            cfg[key] *= factor
    trainer.optimizer.zero_grad(set_to_none=True)
    if trainer.device.type == "cuda":
        torch.cuda.empty_cache()
    event = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "epoch": epoch, "global_step": trainer.global_step,
             "batch_size": [old[0], new_batch], "accumulate_grad_batches": [old[1], trainer.accumulate]}
    trainer.batch_changes.append(event)
    trainer.logger.warning(
        f"out of memory at epoch {epoch}, step {trainer.global_step + 1} with a batch of {old[0]} per process:"
        f" continuing with batches of {new_batch} and accumulate_grad_batches {trainer.accumulate} (the same"
        f" {old[0] * old[1]} samples per process and optimizer step); the step is redone")
    if trainer.is_main and not cfg["fast_dev_run"]:
        record_in_manifest(trainer.run.checkpoint_dir, config, event)
    return trainer.batch_in_epoch * factor


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
