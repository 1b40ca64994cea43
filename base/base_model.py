"""The base class of the project's models."""

from torch import nn


class BaseModel(nn.Module):
    """An ``nn.Module`` whose printout ends with its parameter counts."""

    def __str__(self):
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters()) - trainable
        extra = f", frozen parameters: {frozen:,}" if frozen else ""
        return f"{super().__str__()}\nTrainable parameters: {trainable:,}{extra}"
