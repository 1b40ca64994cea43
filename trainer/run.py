"""Setting up a run and evaluating a checkpoint: what ``train.py`` and ``test.py`` call.

:func:`train` reads top to bottom as the life of a run:

1. check the config (the checkpoint's too when resuming): nothing is written before this passes;
2. pick the device and join the process group (torchrun);
3. build the components and check them against each other, the dry batch last (:func:`checked_parts`);
4. open the run: its folders, logging and writer (TensorBoard and the other loggers: :func:`open_run`);
5. construct the :class:`~trainer.trainer.Trainer`, restore it when resuming, write the manifest
   (:func:`begin`), train, and close with the end block (:func:`end`).

:func:`evaluate_checkpoint` rebuilds a checkpoint's model and scores its config's test split.
"""

import contextlib
import gc
import json
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from base.base_trainer import Parts, Run, RunStopped
from trainer import build
from utils import dist
from utils import parts as optional_parts
from utils.config import ConfigError, check_path_component, flatten, logger_entries, validate_config
from utils.errors import UserError
from utils.io import load_checkpoint, remove_stale_temp_files, write_json

AUTO = "auto"  # ``-r auto``: resume the newest resumable checkpoint of the run, or start it


def train(config=None, resume=None, run_id=None, init_from=None, init_strict=True, argv=None, overwrite=False):
    """Train; returns the last epoch's metrics (``{"epoch": N, "loss": ..., "val_loss": ..., ...}``).

    ``config`` is a dict (None: the checkpoint's); ``resume`` a checkpoint to continue, or ``"auto"``;
    ``init_from`` a checkpoint whose weights start a new run (``init_strict``: all keys must match);
    ``argv`` is recorded in the manifest; ``overwrite`` resumes in place even over later checkpoints.
    Raises UserError (found before anything is written) or RunStopped (interrupted, or diverged).
    """
    from trainer.trainer import Trainer

    started = time.perf_counter()
    start = starting_point(config, resume, run_id, overwrite)  # 1. the config, checked: nothing is written before
    info, device = dist.setup(build.resolve_device(start.config["device"]))  # 2. the device and process group
    parts = trainer = run = None
    try:
        parts, init_report = checked_parts(start, device, info, init_from, init_strict)  # 3. built; the dry batch
        run = open_run(start.config, start.run_id, start.resume, info, start.state, start.overwrite)  # 4. folders
        try:
            with backend_flags(start.config["trainer"], device):  # 5. train
                place_parts(parts, start.config, run)
                trainer = Trainer(start.config, parts, run)
                begin(trainer, start, argv, init_report)
                metrics = trainer.train()
            end(trainer, metrics, time.perf_counter() - started)
            dist.leave_together()
            return metrics
        finally:
            close_run(run)
    except RunStopped as stopped:  # every process stops together (the stop was agreed on): they leave together too
        if stopped.together:  # (not a process stopping alone: the others are not there to wait for)
            dist.leave_together()
        raise
    finally:
        parts = trainer = run = None  # noqa: F841 (see let_go)
        let_go(info)


def let_go(info):
    """Leave the process group. The run's objects hold it (DDP's reducer does) and sit in reference cycles: left to
    the interpreter's exit, gloo's threads would be torn down with it, which can abort the process ("terminate
    called without an active exception") after a run that succeeded. So they are let go first."""
    if info.enabled:
        if sys.exc_info()[1] is not None:  # (an error's traceback holds the frames that hold them)
            traceback.clear_frames(sys.exc_info()[1].__traceback__)
        gc.collect()
    dist.cleanup()


# --------------------------------------------------------------------------- 1. the config


@dataclass
class Start:
    """Where a run starts: its checked config and, when it continues one, the checkpoint and its state."""

    config: dict
    state: dict = None
    resume: str = None
    run_id: str = None
    overwrite: bool = False
    changes: list = field(default_factory=list)  # how the config differs from the checkpoint's (logged)
    skipped: list = field(default_factory=list)  # -r auto: the damaged checkpoints passed over (logged)


def starting_point(config, resume, run_id, overwrite):
    """The checked config and what the run continues: a checkpoint, ``-r auto``'s newest one, or nothing.

    Raises:
        UserError: a problem in the config or the checkpoint (all of them at once).
        RunStopped: the checkpoint's run is over (exit code 0), or a part's check_resume refused it.
    """
    skipped = []
    if resume == AUTO:  # the run's newest resumable checkpoint, continued in place; or the run started
        resume, state, run_id, skipped = auto_resume(config, run_id)
        overwrite = True
    else:
        state = load_checkpoint(resume) if resume else None
    config, changes = checked_config(config, state)
    if state is not None and state.get("stopped_early"):  # -r CKPT of an early-stopped run
        from utils.resume import run_is_finished

        if done := run_is_finished(state, config):
            raise RunStopped(f"{resume}: nothing to resume: {done}", exit_code=0)
    if state is not None:  # a part may refuse to train on from it in this launch (RunStopped; utils/parts.py)
        optional_parts.call_each(config, "check_resume", state, resume)
    return Start(config, state, resume, run_id, overwrite, changes, skipped)


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
    from utils.resume import carry_data_args, check_resume_changes  # (only a resume needs the resume policy)

    saved = state["config"]
    config = validate_config(saved if config is None else carry_data_args(saved, config), registries)
    changes = check_resume_changes(saved, config, mid_epoch=state["batch_in_epoch"] > 0)
    epochs, done = config["trainer"]["epochs"], state["epoch"]
    if done >= epochs:
        raise ConfigError(f"trainer.epochs: the checkpoint has completed {done} of {epochs} epochs, so there is"
                          f" nothing to train; resume with trainer.epochs={done + 1} or more to train on")
    return config, changes


def auto_resume(config, run_id=None):
    """``-r auto``: ``(checkpoint, state, run_id, skipped)`` of the run's newest resumable checkpoint (see
    :func:`utils.resume.find_resumable`), or ``(None, None, run_id, skipped)`` to start the run.

    Raises:
        UserError: no config to find the run by, or a bad run id.
        RunStopped: (exit code 0) the newest checkpoint has finished the run: nothing to do.
    """
    from utils.resume import find_resumable, run_is_finished

    if config is None:
        raise UserError("-r auto needs the run's config (-c CONFIG): its name and trainer.save_dir say where the run is")
    if run_id is not None and (problem := check_path_component(run_id, "--run-id")):
        raise UserError(problem)
    checked = validate_config(config, build.registries())
    path, state, found_id, skipped = find_resumable(checked, run_id)
    if state is not None and (done := run_is_finished(state, checked)):
        raise RunStopped(f"{path}: nothing to resume: {done}", exit_code=0)
    return (str(path) if path else None), state, found_id or run_id, skipped


# --------------------------------------------------------------------------- 3. the components


def checked_parts(start, device, info, init_from=None, init_strict=True):
    """The run's components, built and checked against each other; the dry batch is the last check, after which
    the run's folders may be created. Returns ``(parts, init_report)``."""
    from trainer.preflight import check_plan, check_shards, dry_batch
    from utils import parts as optional_parts
    from utils.seed import seed_everything

    config = start.config
    build.check_amp(config["trainer"]["amp"], device)
    if info.enabled and config["trainer"]["skip_nonfinite"]:
        raise ConfigError("trainer.skip_nonfinite: not supported under torchrun (every process would have to"
                          " agree on each step); leave it false there, so a non-finite loss stops the run")
    seed_everything(config["seed"])
    parts = build_parts(config, device, info)
    optional_parts.call_each(config, "prepare", config, parts)  # the parts' changes (overfit_batches' batches)
    # The class order and feature scaling the data fixed, kept in config.json and every checkpoint's
    # config, so that test.py (and a resume) rebuilds the data the same way.
    config["data_loader"]["args"].update(parts.data_loader.data_args())
    init_report = None
    if init_from:
        from utils.resume import init_weights

        init_report = init_weights(parts.model, init_from, init_strict)
    check_plan(config, parts)
    check_shards(parts, info)
    optional_parts.call_each(config, "prepare", config, parts)  # the parts' (utils/parts.py)
    dry_batch(config, parts)
    return parts, init_report


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
    return Parts(model=model, criterion=build.build_loss(config, device), metric_fns=build.build_metrics(config),
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


def run_folders(config, run_id=None, resume=None, state=None, overwrite=False):
    """Where the run goes: ``(run_id, checkpoint_dir, log_dir, branched_from)``. Nothing is created here.

    A new run gets ``<save_dir>/models/<name>/<run_id>`` and ``<save_dir>/log/<name>/<run_id>``.
    A resumed run continues in its checkpoint's folder, unless that would overwrite later
    work: when the folder holds a checkpoint of a later step than the one resumed (or
    ``run_id`` names another folder) the run branches into a new folder,
    ``<run_id>-from-<checkpoint name>``, and ``branched_from`` says from where. ``overwrite``
    continues in place regardless.
    """
    save_dir, name = Path(config["trainer"]["save_dir"]), config["name"]
    models = save_dir / "models" / name
    branched_from = None
    if run_id is not None and (problem := check_path_component(run_id, "--run-id")):
        raise UserError(problem)
    if resume is not None:
        checkpoint_dir = Path(resume).resolve().parent
        from utils.resume import newer_checkpoints

        newer = [] if overwrite else newer_checkpoints(checkpoint_dir, resume, state["global_step"])
        if run_id is None or run_id == checkpoint_dir.name:
            run_id = checkpoint_dir.name
            if newer:
                run_id = _free_id(models, f"{checkpoint_dir.name}-from-{Path(resume).stem}")
        if run_id != checkpoint_dir.name:
            branched_from = {"run_dir": str(checkpoint_dir), "checkpoint": str(resume),
                             "global_step": state["global_step"], "newer_checkpoints": newer}
        else:
            return run_id, checkpoint_dir, save_dir / "log" / name / run_id, None
    elif run_id is None:
        run_id = _free_id(models, time.strftime("%Y%m%d-%H%M%S"))
    if (models / run_id).exists() and not overwrite:  # overwrite: -r auto starting a run that saved nothing yet
        raise UserError(f"run folder {models / run_id} already exists: choose another --run-id,"
                        " or resume it with -r <checkpoint>")
    return run_id, models / run_id, save_dir / "log" / name / run_id, branched_from


def _free_id(folder, base):
    run_id, n = base, 1
    while (folder / run_id).exists():
        n += 1
        run_id = f"{base}-{n}"
    return run_id


def agree_on_run(config, run_id, resume, info, state=None, overwrite=False):
    """Rank 0 picks the run folders and every rank gets the same ones (or the same error)."""
    chosen = None
    if info.is_main:
        try:
            run_id, checkpoint_dir, log_dir, branched_from = run_folders(config, run_id, resume, state, overwrite)
            chosen = [run_id, str(checkpoint_dir), str(log_dir), branched_from]
        except UserError as err:
            chosen = str(err)
    chosen = dist.broadcast_object(chosen, info)
    if isinstance(chosen, str):
        raise UserError(chosen)
    return chosen[0], Path(chosen[1]), Path(chosen[2]), chosen[3]


def open_run(config, run_id=None, resume=None, info=None, state=None, overwrite=False):
    """Create the run's folders (rank 0), set up logging and the writer of ``trainer.loggers``; returns a :class:`Run`.

    When resuming in place, the loggers drop what the interrupted run logged after its checkpoint.
    """
    from logger.logger import setup_logging
    from logger.logger import WriterContext, open_writer

    cfg, info = config["trainer"], info or dist.DistInfo()
    run_id, checkpoint_dir, log_dir, branched_from = agree_on_run(config, run_id, resume, info, state, overwrite)
    # A dry run (a part's writes(config) is False: fast_dev_run) creates no folder and writes no file.
    run_writes = all(optional_parts.call_each(config, "writes", config))
    writes = info.is_main and run_writes
    if writes:
        try:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            log_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(checkpoint_dir)  # left by a kill -9 in the middle of a write
        except OSError as err:
            raise UserError(f"trainer.save_dir: cannot create the run folders under {cfg['save_dir']}: "
                            f"{err.strerror or err}; choose a folder you can write to") from None
    logger = setup_logging(log_dir if writes else None, cfg["verbosity"] if info.is_main else 0)
    purge = state["global_step"] + 1 if state else 0 if overwrite else None  # (a restart drops the try before's)
    context = WriterContext(config, log_dir, run_id, state, purge, branched_from is not None, logger)
    writer = open_writer(config, context, enabled=writes)  # TensorBoard, metrics.csv, MLflow, ... (trainer.loggers)
    return Run(run_id=run_id, checkpoint_dir=checkpoint_dir, log_dir=log_dir, logger=logger, writer=writer,
               dist=info, resumed_from=resume, branched_from=branched_from, writes=run_writes)


def close_run(run):
    from logger.logger import close_logging

    run.writer.close()
    close_logging()


# --------------------------------------------------------------------------- 5. resume, manifest, summary


def begin(trainer, start, argv, init_report):
    """Before the first step: restore the checkpoint's state, write the run's files, log what the run is."""
    run, config = trainer.run, start.config
    if start.state is not None:
        restore(trainer, start.state, config)
    if run.dist.is_main:
        for line in start.skipped:
            run.logger.warning(line)
        write_run_files(run, config, argv, start.resume)
        log_summary(run, config, trainer.parts, start.state, start.changes, init_report)


def end(trainer, metrics, seconds):
    """After the last epoch (rank 0): the hyperparameters and final values for TensorBoard, the trackers'
    artifacts, and the end block (with the test split's scores)."""
    run, config = trainer.run, trainer.config
    if not run.dist.is_main:
        return
    if not run.writes:
        run.logger.info(f"dry run: {trainer.global_step} steps and validation ran; nothing was written"
                        f" (the run would have gone to {run.checkpoint_dir} and {run.log_dir})")
        return
    # The config as it is at the end (a list as its JSON text), once per run: a resume replaces it.
    hparams = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
               for k, v in flatten(config).items() if v is not None}
    final = {f"hparam/{k}": v for k, v in metrics.items() if k != "epoch"}
    if trainer.best_epoch is not None:
        final[f"hparam/best_{trainer.monitor_key}"] = trainer.monitor_best
    run.writer.add_hparams(hparams, final)
    run.writer.finish(run.checkpoint_dir)  # trackers' artifacts (MLflow: config, manifest, model_best)
    log_end(run, config, trainer, metrics, seconds)


def restore(trainer, state, config):
    """Continue the run that wrote ``state``, with the changed optimizer and scheduler arguments of ``config``."""
    from utils.resume import apply_resume_changes, batch_split

    trainer.load_state_dict(state)
    apply_resume_changes(state["config"], config, trainer.optimizer, trainer.lr_scheduler)
    logger = trainer.logger
    if state["batch_in_epoch"] and (factor := batch_split(state["config"], config)):
        trainer.batch_in_epoch *= factor  # the same samples done, counted in batches of the new size
        logger.info(f"each batch is split in {factor} from here on: continuing at batch {trainer.batch_in_epoch}"
                    f" of the epoch, the same sample as the checkpoint's batch {state['batch_in_epoch']}")
    if state["config"]["seed"] != config["seed"]:
        logger.warning("the seed changed: the data order from here on differs from the original run's")
    if state.get("world_size", 1) != trainer.world_size:
        logger.warning(f"resuming a run of {state.get('world_size', 1)} processes with {trainer.world_size}:"
                       " each process's share of the data, and so the data order, changes from here on")


def write_run_files(run, config, argv, resume):
    """The run's ``config.json`` and ``manifest.json`` (a resume adds to the manifest's history).

    A branch (a resume into a new folder) records where it came from, and the run it came
    from records the branch in its own manifest.
    """
    if not run.writes:
        loggers = ", ".join(name for name, _ in logger_entries(config["trainer"]))
        run.logger.info(f"dry run: would write config.json and manifest.json to {run.checkpoint_dir}, and"
                        f" info.log{' and the files of ' + loggers if loggers else ''} to {run.log_dir}")
        return
    manifest_path = run.checkpoint_dir / "manifest.json"
    previous = _read_manifest(manifest_path) if resume else None
    write_json(run.checkpoint_dir / "config.json", config)
    record = manifest(run, config, argv or [], resume, previous)
    if run.branched_from:
        origin_path = Path(run.branched_from["run_dir"]) / "manifest.json"
        origin = _read_manifest(origin_path)
        record["command"] = argv or []
        record["branched_from"] = run.branched_from
        if origin is not None:
            origin.setdefault("branches", []).append({
                "time": time.strftime("%Y-%m-%d %H:%M:%S"), "run_dir": str(run.checkpoint_dir),
                "checkpoint": Path(run.branched_from["checkpoint"]).name, "command": argv or []})
            write_json(origin_path, origin)
    write_json(manifest_path, record)


def _read_manifest(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def manifest(run, config, argv, resume, previous=None):
    """What it takes to reproduce a run: command, resolved config, git commit, library versions, resume history."""
    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:
        tv = None
    history = list((previous or {}).get("resume_history", []))
    if resume:
        # (under SLURM or torchrun also the job id and how often it was requeued or restarted: utils/dist.py)
        history.append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "checkpoint": str(resume), "command": argv,
                        **dist.launch_context()})
    return {
        "run_id": run.run_id,
        "command": (previous or {}).get("command", argv) if resume else argv,
        "config": config,
        "seed": config["seed"],
        "git_commit": _git_commit(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "torchvision": tv,
                     "cuda": torch.version.cuda},
        "resume_history": history,
        "trackers": run.writer.run_ids(),  # e.g. {"mlflow": RUN_ID}
    }


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent.parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def log_summary(run, config, parts, state, changes, init_report):
    logger, info, loader, valid = run.logger, run.dist, parts.data_loader, parts.valid_data_loader
    trainable = sum(p.numel() for p in parts.model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in parts.model.parameters()) - trainable
    logger.info(f"Run {config['name']}/{run.run_id} on {parts.device}"
                + (f", world size {info.world_size}" if info.enabled else ""))
    logger.info(f"Parameters: {trainable:,} trainable, {frozen:,} frozen")
    batch = loader.batch_size
    logger.info(f"Batch size {batch} per process, {batch * info.world_size * config['trainer']['accumulate_grad_batches']}"
                f" per optimizer step; {len(loader)} batches per epoch, "
                f"{len(valid.sampler.indices) if valid else 0} validation samples")
    if state is not None:
        logger.info(f"Resumed from epoch {state['epoch']}, batch {state['batch_in_epoch']}, step {state['global_step']}")
        if run.branched_from and run.branched_from["newer_checkpoints"]:
            logger.warning(f"{Path(run.branched_from['checkpoint']).name} is not the newest checkpoint of its run"
                           f" ({', '.join(run.branched_from['newer_checkpoints'])} hold later steps): continuing in a"
                           f" new run folder, {run.checkpoint_dir}, so nothing is overwritten (--overwrite continues"
                           " in place)")
        elif run.branched_from:
            logger.info(f"Continuing {run.branched_from['run_dir']} in a new run folder, {run.checkpoint_dir}")
        else:
            logger.info(f"Continuing in {run.checkpoint_dir}")
        for line in changes:
            logger.info(f"  changed: {line}")
    if init_report:
        logger.info(init_report)


def log_end(run, config, trainer, metrics, seconds):
    """The end of a run in one block: wall time, the best epoch, where the checkpoints are, the test split's scores.

    With ``trainer.test_after_train`` (the default) the best checkpoint (or the last, when
    nothing is monitored) is scored on the test split as ``test.py`` would, and its
    ``.test.json`` written beside it.
    """
    logger, folder = run.logger, run.checkpoint_dir
    lines = [f"Finished {config['name']}/{run.run_id} in {_duration(seconds)}: {trainer.epoch} epochs,"
             f" {trainer.global_step} steps"]
    best = folder / "model_best.pth"
    if trainer.best_epoch is not None:
        lines.append(f"Best {trainer.monitor_key} {trainer.monitor_best:.6g} at epoch {trainer.best_epoch}"
                     f" ({best.name})")
    if trainer.ended_by:
        lines.append(f"Ended after epoch {trainer.epoch}: {trainer.ended_by}")
    if trainer.nonfinite_skips:  # a warning: visible at any verbosity
        logger.warning(f"Skipped {trainer.nonfinite_skips} steps with a non-finite loss (trainer.skip_nonfinite)")
    lines.append(f"Checkpoints: {folder}")
    scored = best if best.is_file() else folder / f"checkpoint-epoch{metrics.get('epoch')}.pth"
    scores = None
    if config["trainer"].get("test_after_train", True) and scored.is_file():
        try:
            scores = evaluate_checkpoint(scored, progress=False)
        except UserError as err:  # no test split, say: the run itself succeeded
            lines.append(f"Test split not scored: {err.problems[0]}")
        else:
            shown = "  ".join(f"{k} {v:.6g}" for k, v in scores.items() if k != "n_samples")
            lines.append(f"Test split ({scores['n_samples']} samples, {scored.name}): {shown}")
    for line in lines:
        logger.info(line)
    # What a script (a sweep, say) reads of the run: its final, best and test values.
    write_json(folder / "result.json", {
        "run_id": run.run_id, "epochs": trainer.epoch, "steps": trainer.global_step, "seconds": round(seconds, 3),
        "final": metrics, "monitor": trainer.monitor_key,
        "best": trainer.monitor_best if trainer.best_epoch is not None else None, "best_epoch": trainer.best_epoch,
        "ended_by": trainer.ended_by, "test": scores, "test_checkpoint": scored.name if scores else None})


def _duration(seconds):
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}h {minutes:02d}m {seconds:04.1f}s" if hours else f"{minutes}m {seconds:04.1f}s" if minutes else f"{seconds:.1f} s"


# --------------------------------------------------------------------------- test.py


def test_results_path(checkpoint):
    """Where :func:`evaluate_checkpoint` writes its scores: ``model_best.test.json`` for ``model_best.pth``."""
    return Path(checkpoint).with_suffix(".test.json")


def evaluate_checkpoint(checkpoint, overrides=(), device=None, write=True, progress=None):
    """Evaluate ``checkpoint`` on its config's test split; returns ``{"loss": ..., "<metric>": ..., "n_samples": N}``.

    ``overrides`` (``key.path=VALUE``) change the checkpoint's config, e.g. ``data_loader.args.data_dir=...``.
    With ``write``, the result is also written beside the checkpoint (``.test.json`` for ``.pth``).
    """
    from trainer.trainer import evaluate

    model, config, device, autocast = build.trained_model(checkpoint, overrides, device)
    loader = build.build_data_loader(config, training=False)
    if len(loader.sampler) == 0:
        raise UserError(f"{config['data_loader']['type']}: the test split is empty (0 samples), so there is nothing to"
                        " score; give the data a test split (the built-in sets: data_loader.args.test_fraction > 0)")
    loader.to(device)
    progress = config["trainer"]["verbosity"] > 0 if progress is None else progress
    metrics = evaluate(model, loader, build.build_loss(config, device), build.build_metrics(config), device, autocast,
                       progress=progress)
    metrics["n_samples"] = len(loader.sampler)
    if write:
        write_json(test_results_path(checkpoint), {"checkpoint": str(checkpoint), **metrics})
    return metrics
