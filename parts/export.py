"""``export.py``: a checkpoint's model as TorchScript, ONNX or a ``torch.export`` program, checked before it is kept.

Promises:

* The model is exported in eval mode, from the checkpoint's config and weights, with a dynamic
  batch dimension; the example input is a batch of the checkpoint's own test split (its config's
  data), or, when that data is not on this machine, random inputs of the shape its config names.
  The model's inputs are what the step gives it: all but the last item of a batch, or, for a config
  naming a ``task`` (base/base_task.py), ``task.inputs(batch)``; a model of several inputs
  (``model(image, row)``) is exported taking them in that order, and one returning a tuple of
  tensors (``(logits, rebuilt)``) is exported returning all of them, in that order.
* Every export is checked before it is written: the exported model, loaded back from its bytes
  (ONNX through ``onnxruntime``), gives the eager model's outputs, each of them, within
  ``ATOL + RTOL * |eager|`` on that batch and on a batch of another size (the dynamic batch
  dimension). A mismatch, or a model the format cannot express, is one ``error:`` line naming the
  format and, where the exporter says, the failing operator; nothing is written then.
* Beside the file, ``<file>.preprocess.json`` says what an input must be: its shape without the
  batch dimension (``input_shape``; ``input_shapes``, one per input, for several), dtype, the names
  of the inputs and outputs (ONNX's; for the other formats their order), the image size, channels,
  normalisation ``mean``/``std`` (images), the feature names and standardisation (tables), the class
  names, the task, and the check's tolerance and largest difference. Both files are written whole or
  not at all (:func:`utils.io.atomic_write`).
* Neither file replaces an input: the checkpoint, its run's ``config.json``, a folder, or any existing
  file that is not an earlier export (whose ``.preprocess.json`` names it) is one ``error:`` line before
  the checkpoint is read (:func:`parts.predict.check_output`).

A part (utils/parts.py) that needs the predict part: the model and the preprocessing it describes
are the ones ``predict.py`` loads (:func:`parts.predict.load_for_inference`), so the two cannot
disagree. Delete this file, ``export.py`` and tests/parts/test_export.py, and nothing else changes;
deleting the predict part deletes this one too.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import torch

from utils.errors import UserError

FORMATS = {"torchscript": ".torchscript.pt", "onnx": ".onnx", "exported_program": ".pt2"}
ATOL = 1e-4
RTOL = 1e-4
EXAMPLE_BATCH = 8

# Input shapes of the built-in loaders, for an export where the data is not on this machine.
_BUILTIN_SHAPES = {"DigitsDataLoader": (1, 8, 8), "MnistDataLoader": (1, 28, 28), "Cifar10DataLoader": (3, 32, 32)}


def default_output(checkpoint, fmt):
    """``model_best.onnx`` for ``model_best.pth`` and ``onnx``."""
    path = Path(checkpoint)
    return path.with_name(path.stem + FORMATS[fmt])


def preprocess_path(output):
    output = Path(output)
    return output.with_name(output.name + ".preprocess.json")


def _describes(sidecar, name):
    """Whether ``sidecar`` is a ``.preprocess.json`` this command wrote for the file called ``name``."""
    try:
        info = json.loads(Path(sidecar).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return (isinstance(info, dict) and info.get("file") == name and "checked_on" in info
            and info.get("format") in FORMATS)


def check_outputs(checkpoint, output, label="-o"):
    """The exported file and its ``.preprocess.json``: neither may replace the checkpoint, its run's files or
    anything but an earlier export (:func:`parts.predict.check_output`). Raises UserError."""
    from parts.predict import check_output, run_files

    inputs = run_files(checkpoint)
    check_output(output, inputs, "export.py", lambda path: _describes(preprocess_path(path), path.name), label)
    check_output(preprocess_path(output), inputs, "export.py", lambda path: _describes(path, Path(output).name),
                 f"the preprocessing file of {label}")


# --------------------------------------------------------------------------- example inputs


def example_inputs(config, batch=EXAMPLE_BATCH):
    """``(inputs, source)``: ``inputs`` the tuple ``model(*inputs)`` takes, up to ``batch`` samples of the test split
    (as the config's step reads a batch: all but its last item, or its task's ``inputs(batch)``), or random ones of
    the config's input shape. Floating-point inputs become float32; others (token ids) keep their dtype.

    Raises:
        UserError: neither the data nor an input shape can be found, or the task's inputs are not tensors.
    """
    from trainer import build

    try:
        loader = build.build_data_loader(config, training=False)
        loader.batch_size = max(loader.batch_size, batch)
        first = next(iter(loader))
    except UserError as err:
        reason = str(err).splitlines()[0]
    else:
        if config.get("task"):
            from utils.config import init_obj

            task = init_obj(config["task"], build.registries()["task"], where="task")
            inputs = task.inputs(first)
            where = f"task: {config['task']['type']}.inputs(batch)"
        else:
            inputs, where = first[:-1], "the data loader's batches, all but their last item,"
        inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
        if not inputs or not all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in inputs):
            raise UserError(f"cannot make an example input: {where} gives {_kinds(inputs)}; export needs a tuple of"
                            " tensors with a batch dimension (what model(*inputs) takes)")
        return tuple(x[:batch].float() if x.is_floating_point() else x[:batch] for x in inputs), "the test split"
    shape = input_shape_from_config(config)
    if shape is None:
        raise UserError(f"cannot make an example input: the checkpoint's data is not here ({reason}) and its config"
                        " does not say the input shape; point data_loader.args at the data (key.path=VALUE)")
    generator = torch.Generator().manual_seed(0)
    random = torch.randn(batch, *shape, generator=generator)
    return (random,), f"random inputs of shape {list(shape)} (data not found: {reason})"


def _kinds(values):
    return "(" + ", ".join(f"a tensor of shape {list(v.shape)}" if isinstance(v, torch.Tensor) else
                           f"a {type(v).__name__}" for v in values) + ")"


def _names(kind, count):
    """The inputs' or outputs' names: ``input`` for one (as before several were possible), ``input_0``, ... else."""
    return [kind] if count == 1 else [f"{kind}_{i}" for i in range(count)]


def _outputs(output):
    """A model's output as a list of tensors: a tensor, or a (nested) tuple or list of them, in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _outputs(item)]
    raise UserError(f"the model returns a {type(output).__name__}; export checks a tensor or a tuple of tensors")


def input_shape_from_config(config):
    """The shape of one input (no batch dimension) as far as the config says, else None."""
    section = config["data_loader"]
    args = section["args"]
    if section["type"] in _BUILTIN_SHAPES:
        return _BUILTIN_SHAPES[section["type"]]
    if section["type"] == "SyntheticDataLoader":
        return tuple(args.get("input_shape", (1, 8, 8)))
    if section["type"] == "ImageFolderDataLoader" and args.get("image_size") is not None:
        from utils import parts as optional_parts

        return (args.get("channels", 3), *optional_parts.load("image_folder").size_pair(args["image_size"]))
    if section["type"] == "CsvDataLoader":
        features = (args.get("feature_stats") or {}).get("features") or args.get("features")
        return (len(features),) if features else None
    return None


def preprocessing(loaded, inputs, fmt, output, max_diff, source, n_outputs=1):
    """What ``<file>.preprocess.json`` holds (see the module's docstring); ``inputs``: the tuple of example inputs."""
    config = loaded.config
    shapes = [["batch", *x.shape[1:]] for x in inputs]
    dtypes = [str(x.dtype).removeprefix("torch.") for x in inputs]
    info = {"format": fmt, "file": Path(output).name}
    if len(inputs) == 1:
        info.update(input_shape=shapes[0], input_dtype=dtypes[0])
    else:
        info.update(input_shapes=shapes, input_dtypes=dtypes)
    info.update(input_names=_names("input", len(inputs)), output_names=_names("output", n_outputs),
                class_names=loaded.class_names)
    inputs = inputs[0]  # images and tables: the one input
    reader = loaded.inputs
    if reader is not None and reader.kind == "images":  # decoded by the image_folder part's code (predict.py)
        from utils import parts as optional_parts

        image_folder = optional_parts.load("image_folder")
        mean, std = reader.normalisation()
        transforms = image_folder.transforms_of(config["data_loader"]["args"]) or {}  # normalize "auto" resolved
        info.update(image_size=list(reader.size) if reader.size else list(inputs.shape[2:]),
                    channels=reader.channels, color="RGB" if reader.channels == 3 else "L",
                    scale="pixels / 255, then (x - mean) / std per channel" if mean else "pixels / 255",
                    mean=mean, std=std, resize_filter=image_folder.RESIZE_FILTER,
                    resize=f"resize ({image_folder.RESIZE_FILTER}, PIL) to cover image_size keeping the aspect"
                           " ratio, then centre-crop",
                    eval_transforms=transforms.get("eval", []))
    elif reader is not None and reader.kind == "table":
        info.update(feature_names=reader.features, feature_stats=reader.stats,
                    scale="(x - mean) / std per feature" if reader.stats else "none")
    info.update(checked_on=source, atol=ATOL, rtol=RTOL, max_abs_diff=max_diff,
                arch=config["arch"], data_loader=config["data_loader"]["type"])
    if config.get("task"):
        info["task"] = config["task"]["type"]
    return info


# --------------------------------------------------------------------------- exporters: bytes, and a runner of those bytes


# Each takes the model and the tuple of its example inputs; returns the bytes and a function of those inputs
# (``runner(*inputs)``) that runs the model loaded back from the bytes.


def _export_torchscript(model, xs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices say nothing about this model
        traced = torch.jit.trace(model, xs, check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    data = buffer.getvalue()

    def runner(*inputs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        return module(*inputs)

    return data, runner


def _export_program(model, xs):
    batch = torch.export.Dim("batch", min=1, max=2**20)
    program = torch.export.export(model, xs, dynamic_shapes=tuple({0: batch} for _ in xs))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    data = buffer.getvalue()

    def runner(*inputs):
        return torch.export.load(io.BytesIO(data)).module()(*inputs)

    return data, runner


def _export_onnx(model, xs):
    try:
        import onnxruntime
    except ImportError:
        raise UserError("--format onnx needs the packages onnx and onnxruntime: pip install onnx onnxruntime") from None
    with torch.no_grad():
        input_names, output_names = _names("input", len(xs)), _names("output", len(_outputs(model(*xs))))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, xs, buffer, dynamo=False, input_names=input_names, output_names=output_names,
                          dynamic_axes={name: {0: "batch"} for name in input_names + output_names})
    data = buffer.getvalue()

    def runner(*inputs):
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        outs = session.run(None, {name: x.numpy() for name, x in zip(input_names, inputs)})
        return tuple(torch.from_numpy(out) for out in outs)

    return data, runner


_EXPORTERS = {"torchscript": _export_torchscript, "onnx": _export_onnx, "exported_program": _export_program}


def failing_operator(err):
    """What an exporter's message says failed: ``"operator aten::linalg_eigh"``, ``"data-dependent control flow"``, or None."""
    text = str(err)
    for pattern in (r"the operator '([\w:.]+)'", r"ONNX export of operator (\S+?)[,.\s]"):
        found = re.search(pattern, text)
        if found:
            return f"operator {found.group(1)}"
    if "data-dependent" in text:  # torch.export: a Python branch or a shape that depends on a tensor's values
        return "data-dependent control flow (a Python branch on a tensor's value, e.g. after .item())"
    found = re.search(r"(aten(?:::|\.)\w+(?:\.\w+)?)", text)
    return f"operator {found.group(1)}" if found else None


@contextlib.contextmanager
def _quiet_torch():
    """The exporters log their graphs and guesses as warnings, and torch.export prints a failing graph; the
    outcome is reported in one line instead."""
    names = ["torch", *(n for n in logging.root.manager.loggerDict if n.startswith("torch."))]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch.export prints the failing graph to stderr itself
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_model(loaded, fmt, xs):
    """``(bytes, max_abs_diff, number of outputs)`` of ``loaded.model`` exported as ``fmt`` on the CPU and checked
    on ``xs``, the tuple of example inputs (a tensor alone: one input).

    Raises:
        UserError: the format cannot express the model, or the exported outputs differ from the eager ones.
    """
    model = loaded.model.to("cpu").eval()
    xs = tuple(x.to("cpu") for x in (xs if isinstance(xs, (list, tuple)) else (xs,)))
    try:
        with _quiet_torch():
            data, runner = _EXPORTERS[fmt](model, xs)
    except UserError:
        raise
    except Exception as err:  # every exporter has its own exception types; all mean "cannot export this"
        op = failing_operator(err)
        first = " ".join(str(err).split())[:300] or type(err).__name__
        where = f" ({op})" if op else ""
        raise UserError(f"{loaded.config['arch']['type']} cannot be exported as {fmt}{where}: {first}") from None
    max_diff = 0.0
    small = tuple(x[:1] for x in xs)  # another batch size: the batch dimension must really be dynamic
    for inputs in (xs, small):
        n = len(inputs[0])
        with torch.no_grad():
            expected = _outputs(model(*inputs))
            try:
                got = _outputs(runner(*(x.clone() for x in inputs)))
            except UserError:
                raise
            except Exception as err:
                first = " ".join(str(err).split())[:300]
                raise UserError(f"the {fmt} export of {loaded.config['arch']['type']} fails on a batch of"
                                f" {n}: {first}") from None
        if len(got) != len(expected):
            raise UserError(f"the {fmt} export gives {len(got)} outputs where the model gives {len(expected)}")
        for i, (out, want) in enumerate(zip(got, expected)):
            which = f" (output {i})" if len(expected) > 1 else ""
            out, want = out.float(), want.float()
            if out.shape != want.shape:
                raise UserError(f"the {fmt} export gives outputs of shape {tuple(out.shape)} where the model gives"
                                f" {tuple(want.shape)}{which} (batch of {n})")
            diff = (out - want).abs()
            max_diff = max(max_diff, float(diff.max()) if diff.numel() else 0.0)
            if not torch.allclose(out, want, atol=ATOL, rtol=RTOL):
                raise UserError(f"the {fmt} export's outputs{which} differ from the model's by up to"
                                f" {float(diff.max()):.3g} (tolerance {ATOL} + {RTOL} x |output|, batch of {n});"
                                " nothing was written")
    return data, max_diff, len(expected)


def export_checkpoint(checkpoint, fmt, output=None, overrides=()):
    """Export ``checkpoint``'s model as ``fmt`` to ``output`` (default beside the checkpoint), checked, with its
    preprocessing JSON beside it. Returns ``(output path, preprocessing dict)``."""
    from parts.predict import load_for_inference
    from utils.io import atomic_write, write_json

    if fmt not in FORMATS:
        raise UserError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    label = "-o" if output else "the default output"
    output = Path(os.path.expanduser(output)) if output else default_output(checkpoint, fmt)
    check_outputs(checkpoint, output, label)
    loaded = load_for_inference(checkpoint, list(overrides) + ["device=cpu"])
    xs, source = example_inputs(loaded.config)
    data, max_diff, n_outputs = export_model(loaded, fmt, xs)
    info = preprocessing(loaded, xs, fmt, output, max_diff, source, n_outputs)
    with atomic_write(output, expected_size=len(data)) as f:
        f.write(data)
    write_json(preprocess_path(output), info)
    return output, info


# --------------------------------------------------------------------------- the command line


def export_parser():
    from trainer.cli import CommandParser

    parser = CommandParser(description="Export a checkpoint's model (eval mode, dynamic batch), checked"
                                     " against the eager model, with its preprocessing as JSON beside it.")
    parser.add_argument("-r", "--resume", required=True, metavar="CHECKPOINT", help="checkpoint to export")
    parser.add_argument("--format", required=True, choices=list(FORMATS), help="what to export to")
    parser.add_argument("-o", "--output", help="the exported file (default: beside the checkpoint,"
                        " e.g. model_best.onnx)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=VALUE",
                        help="change the checkpoint's config (e.g. data_loader.args.data_dir=... for real example inputs)")
    return parser


def export_command(argv=None):
    """``python export.py -r CKPT --format FORMAT [-o FILE]``; returns the exit code."""
    from trainer.cli import run_command, overrides_of, parse

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(export_parser(), argv)

    def run():
        output, info = export_checkpoint(args.resume, args.format, args.output, overrides_of(args))
        print(f"Exported {args.resume} as {args.format} to {output}")
        print(f"    checked on {info['checked_on']}: largest difference {info['max_abs_diff']:.3g}"
              f" (tolerance {ATOL} + {RTOL} x |output|), batch sizes {EXAMPLE_BATCH} and 1")
        print(f"    preprocessing: {preprocess_path(output)}")

    return run_command(run)
