"""The training recipe around the tutorial's loop: optimiser, learning-rate schedule, augmentation.

The tutorial trains with plain Adam at a constant rate on un-augmented images; each improvement
here is one `TrainConfig` field (see README, "Training"): weight decay (AdamW, decoupled),
a per-step cosine or one-cycle schedule, label smoothing (in the loss), and augmentation done on
the device on whole uint8 batches (random crop from a 4-pixel zero-padded image, horizontal flip)
with fixed shapes, so a compiled step never recompiles and no image goes through Python.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

CROP_PADDING = 4


def make_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float,
                   device: torch.device) -> torch.optim.Optimizer:
    """Adam as in the tutorial; AdamW when weight decay is asked for (decoupled from the
    adaptive step, which is what makes decay work with Adam). Fused kernels on CUDA."""
    fused: dict[str, Any] = {"fused": True} if device.type == "cuda" else {}
    if weight_decay > 0:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fused)
    return torch.optim.Adam(params, lr=lr, **fused)


def make_schedule(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int
                  ) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step multiplier of the base rate: constant, cosine to 0, or one-cycle.

    one-cycle: linear warm-up over the first 15 % of steps from 0.1x to 1x, then cosine to 0
    (Smith's schedule, with the configured rate as its peak).
    """
    total = max(1, total_steps)
    warmup = max(1, int(0.15 * total))

    def constant(_: int) -> float:
        return 1.0

    def cosine(step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    def one_cycle(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        progress = min(step - warmup, total - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    factors = {"constant": constant, "cosine": cosine, "onecycle": one_cycle}
    if schedule not in factors:
        raise ValueError(f"schedule: expected one of {sorted(factors)}, got {schedule!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors[schedule])


def augment(images: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """uint8 [N, H, W, C] -> the same shape, randomly cropped (mode has "crop") and flipped
    left-right (mode has "flip"); every image draws its own offsets from `generator`."""
    if mode == "none":
        return images
    count, height, width, _ = images.shape
    device = images.device
    if "crop" in mode:
        padded = nn.functional.pad(images, (0, 0, CROP_PADDING, CROP_PADDING,
                                            CROP_PADDING, CROP_PADDING))
        top = torch.randint(0, 2 * CROP_PADDING + 1, (count, 1, 1), generator=generator,
                            device=device)
        left = torch.randint(0, 2 * CROP_PADDING + 1, (count, 1, 1), generator=generator,
                             device=device)
        rows = top + torch.arange(height, device=device).view(1, height, 1)
        cols = left + torch.arange(width, device=device).view(1, 1, width)
        batch = torch.arange(count, device=device).view(count, 1, 1)
        images = padded[batch, rows, cols]  # one gather: [N, H, W, C]
    if "flip" in mode:
        flip = torch.rand((count, 1, 1, 1), generator=generator, device=device) < 0.5
        images = torch.where(flip, images.flip(2), images)
    return images
