"""``trainer.confusion_matrix``: the validation's confusion matrix, as a TensorBoard image at each validation.

A part (utils/parts.py): delete this file and tests/parts/test_confusion.py, and runs without
``trainer.confusion_matrix`` train as before. In a config::

    "trainer": {"confusion_matrix": true}

Promises:

* Every validation counts (true class, predicted class) over all of its samples, summed over the
  processes under torchrun, and rank 0 logs the matrix as the image ``val/confusion_matrix``, with
  the data's class names (else the class indices), drawn with PIL (no matplotlib, no torchmetrics).
* A matrix that could not be shown (no validation split, TensorBoard off) or counted (outputs that
  are not class scores, targets that are not class indices) is one config line before anything is written.
* It costs training nothing: it is counted in validation only, and nothing of it is checkpointed.
"""

import json

import torch

from base.base_hook import Hook
from utils.config import boolean, metric_name
from utils.errors import ConfigError, UserError
from trainer.trainer import EpochMetric

NAME = "confusion_matrix"  # the key evaluate() returns the matrix under, which the hook takes out of the result


def check(config):
    """``trainer.confusion_matrix``: true or false, with TensorBoard on, and no metric of the same name."""
    cfg = config["trainer"]
    value = cfg.get("confusion_matrix")
    if boolean(value):
        return [f"trainer.confusion_matrix: got {json.dumps(value)}, expected true or false"]
    problems = []
    loggers = cfg.get("loggers") if isinstance(cfg.get("loggers"), list) else []
    names = [item if isinstance(item, str) else item.get("type") for item in loggers if isinstance(item, (str, dict))]
    if "tensorboard" not in names:
        problems.append("trainer.confusion_matrix: it is logged as a TensorBoard image, and TensorBoard is off in this"
                        ' run (trainer.loggers); add "tensorboard", or leave the matrix off')
    metrics = config.get("metrics") if isinstance(config.get("metrics"), list) else []
    if any(isinstance(m, (str, dict)) and metric_name(m) == NAME for m in metrics):
        problems.append(f"metrics: the name {NAME!r} is taken by trainer.confusion_matrix; give the entry its own"
                        ' "name"')
    return problems


def prepare(config, parts):
    """Validation counts the matrix (``parts.valid_metric_fns``); without a validation split it would count nothing."""
    if parts.valid_data_loader is None:
        raise ConfigError("trainer.confusion_matrix: it is counted over the validation split, and this run holds"
                          " none out; set data_loader.args.validation_split, or leave the matrix off")
    parts.valid_metric_fns.append(ConfusionMatrix(config["loss"]["args"].get("ignore_index", -100)))


def hooks(config, parts, run):
    return [ConfusionImage()]


class ConfusionImage(Hook):
    """Takes each validation's matrix out of its result (it is no scalar to log) and logs it as an image (rank 0)."""

    def after_validation(self, trainer, epoch, result):
        counts = result.pop(NAME, None)
        if counts is None or not (trainer.is_main and trainer.writer) or counts.numel() == 0:
            return
        names = getattr(trainer.valid_data_loader, "class_names", None)
        trainer.writer.add_images("val/confusion_matrix", confusion_image(counts, names)[None], trainer.global_step)


class ConfusionMatrix(EpochMetric):
    """Counts of (true class, predicted class) over an epoch.

    Rows are the targets, columns the argmax of the outputs; targets equal to ``ignore_index``
    are left out. :meth:`compute` returns the matrix (a CPU int64 tensor), summed over all
    processes under torchrun.
    """

    def __init__(self, ignore_index=-100, device=None, sync=True, check_inputs=False):
        self.__name__ = NAME
        self.ignore_index, self.device, self.sync, self.check_inputs = ignore_index, device, sync, check_inputs
        self.counts = None  # (C, C), made at the first batch: C is the output's number of classes

    def new(self, device, sync=True, check_inputs=False):
        return ConfusionMatrix(self.ignore_index, device, sync, check_inputs)

    def update(self, output, target):
        if self.check_inputs and (target.is_floating_point() or output.dim() != 2):  # (the dry batch's probe)
            raise UserError(f"trainer.confusion_matrix: needs class scores of shape (N, C) and class-index targets, but"
                            f" the model gives {_shape(output)} and the targets are {_shape(target)}; set it false")
        n = output.shape[1]
        kept = target != self.ignore_index
        pairs = target[kept] * n + output.detach().argmax(1)[kept]
        counts = torch.bincount(pairs, minlength=n * n)[: n * n].view(n, n)
        self.counts = counts if self.counts is None else self.counts + counts

    def compute(self):
        return self._total(self.sync).cpu()

    def _total(self, sync):
        counts = self.counts if self.counts is not None else torch.zeros(0, 0, dtype=torch.int64, device=self.device)
        if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            # A process whose shard held no batch has no matrix yet: agree on the size, then sum.
            size = torch.tensor([counts.shape[0]], device=counts.device)
            torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MAX)
            n = int(size)
            counts = torch.nn.functional.pad(counts, (0, n - counts.shape[0], 0, n - counts.shape[0]))
            torch.distributed.all_reduce(counts)
        return counts

    def reset(self):
        self.counts = None

    def state_dict(self, reduce=False):
        return {"counts": self._total(reduce).to("cpu", copy=True)}

    def load_state_dict(self, state, own=True):
        counts = state.get("counts")
        if not isinstance(counts, torch.Tensor) or counts.dim() != 2:
            return False
        self.counts = counts.to(self.device, copy=True) if own and counts.numel() else None
        return True


def _shape(t):
    return f"[{', '.join(map(str, t.shape))}] ({str(t.dtype).replace('torch.', '')})"


def confusion_image(counts, class_names=None, cell=28):
    """The confusion matrix as an RGB image tensor ``(3, H, W)`` in [0, 1], drawn with PIL (no matplotlib).

    Each cell shows its count; its shade is the count's share of its row (the recall of that
    class on the diagonal). Rows (true class) are labelled on the left, columns (predicted) on
    top, with ``class_names`` or the class indices.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    counts = counts.to(torch.int64).cpu()
    n = counts.shape[0]
    names = [str(c) for c in (class_names if class_names and len(class_names) == n else range(n))]
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text):
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    label = max([text_size(name)[0] for name in names] + [4]) + 8  # room for the longest name
    width = height = label + n * cell + 4
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    shares = counts.double() / counts.sum(1, keepdim=True).clamp(min=1)
    for row in range(n):
        for col in range(n):
            x, y = label + col * cell, label + row * cell
            shade = int(255 * (1 - 0.85 * float(shares[row, col])))  # white (none) to dark blue (all of the row)
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255), outline=(200, 200, 200))
            text = str(int(counts[row, col]))
            w, h = text_size(text)
            draw.text((x + (cell - w) / 2, y + (cell - h) / 2), text, font=font,
                      fill="white" if shade < 128 else "black")
    for i, name in enumerate(names):
        w, h = text_size(name)
        draw.text((label - w - 4, label + i * cell + (cell - h) / 2), name, font=font, fill="black")  # rows
        column = Image.new("RGB", (w + 2, h + 4), "white")  # columns: the name turned upwards
        ImageDraw.Draw(column).text((1, 0), name, font=font, fill="black")
        column = column.rotate(90, expand=True)
        image.paste(column, (label + i * cell + (cell - column.width) // 2, label - column.height - 4))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return pixels.permute(2, 0, 1).contiguous()
