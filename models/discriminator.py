"""Discriminator of SKF's semantic-guided adversarial (SA) loss (docs/method.md §5.1; 4,725,377 params).

A VGG-style conv/BN/ReLU stack with two entry convs picked by the input's channel count: ``conv1`` for a
plain RGB image and ``conv0`` for the image concatenated with the class probabilities (3 + 59 = 62 ch).
Names (``conv0..conv9``, ``bn2..bn8``) match the official DRBN-SKF ``Discriminator``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.padding import working_layout

__all__ = ["Discriminator"]

# (in, out, stride) of conv2..conv8; each is followed by BatchNorm and ReLU.
_BODY = ((64, 64, 2), (64, 128, 1), (128, 128, 2), (128, 256, 1), (256, 256, 2), (256, 512, 1), (512, 512, 2))


class Discriminator(nn.Module):
    """Image (B×3×H×W) or image ⊕ probabilities (B×(3+K)×H×W) -> realness probability (B×1).

    ``conv9`` is a 1×1 conv with padding 1, as released: the border of its output is bias-only and takes
    part in the global average. H and W should be at least 16 (four stride-2 stages).

    ``channels_last`` is the memory layout the stack runs in (``None``: channels-last on CPU, where oneDNN's
    bf16 convolutions are faster in it, NCHW on CUDA); the result does not depend on it.
    """

    def __init__(
        self, image_channels: int = 3, num_classes: int = 59, channels_last: bool | None = None
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.image_channels = image_channels
        self.semantic_channels = image_channels + num_classes
        self.conv0 = nn.Conv2d(self.semantic_channels, 64, 3, padding=1)
        self.conv1 = nn.Conv2d(image_channels, 64, 3, padding=1)
        for i, (cin, cout, stride) in enumerate(_BODY, start=2):
            self.add_module(f"conv{i}", nn.Conv2d(cin, cout, 3, stride=stride, padding=1))
            self.add_module(f"bn{i}", nn.BatchNorm2d(cout))
        self.conv9 = nn.Conv2d(512, 1, 1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1] if x.dim() == 4 else None
        if channels is not None:
            x = working_layout(x, self.channels_last)
        if channels == self.image_channels:
            x = F.relu(self.conv1(x))
        elif channels == self.semantic_channels:
            x = F.relu(self.conv0(x))
        else:
            raise ValueError(
                f"Discriminator takes B×{self.image_channels}×H×W images or B×{self.semantic_channels}×H×W "
                f"image⊕probabilities, got {tuple(x.shape)}"
            )
        for i in range(2, 9):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        # pooled and squashed in at least fp32: under bf16 autocast the probability keeps its digits
        # (LSGAN errors and the hardest-region choice compare these numbers)
        out = self.conv9(x)
        logits = out.to(torch.promote_types(out.dtype, torch.float32)).mean(dim=(2, 3))
        return logits.sigmoid()
