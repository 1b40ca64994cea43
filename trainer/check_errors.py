"""The wording of the last checks' failures (``check_plan``, ``dry_batch`` and ``trained_model`` in trainer/build.py):
each function returns the one-line error to raise (``more_outputs`` only warns). Imported only when a check fails or
warns, so a run that passes never reads this file."""

import torch

from utils.errors import ConfigError, UserError

UNSUPPORTED_OPTIMIZERS = {
    "LBFGS": "needs a closure that re-evaluates the loss several times per step, which this loop does not run",
    "SparseAdam": "needs sparse gradients (nn.Embedding(sparse=True)); the models here give dense ones",
}


def reason(err):
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def shape(t):
    return f"[{', '.join(map(str, t.shape))}] ({str(t.dtype).replace('torch.', '')})"


# --------------------------------------------------------------------------- check_plan


def unsupported_optimizer(opt_type):
    return ConfigError(f"optimizer.type: {opt_type} {UNSUPPORTED_OPTIMIZERS[opt_type]}; use SGD, Adam or AdamW")


def plateau_per_step():
    return ConfigError('lr_scheduler.interval: ReduceLROnPlateau steps on a validation metric, once per epoch;'
                       ' use "interval": "epoch"')


def schedule_too_short(kind, total, planned, per_step):
    unit = "optimizer steps" if per_step else "epochs"
    return ConfigError(f"lr_scheduler.args: {kind} has total_steps {total}, but the run takes {planned} {unit};"
                       f" set total_steps to {planned} (or epochs and steps_per_epoch to match)")


def scheduler_fails(kind, err):
    return ConfigError(f"lr_scheduler.args: {kind} fails when it steps ({type(err).__name__}: {reason(err)});"
                       " check its arguments")


def optimizer_rejects(section, optimizer_class, err):
    """The optimizer's constructor refused its arguments (``betas=[0.9]``): the key it refused, found by building
    ``args`` alone and then with each of ``param_groups``, on a stand-in parameter (``build.check_standins``)."""
    import json

    def fails(**settings):
        try:
            optimizer_class([torch.nn.Parameter(torch.zeros(1))], **{**section["args"], **settings})
        except Exception:
            return True
        return False

    where, given = "optimizer.args", dict(section["args"])
    if not fails():  # the args alone are fine: the settings of a group are the problem
        for index, group in enumerate(section.get("param_groups") or []):
            settings = {k: v for k, v in group.items() if k != "params"}
            if fails(**settings):
                where, given = f"optimizer.param_groups[{index}]", settings
                break
    why = reason(err)
    lists = [key for key, value in given.items() if isinstance(value, list) and isinstance(err, IndexError)]
    named = [key for key in given if key in why or (key.endswith("s") and key[:-1] in why)] or lists
    if len(named) == 1:
        return ConfigError(f"{where}.{named[0]}: {section['type']} rejected {json.dumps(given[named[0]])}:"
                           f" {why}{' (a list of the wrong length?)' if isinstance(err, IndexError) else ''}")
    return ConfigError(f"{where}: {section['type']} rejected its arguments {json.dumps(given)}: {why}")


def negative_lr(schedule, step, rates):
    """A schedule whose learning rate turns negative (gradient ascent): the argument that does it, where it is one."""
    import json

    culprits = [f"{key} {json.dumps(value)}" for key, value in schedule["args"].items()
                if key in ("gamma", "factor", "start_factor", "end_factor") and isinstance(value, (int, float))
                and value < 0]
    where = f"lr_scheduler.args.{culprits[0].split()[0]}" if len(culprits) == 1 else "lr_scheduler.args"
    return ConfigError(f"{where}: {schedule['type']} makes the learning rate negative at step {step}"
                       f" ({', '.join(f'{r:.3g}' for r in rates)}): a negative one climbs the loss; give"
                       f" {culprits[0].split()[0] if len(culprits) == 1 else 'arguments'} >= 0")


def weights_misfit(checkpoint, saved, config, err):
    """``test.py`` (trainer/build.py's trained_model): the checkpoint's weights do not load into the model its config,
    changed by the overrides, builds: another model (one line naming both), or the first tensor that does not fit."""
    old, new = (saved.get("arch") or {}).get("type"), config["arch"]["type"]
    if old != new:
        return UserError(f"{checkpoint}: its model is {old}, but the config names {new} (arch.type); score it with"
                         " its own arch (leave arch.type as the checkpoint has it)")
    details = [line.strip() for line in str(err).strip().splitlines()[1:] if line.strip()]
    return UserError(f"{checkpoint}: the weights do not fit the model its config builds"
                     f" ({(details[0] if details else reason(err))[:300]})")


# --------------------------------------------------------------------------- dry_batch


def empty_epoch(loader, config):
    return UserError(f"data_loader: an epoch has 0 batches ({len(loader.sampler)} training samples, batch_size"
                     f" {loader.batch_size}, drop_last {config['data_loader']['args'].get('drop_last', False)});"
                     " lower batch_size or set drop_last false")


def forward(err, model, data, arch):
    """A model that cannot take the data's batches: what its first layer expects, where that is it."""
    why = reason(err)
    name, layer = next(((n, m) for n, m in model.named_modules()
                        if isinstance(m, (torch.nn.modules.conv._ConvNd, torch.nn.Linear))), (None, None))
    if isinstance(layer, torch.nn.modules.conv._ConvNd) and data.dim() >= 2 and data.shape[1] != layer.in_channels:
        return UserError(f"arch: {arch}'s first layer {name} expects {layer.in_channels} input channels, but the"
                         f" data's batches are {shape(data)} with {data.shape[1]}; use data with {layer.in_channels}"
                         f" channels (an image loader's channels: {layer.in_channels}) or a model for"
                         f" {data.shape[1]}-channel input (arch.args.in_channels={data.shape[1]} where the model"
                         " takes it)")
    if isinstance(layer, torch.nn.Linear) and data[0].numel() != layer.in_features and data.dim() >= 2:
        return UserError(f"arch: {arch}'s first layer {name} expects {layer.in_features} input features, but one"
                         f" sample of the data has {data[0].numel()} values (batches are {shape(data)}); set"
                         f" arch.args.input_size={data[0].numel()} or use a model built for this data")
    if any(s in why for s in ("Kernel size can't be greater", "Output size is too small",
                              "input image (T: 1 H: 1", "smaller than kernel", "too small")):
        return UserError(f"arch: the data's images are too small for {arch}: batches are {shape(data)} ({why});"
                         " use a model made for this image size, or resize the images (image_size)")
    return UserError(f"arch: {arch} cannot take the data's batches {shape(data)}: {why}")


def more_outputs(arch, n_outputs, n_classes):
    """Not an error: a model may keep room for classes this data lacks. Said once (rank 0) on stderr, at any
    verbosity: the run's log does not exist yet."""
    import sys

    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"warning: arch: {arch} outputs {n_outputs} class scores, but the data has {n_classes} classes; the"
              f" other {n_outputs - n_classes} are never a target (set arch.args.num_classes={n_classes} unless"
              " that is on purpose)", file=sys.stderr, flush=True)


def not_per_sample(arch, output, target):
    if not isinstance(output, torch.Tensor):
        return UserError(f"arch: {arch} returned a {type(output).__name__}, not a tensor; the loss and"
                         " metrics need one tensor of scores per sample")
    return UserError(f"arch: {arch} returned {shape(output)} for a batch of {target.shape[0]} samples;"
                     " its first dimension must be the batch")


def class_targets(arch, n_classes, low, high):
    if high >= n_classes:
        return UserError(f"arch: {arch} outputs {n_classes} class scores but the targets go up to {high};"
                         f" set arch.args.num_classes={high + 1} (targets are 0..{high})")
    return UserError(f"data_loader: targets must be class indices >= 0, found {low}")


def loss_input(loss_name, output, target, err):
    hint = ""
    if target.is_floating_point() and "mse" not in loss_name:
        hint = "; the targets are floating point: for regression use \"loss\": \"mse_loss\""
    elif not target.is_floating_point() and "mse" in loss_name:
        hint = "; the targets are class indices: for classification use \"loss\": \"cross_entropy\""
    return UserError(f"loss: {loss_name} cannot take the model's output {shape(output)} and the targets"
                     f" {shape(target)}: {reason(err)}{hint}")


def loss_not_scalar(loss_name, loss):
    got = shape(loss) if isinstance(loss, torch.Tensor) else type(loss).__name__
    return UserError(f"loss: {loss_name} returned {got}, not a single value; the training step needs the"
                     " batch's mean (leave reduction at \"mean\")")


def nll_on_logits(sums):
    return UserError("loss: nll_loss expects log-probabilities, but the model's outputs are not (the exp"
                     f" of a row sums to {float(sums.flatten()[0]):.4g}, not 1): use \"loss\":"
                     " \"cross_entropy\" for a model that returns logits, or end the model with log_softmax")


def metric_input(metric, output, target, err):
    return UserError(f"metrics: {metric.__name__} cannot take the model's output {shape(output)} and"
                     f" the targets {shape(target)}: {reason(err)}")
