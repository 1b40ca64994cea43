"""Train a model from a config: ``python train.py -c config.json [key.path=VALUE ...]``.

``main(config)`` does the work and returns the final metrics; the command line only
parses arguments and turns a user's mistake into one line on stderr and exit code 2.
"""

import argparse
import json
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from utils.config import ConfigError, apply_overrides, config_diff, load_config, validate_config
from utils.errors import UserError
from utils.io import load_checkpoint, write_json


def make_run(config, run_id, checkpoint_path=None):
    """The run's folders: ``<save_dir>/models/<name>/<run_id>`` and ``<save_dir>/log/<name>/<run_id>``.

    A resumed run continues in the folder of the checkpoint it resumes from.
    """
    save_dir, name = Path(config["trainer"]["save_dir"]), config["name"]
    if checkpoint_path is not None:
        checkpoint_dir = Path(checkpoint_path).resolve().parent
        run_id = run_id or checkpoint_dir.name
    else:
        if run_id is None:
            run_id = time.strftime("%Y%m%d-%H%M%S")
            base, n = run_id, 1
            while (save_dir / "models" / name / run_id).exists():
                n += 1
                run_id = f"{base}-{n}"
        elif (save_dir / "models" / name / run_id).exists():
            raise UserError(
                f"run folder {save_dir / 'models' / name / run_id} already exists: choose another --run-id,"
                " or resume it with -r <checkpoint>"
            )
        checkpoint_dir = save_dir / "models" / name / run_id
    return SimpleNamespace(run_id=run_id, checkpoint_dir=checkpoint_dir, log_dir=save_dir / "log" / name / run_id)


def _agree_on_run(config, run_id, resume, info, dist):
    """Rank 0 picks the run folder and every rank gets the same one (or the same error)."""
    chosen = None
    if info.is_main:
        try:
            run = make_run(config, run_id, resume)
            chosen = (run.run_id, str(run.checkpoint_dir), str(run.log_dir))
        except UserError as err:
            chosen = str(err)
    chosen = dist.broadcast_object(chosen, info)
    if isinstance(chosen, str):
        raise UserError(chosen)
    return SimpleNamespace(run_id=chosen[0], checkpoint_dir=Path(chosen[1]), log_dir=Path(chosen[2]))


# Keys whose change would make the checkpoint's state meaningless (other weights, other parameter groups).
FIXED_ON_RESUME = ("name", "arch", "optimizer.type", "optimizer.param_groups", "lr_scheduler.type", "trainer.freeze")
# Keys that decide which sample comes next: fine to change between epochs, not in the middle of one.
FIXED_MID_EPOCH = ("seed", "data_loader", "trainer.len_epoch", "trainer.accumulate_grad_batches")


def _check_resume_changes(saved, config, mid_epoch):
    """Lines describing how ``config`` differs from the checkpoint's; refuses changes that cannot be honoured."""
    changes = config_diff(saved, config)
    fixed = FIXED_ON_RESUME + (FIXED_MID_EPOCH if mid_epoch else ())
    refused = [line for line in changes if any(line == k or line.startswith((k + ".", k + ":")) for k in fixed)]
    if refused:
        why = "in the middle of an epoch; resume from a checkpoint-epoch*.pth" if mid_epoch else "start a new run with --init-from"
        raise ConfigError(*(f"cannot resume with a changed {line.split(':')[0]} ({line}); {why}" for line in refused))
    return changes


def _apply_resume_changes(saved, config, optimizer, lr_scheduler):
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


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _manifest(run, config, argv, resume, previous=None):
    import torch

    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:
        tv = None
    history = list((previous or {}).get("resume_history", []))
    if resume:
        history.append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "checkpoint": str(resume), "command": argv})
    return {
        "run_id": run.run_id,
        "command": (previous or {}).get("command", argv) if resume else argv,
        "config": config,
        "seed": config["seed"],
        "git_commit": _git_commit(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "torchvision": tv,
                     "cuda": torch.version.cuda},
        "resume_history": history,
    }


def main(config=None, resume=None, run_id=None, init_from=None, init_strict=True, argv=None):
    """Train; returns the last epoch's metrics (``{"epoch": N, "loss": ..., "val_loss": ..., ...}``).

    Args:
        config: the config as a dict; None to take the checkpoint's when resuming.
        resume: a checkpoint to continue (same run folder, same TensorBoard run).
        run_id: the run folder's name (default: the start time).
        init_from: a checkpoint whose model weights start a new run (fine-tuning).
        init_strict: whether ``init_from`` must match the model's keys exactly.
        argv: the command line, recorded in the run's manifest.

    Raises:
        UserError: a problem in the config or the inputs, found before anything is written.
        RunStopped: the run was interrupted (a resumable ``last.pth`` is written) or diverged.
    """
    import torch

    from logger.logger import close_logging, setup_logging
    from logger.visualization import TensorboardWriter
    from trainer import build
    from trainer.trainer import Trainer
    from utils import dist
    from utils.seed import seed_everything

    # ---- everything that can be the user's mistake is checked before anything is written
    registries = build.registries()
    state = load_checkpoint(resume) if resume else None
    changes = []
    if state is not None:
        saved = state["config"]
        config = saved if config is None else config
        config = validate_config(config, registries)
        changes = _check_resume_changes(saved, config, mid_epoch=state["batch_in_epoch"] > 0)
    elif config is None:
        raise UserError("give a config (-c config.json) or a checkpoint to resume (-r checkpoint.pth)")
    else:
        config = validate_config(config, registries)
    cfg = config["trainer"]
    device = build.resolve_device(config["device"])
    info, device = dist.setup(device)
    build.check_amp(cfg["amp"], device)
    if info.enabled and cfg["skip_nonfinite"]:
        raise ConfigError("trainer.skip_nonfinite: not supported under torchrun (every process would have to agree"
                          " on each step); leave it false there, so a non-finite loss stops the run")
    seed_everything(config["seed"])

    data_loader = build.build_data_loader(config)
    valid_data_loader = data_loader.split_validation()
    model = build.build_model(config).to(device)  # before the optimizer: fused CUDA optimizers need it there
    frozen = build.freeze(model, cfg["freeze"]) if cfg["freeze"] else []
    criterion, metric_fns = build.build_loss(config), build.build_metrics(config)
    optimizer = build.build_optimizer(model, config, device)
    lr_scheduler = build.build_scheduler(optimizer, config)
    missing = [m for m in cfg["activation_histograms"] if m not in dict(model.named_modules())]
    if missing:
        names = [n for n, _ in model.named_modules() if n][:8]
        raise ConfigError(f"trainer.activation_histograms: no module named {missing[0]!r}; modules are named like {', '.join(names)}")
    init_report = _init_weights(model, init_from, init_strict) if init_from else None

    # ---- the run's folders; all ranks agree on the run id
    run = _agree_on_run(config, run_id, resume, info, dist)
    if info.is_main:
        try:
            run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            run.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"trainer.save_dir: cannot create the run folders under {cfg['save_dir']}: "
                            f"{err.strerror or err}; choose a folder you can write to") from None
    logger = setup_logging(run.log_dir if info.is_main else None, cfg["verbosity"] if info.is_main else 0)
    purge = state["global_step"] + 1 if state else None
    writer = TensorboardWriter(run.log_dir, cfg["tensorboard"] and info.is_main, purge_step=purge, logger=logger)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        # TF32 matmuls and cuDNN's autotuner: large speed-ups on Ampere and later GPUs; the autotuner picks
        # kernels by timing, so it is off when the run must be deterministic.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg["tf32"]
        torch.backends.cudnn.benchmark = cfg["cudnn_benchmark"] and not cfg["deterministic"]

    try:
        data_loader.to(device)
        if valid_data_loader is not None:
            valid_data_loader.to(device)
        if info.enabled:
            data_loader.shard(info.rank, info.world_size)
            if valid_data_loader is not None:
                valid_data_loader.shard(info.rank, info.world_size)
        forward_model = _wrap_model(model, config, device, info, logger)
        scaler = _grad_scaler(device) if cfg["amp"] == "fp16" else None
        trainer = Trainer(model, criterion, metric_fns, optimizer, config, device, data_loader, run,
                          valid_data_loader=valid_data_loader, lr_scheduler=lr_scheduler, writer=writer,
                          logger=logger, forward_model=forward_model, frozen=frozen, scaler=scaler,
                          is_main=info.is_main, distributed=info.enabled,
                          rewrap=lambda: _wrap_model(model, config, device, info, logger))
        trainer.world_size = info.world_size
        if state is not None:
            trainer.load_state_dict(state)
            trainer.resumed_from = resume
            _apply_resume_changes(state["config"], config, optimizer, lr_scheduler)
            if state["config"]["seed"] != config["seed"]:
                logger.warning("the seed changed: the data order from here on differs from the original run's")
            if state.get("world_size", 1) != info.world_size:
                logger.warning(f"resuming a run of {state.get('world_size', 1)} processes with {info.world_size}:"
                               " each process's share of the data, and so the data order, changes from here on")

        if info.is_main:
            previous = None
            manifest_path = run.checkpoint_dir / "manifest.json"
            if state is not None and manifest_path.is_file():
                previous = json.loads(manifest_path.read_text())
            write_json(run.checkpoint_dir / "config.json", config)
            write_json(manifest_path, _manifest(run, config, argv or [], resume, previous))
            _log_summary(logger, model, config, device, info, data_loader, valid_data_loader, run, state, changes,
                         init_report)
        metrics = trainer.train()
        if info.is_main:
            writer.add_hparams(_hparams(config), {f"hparam/{k}": v for k, v in metrics.items() if k != "epoch"})
            logger.info(f"Checkpoints: {run.checkpoint_dir}")
        return metrics
    finally:
        writer.close()
        close_logging()
        dist.cleanup()
        torch.use_deterministic_algorithms(deterministic_before)


def _init_weights(model, path, strict):
    """Load the model weights of another run's checkpoint; returns a report of what did not match.

    With ``strict=False`` tensors whose name is unknown or whose shape differs (a new
    classifier head, say) are skipped and listed instead of failing the run.
    """
    weights = load_checkpoint(path)["model"]
    own = model.state_dict()
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


def _wrap_model(model, config, device, info, logger):
    """What runs the steps: the model itself, or compiled / DistributedDataParallel / DataParallel around it.

    Checkpoints always save ``model`` itself, so no ``_orig_mod.`` or ``module.`` prefixes reach the saved keys.
    """
    import torch

    forward = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif config["n_gpu"] > 1 and device.type == "cuda" and torch.cuda.device_count() > 1:
        n = min(config["n_gpu"], torch.cuda.device_count())
        logger.warning(f"n_gpu={n}: using DataParallel. torchrun is faster: torchrun --nproc_per_node={n} train.py -c CONFIG")
        forward = torch.nn.DataParallel(model, device_ids=list(range(n)))
    if config["trainer"]["compile"]:
        forward = torch.compile(forward)
    return forward


def _grad_scaler(device):
    import torch

    try:
        return torch.amp.GradScaler(device.type)
    except (AttributeError, TypeError):  # torch < 2.3
        return torch.cuda.amp.GradScaler()


def _hparams(config):
    from utils.config import flatten

    return {k: v for k, v in flatten(config).items() if isinstance(v, (int, float, str, bool))}


def _log_summary(logger, model, config, device, info, loader, valid, run, state, changes, init_report):
    from base.base_model import count_parameters

    trainable, frozen = count_parameters(model)
    logger.debug(str(model))
    logger.info(f"Run {config['name']}/{run.run_id} on {device}"
                + (f", world size {info.world_size}" if info.enabled else ""))
    logger.info(f"Parameters: {trainable:,} trainable, {frozen:,} frozen")
    batch = loader.batch_size
    logger.info(f"Batch size {batch} per process, {batch * info.world_size * config['trainer']['accumulate_grad_batches']}"
                f" per optimizer step; {len(loader)} batches per epoch, "
                f"{len(valid.sampler.indices) if valid else 0} validation samples")
    if state is not None:
        logger.info(f"Resumed from epoch {state['epoch']}, batch {state['batch_in_epoch']}, step {state['global_step']}")
        for line in changes:
            logger.info(f"  changed: {line}")
    if init_report:
        logger.info(init_report)


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Train a model from a config file.")
    parser.add_argument("-c", "--config", help="config file (JSON, or YAML ending in .yaml/.yml)")
    parser.add_argument("-r", "--resume", help="checkpoint to continue (its run folder and settings)")
    parser.add_argument("--run-id", help="name of the run folder (default: the start time)")
    parser.add_argument("--lr", type=float, help="shortcut for optimizer.args.lr=VALUE")
    parser.add_argument("--bs", type=int, help="shortcut for data_loader.args.batch_size=VALUE")
    parser.add_argument("--init-from", help="start a new run from this checkpoint's model weights (fine-tuning)")
    parser.add_argument("--init-from-strict", choices=("true", "false"), default="true",
                        help="whether --init-from must match every key (default true)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=VALUE", help="change any config key")
    args = parser.parse_args(argv)
    if not args.config and not args.resume:
        parser.error("give -c CONFIG to start a run, or -r CHECKPOINT to resume one")
    if args.resume and args.init_from:
        parser.error("-r continues a run and --init-from starts a new one: give one of them")
    return args


def resolve_config(args):
    """The config a command line asks for: the file (or the checkpoint's, when resuming) with overrides applied."""
    overrides = list(args.overrides)
    if args.lr is not None:
        overrides.append(f"optimizer.args.lr={args.lr}")
    if args.bs is not None:
        overrides.append(f"data_loader.args.batch_size={args.bs}")
    if args.config:
        config = load_config(args.config)
    elif overrides:
        config = load_checkpoint(args.resume)["config"]
    else:
        return None
    return apply_overrides(config, overrides)


def cli(argv=None):
    from base.base_trainer import RunStopped

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        config = resolve_config(args)
        main(config, resume=args.resume, run_id=args.run_id, init_from=args.init_from,
             init_strict=args.init_from_strict == "true", argv=["train.py", *argv])
    except UserError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except RunStopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    code = cli()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run is over: a late Ctrl-C must not print a traceback
    sys.exit(code)
