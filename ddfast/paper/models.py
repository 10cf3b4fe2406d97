"""The paper's networks (supplementary Table 3), PyTorch default initialisation.

* :class:`MLP`: 784-500-150-10 with ReLU; takes ``[B, 784]`` or ``[B, 1, 28, 28]``.
* :class:`LeNet`: conv5x5-20, maxpool2, conv5x5-50, maxpool2, fc-500, ReLU, fc-10
  (the MatConvNet / DeepFool LeNet: no ReLU after the convolutions); ``[B, 1, 28, 28]``.
* :class:`ConvNet`: the MatConvNet CIFAR-10 example as in Table 3; ``[B, 3, 32, 32]``.
  5x5 convolutions use padding 2 so that the final conv-4 sees a 4x4 map and the classifier
  conv-1 outputs ``[B, 10, 1, 1]`` (our choice; Table 3 does not give paddings).
* :class:`NIN`: network in network as in Table 3; paddings keep the spatial size
  (5x5 pad 2, 3x3 pad 1), pools halve it, the final average pool is global (8x8).

Layers carry the paper's names (``fc1``, ``conv1``, ...) so a layer-wise regularization
(paper Fig. 5) can name them: see :func:`layer_names`.
All models return logits ``[B, 10]``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Type

import torch
from torch import Tensor, nn

__all__ = ["MLP", "LeNet", "ConvNet", "NIN", "MODELS", "build_model", "layer_names"]


class MLP(nn.Module):
    """784-500-150-10 ReLU MLP (the paper's MNIST MLP). Input ``[B, 784]`` or ``[B, 1, 28, 28]``."""

    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (500, 150), num_classes: int = 10):
        super().__init__()
        self.in_features = in_features
        sizes = [in_features, *hidden, num_classes]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), 1):
            self.add_module(f"fc{i}", nn.Linear(a, b))
        self.num_layers = len(sizes) - 1

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"MLP expects {self.in_features} input features, got {x.shape[1]}")
        for i in range(1, self.num_layers + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.num_layers:
                x = torch.relu(x)
        return x


class LeNet(nn.Module):
    """LeNet of the MatConvNet / DeepFool MNIST example. Input ``[B, 1, 28, 28]``."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)  # 28 -> 24, pool -> 12
        self.conv2 = nn.Conv2d(20, 50, 5)  # 12 -> 8, pool -> 4
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.max_pool2d(self.conv1(x), 2)
        x = nn.functional.max_pool2d(self.conv2(x), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class ConvNet(nn.Module):
    """CIFAR-10 ConvNet (MatConvNet example, Table 3). Input ``[B, 3, 32, 32]``."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 5, padding=2)  # 32, maxpool -> 16
        self.conv2 = nn.Conv2d(32, 32, 5, padding=2)  # 16, avgpool -> 8
        self.conv3 = nn.Conv2d(32, 64, 5, padding=2)  # 8, avgpool -> 4
        self.conv4 = nn.Conv2d(64, 64, 4)  # 4 -> 1
        self.conv5 = nn.Conv2d(64, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        F = nn.functional
        x = torch.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.avg_pool2d(torch.relu(self.conv2(x)), 2)
        x = F.avg_pool2d(torch.relu(self.conv3(x)), 2)
        x = self.conv5(torch.relu(self.conv4(x)))
        return x.flatten(1)


class NIN(nn.Module):
    """Network in network for CIFAR-10 (Table 3). Input ``[B, 3, 32, 32]``."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()

        def block(cin: int, k: int, widths: Sequence[int]) -> nn.Sequential:
            layers = [nn.Conv2d(cin, widths[0], k, padding=k // 2), nn.ReLU()]
            for a, b in zip(widths[:-1], widths[1:]):
                layers += [nn.Conv2d(a, b, 1), nn.ReLU()]
            return nn.Sequential(*layers)

        self.block1 = block(in_channels, 5, [192, 160, 96])  # 32, maxpool -> 16
        self.block2 = block(96, 5, [192, 192, 192])  # 16, avgpool -> 8
        self.block3 = nn.Sequential(
            nn.Conv2d(192, 192, 3, padding=1), nn.ReLU(), nn.Conv2d(192, 192, 1), nn.ReLU(),
            nn.Conv2d(192, num_classes, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        F = nn.functional
        x = F.max_pool2d(self.block1(x), 2)
        x = F.avg_pool2d(self.block2(x), 2)
        x = self.block3(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


MODELS: Dict[str, Type[nn.Module]] = {"mlp": MLP, "lenet": LeNet, "convnet": ConvNet, "nin": NIN}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """A fresh model by name: ``"mlp"``, ``"lenet"``, ``"convnet"`` or ``"nin"``."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](**kwargs)


def layer_names(model: nn.Module) -> List[str]:
    """Names of the parameterised leaf layers (``conv*``, ``fc*``, ``block1.0`` ...), in order."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
