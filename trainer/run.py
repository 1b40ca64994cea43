"""Setting up a run and evaluating a checkpoint: what ``train.py`` and ``test.py`` call.

:func:`train` reads top to bottom as the life of a run:

1. check the config (the checkpoint's too when resuming): nothing is written before this passes;
2. pick the device and join the process group (torchrun);
3. build the components (:func:`build_parts`);
4. open the run: its folders, logging and TensorBoard writer (:func:`open_run`);
5. construct the :class:`~trainer.trainer.Trainer`, restore it when resuming, write the manifest, train.

:func:`evaluate_checkpoint` rebuilds a checkpoint's model and scores its config's test split.
"""

import contextlib
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from base.base_trainer import Parts, Run
from trainer import build
from utils import dist
from utils.config import ConfigError, flatten, validate_config
from utils.errors import UserError
from utils.io import load_checkpoint, write_json
from utils.resume import apply_resume_changes, check_resume_changes, init_weights


def train(config=None, resume=None, run_id=None, init_from=None, init_strict=True, argv=None):
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
    from trainer.trainer import Trainer
    from utils.seed import seed_everything

    state = load_checkpoint(resume) if resume else None
    config, changes = checked_config(config, state)
    device = build.resolve_device(config["device"])
    info, device = dist.setup(device)
    try:
        build.check_amp(config["trainer"]["amp"], device)
        if info.enabled and config["trainer"]["skip_nonfinite"]:
            raise ConfigError("trainer.skip_nonfinite: not supported under torchrun (every process would have to"
                              " agree on each step); leave it false there, so a non-finite loss stops the run")
        seed_everything(config["seed"])
        parts = build_parts(config, device, info)
        init_report = init_weights(parts.model, init_from, init_strict) if init_from else None

        run = open_run(config, run_id, resume, info, state)
        try:
            with backend_flags(config["trainer"], device):
                place_parts(parts, config, run)
                trainer = Trainer(config, parts, run)
                if state is not None:
                    restore(trainer, state, config)
                if info.is_main:
                    write_run_files(run, config, argv, resume)
                    log_summary(run, config, parts, state, changes, init_report)
                metrics = trainer.train()
            if info.is_main:
                hparams = {k: v for k, v in flatten(config).items() if isinstance(v, (int, float, str, bool))}
                run.writer.add_hparams(hparams, {f"hparam/{k}": v for k, v in metrics.items() if k != "epoch"})
                run.logger.info(f"Checkpoints: {run.checkpoint_dir}")
            return metrics
        finally:
            close_run(run)
    finally:
        dist.cleanup()


# --------------------------------------------------------------------------- 1. the config


def checked_config(config, state=None):
    """The checked config, and the lines saying how it differs from a resumed checkpoint's.

    Raises:
        UserError: any problem, all at once; or no config and nothing to resume.
    """
    registries = build.registries()
    if state is None:
        if config is None:
            raise UserError("give a config (-c config.json) or a checkpoint to resume (-r checkpoint.pth)")
        return validate_config(config, registries), []
    saved = state["config"]
    config = validate_config(saved if config is None else config, registries)
    return config, check_resume_changes(saved, config, mid_epoch=state["batch_in_epoch"] > 0)


# --------------------------------------------------------------------------- 3. the components


def build_parts(config, device, info=None):
    """Data loaders, model, freezing, loss, metrics, optimizer and scheduler, as the config names them.

    Nothing is written and nothing is moved yet except the model (fused CUDA optimizers need
    it on the device before they are built); :func:`place_parts` finishes the placement.
    """
    cfg = config["trainer"]
    data_loader = build.build_data_loader(config)
    valid_data_loader = data_loader.split_validation()
    model = build.build_model(config).to(device)
    frozen = build.freeze(model, cfg["freeze"]) if cfg["freeze"] else []
    optimizer = build.build_optimizer(model, config, device)
    missing = [m for m in cfg["activation_histograms"] if m not in dict(model.named_modules())]
    if missing:
        names = [n for n, _ in model.named_modules() if n][:8]
        raise ConfigError(f"trainer.activation_histograms: no module named {missing[0]!r};"
                          f" modules are named like {', '.join(names)}")
    return Parts(model=model, criterion=build.build_loss(config), metric_fns=build.build_metrics(config),
                 optimizer=optimizer, lr_scheduler=build.build_scheduler(optimizer, config),
                 data_loader=data_loader, valid_data_loader=valid_data_loader, device=device, frozen=frozen,
                 scaler=build.grad_scaler(device) if cfg["amp"] == "fp16" else None,
                 forward_model=model)


def place_parts(parts, config, run):
    """Move the data to the device, give each process its shard, and wrap the model for the steps."""
    info = run.dist
    loaders = [loader for loader in (parts.data_loader, parts.valid_data_loader) if loader is not None]
    for loader in loaders:
        loader.to(parts.device)
        if info.enabled:
            loader.shard(info.rank, info.world_size)
    parts.wrap = lambda model: build.wrap_model(model, config, parts.device, info, run.logger)
    parts.forward_model = parts.wrap(parts.model)


@contextlib.contextmanager
def backend_flags(cfg, device):
    """Determinism and the CUDA speed flags the config asks for, with determinism restored afterwards."""
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        # TF32 matmuls and cuDNN's autotuner: large speed-ups on Ampere and later GPUs; the autotuner picks
        # kernels by timing, so it is off when the run must be deterministic.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg["tf32"]
        torch.backends.cudnn.benchmark = cfg["cudnn_benchmark"] and not cfg["deterministic"]
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic_before)


# --------------------------------------------------------------------------- 4. the run's folders


def run_folders(config, run_id, checkpoint_path=None):
    """``(run_id, checkpoint_dir, log_dir)``: ``<save_dir>/models/<name>/<run_id>`` and ``<save_dir>/log/<name>/<run_id>``.

    A resumed run continues in the folder of the checkpoint it resumes from. Nothing is created here.
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
    return run_id, checkpoint_dir, save_dir / "log" / name / run_id


def agree_on_run(config, run_id, resume, info):
    """Rank 0 picks the run folders and every rank gets the same ones (or the same error)."""
    chosen = None
    if info.is_main:
        try:
            chosen = [str(x) for x in run_folders(config, run_id, resume)]
        except UserError as err:
            chosen = str(err)
    chosen = dist.broadcast_object(chosen, info)
    if isinstance(chosen, str):
        raise UserError(chosen)
    return chosen[0], Path(chosen[1]), Path(chosen[2])


def open_run(config, run_id=None, resume=None, info=None, state=None):
    """Create the run's folders (rank 0), set up logging and the TensorBoard writer; returns a :class:`Run`.

    When resuming, TensorBoard drops the events the interrupted run wrote after its checkpoint.
    """
    from logger.logger import setup_logging
    from logger.visualization import TensorboardWriter

    cfg, info = config["trainer"], info or dist.DistInfo()
    run_id, checkpoint_dir, log_dir = agree_on_run(config, run_id, resume, info)
    if info.is_main:
        try:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"trainer.save_dir: cannot create the run folders under {cfg['save_dir']}: "
                            f"{err.strerror or err}; choose a folder you can write to") from None
    logger = setup_logging(log_dir if info.is_main else None, cfg["verbosity"] if info.is_main else 0)
    purge = state["global_step"] + 1 if state else None
    writer = TensorboardWriter(log_dir, cfg["tensorboard"] and info.is_main, purge_step=purge, logger=logger)
    return Run(run_id=run_id, checkpoint_dir=checkpoint_dir, log_dir=log_dir, logger=logger, writer=writer,
               dist=info, resumed_from=resume)


def close_run(run):
    from logger.logger import close_logging

    run.writer.close()
    close_logging()


# --------------------------------------------------------------------------- 5. resume, manifest, summary


def restore(trainer, state, config):
    """Continue the run that wrote ``state``, with the changed optimizer and scheduler arguments of ``config``."""
    trainer.load_state_dict(state)
    apply_resume_changes(state["config"], config, trainer.optimizer, trainer.lr_scheduler)
    logger = trainer.logger
    if state["config"]["seed"] != config["seed"]:
        logger.warning("the seed changed: the data order from here on differs from the original run's")
    if state.get("world_size", 1) != trainer.world_size:
        logger.warning(f"resuming a run of {state.get('world_size', 1)} processes with {trainer.world_size}:"
                       " each process's share of the data, and so the data order, changes from here on")


def write_run_files(run, config, argv, resume):
    """The run's ``config.json`` and ``manifest.json`` (a resume adds to the manifest's history)."""
    manifest_path = run.checkpoint_dir / "manifest.json"
    previous = json.loads(manifest_path.read_text()) if resume and manifest_path.is_file() else None
    write_json(run.checkpoint_dir / "config.json", config)
    write_json(manifest_path, manifest(run, config, argv or [], resume, previous))


def manifest(run, config, argv, resume, previous=None):
    """What it takes to reproduce a run: command, resolved config, git commit, library versions, resume history."""
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


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent.parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def log_summary(run, config, parts, state, changes, init_report):
    from base.base_model import count_parameters

    logger, info, loader, valid = run.logger, run.dist, parts.data_loader, parts.valid_data_loader
    trainable, frozen = count_parameters(parts.model)
    logger.debug(str(parts.model))
    logger.info(f"Run {config['name']}/{run.run_id} on {parts.device}"
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


# --------------------------------------------------------------------------- test.py


def evaluate_checkpoint(resume, overrides=(), device=None, write=True):
    """Evaluate the checkpoint ``resume`` on its config's test split; returns ``{"loss": ..., "<metric>": ..., "n_samples": N}``.

    ``overrides`` (``key.path=VALUE``) change the checkpoint's config, e.g. ``data_loader.args.data_dir=...``.
    With ``write``, the result is also written beside the checkpoint (``.test.json`` for ``.pth``).
    """
    from trainer.trainer import evaluate
    from utils.config import apply_overrides

    state = load_checkpoint(resume)
    config = apply_overrides(state["config"], list(overrides) + ([f"device={device}"] if device else []))
    config = validate_config(config, build.registries())
    device = build.resolve_device(config["device"])
    loader = build.build_data_loader(config, training=False)
    model = build.build_model(config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise UserError(f"{resume}: the weights do not fit the model its config builds ({str(err).splitlines()[0]})") from None
    model.to(device)
    loader.to(device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config["trainer"]["amp"])
    autocast = torch.autocast(device.type, dtype=amp) if amp and device.type != "cpu" else None
    metrics = evaluate(model, loader, build.build_loss(config), build.build_metrics(config), device, autocast,
                       progress=config["trainer"]["verbosity"] > 0)
    metrics["n_samples"] = len(loader.sampler)
    if write:
        write_json(Path(resume).with_suffix(".test.json"), {"checkpoint": str(resume), **metrics})
    return metrics
