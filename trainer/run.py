"""The life of a run (:func:`train`, what ``train.py`` calls) and the scoring of a checkpoint (what ``test.py`` calls).

:func:`train` reads as the five steps of a run: check the config (nothing is written before this passes); the
device and process group; the components, checked (the dry batch last) and placed; the run's folders, logging and
writer; train, between :func:`begin` and :func:`end`. What only a resume needs is in ``utils/resume.py``, what only
torchrun needs in ``trainer/torchrun.py``."""

import contextlib
import datetime
import functools
import json
import platform
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from base.base_trainer import STOP_SIGNALS, Parts, Run, RunStopped, seed_everything
from logger.logger import RESULT
from trainer import build
from utils import dist
from utils import parts as optional_parts
from utils.config import check_path_component, flatten, init_obj, logger_entries, validate_config
from utils.errors import ConfigError, UserError
from utils.io import lock_folder, write_json


def train(config=None, resume=None, run_id=None, init_from=None, init_strict=True, argv=None, overwrite=False):
    """Train; returns the last epoch's metrics (``{"epoch": N, "loss": ..., "val_loss": ..., ...}``). ``config``: a
    dict (None: the checkpoint's); ``resume``: a checkpoint to continue, or ``"auto"``; ``init_from``: a checkpoint
    whose weights start a new run (``init_strict``: every key must match); ``argv``: for the manifest; ``overwrite``:
    resume in place even over later checkpoints. Raises UserError (before anything is written) or RunStopped."""
    from trainer.trainer import Trainer

    started = time.perf_counter()
    if resume:  # 1. the config, checked (the checkpoint's too): nothing is written before
        from utils.resume import resume_point

        start = Start(**resume_point(config, resume, run_id, overwrite, build.registries(), evaluate_checkpoint))
    else:
        start = Start(checked_config(config)[0], run_id=run_id)
    info, device = dist.setup(build.resolve_device(start.config["device"]))  # 2. the device and process group
    parts = trainer = run = None
    try:
        parts, init_report = checked_parts(start.config, device, info, init_from, init_strict)  # 3. checked, placed
        with open_run(start.config, start.run_id, start.resume, info, start.state, start.overwrite) as run:  # 4.
            trainer = Trainer(start.config, parts, run)  # 5. train
            begin(trainer, start, argv, init_report)
            metrics = trainer.train()
            end(trainer, metrics, time.perf_counter() - started)
            dist.leave_together()
        return metrics
    except RunStopped as stopped:  # every process stops together (the stop was agreed on): they leave together too
        if stopped.together:  # (not a process stopping alone: the others are not there to wait for)
            dist.leave_together()
        raise
    finally:
        if info.enabled:
            parts = trainer = run = None  # noqa: F841 (see trainer/torchrun.py: let_go)
            from trainer.torchrun import let_go

            let_go()


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


def checked_config(config):
    """``(config, [])``, checked: every problem at once as one UserError (a resume's: utils/resume.py)."""
    if config is None:
        raise UserError("give a config (-c config.json) or a checkpoint to resume (-r checkpoint.pth)")
    return validate_config(config, build.registries()), []


# --------------------------------------------------------------------------- 3. the components


def checked_parts(config, device, info, init_from=None, init_strict=True):
    """``(parts, init_report)``: the run's components built, checked against each other (the dry batch last: after it
    the run's folders may be created), and placed (data on the device and sharded, model wrapped, CUDA flags set)."""
    cfg = config["trainer"]
    seed_everything(config["seed"])
    parts = build_parts(config, device)
    optional_parts.call_each(config, "prepare", config, parts)  # the parts' changes and checks (utils/parts.py)
    # The class order and feature scaling the data fixed, kept in the config: test.py and a resume rebuild them.
    config["data_loader"]["args"].update(getattr(parts.data_loader, "data_args", dict)())
    init_report = None
    if init_from:
        from utils.resume import init_weights

        init_report = init_weights(parts.model, init_from, init_strict)
    if info.enabled:
        from trainer.torchrun import check_launch

        check_launch(config, parts, info)
    build.check_plan(config, parts)
    build.dry_batch(config, parts)
    for loader in (parts.data_loader, parts.valid_data_loader):
        if loader is not None:
            loader.to(device)
            if info.enabled:
                loader.shard(info.rank, info.world_size)
    parts.wrap = functools.partial(build.wrap_model, config=config, device=device, info=info)
    if info.enabled or cfg["strategy"] == "fsdp":  # wrapped (DDP) or sharded, and what each process holds
        from trainer.fsdp import place

        init_report = "\n".join(filter(None, [init_report, place(config, parts, info)]))
    elif cfg["compile"]:
        parts.forward_model = parts.wrap(parts.model)
    # TF32 and cuDNN's autotuner: large speed-ups on Ampere and later; the autotuner times kernels: not deterministic.
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg["tf32"]
        torch.backends.cudnn.benchmark = cfg["cudnn_benchmark"] and not cfg["deterministic"]
    return parts, init_report


def build_parts(config, device):
    """Data loaders, model, freezing, loss, metrics, optimizer and scheduler, as the config names them. Only the
    model is moved (a fused CUDA optimizer needs it on the device); :func:`checked_parts` places the rest."""
    cfg = config["trainer"]
    if cfg["amp"] == "fp16" and device.type != "cuda":  # (its gradient scaler needs CUDA)
        raise ConfigError(f'trainer.amp: "fp16" needs a CUDA device, but the run is on {device.type};'
                          ' use "bf16" or false')
    if cfg["amp"] == "bf16" and device.type == "mps":
        raise ConfigError('trainer.amp: "bf16" autocast is not supported on mps here; use false')
    build.check_standins(config)  # the optimizer's and scheduler's arguments, before any data is read
    data_loader = build.build_data_loader(config)
    valid_data_loader = data_loader.split_validation()
    model = build.build_model(config).to(device)
    frozen = []
    if cfg["freeze"]:
        from trainer.parameters import freeze

        frozen = freeze(model, cfg["freeze"])
    optimizer = build.build_optimizer(model, config, device)
    modules = [name for name, _ in model.named_modules()]
    if missing := [m for m in cfg["activation_histograms"] if m not in modules]:
        raise ConfigError(f"trainer.activation_histograms: no module named {missing[0]!r};"
                          f" modules are named like {', '.join([n for n in modules if n][:8])}")
    section, schedulers = config.get("lr_scheduler"), build.registries()["lr_scheduler"]
    scheduler = init_obj(section, schedulers, optimizer, where="lr_scheduler") if section else None
    task = init_obj(config["task"], build.registries()["task"], where="task") if config["task"] else None
    return Parts(model=model, criterion=build.build_loss(config, device), optimizer=optimizer,
                 metric_fns=build.build_metrics(config) + (task.loss_metrics() if task else []), task=task,
                 lr_scheduler=scheduler, data_loader=data_loader, valid_data_loader=valid_data_loader, device=device,
                 frozen=frozen, forward_model=model, scaler=torch.amp.GradScaler(device.type) if cfg["amp"] == "fp16"
                 else None)


# --------------------------------------------------------------------------- 4. the run's folders


def run_folders(config, run_id=None, resume=None, state=None, overwrite=False):
    """Where the run goes, ``(run_id, checkpoint_dir, log_dir, branched_from)``, made and locked by :func:`open_run`:
    for a new run ``<save_dir>/models/<name>/<run_id>`` and ``<save_dir>/log/<name>/<run_id>`` (run id: the start
    time); for a resume its checkpoint's folder, or a branch of it (:func:`utils.resume.resumed_folder`)."""
    save_dir, name = Path(config["trainer"]["save_dir"]), config["name"]
    models, logs = save_dir / "models" / name, save_dir / "log" / name
    if run_id is not None and (problem := check_path_component(run_id, "--run-id")):
        raise UserError(problem)
    base, branched_from = time.strftime("%Y%m%d-%H%M%S"), None
    if resume is not None:
        from utils.resume import resumed_folder

        run_id, base, branched_from, log_dir = resumed_folder(resume, state, run_id, overwrite, models)
        if base is None:  # in place, logging beside its run's checkpoints
            return run_id, Path(resume).resolve().parent, log_dir, None
    if run_id is None:  # a free name: the base, else the base numbered
        run_id, n = base, 1
        while (models / run_id).exists():
            n += 1
            run_id = f"{base}-{n}"
    elif (models / run_id).exists() and not overwrite:  # overwrite: -r auto starting a run that saved nothing yet
        raise UserError(f"run folder {models / run_id} already exists: choose another --run-id,"
                        " or resume it with -r <checkpoint>")
    return run_id, models / run_id, logs / run_id, branched_from


@contextlib.contextmanager
def open_run(config, run_id=None, resume=None, info=None, state=None, overwrite=False):
    """The run as a :class:`Run`: its folders (made and locked by rank 0), logging, the writer of ``trainer.loggers``
    (dropping what an interrupted run logged after the checkpoint it resumes), determinism; all undone at the end."""
    from logger.logger import WriterContext, close_logging, open_writer, setup_logging

    cfg, info, held, made = config["trainer"], info or dist.DistInfo(), [], []
    run_writes = all(optional_parts.call_each(config, "writes", config))  # False: a dry run (fast_dev_run)
    writes = info.is_main and run_writes

    def chosen():  # the folders, made and locked (one writer per run folder) before anything is written there
        folders = run_folders(config, run_id, resume, state, overwrite)
        if writes:
            made.extend(f for f in folders[1:3] if not (f.exists() or f.is_symlink()))  # (see the end of open_run)
            try:
                folders[1].mkdir(parents=True, exist_ok=True)
                held.append(lock_folder(folders[1]))  # (and temporary files a kill -9 left mid-write removed)
                folders[2].mkdir(parents=True, exist_ok=True)
            except OSError as err:  # a full disk, a dangling symbolic link, no permission: one line
                from utils.io_problems import run_folder_error

                raise run_folder_error(err, folders[1:3], cfg["save_dir"]) from None
        return folders

    if info.enabled:  # rank 0 chooses, makes and locks the folders; every rank gets the same ones (or the same error)
        from trainer.torchrun import agree_on_run

        chosen = functools.partial(agree_on_run, chosen, info)
    run_id, checkpoint_dir, log_dir, branched_from = chosen()
    logger = setup_logging(log_dir if writes else None, cfg["verbosity"] if info.is_main else 0)
    purge = state["global_step"] + 1 if state else 0 if overwrite else None  # (a restart drops the try before's)
    context = WriterContext(config, log_dir, run_id, state, purge, branched_from is not None, logger)
    writer = open_writer(config, context, enabled=writes)  # TensorBoard, metrics.csv, MLflow, ... (trainer.loggers)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True)
    try:
        yield Run(run_id=run_id, checkpoint_dir=checkpoint_dir, log_dir=log_dir, logger=logger, writer=writer,
                  dist=info, resumed_from=resume, branched_from=branched_from, writes=run_writes)
    except (KeyboardInterrupt, UserError):  # a start cut short (Ctrl-C, a full disk): no half-made run folder is left
        from utils.io_problems import unmake_run

        unmake_run(made, checkpoint_dir)
        raise
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        writer.close()
        close_logging()
        for lock in held:
            lock.close()  # the next writer may come


# --------------------------------------------------------------------------- 5. before and after training


def begin(trainer, start, argv, init_report):
    """Before the first step: restore a resumed run, write ``config.json`` and ``manifest.json`` (what reproduces the
    run: command, config, git commit, versions, resume history), and log what the run is."""
    run, config, parts, argv = trainer.run, start.config, trainer.parts, argv or []
    if start.state is not None:
        from utils.resume import restore

        restore(trainer, start)
    if not run.dist.is_main:
        return
    logger, info, loader = run.logger, run.dist, parts.data_loader
    if run.writes:
        try:
            git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                 cwd=Path(__file__).resolve().parent.parent).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            git = None
        try:
            from torchvision import __version__ as torchvision_version
        except ImportError:
            torchvision_version = None
        record = {"run_id": run.run_id, "command": argv, "config": config, "seed": config["seed"], "git_commit": git,
                  "versions": {"python": platform.python_version(), "torch": torch.__version__,
                               "torchvision": torchvision_version, "cuda": torch.version.cuda},
                  "resume_history": [], "trackers": getattr(run.writer, "run_ids", dict)()}  # {"mlflow": RUN_ID}
        if start.resume:
            from utils.resume import resumed_manifest

            resumed_manifest(record, run, argv, start.resume)
        write_json(run.checkpoint_dir / "config.json", config)
        write_json(run.checkpoint_dir / "manifest.json", record)
    else:
        loggers = ", ".join(name for name, _ in logger_entries(config["trainer"]))
        logger.info(f"dry run: would write config.json and manifest.json to {run.checkpoint_dir}, and"
                    f" info.log{' and the files of ' + loggers if loggers else ''} to {run.log_dir}")
    trainable = sum(p.numel() for p in parts.model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in parts.model.parameters()) - trainable
    logger.info(f"Run {config['name']}/{run.run_id} on {parts.device}"
                + (f", world size {info.world_size}" if info.enabled else ""))
    logger.info(f"Parameters: {trainable:,} trainable, {frozen:,} frozen")
    per_step = loader.batch_size * info.world_size * config["trainer"]["accumulate_grad_batches"]
    valid = len(parts.valid_data_loader.sampler.indices) if parts.valid_data_loader else 0
    logger.info(f"Batch size {loader.batch_size} per process, {per_step} per optimizer step; {len(loader)} batches"
                f" per epoch, {valid} validation samples")
    if (key := trainer.monitor_key or "").startswith("val_") and "acc" in key and 0 < valid < 100:  # (accuracy-like)
        logger.info(f"{key} on {valid} validation samples moves in steps of 1/{valid} = {1 / valid:.3g}: of equal"
                    " values the one with the lower val_loss counts as the best (model_best.pth)")
    if init_report:
        logger.info(init_report)


def end(trainer, metrics, seconds):
    """After the last epoch (rank 0): hyperparameters and final values for TensorBoard, the trackers' artifacts, the
    test split's scores of the best checkpoint (else the last: ``trainer.test_after_train``, as ``test.py`` scores
    it), ``result.json``, and the end block (wall time, best epoch, where the checkpoints are, the scores)."""
    run, config, logger, folder = trainer.run, trainer.config, trainer.run.logger, trainer.run.checkpoint_dir
    if not run.dist.is_main:
        return
    if not run.writes:
        logger.log(RESULT, f"dry run: {trainer.global_step} steps and validation ran; nothing was written"
                    f" (the run would have gone to {folder} and {run.log_dir})")
        return
    # The config as it is at the end (a list as its JSON text), once per run: a resume replaces it.
    hparams = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
               for k, v in flatten(config).items() if v is not None}
    final = {f"hparam/{k}": v for k, v in metrics.items() if k != "epoch"}
    best_value = trainer.monitor_best if trainer.best_epoch is not None else None
    if best_value is not None:
        final[f"hparam/best_{trainer.monitor_key}"] = best_value
    run.writer.add_hparams(hparams, final)
    if hasattr(run.writer, "finish"):  # trackers' artifacts (MLflow: config, manifest, model_best)
        run.writer.finish(folder)
    took = f"{seconds:.1f} s" if seconds < 60 else str(datetime.timedelta(seconds=round(seconds)))
    lines = [f"Finished {config['name']}/{run.run_id} in {took}: {trainer.epoch} epochs, {trainer.global_step} steps"]
    best = folder / "model_best.pth"
    if best_value is not None:
        lines.append(f"Best {trainer.monitor_key} {best_value:.6g} at epoch {trainer.best_epoch} ({best.name})")
    if trainer.ended_by:
        lines.append(f"Ended after epoch {trainer.epoch}: {trainer.ended_by}")
    if trainer.nonfinite_skips:  # a warning: visible at any verbosity
        logger.warning(f"Skipped {trainer.nonfinite_skips} steps with a non-finite loss (trainer.skip_nonfinite)")
    lines.append(f"Checkpoints: {folder}")
    scored = best if best.exists() else folder / f"checkpoint-epoch{metrics.get('epoch')}.pth"  # (sharded: a folder)
    scoring = config["trainer"].get("test_after_train", True) and scored.exists()
    # What a script (a sweep, say) reads of the run: its final, best and test values; written before the test scoring
    # too ("test" null, "test_checkpoint" named), so a stop during it loses nothing (-r auto then scores it).
    result = {"run_id": run.run_id, "epochs": trainer.epoch, "steps": trainer.global_step, "seconds": round(seconds, 3),
              "final": metrics, "monitor": trainer.monitor_key, "best": best_value, "best_epoch": trainer.best_epoch,
              "ended_by": trainer.ended_by, "test": None, "test_checkpoint": scored.name if scoring else None}
    if scoring:  # a stop signal now ends the run with one line: training is complete, and how to score it
        main = threading.current_thread() is threading.main_thread()  # (handlers can only be set there)
        kept = {sig: signal.signal(sig, functools.partial(stop_scoring, scored)) for sig in STOP_SIGNALS if main}
        write_json(folder / "result.json", result)
        try:
            if trainer.stop and trainer.stop.exit_code > 128:  # a stop signal during the last validation: stop now
                stop_scoring(scored, trainer.stop.exit_code - 128, None)
            result["test"] = evaluate_checkpoint(scored, progress=False)
        except UserError as err:  # no test split, say: the run itself succeeded
            lines.append(f"Test split not scored: {err.problems[0]}")
            result["test_checkpoint"] = None
        else:
            shown = "  ".join(f"{k} {v:.6g}" for k, v in result["test"].items() if k != "n_samples")
            lines.append(f"Test split ({result['test']['n_samples']} samples, {scored.name}): {shown}")
        finally:
            for sig, handler in kept.items():
                signal.signal(sig, handler)
    for line in lines:  # the end block: shown at every verbosity
        logger.log(RESULT, line)
    write_json(folder / "result.json", result)


def stop_scoring(checkpoint, signum, frame):
    """A stop signal during :func:`end`'s test scoring (no ``frame``: one before it), as the run's one line, raised."""
    from base.stopping import scoring_stopped

    raise RunStopped(**scoring_stopped(checkpoint, signum, before=frame is None))


# --------------------------------------------------------------------------- test.py


def evaluate_checkpoint(checkpoint, overrides=(), device=None, write=True, progress=None):
    """``{"loss": ..., "<metric>": ..., "n_samples": N}`` of ``checkpoint`` on its config's test split, its config
    changed by ``overrides`` (``key.path=VALUE``); with ``write``, also written beside it (``.test.json``)."""
    from trainer.trainer import default_step, evaluate

    model, config, device, autocast = build.trained_model(checkpoint, overrides, device)
    task = init_obj(config["task"], build.registries()["task"], where="task") if config["task"] else None
    loader = build.build_data_loader(config, training=False)
    if len(loader.sampler) == 0:
        raise UserError(f"{config['data_loader']['type']}: the test split is empty (0 samples), so there is nothing to"
                        " score; give the data a test split (the built-in sets: data_loader.args.test_fraction > 0)")
    loader.to(device)
    metrics = evaluate(model, loader, build.build_loss(config, device),
                       build.build_metrics(config) + (task.loss_metrics() if task else []), device, autocast,
                       progress=config["trainer"]["verbosity"] > 1 if progress is None else progress,
                       step=task or default_step)
    metrics["n_samples"] = len(loader.sampler)
    if write:
        write_json(Path(checkpoint).with_suffix(".test.json"), {"checkpoint": str(checkpoint), **metrics})
    return metrics
