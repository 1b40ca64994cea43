"""The optional parts of the project, in one table.

A part is a feature a default run does not need, in its own files under ``parts/``, owning its config keys.
The core never imports one: it imports a part's module when a config uses it (sets one of its keys, or names
one of its loaders, models, metrics or loggers); a config using a deleted part gets one line saying so.

A part's module may define (each optional; the core calls what is there): ``check(config) -> [problem lines]``
(its keys' checks and defaults); ``prepare(config, parts)`` (change or refuse the built components before the
dry batch); ``hooks(config, parts, run) -> [Hook]`` (base/base_hook.py); ``check_resume(state, checkpoint)``
(raise RunStopped: this launch must not train on); ``evaluated_weights(state)`` (other weights to score, the
EMA's); ``writes(config) -> bool`` (False: a dry run); ``FIXED_MID_EPOCH`` / ``BATCH_COUNTS`` (utils/resume.py);
``LOADERS`` / ``model(name)`` / ``metric(name)`` / ``writer(name, settings, context)`` for what it provides;
``pipelines(...)`` (the owner of ``data_loader.args.transforms``: base/base_data_loader.py).
"""

import importlib
import importlib.util
from dataclasses import dataclass

from utils.errors import ConfigError


@dataclass(frozen=True)
class Part:
    module: str  # imported when a config uses the part; None for a part no config names (a batch script)
    about: str  # one line: what it does (the README's table, and the message when its files are gone)
    files: tuple  # what deleting the part removes: its code, command, configs and tests
    keys: tuple = ()  # config keys it owns, dotted ("trainer.ema")
    loaders: tuple = ()  # data_loader.type names it provides
    archs: tuple = ()  # arch.type prefixes ("timm.")
    metrics: tuple = ()  # metric type prefixes ("torchmetrics.")
    loggers: tuple = ()  # trainer.loggers names
    needs: tuple = ()  # the parts whose modules it imports; deleting one of them deletes this part too


PARTS = {
    "ema": Part("parts.ema", "an exponential moving average of the weights, scored and saved beside them",
                files=("parts/ema.py", "tests/parts/test_ema.py"), keys=("trainer.ema",)),
    "predict": Part("parts.predict",
                    "predict.py: a checkpoint's predictions for image files, folders of images or CSV rows",
                    files=("parts/predict.py", "predict.py", "tests/parts/test_predict.py")),
    "export": Part("parts.export", "export.py: a checkpoint's model as TorchScript, ONNX or a torch.export program,"
                   " checked against it, with predict's preprocessing beside it",
                   files=("parts/export.py", "export.py", "tests/parts/test_export.py"), needs=("predict",)),
    "torchmetrics": Part("parts.torchmetrics", "torchmetrics classes by name in metrics, computed over the whole epoch",
                         files=("parts/torchmetrics.py", "tests/parts/test_torchmetrics.py",
                                "tests/parts/test_torchmetrics_distributed.py"), metrics=("torchmetrics.",)),
    "confusion": Part("parts.confusion", "the validation's confusion matrix as a TensorBoard image",
                      files=("parts/confusion.py", "tests/parts/test_confusion.py"),
                      keys=("trainer.confusion_matrix",)),
    "timm": Part("parts.timm_models", "timm models by name, built without downloading weights",
                 files=("parts/timm_models.py", "tests/parts/test_timm.py"), archs=("timm.",)),
    "max_time": Part("parts.max_time", "trainer.max_time: a wall-clock budget, after which the run stops with a"
                     " resumable last.pth and exit code 75",
                     files=("parts/max_time.py", "tests/parts/test_max_time.py"), keys=("trainer.max_time",)),
    "slurm": Part(None, "slurm/train.sbatch: training on SLURM, requeued after the time-limit warning (SIGUSR1, a stop"
                  " signal of the core) and resumed with -r auto",
                  files=("slurm/train.sbatch", "tests/parts/test_slurm.py", "tests/parts/slurm/start_slurm.sh",
                         "tests/parts/slurm/train_held.py")),
    "csv_logger": Part("parts.csv_logger", "every logged value as a row of metrics.csv in the run's log folder",
                       files=("parts/csv_logger.py", "tests/parts/test_csv_logger.py"), loggers=("csv",)),
    "mlflow_logger": Part("parts.mlflow_logger", "the run as an MLflow run: params, metric histories, artifacts",
                          files=("parts/mlflow_logger.py", "tests/parts/test_mlflow_logger.py"), loggers=("mlflow",)),
    "sweep": Part("parts.sweep",
                  "sweep.py: grid, random and Optuna searches over config keys, each trial a train.py run",
                  files=("parts/sweep.py", "sweep.py", "tests/parts/test_sweep.py", "tests/parts/test_optuna.py"),
                  keys=("trainer.optuna_trial",)),
    "step_schedule": Part("parts.step_schedule", "validation and a resumable last.pth every N optimizer steps",
                          files=("parts/step_schedule.py", "tests/parts/test_step_schedule.py"),
                          keys=("trainer.val_every_n_steps", "trainer.save_every_n_steps")),
    "debug": Part("parts.debug", "debug modes: fast_dev_run (a dry run of N batches), overfit_batches, limits on the"
                  " training and validation batches, autograd anomaly mode",
                  files=("parts/debug.py", "tests/parts/test_debug.py"),
                  keys=("trainer.fast_dev_run", "trainer.overfit_batches", "trainer.limit_train_batches",
                        "trainer.limit_val_batches", "trainer.detect_anomaly")),
    "model_summary": Part("parts.model_summary", "a table of the model's layers (output shapes of one batch,"
                          " parameters) at the start of a run",
                          files=("parts/model_summary.py", "tests/parts/test_model_summary.py"),
                          keys=("trainer.model_summary",)),
    "profiler": Part("parts.profiler",
                     "torch.profiler over a few steps: a trace, and the operators taking the most time",
                     files=("parts/profiler.py", "tests/parts/test_profiler.py"), keys=("trainer.profile",)),
    "lr_finder": Part("parts.lr_finder", "tools/lr_find.py: the learning-rate range test, a suggested learning rate"
                      " and a plot", files=("parts/lr_finder.py", "tools/lr_find.py", "tests/parts/test_lr_finder.py")),
    "auto_accumulate": Part("parts.auto_accumulate", "out of memory in a step: a smaller batch and more accumulation,"
                            " the same samples per step (under torchrun: fitted before the first step)",
                            files=("parts/auto_accumulate.py", "tests/parts/test_auto_accumulate.py",
                                   "tests/parts/test_oom_dist.py"), keys=("trainer.auto_accumulate",)),
    "augment": Part("parts.augment", "per-split torchvision transforms, augmentation replayed exactly on resume",
                    files=("parts/augment.py", "tests/parts/test_augment.py"), keys=("data_loader.args.transforms",)),
    "image_folder": Part("parts.image_folder", "images in class folders as a data set, decoded once and cached",
                         files=("parts/image_folder.py", "configs/image_folder.json",
                                "tests/parts/test_image_folder.py"), loaders=("ImageFolderDataLoader",)),
    "tables": Part("parts.tables", "a CSV table as a data set: numeric features, a class or a number to predict",
                   files=("parts/tables.py", "configs/csv.json", "configs/csv_regression.json",
                          "tests/parts/test_tables.py"), loaders=("CsvDataLoader",)),
    "segmentation": Part(None, "example: digit scenes segmented per pixel by a U-Net, mean IoU; predict.py: masks",
                         files=("examples/segmentation.py", "configs/examples/segmentation.json",
                                "tests/examples/test_segmentation.py"), needs=("torchmetrics",)),
    "two_inputs": Part(None, "example: a digit image and a table row read together (dict batches), two losses",
                       files=("examples/two_inputs.py", "configs/examples/two_inputs.json",
                              "configs/experiments/two_inputs_image_only.json", "tests/examples/test_two_inputs.py")),
    "char_lm": Part(None, "example: a character-level language model of the standard library's docstrings",
                    files=("examples/char_lm.py", "configs/examples/char_lm.json",
                           "configs/experiments/char_lm_long_context.json", "tests/examples/test_char_lm.py")),
}


KEY_OWNERS = {key: name for name, part in PARTS.items() for key in part.keys}  # each part's config keys -> its name
PART_LOADERS = tuple(name for part in PARTS.values() for name in part.loaders)  # the parts' data_loader.type names
# A key set to null, false, 0 (== False) or empty asks for nothing: its part need not be there.
OFF = (None, False, [], {})


def used_by(config):
    """The names of the parts ``config`` uses, in the table's order."""
    on = set()  # the parts whose keys the config sets to something other than off
    for key, name in KEY_OWNERS.items():
        node = config
        for step in key.split("."):
            node = node.get(step) if isinstance(node, dict) else None
        if node not in OFF:
            on.add(name)
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    loader = (config.get("data_loader") or {}).get("type") if isinstance(config.get("data_loader"), dict) else None
    arch = (config.get("arch") or {}).get("type") if isinstance(config.get("arch"), dict) else None
    arch = arch if isinstance(arch, str) else ""
    metrics = [m.get("type") if isinstance(m, dict) else m for m in config.get("metrics") or []
               if isinstance(m, (str, dict))]
    loggers = [entry.get("type") if isinstance(entry, dict) else entry for entry in trainer.get("loggers") or []
               if isinstance(entry, (str, dict))]
    return [name for name, part in PARTS.items()
            if name in on or loader in part.loaders or any(arch.startswith(p) for p in part.archs)
            or any(isinstance(m, str) and m.startswith(p) for m in metrics for p in part.metrics)
            or any(logger in part.loggers for logger in loggers)]


def present(name):
    """Whether part ``name``'s module is in this project (without importing it)."""
    try:
        return importlib.util.find_spec(PARTS[name].module) is not None
    except ModuleNotFoundError:  # the parts/ package itself is gone
        return False


def load(name):
    """The module of part ``name`` (imported here, and only here); a part whose files were deleted is one clear line."""
    part = PARTS[name]
    if not present(name):
        uses = ", ".join([*part.keys, *(f"data_loader.type {n}" for n in part.loaders),
                          *(f"arch.type {p}*" for p in part.archs), *(f"metrics {p}*" for p in part.metrics),
                          *(f"trainer.loggers {n}" for n in part.loggers)])
        raise ConfigError(f"{uses}: needs the {name} part ({part.about}), whose files are not in this project"
                          f" ({part.files[0]}); restore them, or remove the setting")
    return importlib.import_module(part.module)


def provider(kind, name):
    """The class a part provides under ``name`` (``kind``: "loaders", "archs" or "metrics"), or None;
    for ``kind`` "loggers", the ``writer`` function of the part whose logger ``name`` is."""
    for part_name, part in PARTS.items():
        if kind == "loggers" and name in part.loggers:
            return load(part_name).writer
        if kind == "loaders" and name in part.loaders:
            return load(part_name).LOADERS[name]
        if kind == "archs" and any(name.startswith(p) for p in part.archs):
            return load(part_name).model(name)
        if kind == "metrics" and any(name.startswith(p) for p in part.metrics):
            return load(part_name).metric(name)
    return None


def call_each(config, function, *args):
    """Call ``function(*args)`` of every part ``config`` uses that defines it; returns their results in order."""
    modules = [load(name) for name in used_by(config)]
    return [getattr(module, function)(*args) for module in modules if hasattr(module, function)]
