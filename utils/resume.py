"""Resume policy: what a resumed run may change, what it refuses, how changes are applied; weights from checkpoints.

A checkpoint holds the state of a run under its config. Resuming with another config
(``-r CKPT -c other.json`` or overrides) is allowed where the saved state still means
the same thing: a new learning rate, more epochs. It is refused where it would not: other
weights (another model), other parameter groups (another optimizer type or freeze list),
or, in the middle of an epoch, a different data order.
"""

from utils.config import ConfigError, config_diff
from utils.errors import UserError
from utils.io import load_checkpoint

# Keys whose change would make the checkpoint's state meaningless (other weights, other parameter groups).
FIXED_ON_RESUME = ("name", "arch", "optimizer.type", "optimizer.param_groups", "lr_scheduler.type", "trainer.freeze")
# Keys that decide which sample comes next: fine to change between epochs, not in the middle of one.
FIXED_MID_EPOCH = ("seed", "data_loader", "trainer.len_epoch", "trainer.accumulate_grad_batches")


def check_resume_changes(saved, config, mid_epoch):
    """Lines describing how ``config`` differs from the checkpoint's ``saved`` config.

    Raises:
        ConfigError: a change that cannot be honoured, one line each, saying what to do instead.
    """
    changes = config_diff(saved, config)
    fixed = FIXED_ON_RESUME + (FIXED_MID_EPOCH if mid_epoch else ())
    refused = [line for line in changes if any(line == k or line.startswith((k + ".", k + ":")) for k in fixed)]
    if refused:
        why = "in the middle of an epoch; resume from a checkpoint-epoch*.pth" if mid_epoch else "start a new run with --init-from"
        raise ConfigError(*(f"cannot resume with a changed {line.split(':')[0]} ({line}); {why}" for line in refused))
    return changes


def apply_resume_changes(saved, config, optimizer, lr_scheduler):
    """Make changed optimizer and scheduler arguments win over the values restored from the checkpoint.

    A new ``lr`` replaces the base learning rate; the scheduler's progress (the factor it
    has applied so far) carries over to it.
    """
    old_args, new_args = saved["optimizer"].get("args", {}), config["optimizer"].get("args", {})
    for key, value in new_args.items():
        if old_args.get(key) == value:
            continue
        for i, group in enumerate(optimizer.param_groups):
            if key == "lr" and i == 0:  # only the default group: param_groups entries set their own lr
                base = group.get("initial_lr", old_args.get("lr", group["lr"]))
                group["lr"] = value * group["lr"] / base if base else value
                group["initial_lr"] = value
                if lr_scheduler is not None and hasattr(lr_scheduler, "base_lrs"):
                    lr_scheduler.base_lrs[0] = value
            elif key != "lr" and key in group:
                group[key] = value
    if lr_scheduler is not None and saved.get("lr_scheduler"):
        old_sched, new_sched = saved["lr_scheduler"].get("args", {}), config["lr_scheduler"].get("args", {})
        for key, value in new_sched.items():
            if old_sched.get(key) != value and hasattr(lr_scheduler, key):
                setattr(lr_scheduler, key, value)


def init_weights(model, path, strict):
    """Load the model weights of another run's checkpoint (``--init-from``); returns a line reporting what matched.

    With ``strict=False`` tensors whose name is unknown or whose shape differs (a new
    classifier head, say) are skipped and listed instead of failing the run.

    Raises:
        UserError: the checkpoint cannot be read, or (strict) its weights do not fit the model.
    """
    weights = load_checkpoint(path, purpose="weights")["model"]
    own = model.state_dict()
    reshaped = []
    if not strict:
        reshaped = [k for k, v in weights.items() if k in own and own[k].shape != v.shape]
        weights = {k: v for k, v in weights.items() if k not in reshaped}
    try:
        result = model.load_state_dict(weights, strict=strict)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).strip().splitlines()]
        detail = "; ".join(lines[1:3]) or lines[0]
        raise UserError(f"--init-from {path}: the weights do not fit this model ({detail}); "
                        "use --init-from-strict false to load only the tensors that fit") from None
    report = f"Initialised from {path}"
    if not strict:
        report += (f": missing keys {list(result.missing_keys)}, unexpected keys {list(result.unexpected_keys)},"
                   f" skipped for a different shape {reshaped}")
    return report
