"""The dry batch: one batch through model, loss and metrics before a run writes anything.

Config checks catch typos; mistakes that only show once data meets the model (an RGB
model on grayscale data, 5 output classes for 10 labels, 8x8 images into a network built
for 28x28, logits fed to ``nll_loss``) would otherwise surface as a torch traceback after
the run folder exists. :func:`dry_batch` runs the first batch in eval mode without a
gradient step and turns each such failure into one line naming the shapes and the likely
fix. It draws no random numbers that training would see: every RNG state is restored.
"""

import contextlib
import warnings

import torch

from utils.errors import ConfigError, UserError
from trainer.trainer import EpochMetric
from utils.seed import rng_state, set_rng_state


def dry_batch(config, parts):
    """Raise a one-line :class:`UserError` if the config's data, model, loss and metrics do not fit together.

    Uses the validation loader when there is one (no augmentation), else the training loader.
    """
    loader = parts.data_loader
    if len(loader) == 0:
        args = config["data_loader"]["args"]
        raise UserError(f"data_loader: an epoch has 0 batches ({len(loader.sampler)} training samples, batch_size"
                        f" {loader.batch_size}, drop_last {args.get('drop_last', False)}); lower batch_size or set"
                        " drop_last false")
    source = parts.valid_data_loader or loader
    saved_rng = rng_state()
    model = parts.model
    was_training = model.training
    try:
        data, target = first_batch(source)
        data, target = data.to(parts.device), target.to(parts.device)
        model.eval()
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config["trainer"]["amp"])
        autocast = torch.autocast(parts.device.type, dtype=amp) if amp else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            output = _forward(model, data, config)
            _check_output(output, target, config)
            loss = _loss(parts.criterion, output, target, config)
            _check_loss(loss, output, config)
            for fn in [*parts.metric_fns, *parts.valid_metric_fns]:
                _metric(fn, output, target, parts.device)
    finally:
        model.train(was_training)
        set_rng_state(saved_rng)


# Optimizers this loop cannot drive: it calls step() without a closure, on dense gradients.
UNSUPPORTED_OPTIMIZERS = {
    "LBFGS": "needs a closure that re-evaluates the loss several times per step, which this loop does not run",
    "SparseAdam": "needs sparse gradients (nn.Embedding(sparse=True)); the models here give dense ones",
}


def check_shards(parts, info):
    """Under torchrun, an epoch metric (a macro F1) gathers every process's validation share, so each needs one sample.

    Validation is sharded without padding (no sample counted twice): with fewer held-out
    samples than processes, some process would hold none, and a gather of an empty state
    may fail (torchmetrics' of a list state does). One line instead, before anything is written.
    """
    valid = parts.valid_data_loader
    epoch_metrics = [fn.__name__ for fn in parts.metric_fns if isinstance(fn, EpochMetric)]
    if not info.enabled or valid is None or not epoch_metrics:
        return
    held_out = len(valid.sampler)
    if held_out < info.world_size:
        raise ConfigError(f"data_loader.args.validation_split: {held_out} validation samples for {info.world_size}"
                          f" processes, and the epoch metrics ({', '.join(epoch_metrics)}) need at least one on every"
                          f" process; hold out at least {info.world_size} samples")


def check_plan(config, parts):
    """Raise a one-line ConfigError for an optimizer or scheduler that would fail later in the run.

    Each is built already; what is left is what only shows when it runs: the optimizer
    type's needs, a scheduler stepped per step that needs a metric, a one-cycle schedule
    shorter than the run, and a scheduler that fails on its first steps (tried on a copy
    over one stand-in parameter, so the real optimizer is untouched).
    """
    opt_type = config["optimizer"]["type"]
    if opt_type in UNSUPPORTED_OPTIMIZERS:
        raise ConfigError(f"optimizer.type: {opt_type} {UNSUPPORTED_OPTIMIZERS[opt_type]}; use SGD, Adam or AdamW")
    section = config.get("lr_scheduler")
    scheduler = parts.lr_scheduler
    if not section or scheduler is None:
        return
    kind, interval = section["type"], section["interval"]
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and interval == "step":
        raise ConfigError('lr_scheduler.interval: ReduceLROnPlateau steps on a validation metric, once per epoch;'
                          ' use "interval": "epoch"')
    planned = planned_scheduler_steps(config, parts.data_loader)
    total = getattr(scheduler, "total_steps", None)
    if isinstance(total, int) and planned > total:
        unit = "optimizer steps" if interval == "step" else "epochs"
        raise ConfigError(f"lr_scheduler.args: {kind} has total_steps {total}, but the run takes {planned} {unit};"
                          f" set total_steps to {planned} (or epochs and steps_per_epoch to match)")
    from trainer import build

    try:  # the same optimizer type and groups, over stand-in parameters
        skip = ("params", "initial_lr", "fused", "foreach", "capturable", "differentiable")
        groups = [{**{k: v for k, v in g.items() if k not in skip}, "params": [torch.nn.Parameter(torch.zeros(1))]}
                  for g in parts.optimizer.param_groups]
        trial = type(parts.optimizer)(groups)
    except Exception:  # an optimizer that cannot be rebuilt this way: the run itself will show any problem
        return
    try:
        trial_scheduler = build.build_scheduler(trial, config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "lr_scheduler.step() before optimizer.step()": on purpose
            for _ in range(min(3, planned)):  # no trial.step(): optimizer hooks others registered must not see it
                if isinstance(trial_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    trial_scheduler.step(1.0)
                else:
                    trial_scheduler.step()
    except (ArithmeticError, TypeError, ValueError, RuntimeError, IndexError, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"lr_scheduler.args: {kind} fails when it steps ({type(err).__name__}: {reason});"
                          " check its arguments") from None


def planned_scheduler_steps(config, loader):
    """How often the scheduler steps in the whole run: optimizer steps for ``interval: step``, else epochs."""
    cfg = config["trainer"]
    if config["lr_scheduler"]["interval"] != "step":
        return cfg["epochs"]
    batches = cfg["len_epoch"] or len(loader)
    per_epoch = -(-batches // cfg["accumulate_grad_batches"])
    steps = cfg["epochs"] * per_epoch
    return min(steps, cfg["max_steps"]) if cfg["max_steps"] else steps


def first_batch(loader):
    """The first batch of ``loader``'s first epoch."""
    loader.set_epoch(1, 0)
    iterator = iter(loader)
    try:
        return next(iterator)
    finally:
        del iterator  # frees non-persistent workers now


def _shape(t):
    return f"[{', '.join(map(str, t.shape))}] ({str(t.dtype).replace('torch.', '')})"


def _first_layer(model):
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.modules.conv._ConvNd, torch.nn.Linear)):
            return name, module
    return None, None


def _forward(model, data, config):
    arch = config["arch"]["type"]
    try:
        return model(data)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        name, layer = _first_layer(model)
        if isinstance(layer, torch.nn.modules.conv._ConvNd) and data.dim() >= 2 and data.shape[1] != layer.in_channels:
            fix = (f"use data with {layer.in_channels} channels (an image loader's channels: {layer.in_channels})"
                   f" or a model for {data.shape[1]}-channel input (arch.args.in_channels={data.shape[1]} where the"
                   " model takes it)")
            raise UserError(f"arch: {arch}'s first layer {name} expects {layer.in_channels} input channels, but the"
                            f" data's batches are {_shape(data)} with {data.shape[1]}; {fix}") from None
        if isinstance(layer, torch.nn.Linear) and data[0].numel() != layer.in_features and data.dim() >= 2:
            raise UserError(f"arch: {arch}'s first layer {name} expects {layer.in_features} input features, but one"
                            f" sample of the data has {data[0].numel()} values (batches are {_shape(data)}); set"
                            f" arch.args.input_size={data[0].numel()} or use a model built for this data") from None
        if any(s in reason for s in ("Kernel size can't be greater", "Output size is too small",
                                     "input image (T: 1 H: 1", "smaller than kernel", "too small")):
            raise UserError(f"arch: the data's images are too small for {arch}: batches are {_shape(data)} ({reason});"
                            " use a model made for this image size, or resize the images (image_size)") from None
        raise UserError(f"arch: {arch} cannot take the data's batches {_shape(data)}: {reason}") from None


def _check_output(output, target, config):
    arch = config["arch"]["type"]
    if not isinstance(output, torch.Tensor):
        raise UserError(f"arch: {arch} returned a {type(output).__name__}, not a tensor; the loss and metrics need"
                        " one tensor of scores per sample")
    if output.dim() == 0 or output.shape[0] != target.shape[0]:
        raise UserError(f"arch: {arch} returned {_shape(output)} for a batch of {target.shape[0]} samples; its first"
                        " dimension must be the batch")
    classification = not target.is_floating_point() and output.dim() >= 2
    if classification and target.numel():
        low, high = int(target.min()), int(target.max())
        n_classes = output.shape[1]
        if high >= n_classes:
            raise UserError(f"arch: {arch} outputs {n_classes} class scores but the targets go up to {high};"
                            f" set arch.args.num_classes={high + 1} (targets are 0..{high})")
        if low < 0 and low != -100:  # -100: the losses' ignore_index
            raise UserError(f"data_loader: targets must be class indices >= 0, found {low}")


def _loss(criterion, output, target, config):
    name = config["loss"]["type"]
    # A loss may carry a check of its arguments (model/loss.py), called here once rather than in every step.
    partial = hasattr(criterion, "func") and hasattr(criterion, "keywords")
    fn, args = (criterion.func, criterion.keywords) if partial else (criterion, {})
    try:
        if getattr(fn, "check", None) is not None:
            fn.check(output, target, **args)
        return criterion(output, target)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ""
        if target.is_floating_point() and "mse" not in name:
            hint = "; the targets are floating point: for regression use \"loss\": \"mse_loss\""
        elif not target.is_floating_point() and "mse" in name:
            hint = "; the targets are class indices: for classification use \"loss\": \"cross_entropy\""
        raise UserError(f"loss: {name} cannot take the model's output {_shape(output)} and the targets"
                        f" {_shape(target)}: {reason}{hint}") from None


def _check_loss(loss, output, config):
    name = config["loss"]["type"]
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = _shape(loss) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise UserError(f"loss: {name} returned {shape}, not a single value; the training step needs the batch's"
                        " mean (leave reduction at \"mean\")")
    if name == "nll_loss" and output.dim() >= 2:
        # nll_loss expects log-probabilities: the exp of each row sums to 1. Logits do not, and training on
        # them drives the loss to -infinity while accuracy stays at chance.
        sums = output.float().exp().sum(dim=1)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
            raise UserError("loss: nll_loss expects log-probabilities, but the model's outputs are not (the exp of a"
                            f" row sums to {float(sums.flatten()[0]):.4g}, not 1): use \"loss\": \"cross_entropy\" for"
                            " a model that returns logits, or end the model with log_softmax")


def _metric(fn, output, target, device):
    try:
        if isinstance(fn, EpochMetric):  # one update and a compute, on a probe of its own that checks its inputs
            probe = fn.new(device, sync=False, check_inputs=True)
            probe.update(output, target)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "no positive samples" on one small batch
                probe.compute()
        else:
            fn(output, target)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"metrics: {fn.__name__} cannot take the model's output {_shape(output)} and the targets"
                        f" {_shape(target)}: {reason}") from None
