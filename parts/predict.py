"""``predict.py``: a trained checkpoint's predictions for image files, folders of images or CSV rows; or, for a
checkpoint whose config names a task that reads and writes files, one output file per input file.

A part (utils/parts.py): delete this file, ``predict.py`` and tests/parts/test_predict.py, and
training and ``test.py`` work as before; the export part, which describes an exported model's
inputs with this module's preprocessing, is deleted with it.

Promises:

* The model, its weights, the eval transforms, the class names and the feature scaling all
  come from the checkpoint (its config's ``arch`` and ``data_loader.args``), so an input is
  preprocessed exactly as ``test.py`` preprocesses the test split, and its label is the
  training run's class name.
* Images are decoded like the training images (``image_folder.decode``: the run's channels
  and ``image_size``), then go through ``data_loader.args.transforms.eval``; CSV rows are read
  by the training table's feature columns and standardised with its saved ``feature_stats``.
* One output row per input that could be read: its path (or the CSV file and row number),
  the predicted class, its probability and the ``top_k`` classes; probabilities are the
  softmax of the model's outputs (float32), summing to 1 over the classes.
* A checkpoint whose config's ``task`` defines ``load_input(path)`` and ``write_prediction(output, stem)``
  (base/base_task.py; a segmentation's mask image, say) reads its input files with the first and writes one
  file per input with the second, into the folder ``-o`` names (made if missing; its parent must exist), as
  ``<folder>/<input's stem>`` plus the task's suffix; the rows then name each input and the file written.
  The folder may not be an input folder or lie inside one, and no two inputs may share a stem.
* An unreadable image or CSV row is reported on stderr and skipped; a missing input path,
  an input kind the checkpoint's model does not read, or an input whose shape does not fit
  the model is one ``error:`` line (:class:`~utils.errors.UserError`). Output files are
  written whole or not at all (:func:`utils.io.atomic_write`).
* An output never replaces an input: ``-o`` naming the checkpoint, its run's files, an input, a
  folder, or any existing file that is not an earlier output of the same command is one
  ``error:`` line before any input is read or anything written (:func:`check_output`, which export.py uses
  too; :func:`check_output_folder` for a task's files).
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import sys
from pathlib import Path

import torch

from utils import parts as optional_parts
from utils.errors import UserError

CSV_EXTENSIONS = (".csv", ".tsv")

# Loaders whose datasets normalise inside the dataset (not through transforms): how an image file becomes
# one of their inputs. ``(channels, size, mean, std, class names)``.
_BUILTIN_IMAGES = {
    "MnistDataLoader": (1, (28, 28), (0.1307,), (0.3081,), [str(i) for i in range(10)]),
    "Cifar10DataLoader": (3, (32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                          ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]),
}


# --------------------------------------------------------------------------- the checkpoint


def _part(name):
    """Another part whose code reading the inputs needs (image folders, tables, augmentation), through the table:
    a part deleted from the project is one error line, naming it, rather than an import error."""
    return optional_parts.load(name)


class Loaded:
    """A checkpoint ready for inference.

    Attributes:
        model: the ``nn.Module`` in eval mode, on ``device``.
        config: the checkpoint's config (with overrides), checked and completed with defaults.
        device: ``torch.device``.
        autocast: the run's autocast context (bf16/fp16 on an accelerator), or a no-op context.
        inputs: how raw inputs become model inputs (:class:`ImageInputs`, :class:`TableInputs` or
            :class:`TaskInputs`), or None when the checkpoint's data loader has no file form.
        class_names: list of str, or None (a regression model, or a task's files).
        task: the config's task when it reads and writes files (:func:`file_task`), else None.
    """

    def __init__(self, model, config, device, autocast, inputs, class_names, task=None):
        self.model, self.config, self.device, self.autocast = model, config, device, autocast
        self.inputs, self.class_names, self.task = inputs, class_names, task


def load_for_inference(checkpoint, overrides=(), device=None):
    """Rebuild the model of ``checkpoint`` (weights loaded, eval mode) with its config and preprocessing.

    Raises:
        UserError: the checkpoint is missing or damaged, its config no longer checks, or its weights do
            not fit the model the config builds.
    """
    from trainer import build

    model, config, device, autocast = build.trained_model(checkpoint, overrides, device)
    task = file_task(config)
    inputs = TaskInputs(task) if task is not None else input_reader(config)
    class_names = inputs.class_names if inputs is not None else None
    return Loaded(model, config, device, autocast, inputs, class_names, task)


def file_task(config):
    """The config's task when it defines ``load_input`` and ``write_prediction`` (base/base_task.py), else None.

    Raises:
        UserError: the task defines one of the two but not the other.
    """
    if not config.get("task"):
        return None
    from trainer import build
    from utils.config import init_obj

    task = init_obj(config["task"], build.registries()["task"], where="task")
    has = {name: callable(getattr(task, name, None)) for name in ("load_input", "write_prediction")}
    if len(set(has.values())) > 1:
        given, missing = (name for value in (True, False) for name in has if has[name] is value)
        raise UserError(f"task: {config['task']['type']} defines {given} but not {missing}; predict.py needs both"
                        " (base/base_task.py), or neither")
    return task if all(has.values()) else None


def input_reader(config):
    """How files become this config's model inputs: :class:`ImageInputs`, :class:`TableInputs` or None."""
    section = config["data_loader"]
    args = section["args"]
    if section["type"] == "CsvDataLoader":
        return TableInputs(args)
    if section["type"] == "ImageFolderDataLoader":
        spec = _part("augment").parse_transforms(_part("image_folder").transforms_of(args))  # normalize "auto" too
        return ImageInputs(args.get("channels", 3), _part("image_folder").size_pair(args.get("image_size")), spec.eval if spec else [],
                           args.get("class_names"))
    if section["type"] in _BUILTIN_IMAGES:
        channels, size, mean, std, names = _BUILTIN_IMAGES[section["type"]]
        from torchvision.transforms import v2

        return ImageInputs(channels, size, [("Normalize", v2.Normalize(list(mean), list(std)))], names)
    return None


class ImageInputs:
    """Image files decoded as the training images were, then the eval transforms."""

    kind = "images"

    def __init__(self, channels, size, steps, class_names):
        augment = _part("augment")
        BatchPipeline, SamplePipeline, batch_op = augment.BatchPipeline, augment.SamplePipeline, augment.batch_op

        self.channels, self.size, self.steps, self.class_names = channels, size, list(steps), class_names
        # The batched pipeline is the one test.py's in-memory loader uses; it equals the per-sample one bit for bit.
        batchable = all(batch_op(name, t) is not None for name, t in self.steps)
        self._batch = BatchPipeline(self.steps) if batchable else None
        self._sample = None if batchable else SamplePipeline(self.steps)

    def normalisation(self):
        """``(mean, std)`` of the eval transforms' ``Normalize``, or ``(None, None)``."""
        for name, transform in self.steps:
            if name == "Normalize":
                return list(transform.mean), list(transform.std)
        return None, None

    def read(self, paths, report):
        """Yield ``(label, uint8 tensor)`` per readable file; ``report(line)`` for each unreadable one."""
        image_folder = _part("image_folder")
        Unreadable, decode = image_folder.Unreadable, image_folder.decode

        for path in paths:
            try:
                yield str(path), decode(path, self.channels, self.size)
            except Unreadable as err:
                report(f"skipped {path}: {err}")

    def batch(self, samples):
        """A list of uint8 ``(C, H, W)`` tensors of one shape -> the model's float batch."""
        if self._batch is not None:
            return self._batch(torch.stack(samples))
        return torch.stack([self._sample(x) for x in samples])


class TaskInputs:
    """Input files read by the task's ``load_input`` (one sample's model input, a tensor)."""

    kind = "files"
    class_names = None

    def __init__(self, task):
        self.task = task

    def read(self, paths, report):
        """Yield ``(label, tensor)`` per file ``load_input`` reads; ``report`` those it raises OSError or ValueError
        for (a file that is no image, say)."""
        for path in paths:
            try:
                yield str(path), self.task.load_input(path)
            except (OSError, ValueError) as err:
                report(f"skipped {path}: {' '.join(str(err).split()) or type(err).__name__}")

    @staticmethod
    def batch(samples):
        return torch.stack(samples)


class TableInputs:
    """CSV rows: the training table's feature columns, standardised with its saved statistics."""

    kind = "table"

    def __init__(self, args):
        self.stats = args.get("feature_stats")
        self.features = (self.stats or {}).get("features") or args.get("features")
        self.target = args.get("target")
        self.class_names = args.get("class_names") if args.get("task", "classification") == "classification" else None
        self.delimiter = args.get("delimiter", ",")

    def read(self, path, report):
        """Yield ``(label, float32 tensor)`` per usable row of the CSV file ``path``; ``report`` the others."""
        tables = _part("tables")
        MISSING, parse_number = tables.MISSING, tables.parse_number

        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f, delimiter=self.delimiter)
                header = [h.strip() for h in next(reader, None) or []]
                if not any(header):
                    raise UserError(f"{path} is empty: expected a first row naming the columns")
                features = self.features
                if features is None:  # what the training table used: every numeric column but the target
                    features = [h for h in header if h != self.target]
                missing = [name for name in features if name not in header]
                if missing:
                    raise UserError(f"{path}: no column {missing[0]!r}; the model reads the features"
                                    f" {', '.join(features)} (columns here: {', '.join(header)})")
                index = [header.index(name) for name in features]
                mean = std = None
                if self.stats:
                    mean = torch.tensor(self.stats["mean"], dtype=torch.float64)
                    std = torch.tensor(self.stats["std"], dtype=torch.float64)
                for row_number, row in enumerate(reader, start=1):
                    if not row or (len(row) == 1 and not row[0].strip()):
                        continue
                    where = f"{path} row {row_number} (line {reader.line_num})"
                    if len(row) != len(header):
                        report(f"skipped {where}: {len(row)} values, but the first row names {len(header)} columns")
                        continue
                    values = [row[i].strip() for i in index]
                    bad = [(features[j], v) for j, v in enumerate(values) if v.lower() in MISSING or parse_number(v) is None]
                    if bad:
                        report(f"skipped {where}: column {bad[0][0]!r} is {bad[0][1]!r}, not a number")
                        continue
                    x = torch.tensor([float(v) for v in values], dtype=torch.float64)
                    if mean is not None:
                        x = (x - mean) / std
                    yield (str(path), row_number), x.to(torch.float32)
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            report(f"skipped {path}: cannot read it ({' '.join(str(err).split())})")

    @staticmethod
    def batch(samples):
        return torch.stack(samples)


# --------------------------------------------------------------------------- inputs


def _is_table(path):
    return str(path).lower().endswith(CSV_EXTENSIONS)


def _not_a_file(path):
    """Why ``path``, which exists, is neither a regular file nor a folder (a FIFO, a device, a socket), or why a
    link to nothing is not found: reading a FIFO or a device waits or never ends."""
    target = f" (a symbolic link to {os.path.realpath(path)})" if os.path.islink(path) else ""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return f"{path}{target} does not exist"
    kinds = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"{path}{target} is {kind}, not a file or folder"


def expand_inputs(inputs, kind):
    """The files the command line names, in order: files as given, folders' images recursively (sorted).

    Raises:
        UserError: a path that does not exist, a folder without images, a CSV file for an image model
            or an image for a table model.
    """
    if not inputs:
        raise UserError("no inputs: give image files, folders of images or a CSV file after -r CHECKPOINT")
    files = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir() and kind == "files":  # every file under it, for the task to read (or report and skip)
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise UserError(f"{path} holds no files")
            files += found
        elif path.is_dir():
            if kind == "table":
                raise UserError(f"{path} is a folder; this checkpoint's model reads CSV rows: give a CSV file")
            image_folder = _part("image_folder")
            IMAGE_EXTENSIONS, images_under = image_folder.IMAGE_EXTENSIONS, image_folder.images_under

            found = images_under(path)
            if not found:
                raise UserError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            files += [Path(p) for p in found]
        elif path.is_file():
            if kind == "images" and _is_table(path):
                raise UserError(f"{path} is a CSV file, but this checkpoint's model reads images: give image files or folders")
            if kind == "table" and not _is_table(path):
                raise UserError(f"{path} is not a CSV file (.csv, .tsv), but this checkpoint's model reads CSV rows")
            files.append(path)
        elif os.path.lexists(path):  # a FIFO, a device or a dangling link: say what it is, never read it
            raise UserError(f"input {_not_a_file(path)}: give image files, folders of images or CSV files")
        else:
            raise UserError(f"input not found: {path}")
    return files


def _samples(loaded, files, report):
    reader = loaded.inputs
    if reader.kind == "table":
        for path in files:
            yield from reader.read(path, report)
    else:
        yield from reader.read(files, report)


def _batches(samples, batch_size):
    """Lists of ``(label, sample)`` of at most ``batch_size``, each of one sample shape."""
    batch = []
    for label, x in samples:
        if batch and (len(batch) == batch_size or x.shape != batch[0][1].shape):
            yield batch
            batch = []
        batch.append((label, x))
    if batch:
        yield batch


# --------------------------------------------------------------------------- predicting


def _describe_inputs(loaded):
    reader = loaded.inputs
    if reader.kind == "files":
        return f"the inputs of {loaded.config['data_loader']['type']}"
    if reader.kind == "table":
        return f"the features {', '.join(reader.features)}" if reader.features else "its table's numeric columns"
    size = f" of {reader.size[0]}x{reader.size[1]}" if reader.size else ""
    return f"{reader.channels}-channel images{size}"


@torch.no_grad()
def predict(loaded, files, top_k=3, batch_size=64, progress=False, report=None, out_dir=None):
    """Predictions for ``files`` (image files or CSV files, as :func:`expand_inputs` returns them).

    Returns:
        A list of dicts, one per usable input, in input order: ``input`` (the path), ``row`` (CSV row
        number, 1 = the first row after the header; None for images), and for a classifier ``class``,
        ``probability`` and ``top_k`` (a list of ``(class name, probability)``, most probable first); for a
        regression model ``prediction`` (a float, or a list for several outputs); for a task's files
        (``loaded.task``) ``output``, the path of the file its ``write_prediction`` wrote into ``out_dir``
        (made when the first is written).

    Raises:
        UserError: the inputs do not fit the model (one line, naming the shapes).
    """
    from tqdm import tqdm

    report = report or (lambda line: print(line, file=sys.stderr))
    model, device = loaded.model, loaded.device
    names = loaded.class_names
    results = []
    total = len(files) if loaded.inputs.kind != "table" else None
    bar = tqdm(total=total, desc="predict", unit=" inputs" if total else " rows", leave=False,
               disable=None if progress else True, file=sys.stderr)
    try:
        for batch in _batches(_samples(loaded, files, report), batch_size):
            labels, samples = zip(*batch)
            try:
                x = loaded.inputs.batch(list(samples)).to(device)
                with loaded.autocast:
                    output = model(x)
            except (RuntimeError, ValueError, IndexError) as err:
                reason = " ".join(str(err).split())[:240]
                raise UserError(f"{labels[0] if isinstance(labels[0], str) else labels[0][0]}: inputs of shape"
                                f" {tuple(samples[0].shape)} do not fit the model, which was trained on"
                                f" {_describe_inputs(loaded)} ({reason})") from None
            output = output.float()
            if loaded.task is not None:  # one file per input, written by the task
                Path(out_dir).mkdir(exist_ok=True)
                for label, one in zip(labels, output.cpu()):
                    written = loaded.task.write_prediction(one, Path(out_dir) / Path(label).stem)
                    results.append(_row(label, output=str(written)))
            elif names is not None:
                if output.dim() != 2 or output.shape[1] != len(names):
                    raise UserError(f"the model gives outputs of shape {tuple(output.shape[1:])}, but its data has"
                                    f" {len(names)} classes")
                probs = output.softmax(dim=1).cpu()
                k = max(1, min(top_k, len(names)))
                top_p, top_i = probs.topk(k, dim=1)
                for label, p_row, i_row in zip(labels, top_p.tolist(), top_i.tolist()):
                    results.append(_row(label, class_=names[i_row[0]], probability=p_row[0],
                                        top_k=[(names[i], p) for i, p in zip(i_row, p_row)]))
            else:
                values = output.cpu()
                if scaled := (loaded.config["data_loader"]["args"].get("feature_stats") or {}).get("target"):
                    values = values * scaled["std"] + scaled["mean"]  # a standardised target (parts/tables.py)
                for label, value in zip(labels, values):
                    value = value.tolist()
                    results.append(_row(label, prediction=value[0] if isinstance(value, list) and len(value) == 1 else value))
            bar.update(len(batch))
    finally:
        bar.close()
    return results


def _row(label, class_=None, **values):
    path, row = (label, None) if isinstance(label, str) else label
    out = {"input": path, "row": row}
    if class_ is not None:
        out["class"] = class_
    out.update(values)
    return out


def format_rows(results, top_k, as_json=False):
    """The text of the predictions: CSV (a header row, then one row per input) or JSON lines."""
    if as_json:
        lines = []
        for r in results:
            r = dict(r)
            if "top_k" in r:
                r["top_k"] = [{"class": c, "probability": p} for c, p in r["top_k"]]
            lines.append(json.dumps(r))
        return "".join(line + "\n" for line in lines)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    classifier = bool(results) and "class" in results[0]
    files = bool(results) and "output" in results[0]
    k = max((len(r.get("top_k", ())) for r in results), default=0)
    if classifier:
        header = ["input", "row", "class", "probability"]
        for i in range(1, k + 1):
            header += [f"top{i}_class", f"top{i}_probability"]
    elif files:
        header = ["input", "row", "output"]
    else:
        header = ["input", "row", "prediction"]
    writer.writerow(header)
    for r in results:
        row = ["" if r["row"] is None else r["row"]]
        if classifier:
            cells = [r["input"], *row, r["class"], f"{r['probability']:.6g}"]
            for name, p in r["top_k"]:
                cells += [name, f"{p:.6g}"]
        elif files:
            cells = [r["input"], *row, r["output"]]
        else:
            value = r["prediction"]
            cells = [r["input"], *row, json.dumps(value) if isinstance(value, list) else f"{value:.6g}"]
        writer.writerow(cells)
    return out.getvalue()


# --------------------------------------------------------------------------- where the output goes


def _identity(path):
    """``(st_dev, st_ino)`` of the file ``path`` names (through symbolic links), or None when there is none."""
    try:
        found = os.stat(path)
    except (OSError, ValueError):
        return None
    return found.st_dev, found.st_ino


def run_files(checkpoint):
    """``(what, path)`` of a checkpoint and its run's files (beside it, and beside the file a link points to)."""
    files = [("the checkpoint -r names", Path(checkpoint))]
    for folder in dict.fromkeys([Path(checkpoint).parent, Path(os.path.realpath(checkpoint)).parent]):
        files += [(f"the run's {name}", folder / name) for name in ("config.json", "manifest.json")]
    return files


def check_output(output, inputs, command, is_earlier_output, label="-o"):
    """Refuse, before anything is read or written, an output path whose writing would lose something.

    Args:
        output: the path the command would replace (atomically) with its output.
        inputs: ``(what, path)`` pairs: the checkpoint, its run's files, the files the command reads.
        command: the command's name, for the message (``"predict.py"``).
        is_earlier_output: ``path -> bool``: whether an existing file is an earlier output of this command,
            which may be replaced (a rerun writes its output where the last one was).
        label: what the message calls ``output`` (``"-o"``, or ``"the default output"``).

    Raises:
        UserError: one line naming the problem and what would be valid: ``output`` is a folder, its folder
            does not exist, it is one of ``inputs`` (the same path, or the same file through a symbolic or
            hard link: same device and inode), it is a link to nothing, a FIFO or a device, or it is a
            non-empty file that is not an earlier output of ``command``.
    """
    path = Path(output)
    valid = f"give -o a new file path (or an earlier output of {command}, which it replaces)"
    if str(output).endswith(("/", os.sep)) or path.is_dir():
        raise UserError(f"{label} {output} is a folder: {valid}")
    if not path.parent.is_dir():
        raise UserError(f"{label} {output}: folder {path.parent} does not exist; create it or {valid}")
    found, real = _identity(path), os.path.realpath(path)
    for what, other in inputs:
        if os.path.realpath(other) == real or (found is not None and _identity(other) == found):
            how = [str(other)] if str(other) != str(output) else []
            how += [] if os.path.realpath(other) == real else ["through a hard link"]
            how = f" ({', '.join(how)})" if how else ""
            raise UserError(f"{label} {output} is {what}{how}: {command} would replace it; {valid}")
    if os.path.lexists(path) and not path.is_file():
        raise UserError(f"{label} {_not_a_file(path)}: {valid}")
    if found is not None and path.stat().st_size and not is_earlier_output(path):
        raise UserError(f"{label} {output} exists and is not an output of {command}: it would be replaced;"
                        f" {valid}, or move the file away first")


def check_output_folder(folder, inputs):
    """For a task writing one file per input: refuse, before any input is read, an ``-o`` that is not a folder (nor
    one to make: its parent folder missing), is an input folder or lies inside one, or is the folder of an input
    file (a rerun would read the outputs as inputs, or an output could replace an input).

    Raises:
        UserError: one line naming the problem and what would be valid.
    """
    path = Path(folder)
    valid = "give -o a folder for them (a new one, or the one an earlier run of the same command wrote)"
    writes = "this checkpoint's task writes one file per input"
    if os.path.lexists(path) and not path.is_dir():
        kind = "a file" if path.is_file() else _not_a_file(path).removeprefix(f"{path} is ")
        raise UserError(f"-o {folder} is {kind}, but {writes}: {valid}")
    if not path.parent.is_dir():
        raise UserError(f"-o {folder}: folder {path.parent} does not exist; create it, or {valid}")
    real = os.path.realpath(path)
    for item in inputs:
        where = os.path.realpath(item) if os.path.isdir(item) else os.path.dirname(os.path.realpath(item))
        inside = os.path.isdir(item) and os.path.commonpath([real, where]) == where
        if real == where or inside:
            what = "an input folder" if real == where and os.path.isdir(item) else \
                "inside the input folder" if inside else "the folder of the input"
            raise UserError(f"-o {folder} is {what} {item}, and {writes}: {valid}, outside the inputs")


def check_distinct_stems(files, folder):
    """One output per input, named by the input's stem: two inputs of one stem would write the same file."""
    seen = {}
    for path in files:
        if path.stem in seen:
            raise UserError(f"inputs {seen[path.stem]} and {path} would both write their prediction as"
                            f" {Path(folder) / path.stem}*; rename one, or predict them separately")
        seen[path.stem] = path


def is_predictions_file(path):
    """Whether ``path`` starts as :func:`format_rows` writes: predict.py's CSV header, or a JSON line of a row."""
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 16).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return False
    if first in ("input,row,prediction", "input,row,class,probability"):
        return True
    if first.startswith("input,row,class,probability,top1_"):
        return True
    try:
        row = json.loads(first)
    except ValueError:
        return False
    return isinstance(row, dict) and list(row)[:2] == ["input", "row"]


# --------------------------------------------------------------------------- the command line


def predict_parser():
    from trainer.cli import CommandParser

    parser = CommandParser(description="Predict with a trained checkpoint: image files, folders of images"
                                     " (recursively) or CSV files with the training table's feature columns.")
    parser.add_argument("-r", "--resume", required=True, metavar="CHECKPOINT", help="checkpoint to predict with")
    parser.add_argument("-o", "--output", help="write the predictions to this file (default: standard output); for a"
                        " task that writes a file per input (a mask image, say), the folder for them")
    parser.add_argument("--top-k", type=int, default=3, help="classes listed per input, most probable first (default 3)")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of CSV")
    parser.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass (default 64)")
    parser.add_argument("-d", "--device", help='device: "auto", "cpu", "cuda", "cuda:N" or "mps" (the config\'s "device")')
    parser.add_argument("items", nargs="*", metavar="INPUT | key.path=VALUE",
                        help="image files, folders or CSV files; key.path=VALUE changes the checkpoint's config")
    return parser


def writes_files(loaded):
    return f"{loaded.config['task']['type']} writes one file per input (its write_prediction)"


def _is_override(item):
    key, sep, _ = item.partition("=")
    return bool(sep) and not os.path.exists(item) and all(part.isidentifier() for part in key.split("."))


def predict_command(argv=None):
    """``python predict.py -r CKPT INPUT... [-o FILE] [--top-k K] [--json]``; returns the exit code."""
    from trainer.cli import run_command, overrides_of, parse

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = predict_parser()
    args = parse(parser, argv)
    if args.top_k < 1:
        parser.error("--top-k: expected a positive integer")
    if args.batch_size < 1:
        parser.error("--batch-size: expected a positive integer")
    args.overrides = [item for item in args.items if _is_override(item)]
    inputs = [item for item in args.items if not _is_override(item)]

    def run():
        loaded = load_for_inference(args.resume, overrides_of(args))  # (read before -o: is it a file or a folder?)
        args.output = os.path.expanduser(args.output) if args.output else None  # (as the inputs are)
        if loaded.task is not None:
            if not args.output:
                raise UserError(f"{writes_files(loaded)}: give -o FOLDER, where they go")
            check_output_folder(args.output, inputs)
        elif args.output:  # (an input inside a folder named here is an image: never a predictions file)
            check_output(args.output, run_files(args.resume) + [("an input", Path(item)) for item in inputs],
                         "predict.py", is_predictions_file)
        if loaded.inputs is None:
            raise UserError(f"{args.resume}: predict.py reads image files (ImageFolderDataLoader, MnistDataLoader,"
                            " Cifar10DataLoader) and CSV rows (CsvDataLoader); this checkpoint's data loader"
                            f" {loaded.config['data_loader']['type']} has no file form")
        files = expand_inputs(inputs, loaded.inputs.kind)
        if loaded.task is not None:
            check_distinct_stems(files, args.output)
        skipped = []

        def report(line):
            skipped.append(line)
            print(line, file=sys.stderr)

        results = predict(loaded, files, args.top_k, args.batch_size, progress=True, report=report,
                          out_dir=args.output if loaded.task is not None else None)
        if not results:
            raise UserError(f"no input could be read ({len(skipped)} skipped)")
        text = format_rows(results, args.top_k, args.json)
        if loaded.task is not None:  # the files are written: the rows on standard output name them
            sys.stdout.write(text)
            sys.stdout.flush()
            print(f"{len(results)} outputs written to {args.output}"
                  + (f" ({len(skipped)} inputs skipped)" if skipped else ""), file=sys.stderr)
        elif args.output:
            from utils.io import atomic_write

            data = text.encode("utf-8")
            with atomic_write(args.output, expected_size=len(data)) as f:
                f.write(data)
            print(f"{len(results)} predictions written to {args.output}"
                  + (f" ({len(skipped)} inputs skipped)" if skipped else ""), file=sys.stderr)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()

    return run_command(run)

