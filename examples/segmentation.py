"""Semantic segmentation: each pixel of a scene of handwritten digits is one of the 10 digits or the background.

A scene is a 32x32 canvas holding 2 to 4 of scikit-learn's real 8x8 digits, upscaled to 12x12; a pixel's class is the
digit whose ink there is above half intensity, else the background (10). The default step fits (a batch is ``(scene,
mask)``, the output ``(N, 11, H, W)``); the task adds what predict.py needs: a scene PNG in, a mask PNG out::

    python train.py -c configs/examples/segmentation.json
    python -m examples.segmentation --write-scenes scenes/ --count 8      # test scenes as PNG files
    python predict.py -r saved/models/Segmentation_UNet/<run_id>/model_best.pth scenes/ -o masks/
"""

import argparse
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from base.base_data_loader import BaseDataLoader, TensorDataset, to_float
from base.base_model import BaseModel
from base.base_task import Task
from data_loader.data_loaders import DIGITS_MEAN, DIGITS_STD, DigitsDataset, digits_tensors
from utils.errors import UserError
from utils.io import atomic_write

BACKGROUND, CANVAS, DIGIT = 10, 32, 12  # digit d is class d
SPLIT_SEEDS = {"train": 1, "valid": 2, "test": 3}  # the scenes never depend on the run's seed
PALETTE = bytes.fromhex("e6194b 3cb44b ffe119 0082c8 f58230 911eb4 46f0f0 f032e6 d2f53c fabed4 000000")  # of a mask


@lru_cache(maxsize=8)
def make_scenes(split, count, validation_split=0.15):
    """``(scenes (count, 1, 32, 32) in [0, 1] in a PNG's 8-bit steps, masks (count, 32, 32) int64)`` of ``split``,
    made from its own digit images: "test" from the default's test digits, "valid" from a share of the others."""
    images, labels = digits_tensors()
    ink = F.interpolate((images * DIGITS_STD + DIGITS_MEAN).clamp(0, 1), size=(DIGIT, DIGIT), mode="bilinear")
    train = DigitsDataset(train=True).indices
    held = round(len(train) * validation_split)
    pool = {"train": train[held:], "valid": train[:held], "test": DigitsDataset(train=False).indices}[split].numpy()
    ink, labels, rng = ink[:, 0].numpy(), labels.numpy(), np.random.default_rng(SPLIT_SEEDS[split])
    scenes = np.zeros((count, CANVAS, CANVAS), np.float32)
    masks = np.full((count, CANVAS, CANVAS), BACKGROUND, np.int64)
    for scene, mask in zip(scenes, masks):
        for i in rng.choice(pool, size=rng.integers(2, 5)):
            inked = ink[i] > 0.5
            for _ in range(20):  # a place where at most a tenth of its ink falls on another digit's
                y, x = rng.integers(0, CANVAS - DIGIT + 1, size=2)
                area, window = scene[y:y + DIGIT, x:x + DIGIT], mask[y:y + DIGIT, x:x + DIGIT]
                if (inked & (window != BACKGROUND)).sum() <= 0.1 * inked.sum():
                    np.maximum(area, ink[i], out=area)
                    window[inked] = labels[i]
                    break
    return to_float(torch.from_numpy(np.round(scenes * 255).astype(np.uint8)))[:, None], torch.from_numpy(masks)


class Scenes(TensorDataset):
    """``(scenes, masks)`` pairs joined into two tensors, which the loader batches by indexing."""

    def __init__(self, made):
        self._set(*(torch.cat(t) for t in zip(*made)), num_classes=BACKGROUND + 1)


class SceneLoader(BaseDataLoader):
    """``scenes`` scenes, a ``validation_split`` of them for validation; ``training=False``: ``test_scenes``."""

    def __init__(self, scenes=2000, test_scenes=500, batch_size=8, shuffle=True, validation_split=0.15, seed=0,
                 training=True):
        if type(validation_split) not in (int, float) or not 0 <= validation_split < 1:
            raise UserError(f"data_loader.args.validation_split: got {validation_split!r}, expected a fraction in"
                            " [0, 1) of the scenes (and of the training digits) to validate on")
        held = round(scenes * validation_split) if training else 0
        splits = [("train", scenes - held), ("valid", held)] if training else [("test", test_scenes)]
        made = [make_scenes(split, count, validation_split) for split, count in splits]
        n_train = len(made[0][0])
        super().__init__(Scenes(made), batch_size, shuffle and training, seed=seed, training=training,
                         indices=torch.arange(n_train))
        self.valid_idx = torch.arange(n_train, len(self.dataset)) if held else None  # the validation scenes, last


def block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class UNet(BaseModel):
    """A U-Net of two levels: ``(N, 1, H, W)`` scenes (H, W multiples of 4) -> ``(N, num_classes, H, W)`` logits."""

    def __init__(self, num_classes=BACKGROUND + 1, width=16):
        super().__init__()
        self.down1, self.down2, self.bottom = block(1, width), block(width, 2 * width), block(2 * width, 4 * width)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2), block(4 * width, 2 * width)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2), block(2 * width, width)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        full = self.down1(x)
        half = self.down2(F.max_pool2d(full, 2))
        quarter = self.bottom(F.max_pool2d(half, 2))
        half = self.dec2(torch.cat([self.up2(quarter), half], dim=1))  # the skip connections: detail at each scale
        return self.head(self.dec1(torch.cat([self.up1(half), full], dim=1)))


class SceneMasks(Task):
    """The default step; for predict.py, a scene PNG in and a mask PNG ``<stem>_mask.png`` out: a palette PNG whose
    pixel values are the classes."""

    def load_input(self, path):
        with Image.open(path) as image:
            return to_float(torch.from_numpy(np.array(image.convert("L"))))[None]  # (1, H, W), as in training

    def write_prediction(self, output, stem):
        image = Image.fromarray(output.argmax(0).to(torch.uint8).numpy())
        image.putpalette(PALETTE)
        with atomic_write(f"{stem}_mask.png") as f:
            image.save(f, format="PNG")
        return Path(f"{stem}_mask.png")


def write_scenes(folder, count=8):
    """The first ``count`` test scenes as ``scene_NNN.png`` (8-bit grey) in ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"scene_{i:03d}.png" for i in range(count)]
    for path, scene in zip(paths, make_scenes("test", count)[0][:, 0]):
        Image.fromarray((scene * 255).round().to(torch.uint8).numpy()).save(path)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write test scenes as PNG files, inputs for predict.py.")
    parser.add_argument("--write-scenes", required=True, type=Path, metavar="FOLDER")
    parser.add_argument("--count", type=int, default=8)
    args = parser.parse_args()
    print(f"{len(write_scenes(args.write_scenes, args.count))} scenes written to {args.write_scenes}")
