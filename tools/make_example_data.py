"""Write small example data for ``configs/image_folder.json`` and ``configs/csv.json``.

    python tools/make_example_data.py            # into data/
    python tools/make_example_data.py --out DIR

Writes, the same bytes for the same ``--seed``:

* ``example_images/{train,test}/{circle,square,triangle}/*.png``: 32x32 RGB drawings of
  one shape each, of random size, place and colours, on a noisy background (120 training
  and 30 test images per class);
* ``example_table.csv``: 300 rows of four numeric features ``x1..x4`` and a ``species``
  column (three classes, overlapping Gaussian clusters);
* ``example_regression.csv``: 400 rows of ``x1..x3`` and a numeric ``y``.

Nothing is downloaded; it takes about a second.
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import sys
from pathlib import Path

SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 32
PER_CLASS = {"train": 120, "test": 30}


def draw(shape, rng):
    """One ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB PIL image of ``shape``."""
    from PIL import Image, ImageDraw

    background = tuple(rng.randrange(0, 120) for _ in range(3))
    noise = bytes(min(255, max(0, c + rng.randrange(-20, 21))) for _ in range(IMAGE_SIZE * IMAGE_SIZE) for c in background)
    image = Image.frombytes("RGB", (IMAGE_SIZE, IMAGE_SIZE), noise)
    pen = ImageDraw.Draw(image)
    colour = tuple(rng.randrange(130, 256) for _ in range(3))
    size = rng.randrange(10, 23)
    x, y = rng.randrange(1, IMAGE_SIZE - size), rng.randrange(1, IMAGE_SIZE - size)
    if shape == "circle":
        pen.ellipse([x, y, x + size, y + size], fill=colour)
    elif shape == "square":
        pen.rectangle([x, y, x + size, y + size], fill=colour)
    else:
        pen.polygon([(x + size / 2, y), (x, y + size), (x + size, y + size)], fill=colour)
    return image


def write_images(root, rng):
    for split, count in PER_CLASS.items():
        for shape in SHAPES:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw(shape, rng).save(folder / f"{shape}_{i:03d}.png")
    return sum(PER_CLASS.values()) * len(SHAPES)


def write_table(path, rng, rows=300):
    centres = {"alpha": (0.0, 0.0, 1.0, 2.0), "beta": (1.5, 1.0, 0.0, 2.5), "gamma": (0.5, 2.0, 1.5, 0.5)}
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["x1", "x2", "x3", "x4", "species"])
        for i in range(rows):
            species = list(centres)[i % len(centres)]
            out.writerow([f"{c + rng.gauss(0, 0.6):.4f}" for c in centres[species]] + [species])
    return rows


def write_regression(path, rng, rows=400):
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["x1", "x2", "x3", "y"])
        for _ in range(rows):
            x = [rng.uniform(-2, 2) for _ in range(3)]
            y = 2 * x[0] - x[1] + 0.5 * x[2] ** 2 + math.sin(x[0]) + rng.gauss(0, 0.1)
            out.writerow([f"{v:.4f}" for v in x] + [f"{y:.4f}"])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write small example image-folder and CSV data.")
    parser.add_argument("--out", default="data", help="folder to write into (default: data)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    images = write_images(out / "example_images", rng)
    table = write_table(out / "example_table.csv", rng)
    regression = write_regression(out / "example_regression.csv", rng)
    print(f"wrote {images} images to {out / 'example_images'}/, {table} rows to {out / 'example_table.csv'}"
          f" and {regression} rows to {out / 'example_regression.csv'}")
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
