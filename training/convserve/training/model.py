"""The CIFAR-10 ConvNet of the seed tutorial (seeds/003), layer for layer, plus the serving wrapper.

No I/O here: the model is pure computation so training, export and tests share it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from convserve.contracts.model_signature import SIGNATURE

CHANNELS = SIGNATURE.channels  # RGB


class ConvNet(nn.Module):
    """Seven convolutions, exactly as the tutorial documents them.

    Each 3x3 convolution is followed by ReLU and then BatchNorm; conv2, conv4 and conv6 are
    max-pooled *before* their BatchNorm, as in the tutorial. conv7 is a 1x1 convolution to the
    class count, then AvgPool2d(3) and a flatten. 198,930 parameters at 10 classes; 197,898 at 2
    (the figure the tutorial quotes).

    `forward` returns **logits**. The tutorial's `forward` ends in `F.softmax` and its loop then
    trains with `nn.CrossEntropyLoss`, which applies log-softmax itself: the loss becomes
    log_softmax(softmax(z)), whose gradients vanish as the model grows confident, so training
    slows and stalls. Here the loss sees raw logits; softmax is applied only in the exported
    serving graph (`ServingModel`).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.batchnorm1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.batchnorm2 = nn.BatchNorm2d(8)
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(8, 32, 3, padding=1)
        self.batchnorm3 = nn.BatchNorm2d(32)
        self.conv4 = nn.Conv2d(32, 32, 3, padding=1)
        self.batchnorm4 = nn.BatchNorm2d(32)
        self.pool4 = nn.MaxPool2d(2)
        self.conv5 = nn.Conv2d(32, 128, 3, padding=1)
        self.batchnorm5 = nn.BatchNorm2d(128)
        self.conv6 = nn.Conv2d(128, 128, 3, padding=1)
        self.batchnorm6 = nn.BatchNorm2d(128)
        self.pool6 = nn.MaxPool2d(2)
        self.conv7 = nn.Conv2d(128, num_classes, 1)
        self.pool7 = nn.AvgPool2d(3)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.batchnorm1(F.relu(self.conv1(x)))
        x = self.batchnorm2(self.pool2(F.relu(self.conv2(x))))
        x = self.batchnorm3(F.relu(self.conv3(x)))
        x = self.batchnorm4(self.pool4(F.relu(self.conv4(x))))
        x = self.batchnorm5(F.relu(self.conv5(x)))
        x = self.batchnorm6(self.pool6(F.relu(self.conv6(x))))
        # 4x4 -> AvgPool2d(3) -> 1x1: the tutorial's pooling drops the last row and column;
        # kept as documented rather than "fixed" to a global average.
        x = self.pool7(self.conv7(x))
        return torch.flatten(x, 1)


def init_weights(module: nn.Module) -> None:
    """The tutorial's initialisation: Xavier-uniform weights and biases of 0.01 for conv and linear
    layers; BatchNorm keeps PyTorch's defaults (weight 1, bias 0), as the tutorial leaves it."""
    if isinstance(module, nn.Conv2d | nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0.01)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Preprocess(nn.Module):
    """uint8 NHWC pixels -> normalised float NCHW, shared by training and the exported graph.

    Living in the model (not in a data pipeline) makes training/serving skew impossible: the
    served ONNX graph contains exactly this module (DESIGN principle 3).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != CHANNELS or len(std) != CHANNELS or min(std) <= 0:
            raise ValueError(f"need {CHANNELS} means and {CHANNELS} positive stds, got {mean}, {std}")
        # Folded to one multiply-add: (x/255 - mean)/std == x*scale + shift.
        scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, CHANNELS, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(1, CHANNELS, 1, 1)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    scale: torch.Tensor  # buffers (register_buffer), typed for the checker
    shift: torch.Tensor

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.permute(0, 3, 1, 2).float() * self.scale + self.shift


class ServingModel(nn.Module):
    """What is exported to ONNX: uint8 pixels [N, 32, 32, 3] in, softmax probabilities [N, C] out."""

    def __init__(self, preprocess: Preprocess, net: ConvNet) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.net(self.preprocess(pixels)), dim=1)
