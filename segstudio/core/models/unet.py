"""U-Net family (PyTorch).

Importing this module imports torch; the rest of the core reaches it only
through functions that need torch anyway (torch backend, training, export).

The architecture is described by :class:`~segstudio.core.models.spec.UNetConfig`
(plain data, no torch) so that a model card can say what it is and a state
dict can be checked against it before loading.
"""

from __future__ import annotations

import torch
from torch import nn

from .spec import UNetConfig


class ConvBNReLU(nn.Sequential):
    """3x3 convolution (dense, or depthwise + pointwise), BatchNorm, ReLU."""

    def __init__(self, cin: int, cout: int, separable: bool):
        if separable and cin > 1:
            layers = [
                nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
                nn.Conv2d(cin, cout, 1, bias=False),
            ]
        else:
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False)]
        super().__init__(*layers, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Block(nn.Sequential):
    """Two conv-BN-ReLU layers."""

    def __init__(self, cin: int, cout: int, separable: bool):
        super().__init__(ConvBNReLU(cin, cout, separable), ConvBNReLU(cout, cout, separable))


class UNet(nn.Module):
    """U-Net with ``config.depth`` poolings and ``config.width`` base channels.

    Input ``(B, in_channels, H, W)`` with H and W multiples of
    ``2 ** depth``; output ``(B, out_channels, H, W)`` raw logits.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        widths = config.widths()
        sep = config.separable
        self.encoders = nn.ModuleList()
        cin = config.in_channels
        for w in widths:
            self.encoders.append(Block(cin, w, sep))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for w_skip, w_deep in zip(reversed(widths[:-1]), reversed(widths[1:])):
            self.ups.append(nn.ConvTranspose2d(w_deep, w_skip, 2, stride=2))
            self.decoders.append(Block(2 * w_skip, w_skip, sep))
        self.head = nn.Conv2d(widths[0], config.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.encoders):
            if i > 0:
                x = self.pool(x)
            x = enc(x)
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.ups, self.decoders):
            x = up(x)
            x = dec(torch.cat([skips.pop(), x], dim=1))
        return self.head(x)


def build_unet(config: UNetConfig) -> UNet:
    return UNet(config)
