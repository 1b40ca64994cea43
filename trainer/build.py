"""A run's objects built from a checked config (the same way for training, resuming, ``test.py`` and the parts),
and the last checks before a run writes anything: :func:`check_plan` and :func:`dry_batch` catch what only shows
once the objects meet (the config checks catch typos)."""

import contextlib
import functools
import importlib
import inspect
import json
import warnings

import torch

from base.base_trainer import rng_state, set_rng_state
from data_loader.data_loaders import BUILTIN, DATA_LOADERS
from model.loss import LOSSES
from model.metric import METRICS
from model.model import BUILTIN as BUILTIN_MODELS
from model.model import MODELS
from utils import parts
from utils.config import ConfigError, Registry, init_obj
from trainer.trainer import EpochMetric

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # trainer.amp


def _outside_tables(kind, name):
    """A name outside the project's tables, imported only when a config names it: ``torchvision.models.NAME``, a
    built-in model or data set (model/builtin.py, data_loader/builtin.py), a part's (utils/parts.py); else None."""
    builtin = {"archs": BUILTIN_MODELS, "loaders": BUILTIN}.get(kind, {})
    if kind == "archs" and isinstance(name, str) and name.startswith("torchvision.models."):
        import torchvision

        short = name.removeprefix("torchvision.models.")
        return torchvision.models.get_model_builder(short) if short in torchvision.models.list_models() else None
    if name in builtin:
        return getattr(importlib.import_module(builtin[name]), name)
    return parts.provider(kind, name)


@functools.lru_cache(maxsize=None)
def registries():
    """What ``type`` may name in each config section (a name outside a table: :func:`_outside_tables`)."""
    optim = torch.optim
    optimizers = {n: c for n, c in vars(optim).items()
                  if isinstance(c, type) and issubclass(c, optim.Optimizer) and n[0] != "_" and n != "Optimizer"}
    schedulers = {n: c for n, c in vars(optim.lr_scheduler).items()
                  if isinstance(c, type) and n[0] != "_" and n not in ("LRScheduler", "Optimizer", "Counter")
                  and hasattr(c, "step") and hasattr(c, "state_dict")}
    part_archs = ", ".join(f"{p}NAME" for part in parts.PARTS.values() for p in part.archs)
    part_metrics = ", ".join(f"{p}<module>.<Class>" for part in parts.PARTS.values() for p in part.metrics)
    return {"arch": Registry("model", MODELS, functools.partial(_outside_tables, "archs"),
                             "a torchvision model as torchvision.models.NAME; a part's as " + part_archs,
                             extra_names=BUILTIN_MODELS),
            "data_loader": Registry("data loader", DATA_LOADERS, functools.partial(_outside_tables, "loaders"),
                                    extra_names=[*BUILTIN, *parts.PART_LOADERS]),
            "loss": Registry("loss", LOSSES),
            "metrics": Registry("metric", METRICS, functools.partial(_outside_tables, "metrics"),
                                f'a part\'s as {{"type": "{part_metrics}", "args": {{...}}}}'),
            "optimizer": Registry("optimizer", optimizers),
            "lr_scheduler": Registry("lr scheduler", schedulers),
            "task": Registry("task", {}, extra_hint='a class of your own as "module:Class" (base/base_task.py)')}


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
    """``(model, config, device, autocast)``: the checkpoint's model rebuilt from its own config (changed by
    ``overrides`` and ``device``; ``pretrained_path`` unread: it may be gone), in eval mode, with the weights
    validation scored (an EMA's, where a part kept them), and the run's autocast (none on the CPU: exact scores)."""
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
        raise _failed("weights_misfit", checkpoint, state["config"], config, err) from None
    model.to(device).eval()
    amp = AUTOCAST_DTYPES.get(config["trainer"]["amp"])
    autocast = torch.autocast(device.type, dtype=amp) if amp and device.type != "cpu" else contextlib.nullcontext()
    return model, config, device, autocast


def build_loss(config, device=None):
    """The loss function with its ``args`` bound; class weights (``"weight": [1, 2, 0.5]``) as a float tensor."""
    section = config["loss"]
    fn = registries()["loss"].get(section["type"], "loss.type")
    args = dict(section["args"])
    if isinstance(weight := args.get("weight"), list):
        if not weight or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weight):
            raise ConfigError(f"loss.args.weight: expected a list of numbers, one per class, got {json.dumps(weight)}")
        args["weight"] = torch.tensor(weight, dtype=torch.float32, device=device)
    return functools.partial(fn, **args) if args else fn


def build_metrics(config):
    """The metrics of ``config["metrics"]``: a name's function (model/metric.py), or the EpochMetric a part builds for
    a ``{"type", "args"}`` entry; one taking ``ignore_index`` gets the loss's (what the loss ignores, it does)."""
    from utils.config import metric_name

    metrics = []
    for entry in config["metrics"]:
        metric = registries()["metrics"].get(entry if isinstance(entry, str) else entry["type"], "metrics")
        if not isinstance(entry, str):  # a part's class: built with its args
            args = dict(entry.get("args") or {})
            if "ignore_index" in inspect.signature(metric).parameters and "ignore_index" not in args:
                args["ignore_index"] = config["loss"]["args"].get("ignore_index", -100)
            metric = metric(**args)
            metric.__name__ = metric_name(entry)
        metrics.append(metric)
    return metrics


def build_optimizer(model, config, device=None):
    """The optimizer over the trainable parameters, grouped by ``optimizer.param_groups`` when given. The model
    must already be on ``device``: on CUDA an optimizer with a fused kernel uses it."""
    section, registry = config["optimizer"], registries()["optimizer"]
    if section.get("param_groups"):
        from trainer.parameters import param_groups

        groups = param_groups(model, section)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if not (groups := [g for g in groups if g["params"]]):
        raise ConfigError("trainer.freeze: every parameter is frozen; nothing is left to train")
    extra = {}
    if device is not None and device.type == "cuda":  # a fused kernel, where there is one (trainer/parameters.py)
        from trainer.parameters import fast_optimizer_args

        extra = fast_optimizer_args(registry.get(section["type"]), section["args"], device)
    return init_obj(section, registry, groups, where="optimizer", **extra)


def wrap_model(model, config, device, info):
    """What runs the steps: compiled / DistributedDataParallel around ``model``. Checkpoints save ``model`` itself,
    so no ``_orig_mod.`` or ``module.`` prefixes reach the saved keys."""
    forward = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(forward) if config["trainer"]["compile"] else forward


# --------------------------------------------------------------------------- the checks of what was built


def check_standins(config):
    """The optimizer and scheduler built on stand-in parameters before any data is read: a one-line ConfigError for
    what only a constructor refuses (``betas=[0.9]``), or a schedule that fails or turns an lr negative (gamma < 0)."""
    section, schedule, cfg = config["optimizer"], config.get("lr_scheduler"), config["trainer"]
    if section["type"] in ("LBFGS", "SparseAdam"):  # this loop calls step() without a closure, on dense gradients
        raise _failed("unsupported_optimizer", section["type"])
    device_only = ("fused", "foreach", "capturable", "differentiable")  # (the run's device decides those)
    kind, args = registries()["optimizer"].get(section["type"]), {k: v for k, v in section["args"].items()
                                                                  if k not in device_only}
    groups = [{k: v for k, v in g.items() if k not in ("params", *device_only)}
              for g in [{}, *(section.get("param_groups") or [])]]
    try:  # each group's settings as the constructor's own (it checks only those), then the groups together
        for group in groups:
            kind([torch.nn.Parameter(torch.zeros(1))], **{**args, **group})
        trial = kind([{**group, "params": [torch.nn.Parameter(torch.zeros(1))]} for group in groups], **args)
    except (TypeError, ValueError, IndexError, KeyError) as err:
        raise _failed("optimizer_rejects", section, kind, err) from None
    if not schedule:
        return
    try:
        scheduler = init_obj(schedule, registries()["lr_scheduler"], trial, where="lr_scheduler")
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        steps = min(100, cfg["epochs"] if schedule["interval"] == "epoch" else 100, getattr(scheduler, "total_steps", 0)
                    or 100)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "lr_scheduler.step() before optimizer.step()": on purpose
            for step in range(1, steps + 1):  # no trial.step(): optimizer hooks others registered must not see it
                scheduler.step(1.0) if plateau else scheduler.step()
                if any(g["lr"] < 0 for g in trial.param_groups):
                    raise _failed("negative_lr", schedule, step, [g["lr"] for g in trial.param_groups])
    except (ArithmeticError, TypeError, ValueError, RuntimeError, IndexError, KeyError) as err:
        raise _failed("scheduler_fails", schedule["type"], err) from None


def check_plan(config, parts):
    """A one-line ConfigError for a per-step ReduceLROnPlateau, or a one-cycle schedule shorter than the run."""
    section, cfg = config.get("lr_scheduler"), config["trainer"]
    if not section or parts.lr_scheduler is None:
        return
    per_step = section["interval"] == "step"
    if isinstance(parts.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and per_step:
        raise _failed("plateau_per_step")
    planned = cfg["epochs"]  # how often the scheduler steps in the whole run: epochs, or optimizer steps
    if per_step:
        planned *= -(-(cfg["len_epoch"] or len(parts.data_loader)) // cfg["accumulate_grad_batches"])
        planned = min(planned, cfg["max_steps"]) if cfg["max_steps"] else planned
    total = getattr(parts.lr_scheduler, "total_steps", None)
    if isinstance(total, int) and planned > total:
        raise _failed("schedule_too_short", section["type"], total, planned, per_step)


# What a model, loss or metric raises when it cannot take its input (anything else is a bug, with its traceback).
INPUT_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)


def dry_batch(config, parts):
    """One batch (a validation one where there is: no augmentation) through model, loss and metrics, in eval mode,
    with no step and every RNG state restored; a one-line UserError names the shapes and the likely fix when they do
    not fit (an RGB model on grayscale data, 5 classes for 10 labels, 8x8 images, logits fed to ``nll_loss``)."""
    loader, device, model = parts.data_loader, parts.device, parts.model
    arch, loss_name = config["arch"]["type"], config["loss"]["type"]
    if len(loader) == 0:
        raise _failed("empty_epoch", loader, config)
    saved_rng, was_training, first = rng_state(), model.training, parts.valid_data_loader or loader
    amp = AUTOCAST_DTYPES.get(config["trainer"]["amp"])
    try:
        first.set_epoch(1, 0)  # the first epoch's first batch (the iterator, and any worker it starts, let go at once)
        batch, autocast = next(iter(first)), torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
        model.eval()
        if parts.task is not None or not isinstance(batch, (list, tuple)) or len(batch) < 2:
            from base.base_task import check_task_batch  # (a step of the user's: its own checks)

            return check_task_batch(config, parts, batch, autocast)
        *inputs, target = (t.to(device) for t in batch)
        with torch.no_grad(), autocast:
            try:
                output = model(*inputs)
            except INPUT_ERRORS as err:
                raise _failed("forward", err, model, inputs[0], arch) from None
            if not isinstance(output, torch.Tensor) or output.dim() == 0 or output.shape[0] != target.shape[0]:
                raise _failed("not_per_sample", arch, output, target)
            if not target.is_floating_point() and output.dim() >= 2 and target.numel():  # classification
                low, high = int(target.min()), int(target.max())
                if high >= output.shape[1] or (low < 0 and low != -100):  # -100: the losses' ignore_index
                    raise _failed("class_targets", arch, output.shape[1], low, high)
                classes = getattr(getattr(loader, "dataset", None), "num_classes", None)
                if output.shape[1] > (classes or output.shape[1]):
                    _failed("more_outputs", arch, output.shape[1], classes)  # (a warning only)
            # A loss may carry a check of its arguments (model/loss.py), called here once rather than in every step.
            criterion = parts.criterion  # (a functools.partial when the loss has args)
            fn, args = getattr(criterion, "func", criterion), getattr(criterion, "keywords", {})
            try:
                if getattr(fn, "check", None) is not None:
                    fn.check(output, target, **args)
                loss = criterion(output, target)
            except INPUT_ERRORS as err:
                raise _failed("loss_input", loss_name, output, target, err) from None
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise _failed("loss_not_scalar", loss_name, loss)
            if loss_name == "nll_loss" and output.dim() >= 2:
                # nll_loss expects log-probabilities: the exp of each row sums to 1. Logits do not, and training on
                # them drives the loss to -infinity while accuracy stays at chance.
                sums = output.float().exp().sum(dim=1)
                if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
                    raise _failed("nll_on_logits", sums)
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
                    raise _failed("metric_input", metric, output, target, err) from None
    finally:
        model.train(was_training)
        set_rng_state(saved_rng)


def _failed(check, *facts):
    """The error of a failed check, worded by trainer/check_errors.py (imported only then)."""
    from trainer import check_errors

    return getattr(check_errors, check)(*facts)
