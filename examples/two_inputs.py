"""Two inputs, two losses: a real digit image and a table row read together (configs/examples/two_inputs.json).

Each sample is a dict: ``image``, a digit of scikit-learn's bundled 8x8 digits with Gaussian noise added
(``image_noise``, in units of the pixels' std), and ``clean``, the same digit without it; ``row``, a table row of 12
numbers: a one-hot "hint" that is the digit's label with probability ``hint_accuracy`` and else a random label, the
digit's mean ink, and one feature of pure noise; ``label``, the digit. Noise and hints are drawn once per sample from
the seed, so every epoch (and a resume) sees the same data. Neither input alone is enough: the noisy image is often
misread, the hint is wrong 27% of the time (0.3 x 9/10); together they do better than either (README).

The model encodes both into shared features, from which it gives class logits and rebuilds the clean image; the task
returns two named losses, the label's cross-entropy and the rebuilt image's mean squared error against the clean
one, weighted by ``loss_weights`` and logged as ``loss_label`` and ``loss_image`` (``val_loss_label``, ...).
"""

import torch
from torch import nn
from torch.utils.data import Dataset

from base.base_data_loader import BaseDataLoader
from base.base_task import Task
from data_loader.data_loaders import DigitsDataset
from utils.errors import UserError

ROW_FEATURES = 12  # 10 one-hot hint, mean ink, noise


class DigitsWithHints(Dataset):
    """The digits split of the default run (train or test), each with a row whose hint is drawn once, from
    ``seed``: the same row every epoch and after a resume."""

    def __init__(self, train=True, hint_accuracy=0.7, image_noise=1.0, seed=0):
        images, labels = DigitsDataset(train=train).tensors()  # normalised: mean 0, std 1 over all pixels
        g = torch.Generator().manual_seed(seed + (0 if train else 1))
        right = torch.rand(len(labels), generator=g) < hint_accuracy
        hint = torch.where(right, labels, torch.randint(0, 10, labels.shape, generator=g))
        ink = images.mean(dim=(1, 2, 3)).unsqueeze(1)
        noise = torch.randn(len(labels), 1, generator=g)
        self.clean, self.labels = images, labels
        self.images = images + image_noise * torch.randn(images.shape, generator=g)
        self.rows = torch.cat([nn.functional.one_hot(hint, 10).float(), ink, noise], dim=1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "clean": self.clean[i], "row": self.rows[i], "label": self.labels[i]}


class TwoInputsLoader(BaseDataLoader):
    """Dict batches ``{"image", "clean", "row", "label"}`` (torch's default collate stacks each key);
    ``training=False``: the test split (20%, as the default's)."""

    def __init__(self, batch_size=32, shuffle=True, validation_split=0.1, hint_accuracy=0.7, image_noise=1.0,
                 num_workers=0, seed=0, training=True):
        for name, value, top in (("hint_accuracy", hint_accuracy, 1), ("image_noise", image_noise, float("inf"))):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= top:
                raise UserError(f"data_loader.args.{name}: got {value!r}, expected a number in [0, {top}]")
        super().__init__(DigitsWithHints(training, hint_accuracy, image_noise, seed), batch_size, shuffle and training,
                         validation_split if training else 0.0, num_workers, seed=seed, training=training)


class ImageAndRow(nn.Module):
    """``forward(image, row) -> (logits, rebuilt image)``: a small CNN for the image and a linear layer for the
    row, joined into shared features that both heads read."""

    def __init__(self, hidden=64, num_classes=10):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                   nn.Linear(16 * 4 * 4, hidden), nn.ReLU())
        self.row = nn.Sequential(nn.Linear(ROW_FEATURES, 16), nn.ReLU())
        self.shared = nn.Sequential(nn.Linear(hidden + 16, hidden), nn.ReLU())
        self.classify = nn.Linear(hidden, num_classes)
        self.decode = nn.Linear(hidden, 64)  # the clean 8x8 image, from the shared features

    def forward(self, image, row):
        features = self.shared(torch.cat([self.image(image), self.row(row)], dim=1))
        return self.classify(features), self.decode(features).view(-1, 1, 8, 8)


class TwoLosses(Task):
    """The label's cross-entropy (the config's ``loss``) and the rebuilt image's MSE against the clean one; the
    metrics get the logits and the label."""

    loss_weights = {"label": 1.0, "image": 0.5}

    def step(self, model, batch, criterion):
        logits, rebuilt = model(batch["image"], batch["row"])
        losses = {"label": criterion(logits, batch["label"]),
                  "image": nn.functional.mse_loss(rebuilt, batch["clean"])}
        return losses, logits, batch["label"]

    def inputs(self, batch):
        return batch["image"], batch["row"]
