"""Semantic segmentation: each pixel of a scene of handwritten digits is one of the 10 digits or the background.

A scene is a 32x32 canvas holding 2 to 4 of scikit-learn's real 8x8 digits, upscaled to 12x12 and placed at random
with little overlap; its target gives each pixel a class: the digit whose ink there is above half intensity, else
the background (class 10). Each split's scenes come from a fixed seed and from digit images of their own: the test
scenes use the default config's test digits, the validation scenes a ``validation_split`` of the others.

The default step fits (a batch is ``(scene, mask)``, the U-Net's output ``(N, 11, H, W)``, the loss and accuracy are
per pixel); the task adds only what predict.py needs, a scene PNG in and a mask PNG out::

    python train.py -c configs/examples/segmentation.json
    python -m examples.segmentation --write-scenes scenes/ --count 8      # test scenes as PNG files
    python predict.py -r saved/models/Segmentation_UNet/<run_id>/model_best.pth scenes/ -o masks/
"""

import argparse
import io
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from base.base_data_loader import BaseDataLoader, TensorDataset, to_float
from base.base_model import BaseModel
from base.base_task import Task
from data_loader.data_loaders import DIGITS_MEAN, DIGITS_STD, DigitsDataset, digits_tensors
from utils.errors import UserError

BACKGROUND, CANVAS, DIGIT = 10, 32, 12  # digit d is class d
SPLIT_SEEDS = {"train": 1, "valid": 2, "test": 3}  # the scenes never depend on the run's seed
# The mask PNG's colours: one per digit, black for the background.
PALETTE = [230, 25, 75, 60, 180, 75, 255, 225, 25, 0, 130, 200, 245, 130, 48, 145, 30, 180, 70, 240, 240,
           240, 50, 230, 210, 245, 60, 250, 190, 212, 0, 0, 0]


@lru_cache(maxsize=8)
def make_scenes(split, count, validation_split=0.15):
    """``(scenes (count, 1, 32, 32) float32 in [0, 1], 8-bit steps as a PNG holds them; masks (count, 32, 32) int64)``
    of ``split`` ("train", "valid" or "test")."""
    images, labels = digits_tensors()
    ink = F.interpolate((images * DIGITS_STD + DIGITS_MEAN).clamp(0, 1), size=(DIGIT, DIGIT), mode="bilinear")
    train = DigitsDataset(train=True).indices
    held = round(len(train) * validation_split)
    pool = {"train": train[held:], "valid": train[:held], "test": DigitsDataset(train=False).indices}[split].numpy()
    ink, labels, rng = ink[:, 0].numpy(), labels.numpy(), np.random.default_rng(SPLIT_SEEDS[split])
    canvas = np.zeros((count, CANVAS, CANVAS), np.float32)
    masks = np.full((count, CANVAS, CANVAS), BACKGROUND, np.int64)
    for s in range(count):
        for i in rng.choice(pool, size=rng.integers(2, 5)):
            digit = ink[i]
            inked = digit > 0.5
            for _ in range(20):  # a place where at most a tenth of its ink falls on another digit's
                y, x = rng.integers(0, CANVAS - DIGIT + 1, size=2)
                window = masks[s, y:y + DIGIT, x:x + DIGIT]
                if (inked & (window != BACKGROUND)).sum() <= 0.1 * inked.sum():
                    np.maximum(canvas[s, y:y + DIGIT, x:x + DIGIT], digit, out=canvas[s, y:y + DIGIT, x:x + DIGIT])
                    window[inked] = labels[i]
                    break
    pixels = torch.from_numpy(np.round(canvas * 255).astype(np.uint8))
    return to_float(pixels)[:, None], torch.from_numpy(masks)


class DigitScenes(TensorDataset):
    """Scenes and their masks as two tensors (the loader's in-memory path)."""

    def __init__(self, parts):
        self._set(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), num_classes=BACKGROUND + 1)

    def __getitem__(self, index):
        inputs, targets = self.tensors()
        return inputs[index], targets[index]


class SceneLoader(BaseDataLoader):
    """``scenes`` training scenes, of which a ``validation_split`` is validation (of digit images of its own);
    ``training=False``: ``test_scenes`` test scenes."""

    options_from = BaseDataLoader

    def __init__(self, scenes=2000, test_scenes=500, batch_size=8, shuffle=True, validation_split=0.15,
                 training=True, **options):
        if isinstance(validation_split, bool) or not isinstance(validation_split, (int, float)) \
                or not 0 <= validation_split < 1:
            raise UserError(f"data_loader.args.validation_split: got {validation_split!r}, expected a fraction in"
                            " [0, 1) of the scenes (and of the training digits) to validate on")
        held = round(scenes * validation_split) if training else 0
        if training:  # the training scenes, then the validation ones
            made = [make_scenes("train", scenes - held, validation_split)]
            made += [make_scenes("valid", held, validation_split)] if held else []
        else:
            made = [make_scenes("test", test_scenes)]
        dataset = DigitScenes(made)
        n_train = len(made[0][0])
        super().__init__(dataset, batch_size, shuffle and training, 0.0, training=training,
                         indices=torch.arange(n_train), **options)
        # The validation scenes are made of digit images of their own: held out here, not drawn from the rest.
        self.valid_idx = torch.arange(n_train, len(dataset)) if held else None


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
    """The default step; for predict.py, a scene PNG becomes the model's input and its output a mask PNG."""

    def load_input(self, path):
        from PIL import Image

        with Image.open(path) as image:
            pixels = torch.from_numpy(np.array(image.convert("L")))
        return to_float(pixels)[None]  # (1, H, W), as the training scenes

    def write_prediction(self, output, stem):
        """The class of each pixel as a palette PNG ``<stem>_mask.png``: pixel values are the classes."""
        from PIL import Image

        from utils.io import atomic_write

        image = Image.fromarray(output.argmax(0).to(torch.uint8).numpy())
        image.putpalette(PALETTE)
        data = io.BytesIO()
        image.save(data, format="PNG")
        path = Path(f"{stem}_mask.png")
        with atomic_write(path) as f:
            f.write(data.getvalue())
        return path


def write_scenes(folder, count=8):
    """The first ``count`` test scenes as ``scene_NNN.png`` (8-bit grey) in ``folder``; returns their paths."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = (make_scenes("test", count)[0][:, 0] * 255).round().to(torch.uint8).numpy()
    paths = [folder / f"scene_{i:03d}.png" for i in range(count)]
    for path, scene in zip(paths, pixels):
        Image.fromarray(scene).save(path)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write test scenes as PNG files, inputs for predict.py.")
    parser.add_argument("--write-scenes", required=True, type=Path, metavar="FOLDER")
    parser.add_argument("--count", type=int, default=8)
    args = parser.parse_args()
    print(f"{len(write_scenes(args.write_scenes, args.count))} scenes written to {args.write_scenes}")
