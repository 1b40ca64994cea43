"""The models a config can name in ``arch.type``: the ``MODELS`` table. Each returns raw class scores (logits);
the loss applies the softmax. Your own model: a class here like :class:`DigitsCNN`, added to ``MODELS``.

LeNet, MLP and CifarResNet are in model/builtin.py, imported only when a config names them (``BUILTIN``).
"""

import torch.nn.functional as F
from torch import nn

from base.base_model import BaseModel


class DigitsCNN(BaseModel):
    """A small CNN for 8x8 images such as scikit-learn's digits."""

    def __init__(self, in_channels=1, num_classes=10, width=32, dropout=0.25):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(2 * width * 4 * 4, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 8x8 -> 4x4
        x = self.dropout(x.flatten(1))
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


MODELS = {"DigitsCNN": DigitsCNN}

# The other built-in models, by the module holding them: imported only when a config names one.
BUILTIN = {name: "model.builtin" for name in ("LeNet", "MLP", "CifarResNet")}
