"""Resume policy: what a resumed run may change, what it refuses, how changes are applied; weights from checkpoints.

A checkpoint holds the state of a run under its config. Resuming with another config
(``-r CKPT -c other.json`` or overrides) is allowed where the saved state still means
the same thing: a new learning rate, more epochs. It is refused where it would not: other
weights (another model), other parameter groups (another optimizer type or freeze list),
or, in the middle of an epoch, a different data order.
"""

import math
from pathlib import Path

from utils import parts
from utils.config import ConfigError, flatten
from utils.config_extra import config_diff
from utils.errors import UserError
from utils.io import load_checkpoint

# Keys whose change would make the checkpoint's state meaningless (other weights, other parameter groups).
FIXED_ON_RESUME = ("name", "arch", "optimizer.type", "optimizer.param_groups", "lr_scheduler.type", "trainer.freeze")
# Keys that decide which sample comes next: fine to change between epochs, not in the middle of one (with those
# the parts in use list as their FIXED_MID_EPOCH).
FIXED_MID_EPOCH = ("seed", "data_loader", "trainer.len_epoch", "trainer.accumulate_grad_batches")
# Keys under those that do not decide which sample comes next: where decoded images are cached (image_folder).
FREE_MID_EPOCH = ("data_loader.args.cache_dir",)


# Data loader arguments a run adds to its own config (see BaseDataLoader.data_args): not the user's to repeat.
PINNED_DATA_ARGS = ("class_names", "feature_stats")


def carry_data_args(saved, config):
    """``config`` with the data arguments the checkpoint's run pinned (class order, feature scaling) where it has none.

    Resuming with the original config file, which never had them, is then no change of the data.
    """
    saved_args = (saved.get("data_loader") or {}).get("args") or {}
    args = (config.get("data_loader") or {}).get("args")
    if not isinstance(args, dict) or config["data_loader"].get("type") != saved["data_loader"].get("type"):
        return config
    pinned = {k: saved_args[k] for k in PINNED_DATA_ARGS if k in saved_args and k not in args}
    if not pinned:
        return config
    return {**config, "data_loader": {**config["data_loader"], "args": {**args, **pinned}}}


def declared(name, *configs):
    """The keys the parts any of ``configs`` uses list under ``name`` (``"BATCH_COUNTS"``, say), each once."""
    used = {part for config in configs for part in parts.used_by(config)}
    modules = [parts.load(part) for part in parts.PARTS if part in used]  # (in the table's order)
    return tuple(dict.fromkeys(key for module in modules for key in getattr(module, name, ())))


def batch_counts(*configs):
    """The keys that count batches, which a batch split (:func:`batch_split`) scales so that an epoch holds the same
    samples: ``trainer.len_epoch``, and those the parts ``configs`` use list as their BATCH_COUNTS."""
    return ("trainer.len_epoch", *declared("BATCH_COUNTS", *configs))


def batch_split(saved, config):
    """``f`` when ``config`` splits each batch of the ``saved`` run into ``f`` (an integer > 1), else None.

    That is: the per-process batch divided by ``f``, ``accumulate_grad_batches`` multiplied by
    it, and every count of batches (:func:`batch_counts`: ``len_epoch``, say) that is set
    multiplied by it, so an optimizer step and an epoch hold the same samples in the same
    order. Such a change is allowed in the middle of an epoch (after an out-of-memory error,
    say): the resumed run continues at the same sample.
    """
    def get(cfg, key):
        section, *rest = key.split(".")
        node = cfg.get(section) or {}
        for part in rest:
            node = node.get(part) if isinstance(node, dict) else None
        return node

    def count(value):
        return isinstance(value, int) and not isinstance(value, bool)

    old, new = get(saved, "data_loader.args.batch_size"), get(config, "data_loader.args.batch_size")
    if not (count(old) and count(new)) or not 0 < new < old or old % new:
        return None
    factor = old // new
    if (get(config, "trainer.accumulate_grad_batches") or 1) != (get(saved, "trainer.accumulate_grad_batches") or 1) * factor:
        return None
    for key in batch_counts(saved, config):
        before, after = get(saved, key), get(config, key)
        if (count(before) and before) or (count(after) and after):
            if not (count(before) and count(after) and after == before * factor):
                return None
    return factor


def check_resume_changes(saved, config, mid_epoch):
    """Lines describing how ``config`` differs from the checkpoint's ``saved`` config.

    Raises:
        ConfigError: a change that cannot be honoured, one line each, saying what to do instead.
    """
    old, new = flatten(saved), flatten(config)
    changes = config_diff(old, new)
    if old.get("arch.type") != new.get("arch.type"):  # another model: the one line that matters
        raise ConfigError(f"cannot resume: the checkpoint's model is {old.get('arch.type')}, but the config names"
                          f" {new.get('arch.type')} (arch.type); resume with the checkpoint's own config, or start a new"
                          " run with --init-from")
    fixed = FIXED_ON_RESUME + (FIXED_MID_EPOCH + declared("FIXED_MID_EPOCH", saved, config) if mid_epoch else ())
    split = mid_epoch and batch_split(saved, config)
    counts = batch_counts(saved, config)
    allowed = (*FREE_MID_EPOCH, *(("data_loader.args.batch_size", "trainer.accumulate_grad_batches", *counts)
                                  if split else ()))
    refused = [line for line in changes if any(line == k or line.startswith((k + ".", k + ":")) for k in fixed)
               and not line.startswith(tuple(k + ":" for k in allowed))]
    if refused:
        why = ("in the middle of an epoch (a batch split into N, with accumulate_grad_batches times N, is the one"
               " change of the data allowed there); resume from a checkpoint-epoch*.pth" if mid_epoch
               else "start a new run with --init-from")
        arch = [line for line in refused if line.startswith("arch.")]  # the model built differently: one line
        arch = arch if len(arch) > 1 else []
        lines = [*([f"arch ({'; '.join(arch)})"] if arch else []),
                 *(f"{line.split(':')[0]} ({line})" for line in refused if line not in arch)]
        raise ConfigError(*(f"cannot resume with a changed {line}; {why}" for line in lines))
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


# --------------------------------------------------------------------------- -r auto



def resumable_checkpoints(folder):
    """The checkpoints of one run folder that a run can continue from (``model_best.pth`` is a full state too)."""
    import re

    names = re.compile(r"last\.pth|model_best\.pth|checkpoint-epoch\d+\.pth")
    try:
        entries = list(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    if any(p.name.startswith(".") and p.name.endswith((".tmp", ".old")) and p.is_dir() for p in entries):
        from utils.sharded import recover  # what a writer of a sharded checkpoint killed mid-write left

        recover(folder, idle_only=True)
        entries = list(Path(folder).iterdir())
    return [p for p in entries if names.fullmatch(p.name) and (p.is_file() or (p / ".metadata").is_file())]


def checkpoint_step(path):
    """The global step a checkpoint holds, read without loading its tensors (memory-mapped); raises if unreadable."""
    import torch

    path = Path(path) / "trainer.pth" if Path(path).is_dir() else path  # (a sharded checkpoint: utils/sharded.py)
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    step = state.get("global_step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
        raise ValueError("it holds no global_step")
    return step


def newest_first(folder):
    """The resumable checkpoints of ``folder``, newest first by the global step they hold (then by modification
    time), read without loading their tensors; and one line per file that cannot be read (skipped)."""
    import os

    skipped, ranked = [], []
    for path in resumable_checkpoints(folder):
        try:
            ranked.append((checkpoint_step(path), os.stat(path).st_mtime, path))
        except Exception as err:  # damaged, truncated, not ours: not a state to continue from
            skipped.append(f"{path}: cannot be read ({str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__}); skipped")
    return [path for _, _, path in sorted(ranked, key=lambda r: (r[0], r[1]), reverse=True)], skipped


def find_resumable(config, run_id=None):
    """The newest checkpoint of a run that a run can continue from, for ``train.py -r auto``.

    The run is ``<save_dir>/models/<name>/<run_id>``; without ``run_id``, the run folder of
    ``name`` whose checkpoints were written last. Its candidates are ``last.pth``,
    ``checkpoint-epoch*.pth`` and ``model_best.pth``, newest first by the global step they
    hold (then by modification time). A candidate that fails to load or lacks what a resume
    needs is skipped, and said in ``skipped``, and the next newest is tried.

    Returns:
        ``(path, state, run_id, skipped)``: the checkpoint and its loaded state (both None when the run
        has nothing to resume: start it fresh), the run id to use, and one line per skipped file.
    """
    import os

    models = Path(config["trainer"]["save_dir"]) / "models" / config["name"]
    if run_id is None:
        def newest_write(folder):
            return max((os.stat(p).st_mtime for p in resumable_checkpoints(folder)), default=None)

        runs = [(t, d) for d in (models.iterdir() if models.is_dir() else []) if d.is_dir()
                and (t := newest_write(d)) is not None]
        if not runs:
            return None, None, None, []
        run_id = max(runs)[1].name
    ranked, skipped = newest_first(models / run_id)
    for path in ranked:
        try:
            return path, load_checkpoint(path), run_id, skipped
        except UserError as err:
            skipped.append(f"{err.problems[0]}; skipped")
    return None, None, run_id, skipped


def newer_checkpoints(folder, resumed, global_step):
    """Names of the run's checkpoints in ``folder`` that hold a later step than ``global_step``: what resuming
    ``resumed`` in place would overwrite. Unreadable files are left out: they are no later state of the run."""
    newer = []
    for path in sorted(resumable_checkpoints(folder)):
        if path.resolve() == Path(resumed).resolve():
            continue
        try:
            step = checkpoint_step(path)
        except Exception:  # damaged, truncated, not ours
            continue
        if step > global_step:
            newer.append(path.name)
    return newer


def run_is_finished(state, config):
    """Why the run that wrote ``state`` has nothing left to train under ``config``, and how to go on (a line), or None.

    A run that early stopping ended is finished unless ``config`` asks for more than the run had: a larger
    ``trainer.early_stop`` (or none), or more ``trainer.epochs``.
    """
    cfg = config["trainer"]
    if state["epoch"] >= cfg["epochs"]:
        return f"it has completed {state['epoch']} of {cfg['epochs']} epochs (raise trainer.epochs to train on)"
    if cfg["max_steps"] and state["global_step"] >= cfg["max_steps"]:
        return (f"it has taken {state['global_step']} of trainer.max_steps={cfg['max_steps']} steps"
                " (raise trainer.max_steps to train on)")
    if state.get("stopped_early") and not _asks_for_more(state["config"]["trainer"], cfg):
        saved = state["config"]["trainer"]
        epoch = state["epoch"] + (1 if state["batch_in_epoch"] else 0)
        counted = state.get("early_stop_counts") or "epochs"  # (a hook that validates by step saves "validations")
        return (f"the run stopped early at epoch {epoch}, step {state['global_step']}: its"
                f" {saved['monitor'].split()[-1]} did not improve for more than trainer.early_stop={saved['early_stop']}"
                f" {counted} (raise trainer.early_stop, or trainer.epochs, to train on)")
    return None


def _asks_for_more(saved, cfg):
    """Whether trainer settings ``cfg`` raise the patience or the epochs of the run that had ``saved``."""
    patience, before = cfg.get("early_stop") or math.inf, saved.get("early_stop")  # 0 or null: never stop early
    more_patience = bool(before) and patience > before
    return more_patience or cfg["epochs"] > saved["epochs"]


# --------------------------------------------------------------------------- what trainer/run.py asks of a resume

AUTO = "auto"  # ``-r auto``: resume the newest resumable checkpoint of the run, or start it


def resume_point(config, resume, run_id, overwrite, registries, evaluate=None):
    """Where a resumed run starts (the fields of :class:`trainer.run.Start`): the checked config, the checkpoint and
    its state; with ``-r auto`` the run's newest resumable checkpoint (:func:`find_resumable`) continued in place,
    or no state at all when the run has none (it starts); ``evaluate``: trainer/run.py's evaluate_checkpoint, which
    scores the test split of an ``-r auto`` run whose test scoring was stopped (:func:`score_interrupted_test`).

    Raises:
        UserError: a problem in the config or the checkpoint (all of them at once); no config for ``-r auto``.
        RunStopped: the checkpoint's run is over (exit code 0), or a part's check_resume refused it.
    """
    from base.base_trainer import RunStopped
    from utils.config import check_path_component, validate_config

    skipped = []
    if resume == AUTO:
        if config is None:
            raise UserError("-r auto needs the run's config (-c CONFIG): its name and trainer.save_dir say where the"
                            " run is")
        if run_id is not None and (problem := check_path_component(run_id, "--run-id")):
            raise UserError(problem)
        checked = validate_config(config, registries)
        path, state, found_id, skipped = find_resumable(checked, run_id)
        if skipped and state is None and not overwrite:  # only damaged checkpoints: nothing is started over them
            folder = Path(checked["trainer"]["save_dir"]) / "models" / checked["name"] / found_id
            names = ", ".join(sorted(p.name for p in resumable_checkpoints(folder)))
            raise UserError(f"-r auto: every checkpoint of run {folder} is damaged ({names}), so there is nothing to"
                            " resume and nothing was started; to start this run over, replacing them, add --overwrite,"
                            " or start a new run with another --run-id")
        run_id, resume, overwrite = found_id or run_id, str(path) if path else None, True
        if state is None:  # nothing to resume: the run starts
            _say(fresh_start_line(checked, run_id, skipped))
            return dict(config=checked, run_id=run_id, overwrite=True, skipped=skipped)
        if done := run_is_finished(state, checked):
            if evaluate:  # the test scoring after training was stopped: done now
                score_interrupted_test(path.parent, evaluate)
            raise RunStopped(f"{path}: nothing to resume: {done}", exit_code=0)
        _say(f"-r auto: resuming {path} (epoch {state['epoch']}, step {state['global_step']})")
    else:
        state = load_checkpoint(resume)
    config, changes = checked_resume_config(config, state, registries)
    if state.get("stopped_early") and (done := run_is_finished(state, config)):  # -r CKPT of an early-stopped run
        raise RunStopped(f"{resume}: nothing to resume: {done}", exit_code=0)
    parts.call_each(config, "check_resume", state, resume)  # a part may refuse to train on in this launch
    return dict(config=config, state=state, resume=resume, run_id=run_id, overwrite=overwrite, changes=changes,
                skipped=skipped)


def score_interrupted_test(folder, evaluate):
    """When a stop signal ended the test scoring after training (``result.json`` names a ``test_checkpoint`` but
    holds no ``test`` values), score it now with ``evaluate`` (trainer/run.py's evaluate_checkpoint: passed in, as
    it imports this module), as the run would have, and stop (exit 0) with its scores."""
    import json

    from base.base_trainer import RunStopped
    from utils.io import write_json

    try:
        result = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return
    if not isinstance(result, dict) or result.get("test") is not None or not result.get("test_checkpoint"):
        return
    checkpoint = folder / result["test_checkpoint"]
    _say(f"-r auto: training of {folder} is complete, its test scoring was stopped: scoring {checkpoint}")
    result["test"] = evaluate(checkpoint, progress=False)
    write_json(folder / "result.json", result)
    shown = "  ".join(f"{k} {v:.6g}" for k, v in result["test"].items() if k != "n_samples")
    raise RunStopped(f"training is complete; test split ({result['test']['n_samples']} samples, {checkpoint.name}):"
                     f" {shown} (written to result.json)", exit_code=0)


def _say(line):
    """What ``-r auto`` decided: one line on the console, before the run's log exists (rank 0 alone under torchrun)."""
    import os

    if os.environ.get("RANK", "0") == "0":
        print(line, flush=True)


def fresh_start_line(config, run_id, skipped):
    """The line of ``-r auto`` starting a run that has nothing to resume; when ``run_id`` resembles the id of a run
    that has checkpoints (a typo?), it names that run."""
    import difflib

    models = Path(config["trainer"]["save_dir"]) / "models" / config["name"]
    if run_id is None:
        return f"-r auto: no run of {config['name']} under {models} has a checkpoint: starting a new run"
    note = f" ({len(skipped)} unreadable checkpoints skipped)" if skipped else ""
    what = "has no checkpoint to resume" + note if (models / run_id).is_dir() else "does not exist"
    others = [d.name for d in (models.iterdir() if models.is_dir() else []) if d.name != run_id
              and resumable_checkpoints(d)]
    close = difflib.get_close_matches(run_id, others, n=1, cutoff=0.75)
    hint = f"; did you mean --run-id {close[0]}? (that run has checkpoints)" if close else ""
    return f"-r auto: run {models / run_id} {what}: starting it fresh{hint}"


def checked_resume_config(config, state, registries):
    """The checked config of a resume (the checkpoint's own when ``config`` is None), and the lines saying how it
    differs from the checkpoint's.

    Raises:
        UserError: any problem, all at once; a change the checkpoint's state cannot follow; no epoch left.
    """
    from utils.config import validate_config

    saved = state["config"]
    config = validate_config(saved if config is None else carry_data_args(saved, config), registries)
    changes = check_resume_changes(saved, config, mid_epoch=state["batch_in_epoch"] > 0)
    epochs, done = config["trainer"]["epochs"], state["epoch"]
    if done >= epochs:
        raise ConfigError(f"trainer.epochs: the checkpoint has completed {done} of {epochs} epochs, so there is"
                          f" nothing to train; resume with trainer.epochs={done + 1} or more to train on")
    return config, changes


def resumed_folder(resume, state, run_id, overwrite, models):
    """Where a resumed run goes: ``(run_id, branch_base, branched_from, log_dir)``; ``models``: the config's
    ``<save_dir>/models/<name>``.

    It continues in its checkpoint's folder (``branch_base`` None), logging beside it (``log_dir``: the ``log``
    folder of the save_dir holding the checkpoint's run; a checkpoint outside a run folder: the config's), unless
    that would overwrite later work: when the folder holds a checkpoint of a later step than the one resumed (or
    ``run_id`` names another folder), the run branches into a new folder, ``run_id`` or else a free one named after
    ``branch_base`` (``<run_id>-from-<checkpoint name>``), and ``branched_from`` says from where. ``overwrite``
    continues in place regardless. A changed ``trainer.save_dir`` (``models`` neither the checkpoint's run's nor
    the folder holding it) continues the run there under its run id, checkpoints and logs together (what a full
    disk's line advises).

    Raises:
        UserError: the checkpoint's folder, to continue in, cannot be written (nothing is made before).
    """
    import os

    folder, models = Path(resume).resolve().parent, Path(models).resolve()
    newer = [] if overwrite else newer_checkpoints(folder, resume, state["global_step"])
    saved = state["config"]
    if models not in (folder.parent, (Path(saved["trainer"]["save_dir"]) / "models" / saved["name"]).resolve()):
        run_id = run_id or folder.name
    elif run_id in (None, folder.name) and not newer:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"cannot resume in {folder}: the folder is read-only (no permission to write there), and"
                            " nothing was written; resume with trainer.save_dir=DIR (a folder you can write to) to"
                            " continue the run there, or copy the run folder")
        in_run = folder.parent.parent.name == "models"  # <save_dir>/models/<name>/<run_id>
        logs = folder.parents[2] / "log" / folder.parent.name if in_run else models.parent.parent / "log" / models.name
        return folder.name, None, None, logs / folder.name
    elif run_id in (None, folder.name):
        run_id = None
    return run_id, f"{folder.name}-from-{Path(resume).stem}", {
        "run_dir": str(folder), "checkpoint": str(resume), "global_step": state["global_step"],
        "newer_checkpoints": newer}, None


def restore(trainer, start):
    """Continue the run that wrote ``start.state``, with the changed optimizer and scheduler arguments of
    ``start.config``; log how it goes on (rank 0)."""
    state, config, run, logger = start.state, start.config, trainer.run, trainer.logger
    try:  # tensors of another shape, or keys the model lacks (a damaged or edited checkpoint): one line, not a traceback
        if not (state.get("sharded") or trainer.sharded):  # (sharded: each process loads its slices, utils/sharded.py)
            trainer.model.load_state_dict(state["model"])
    except RuntimeError as err:
        from trainer.check_errors import weights_misfit

        raise weights_misfit(start.resume, state["config"], config, err) from None
    try:
        trainer.load_state_dict(state)
    except ValueError as err:  # torch's optimizer: another number or size of parameter groups
        raise UserError(f"{start.resume}: its optimizer state does not fit the optimizer the config builds"
                        f" ({str(err).strip()[:200]}); resume with the checkpoint's optimizer settings, or start"
                        " a new run with --init-from") from None
    if not trainer.sharded and (misfit := optimizer_state_misfit(trainer.optimizer)):
        raise UserError(f"{start.resume}: its optimizer state does not fit the model ({misfit}); the checkpoint is"
                        " damaged or edited: use another checkpoint of the run, or start a new run with --init-from")
    apply_resume_changes(state["config"], config, trainer.optimizer, trainer.lr_scheduler)
    if state["batch_in_epoch"] and (factor := batch_split(state["config"], config)):
        trainer.batch_in_epoch *= factor  # the same samples done, counted in batches of the new size
        logger.info(f"each batch is split in {factor} from here on: continuing at batch {trainer.batch_in_epoch}"
                    f" of the epoch, the same sample as the checkpoint's batch {state['batch_in_epoch']}")
    if state["config"]["seed"] != config["seed"]:
        logger.warning("the seed changed: the data order from here on differs from the original run's")
    if state.get("world_size", 1) != trainer.world_size:
        logger.warning(f"resuming a run of {state.get('world_size', 1)} processes with {trainer.world_size}:"
                       " each process's share of the data, and so the data order, changes from here on")
    if not run.dist.is_main:
        return
    for line in start.skipped:
        logger.warning(line)
    from base.stopping import continues_at

    logger.info(f"Resumed after step {state['global_step']}: continuing at {continues_at(trainer)}")
    branch = run.branched_from
    if branch and branch["newer_checkpoints"]:
        logger.warning(f"{Path(branch['checkpoint']).name} is not the newest checkpoint of its run"
                       f" ({', '.join(branch['newer_checkpoints'])} hold later steps): continuing in a new run"
                       f" folder, {run.checkpoint_dir}, so nothing is overwritten (--overwrite continues in place)")
    elif branch:
        logger.info(f"Continuing {branch['run_dir']} in a new run folder, {run.checkpoint_dir}")
    else:
        logger.info(f"Continuing in {run.checkpoint_dir}")
    for line in start.changes:
        logger.info(f"  changed: {line}")


def optimizer_state_misfit(optimizer):
    """The first tensor of ``optimizer``'s (loaded) state that cannot be its parameter's (a shape that does not
    broadcast to the parameter's: a ``momentum_buffer`` of another size, say), as a phrase; None when all fit."""
    import torch

    for group_index, group in enumerate(optimizer.param_groups):
        for index, param in enumerate(group["params"]):
            for key, value in optimizer.state.get(param, {}).items():
                if not isinstance(value, torch.Tensor) or value.dim() == 0:
                    continue
                try:
                    fits = torch.broadcast_shapes(value.shape, param.shape) == param.shape
                except RuntimeError:
                    fits = False
                if not fits:
                    return (f"{key!r} of parameter {index} of group {group_index} has shape {list(value.shape)},"
                            f" the parameter {list(param.shape)}")
    return None


def resumed_manifest(record, run, argv, resume):
    """Carry a resumed run's manifest on into ``record``: the first command, and one more entry of the resume
    history (under SLURM or torchrun also the job id and how often it was requeued or restarted). A branch (a
    resume into a new folder) records where it came from, and the run it came from records the branch."""
    import json
    import time

    from utils import dist_round
    from utils.io import write_json

    def read(path):
        try:
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    previous, now = read(run.checkpoint_dir / "manifest.json"), time.strftime("%Y-%m-%d %H:%M:%S")
    record["command"] = previous.get("command", argv)
    record["resume_history"] = [*previous.get("resume_history", []),
                                {"time": now, "checkpoint": str(resume), "command": argv,
                                 **dist_round.launch_context()}]
    if run.branched_from:
        record["command"], record["branched_from"] = argv, run.branched_from
        origin_path = Path(run.branched_from["run_dir"]) / "manifest.json"
        if origin := read(origin_path):
            origin.setdefault("branches", []).append({"time": now, "run_dir": str(run.checkpoint_dir),
                                                      "checkpoint": Path(run.branched_from["checkpoint"]).name,
                                                      "command": argv})
            try:
                write_json(origin_path, origin)
            except UserError as err:  # a read-only or full origin (why the run moved): the branch records it anyway
                run.logger.warning(f"the run this one branched from was not told of the branch: {err.problems[0]}")
