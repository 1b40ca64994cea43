"""The base class of the project's models."""

from torch import nn


def count_parameters(module):
    """``(trainable, frozen)`` parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return trainable, frozen


class BaseModel(nn.Module):
    """An ``nn.Module`` whose printout ends with its parameter counts."""

    def __str__(self):
        trainable, frozen = count_parameters(self)
        extra = f", frozen parameters: {frozen:,}" if frozen else ""
        return f"{super().__str__()}\nTrainable parameters: {trainable:,}{extra}"
