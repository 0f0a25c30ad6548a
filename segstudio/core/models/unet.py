"""U-Net family (PyTorch).

Importing this module imports torch; the rest of the core reaches it only
through functions that need torch anyway (torch backend, training, export).

The architecture is described by :class:`~segstudio.core.models.spec.UNetConfig`
(plain data, no torch) so that a model card can say what it is and a state
dict can be checked against it before loading.
"""

from __future__ import annotations

import math

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


class UNet(nn.Module):
    """U-Net described by ``config`` (see :meth:`UNetConfig.conv_layers`).

    Input ``(B, in_channels, H, W)`` with H and W multiples of
    ``2 ** depth``; output ``(B, out_channels, H, W)`` raw logits.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        sep = config.separable
        layers = {name: (cin, cout) for name, cin, cout, _, _ in config.conv_layers()}
        d = config.depth
        self.encoders = nn.ModuleList(
            nn.Sequential(ConvBNReLU(*layers[f"encoders.{k}.0"], sep), ConvBNReLU(*layers[f"encoders.{k}.1"], sep))
            for k in range(d + 1)
        )
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList(nn.ConvTranspose2d(*layers[f"ups.{j}"], 2, stride=2) for j in range(d))
        self.decoders = nn.ModuleList(
            nn.Sequential(ConvBNReLU(*layers[f"decoders.{j}.0"], sep), ConvBNReLU(*layers[f"decoders.{j}.1"], sep))
            for j in range(d)
        )
        self.head = nn.Conv2d(layers["head"][0], config.out_channels, 1)
        c = float(config.input_asinh)
        if not (math.isfinite(c) and c >= 0):
            raise ValueError(f"input_asinh must be a finite number >= 0, not {config.input_asinh!r}")
        self._asinh = (c, 1.0 / math.asinh(1.0 / c)) if c > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._asinh is not None:
            x = torch.asinh(x * (1.0 / self._asinh[0])) * self._asinh[1]
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


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """Fold every Conv2d + BatchNorm2d pair into the convolution (inference only, in place).

    The BatchNorm becomes an Identity, so the module no longer matches a
    :class:`UNetConfig` state dict: fold copies meant for inference or export.

    Parameters
    ----------
    net : torch.nn.Module
        In eval mode (folding a module in training mode fails); every Conv2d
        directly followed by a BatchNorm2d among one parent's children is
        folded.

    Returns
    -------
    torch.nn.Module
        ``net`` itself, modified.
    """
    for module in net.modules():
        children = list(module.named_children())
        for (name_a, a), (name_b, b) in zip(children, children[1:]):
            if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                setattr(module, name_a, torch.nn.utils.fusion.fuse_conv_bn_eval(a, b))
                setattr(module, name_b, nn.Identity())
    return net


def build_unet(config: UNetConfig) -> UNet:
    """The :class:`UNet` that ``config`` describes, with torch's default initial weights.

    Parameters
    ----------
    config : UNetConfig
        Depth, widths (or every layer's, for a pruned network), channels,
        separable convolutions, input compression (``input_asinh``).

    Returns
    -------
    UNet
        In training mode; input ``(B, in_channels, H, W)`` with H and W
        multiples of ``2 ** depth``, output ``(B, out_channels, H, W)`` logits.

    Raises
    ------
    ValueError
        ``config.input_asinh`` is not a finite number >= 0.
    """
    return UNet(config)
