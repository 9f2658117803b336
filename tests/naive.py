"""An independent naive dense block: the test oracle.

Written like torchvision's ``_DenseLayer``/``_DenseBlock`` (torch.cat per layer, stock
``nn.BatchNorm2d``/``nn.Conv2d``/``F.dropout``) and sharing no code with dense_ext, so that
agreement with it means something. Same state_dict keys as torchvision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NaiveDenseLayer(nn.Module):
    def __init__(self, c_in: int, growth_rate: int, bn_size: int | None, drop_rate: float):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.bottleneck = bool(bn_size)
        if self.bottleneck:
            mid = bn_size * growth_rate
            self.conv1 = nn.Conv2d(c_in, mid, kernel_size=1, bias=False)
            self.norm2 = nn.BatchNorm2d(mid)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(mid, growth_rate, kernel_size=3, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(c_in, growth_rate, kernel_size=3, padding=1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, features: list[Tensor]) -> Tensor:
        out = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        if self.bottleneck:
            out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class NaiveDenseBlock(nn.ModuleDict):
    def __init__(self, num_layers, num_input_features, growth_rate, bn_size=4, drop_rate=0.0):
        super().__init__()
        for i in range(num_layers):
            c_in = num_input_features + i * growth_rate
            layer = NaiveDenseLayer(c_in, growth_rate, bn_size, drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)
        # Per-layer dropout multipliers [N, k, H, W] applied to each layer's new features:
        # a backend that draws its own masks is compared with the naive block given them.
        self.masks: list[Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for i, layer in enumerate(self.values()):
            new = layer(features)
            if self.masks is not None:
                new = new * self.masks[i].to(new)
            features.append(new)
        return torch.cat(features, 1)


def with_masks(naive: NaiveDenseBlock, masks: list[Tensor]) -> NaiveDenseBlock:
    """``naive`` with the given dropout multipliers instead of ``F.dropout``'s."""
    for layer in naive.values():
        layer.drop_rate = 0.0
    naive.masks = masks
    return naive


def randomize_bn(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """Give every BN non-trivial affine parameters and running statistics."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5, generator=generator)
                    m.bias.uniform_(-0.5, 0.5, generator=generator)
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.5, 0.5, generator=generator)
                    m.running_var.uniform_(0.5, 2.0, generator=generator)
