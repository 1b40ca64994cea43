"""A run's objects built from a checked config (the same way for training, resuming, ``test.py`` and the parts),
and the last checks before a run writes anything: :func:`check_plan` and :func:`dry_batch` catch what only shows
once the objects meet (the config checks catch typos)."""

import contextlib
import fnmatch
import functools
import importlib
import inspect
import json
import warnings

import torch

from data_loader.data_loaders import BUILTIN, DATA_LOADERS
from model.loss import LOSSES
from model.metric import METRICS
from model.model import BUILTIN as BUILTIN_MODELS
from model.model import MODELS
from utils import parts
from utils.config import ConfigError, Registry, init_obj
from utils.errors import UserError
from utils.seed import rng_state, set_rng_state
from trainer.trainer import EpochMetric

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # trainer.amp


def _outside_tables(kind, name):
    """A name outside the project's tables, imported only when a config names it: ``torchvision.models.NAME``,
    a built-in data set (data_loader/builtin.py) or a part's loader, model or metric (utils/parts.py); else None."""
    prefix = "torchvision.models."
    if kind == "archs" and isinstance(name, str) and name.startswith(prefix):
        import torchvision

        short = name[len(prefix):]
        return torchvision.models.get_model_builder(short) if short in torchvision.models.list_models() else None
    if kind == "archs" and name in BUILTIN_MODELS:  # LeNet, MLP, CifarResNet (model/builtin.py)
        return getattr(importlib.import_module(BUILTIN_MODELS[name]), name)
    if kind == "loaders" and name in BUILTIN:
        return getattr(importlib.import_module(BUILTIN[name]), name)
    return parts.provider(kind, name)


@functools.lru_cache(maxsize=None)
def registries():
    """The lookup table of each config section: what ``type`` may name there (names outside a table are resolved
    by :func:`_outside_tables` when a config asks for one)."""
    optim = torch.optim
    optimizers = {n: c for n, c in vars(optim).items()
                  if isinstance(c, type) and issubclass(c, optim.Optimizer) and n[0] != "_" and n != "Optimizer"}
    schedulers = {n: c for n, c in vars(optim.lr_scheduler).items()
                  if isinstance(c, type) and n[0] != "_" and n not in ("LRScheduler", "Optimizer", "Counter")
                  and hasattr(c, "step") and hasattr(c, "state_dict")}
    part_archs = ", ".join(f"{p}NAME" for part in parts.PARTS.values() for p in part.archs)
    part_metrics = ", ".join(f"{p}<module>.<Class>" for part in parts.PARTS.values() for p in part.metrics)
    return {
        "arch": Registry("model", MODELS, functools.partial(_outside_tables, "archs"),
                         "a torchvision model as torchvision.models.NAME; a part's as " + part_archs,
                         extra_names=BUILTIN_MODELS),
        "data_loader": Registry("data loader", DATA_LOADERS, functools.partial(_outside_tables, "loaders"),
                                extra_names=[*BUILTIN, *parts.PART_LOADERS]),
        "loss": Registry("loss", LOSSES),
        "metrics": Registry("metric", METRICS, functools.partial(_outside_tables, "metrics"),
                            f'a part\'s as {{"type": "{part_metrics}", "args": {{...}}}}'),
        "optimizer": Registry("optimizer", optimizers),
        "lr_scheduler": Registry("lr scheduler", schedulers),
    }


def resolve_device(name):
    """``auto`` picks CUDA, then MPS, then the CPU. An unavailable device is the user's error."""
    mps = getattr(torch.backends, "mps", None)
    mps_ok = mps is not None and mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f'device: "{name}" requested but CUDA is not available here; use "auto" or "cpu"')
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f'device: "{name}" requested but there are {torch.cuda.device_count()} CUDA devices')
    if name == "mps" and not mps_ok:
        raise ConfigError('device: "mps" requested but MPS is not available here; use "auto" or "cpu"')
    return torch.device(name)


def build_data_loader(config, training=True):
    section = config["data_loader"]
    args = {"seed": config["seed"], **section["args"], **({} if training else {"training": False})}
    return init_obj({"type": section["type"], "args": args}, registries()["data_loader"], where="data_loader")


def build_model(config):
    model = init_obj(config["arch"], registries()["arch"], where="arch")
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"arch: {config['arch']['type']} built a {type(model).__name__}, not a torch.nn.Module")
    return model


def trained_model(checkpoint, overrides=(), device=None):
    """``(model, config, device, autocast)``: the model a checkpoint holds, rebuilt from its own config (changed by
    ``overrides`` and ``device``), in eval mode, with the weights validation scored (an EMA's, where a part kept
    them), and the run's autocast on an accelerator (none on the CPU, so CPU scores are exact). An arch's
    ``pretrained_path`` is not read: it need not exist any more. Raises UserError for a missing or damaged
    checkpoint, a config that no longer checks, or weights that do not fit the model."""
    from utils.config import apply_overrides, validate_config
    from utils.io import load_checkpoint

    state = load_checkpoint(checkpoint, purpose="weights")
    config = apply_overrides(state["config"], list(overrides) + ([f"device={device}"] if device else []))
    config = validate_config(config, registries())
    device = resolve_device(config["device"])
    arch_args = {k: v for k, v in config["arch"]["args"].items() if k != "pretrained_path"}
    model = build_model({**config, "arch": {**config["arch"], "args": arch_args}})
    try:
        model.load_state_dict(state["model"])
        for weights in parts.call_each(config, "evaluated_weights", state):  # e.g. an EMA's average
            if weights:
                model.load_state_dict(weights, strict=False)
    except RuntimeError as err:
        raise UserError(f"{checkpoint}: the weights do not fit the model its config builds"
                        f" ({str(err).splitlines()[0]})") from None
    model.to(device).eval()
    amp = AUTOCAST_DTYPES.get(config["trainer"]["amp"])
    autocast = torch.autocast(device.type, dtype=amp) if amp and device.type != "cpu" else contextlib.nullcontext()
    return model, config, device, autocast


def build_loss(config, device=None):
    """The loss function, with its ``args`` bound. Class weights given as a JSON list (``"weight": [1, 2, 0.5]``)
    become a float tensor on ``device`` (the CPU when None), as ``F.cross_entropy`` needs."""
    section = config["loss"]
    fn = registries()["loss"].get(section["type"], "loss.type")
    args = dict(section["args"])
    if isinstance(args.get("weight"), list):
        weight = args["weight"]
        if not weight or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weight):
            raise ConfigError(f"loss.args.weight: expected a list of numbers, one per class, got {json.dumps(weight)}")
        args["weight"] = torch.tensor(weight, dtype=torch.float32, device=device)
    return functools.partial(fn, **args) if args else fn


def build_metrics(config):
    """The metrics of ``config["metrics"]``, in order: a built-in's function (``model/metric.py``), or for a
    ``{"type": ..., "args": {...}}`` entry the :class:`trainer.trainer.EpochMetric` a part builds by that
    name. One that takes ``ignore_index`` gets the loss's unless its args set one: what the loss ignores, it does."""
    from utils.config import metric_name

    metrics = []
    for entry in config["metrics"]:
        if isinstance(entry, str):
            metrics.append(registries()["metrics"].get(entry, "metrics"))
            continue
        make = registries()["metrics"].get(entry["type"], "metrics")
        args = dict(entry.get("args") or {})
        if "ignore_index" in inspect.signature(make).parameters and "ignore_index" not in args:
            args["ignore_index"] = config["loss"]["args"].get("ignore_index", -100)
        metric = make(**args)
        metric.__name__ = metric_name(entry)
        metrics.append(metric)
    return metrics


def match_parameters(model, patterns, where):
    """Names of ``model``'s parameters matching any glob in ``patterns``; a pattern matching nothing is an error."""
    names = [name for name, _ in model.named_parameters()]
    matched = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ConfigError(f"{where}: pattern {pattern!r} matches no parameter; parameter names look like: {sample}")
        matched.update(hits)
    return [n for n in names if n in matched]  # in model order


def freeze(model, patterns):
    """Set ``requires_grad=False`` on the parameters matching ``patterns``; returns their names."""
    names = match_parameters(model, patterns, "trainer.freeze")
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    return names


def fast_optimizer_args(optimizer_class, args, device):
    """``{"fused": True}`` where torch offers a fused CUDA kernel for this optimizer and the config chose neither
    ``fused`` nor ``foreach``; otherwise nothing. One kernel launch per step instead of one per parameter."""
    if device.type != "cuda" or "fused" in args or "foreach" in args:
        return {}
    try:
        return {"fused": True} if "fused" in inspect.signature(optimizer_class).parameters else {}
    except (TypeError, ValueError):
        return {}


def build_optimizer(model, config, device=None):
    """The optimizer over the trainable parameters, grouped by ``optimizer.param_groups`` when given. The model
    must already be on ``device``: on CUDA an optimizer with a fused kernel uses it."""
    section = config["optimizer"]
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    groups, taken = [], {}
    for i, group in enumerate(section.get("param_groups") or []):
        names = [n for n in match_parameters(model, group["params"], f"optimizer.param_groups[{i}].params")
                 if n in trainable]
        for name in names:
            if name in taken:
                raise ConfigError(f"optimizer.param_groups[{i}]: parameter {name!r} is already in"
                                  f" param_groups[{taken[name]}]; every parameter must land in exactly one group")
            taken[name] = i
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [trainable[n] for n in names]})
    rest = [p for n, p in trainable.items() if n not in taken]
    if rest or not groups:
        groups.insert(0, {"params": rest})
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("trainer.freeze: every parameter is frozen; nothing is left to train")
    registry = registries()["optimizer"]
    cuda = device is not None and device.type == "cuda"
    extra = fast_optimizer_args(registry.get(section["type"]), section["args"], device) if cuda else {}
    return init_obj(section, registry, groups, where="optimizer", **extra)


def build_scheduler(optimizer, config):
    section = config.get("lr_scheduler")
    return init_obj(section, registries()["lr_scheduler"], optimizer, where="lr_scheduler") if section else None


def wrap_model(model, config, device, info):
    """What runs the steps: compiled / DistributedDataParallel around ``model``. Checkpoints save ``model`` itself,
    so no ``_orig_mod.`` or ``module.`` prefixes reach the saved keys."""
    forward = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(forward) if config["trainer"]["compile"] else forward


# --------------------------------------------------------------------------- the checks of what was built


# Optimizers this loop cannot drive: it calls step() without a closure, on dense gradients.
UNSUPPORTED_OPTIMIZERS = {
    "LBFGS": "needs a closure that re-evaluates the loss several times per step, which this loop does not run",
    "SparseAdam": "needs sparse gradients (nn.Embedding(sparse=True)); the models here give dense ones",
}


def check_plan(config, parts):
    """Raise a one-line ConfigError for an optimizer or scheduler that would fail later in the run: an optimizer
    type this loop cannot drive, a scheduler stepped per step that needs a metric, a one-cycle schedule shorter
    than the run, a scheduler that fails on its first steps (tried over a stand-in parameter)."""
    opt_type, section, scheduler = config["optimizer"]["type"], config.get("lr_scheduler"), parts.lr_scheduler
    if opt_type in UNSUPPORTED_OPTIMIZERS:
        raise ConfigError(f"optimizer.type: {opt_type} {UNSUPPORTED_OPTIMIZERS[opt_type]}; use SGD, Adam or AdamW")
    if not section or scheduler is None:
        return
    kind, interval, cfg = section["type"], section["interval"], config["trainer"]
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
    if isinstance(scheduler, plateau) and interval == "step":
        raise ConfigError('lr_scheduler.interval: ReduceLROnPlateau steps on a validation metric, once per epoch;'
                          ' use "interval": "epoch"')
    planned = cfg["epochs"]  # how often the scheduler steps in the whole run: epochs, or optimizer steps
    if interval == "step":
        planned *= -(-(cfg["len_epoch"] or len(parts.data_loader)) // cfg["accumulate_grad_batches"])
        planned = min(planned, cfg["max_steps"]) if cfg["max_steps"] else planned
    total = getattr(scheduler, "total_steps", None)
    if isinstance(total, int) and planned > total:
        unit = "optimizer steps" if interval == "step" else "epochs"
        raise ConfigError(f"lr_scheduler.args: {kind} has total_steps {total}, but the run takes {planned} {unit};"
                          f" set total_steps to {planned} (or epochs and steps_per_epoch to match)")
    try:  # the same optimizer type and groups, over stand-in parameters
        skip = ("params", "initial_lr", "fused", "foreach", "capturable", "differentiable")
        groups = [{**{k: v for k, v in g.items() if k not in skip}, "params": [torch.nn.Parameter(torch.zeros(1))]}
                  for g in parts.optimizer.param_groups]
        trial = type(parts.optimizer)(groups)
    except Exception:  # an optimizer that cannot be rebuilt this way: the run itself will show any problem
        return
    try:
        trial_scheduler = build_scheduler(trial, config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "lr_scheduler.step() before optimizer.step()": on purpose
            for _ in range(min(3, planned)):  # no trial.step(): optimizer hooks others registered must not see it
                trial_scheduler.step(1.0) if isinstance(trial_scheduler, plateau) else trial_scheduler.step()
    except (ArithmeticError, TypeError, ValueError, RuntimeError, IndexError, KeyError) as err:
        raise ConfigError(f"lr_scheduler.args: {kind} fails when it steps ({type(err).__name__}: {_reason(err)});"
                          " check its arguments") from None


def first_batch(loader):
    """The first batch of ``loader``'s first epoch (the iterator, and any worker it started, is let go at once)."""
    loader.set_epoch(1, 0)
    return next(iter(loader))


# What a model, loss or metric raises when it cannot take its input (anything else is a bug, with its traceback).
INPUT_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)


def dry_batch(config, parts):
    """One batch through model, loss and metrics before a run writes anything; raise a one-line UserError naming
    the shapes and the likely fix if they do not fit together (an RGB model on grayscale data, 5 output classes
    for 10 labels, 8x8 images into a network built for 28x28, logits fed to ``nll_loss``). It takes a validation
    batch when there is one (no augmentation), in eval mode, with no step, and restores every RNG state."""
    loader, device, model = parts.data_loader, parts.device, parts.model
    arch, loss_name = config["arch"]["type"], config["loss"]["type"]
    if len(loader) == 0:
        raise UserError(f"data_loader: an epoch has 0 batches ({len(loader.sampler)} training samples, batch_size"
                        f" {loader.batch_size}, drop_last {config['data_loader']['args'].get('drop_last', False)});"
                        " lower batch_size or set drop_last false")
    saved_rng, was_training = rng_state(), model.training
    amp = AUTOCAST_DTYPES.get(config["trainer"]["amp"])
    try:
        data, target = (t.to(device) for t in first_batch(parts.valid_data_loader or loader))
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
            try:
                output = model(data)
            except INPUT_ERRORS as err:
                raise _forward_error(err, model, data, arch) from None
            if not isinstance(output, torch.Tensor):
                raise UserError(f"arch: {arch} returned a {type(output).__name__}, not a tensor; the loss and"
                                " metrics need one tensor of scores per sample")
            if output.dim() == 0 or output.shape[0] != target.shape[0]:
                raise UserError(f"arch: {arch} returned {_shape(output)} for a batch of {target.shape[0]} samples;"
                                " its first dimension must be the batch")
            if not target.is_floating_point() and output.dim() >= 2 and target.numel():  # classification
                low, high, n_classes = int(target.min()), int(target.max()), output.shape[1]
                if high >= n_classes:
                    raise UserError(f"arch: {arch} outputs {n_classes} class scores but the targets go up to {high};"
                                    f" set arch.args.num_classes={high + 1} (targets are 0..{high})")
                if low < 0 and low != -100:  # -100: the losses' ignore_index
                    raise UserError(f"data_loader: targets must be class indices >= 0, found {low}")
            # A loss may carry a check of its arguments (model/loss.py), called here once rather than in every step.
            criterion = parts.criterion
            partial = hasattr(criterion, "func") and hasattr(criterion, "keywords")
            fn, args = (criterion.func, criterion.keywords) if partial else (criterion, {})
            try:
                if getattr(fn, "check", None) is not None:
                    fn.check(output, target, **args)
                loss = criterion(output, target)
            except INPUT_ERRORS as err:
                hint = ""
                if target.is_floating_point() and "mse" not in loss_name:
                    hint = "; the targets are floating point: for regression use \"loss\": \"mse_loss\""
                elif not target.is_floating_point() and "mse" in loss_name:
                    hint = "; the targets are class indices: for classification use \"loss\": \"cross_entropy\""
                raise UserError(f"loss: {loss_name} cannot take the model's output {_shape(output)} and the targets"
                                f" {_shape(target)}: {_reason(err)}{hint}") from None
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                shape = _shape(loss) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise UserError(f"loss: {loss_name} returned {shape}, not a single value; the training step needs the"
                                " batch's mean (leave reduction at \"mean\")")
            if loss_name == "nll_loss" and output.dim() >= 2:
                # nll_loss expects log-probabilities: the exp of each row sums to 1. Logits do not, and training on
                # them drives the loss to -infinity while accuracy stays at chance.
                sums = output.float().exp().sum(dim=1)
                if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
                    raise UserError("loss: nll_loss expects log-probabilities, but the model's outputs are not (the exp"
                                    f" of a row sums to {float(sums.flatten()[0]):.4g}, not 1): use \"loss\":"
                                    " \"cross_entropy\" for a model that returns logits, or end the model with"
                                    " log_softmax")
            for metric in [*parts.metric_fns, *parts.valid_metric_fns]:
                try:
                    if isinstance(metric, EpochMetric):  # one update and a compute, on a probe that checks its inputs
                        probe = metric.new(device, sync=False, check_inputs=True)
                        probe.update(output, target)
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")  # e.g. "no positive samples" on one small batch
                            probe.compute()
                    else:
                        metric(output, target)
                except INPUT_ERRORS as err:
                    raise UserError(f"metrics: {metric.__name__} cannot take the model's output {_shape(output)} and"
                                    f" the targets {_shape(target)}: {_reason(err)}") from None
    finally:
        model.train(was_training)
        set_rng_state(saved_rng)


def _forward_error(err, model, data, arch):
    """The line for a model that cannot take the data's batches: what its first layer expects, where that is it."""
    reason = _reason(err)
    name, layer = next(((n, m) for n, m in model.named_modules()
                        if isinstance(m, (torch.nn.modules.conv._ConvNd, torch.nn.Linear))), (None, None))
    if isinstance(layer, torch.nn.modules.conv._ConvNd) and data.dim() >= 2 and data.shape[1] != layer.in_channels:
        return UserError(f"arch: {arch}'s first layer {name} expects {layer.in_channels} input channels, but the"
                         f" data's batches are {_shape(data)} with {data.shape[1]}; use data with {layer.in_channels}"
                         f" channels (an image loader's channels: {layer.in_channels}) or a model for"
                         f" {data.shape[1]}-channel input (arch.args.in_channels={data.shape[1]} where the model"
                         " takes it)")
    if isinstance(layer, torch.nn.Linear) and data[0].numel() != layer.in_features and data.dim() >= 2:
        return UserError(f"arch: {arch}'s first layer {name} expects {layer.in_features} input features, but one"
                         f" sample of the data has {data[0].numel()} values (batches are {_shape(data)}); set"
                         f" arch.args.input_size={data[0].numel()} or use a model built for this data")
    if any(s in reason for s in ("Kernel size can't be greater", "Output size is too small",
                                 "input image (T: 1 H: 1", "smaller than kernel", "too small")):
        return UserError(f"arch: the data's images are too small for {arch}: batches are {_shape(data)} ({reason});"
                         " use a model made for this image size, or resize the images (image_size)")
    return UserError(f"arch: {arch} cannot take the data's batches {_shape(data)}: {reason}")


def _reason(err):
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _shape(t):
    return f"[{', '.join(map(str, t.shape))}] ({str(t.dtype).replace('torch.', '')})"
