"""What a training run writes to TensorBoard: one writer, owned by rank 0, in `<run>/tensorboard`.

Every epoch, at step = epochs completed (1..N):
  SCALARS     Loss/train, Loss/val, Accuracy/train, Accuracy/val, LearningRate, Recall/<class>
  IMAGES      Validation/confusion: true class per row, predicted per column, counts in the cells,
              each row shaded by its share of that class (the diagonal reads as recall).
              Validation/predictions: the first 16 validation images, "p:" the predicted class
              (green when right, red when wrong) and "t:" the true one.
  PR CURVES   PR/<class>: one class against the rest, on the validation softmax probabilities.
  HISTOGRAMS  Weights/<parameter>: every parameter of the net.
At the end, at step N: HPARAMS, the run's settings (TrainConfig, plus the device used and whether
it was compiled) with Accuracy/val and Loss/val as its metrics, so the plugin shows their last
(final) values. The summaries go into this run's own directory, not the sub-run `add_hparams`
makes, so the plugin's row is the run whose curves the other dashboards show.

Measured on 2 CPU cores: 0.05-0.15 s and ~240 KB per epoch (1,000 to 10,000 validation images;
the probabilities come from the validation pass itself, no second forward pass), against 18-24 s
for one epoch of synthetic:5000: cheap enough to show every epoch, not only the last. No GRAPH:
`add_graph` traces with the deprecated `torch.jit.trace` (a FutureWarning in torch 2.14) and took
1.1-1.6 s on first use on the same CPU, more than the rest of a run's TensorBoard output.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from convserve.contracts.spec import TrainConfig
from convserve.training.data import Dataset
from convserve.training.metrics import ValidationMetrics

GRID_IMAGES = 16
GRID_COLUMNS = 4
GRID_SCALE = 2            # 32x32 pixels are too small to judge at 1:1
HPARAMS_METRICS = ("Accuracy/val", "Loss/val")
_HEAT = np.array([8, 48, 107], dtype=np.float64)  # the colour of a full row share (dark blue)
_RIGHT, _WRONG = (0, 128, 0), (200, 0, 0)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def run_settings(config: TrainConfig, device: torch.device, compiled: bool) -> dict[str, Any]:
    """The hparams of a run: its config, plus what "auto" resolved to."""
    return {**config.to_dict(), "device_used": str(device), "compiled": compiled}


class TrainingBoard:
    """The run's TensorBoard writer. Create it on rank 0 only."""

    def __init__(self, log_dir: Path, start_epoch: int, data: Dataset,
                 settings: dict[str, Any]) -> None:
        # Steps are epochs completed, so a run resumed after `start_epoch` epochs keeps steps up
        # to start_epoch and purges only what a killed process wrote after its last checkpoint.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_epoch + 1)
        self.classes = data.classes
        self.val_labels = data.val_labels
        self.grid_images = data.val_images[:GRID_IMAGES]
        self.settings = settings

    def __enter__(self) -> TrainingBoard:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.writer.close()

    def write_epoch(self, step: int, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    batch_losses: list[float], val_losses: list[float], train_accuracy: float,
                    validation: ValidationMetrics, probabilities: np.ndarray) -> None:
        """Everything of one epoch; `probabilities` are the validation split's softmax [N, C]."""
        writer = self.writer
        writer.add_scalar("Loss/train", float(np.mean(batch_losses)), step)
        writer.add_scalar("Loss/val", float(np.mean(val_losses)), step)
        writer.add_scalar("Accuracy/train", train_accuracy, step)
        writer.add_scalar("Accuracy/val", validation.accuracy, step)
        writer.add_scalar("LearningRate", optimizer.param_groups[0]["lr"], step)
        for name, recall in validation.recall_by_class().items():
            writer.add_scalar(f"Recall/{name}", recall, step)
        writer.add_image("Validation/confusion", confusion_image(validation.confusion, self.classes),
                         step, dataformats="HWC")
        predicted = probabilities[:len(self.grid_images)].argmax(axis=1)
        grid = prediction_grid(self.grid_images, predicted, self.val_labels[:len(predicted)],
                               self.classes)
        writer.add_image("Validation/predictions", grid, step, dataformats="HWC")
        for index, name in enumerate(self.classes):
            writer.add_pr_curve(f"PR/{name}", (self.val_labels == index).astype(np.int64),
                                probabilities[:, index], step)
        for name, parameter in net.named_parameters():
            writer.add_histogram(f"Weights/{name}", parameter.detach().float().cpu(), step)
        writer.flush()

    def write_hparams(self, step: int) -> None:
        """The HPARAMS row, once, after the last epoch's `write_epoch` and before its checkpoint
        (a run killed in between repeats that epoch on resume, and the purge drops this step)."""
        # The metric values are not stored: the plugin reads each metric tag's last scalar.
        summaries = hparams(self.settings, dict.fromkeys(HPARAMS_METRICS, 0.0))
        file_writer = self.writer.file_writer
        assert file_writer is not None  # created by SummaryWriter.__init__, dropped only by close
        for summary in summaries:
            file_writer.add_summary(summary, step)
        self.writer.flush()


def confusion_image(confusion: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """[true, predicted] counts drawn as an HWC uint8 image with the class names along both axes;
    rows are shaded by share, not count, so a large class does not wash out the others."""
    font = _font()
    count = len(classes)
    share = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    cell = max(24, _text_size(str(int(confusion.max())), font)[0] + 8)
    names = [_fit(name, 90, font) for name in classes]
    margin = max(_text_size(text, font)[0] for text in [*names, "true\\pred"]) + 8
    colours = np.rint(255 - share[..., None] * (255 - _HEAT)).astype(np.uint8)
    image = Image.new("RGB", (margin + count * cell,) * 2, "white")
    image.paste(Image.fromarray(colours.repeat(cell, axis=0).repeat(cell, axis=1)), (margin, margin))
    draw = ImageDraw.Draw(image)
    draw.text((2, margin - 14), "true\\pred", fill="grey", font=font)
    for row, name in enumerate(names):
        middle = margin + row * cell + cell // 2
        width, height = _text_size(name, font)
        draw.text((margin - 4 - width, middle - height // 2), name, fill="black", font=font)
        label = Image.new("RGB", (width, height + 2), "white")
        ImageDraw.Draw(label).text((0, 0), name, fill="black", font=font)
        image.paste(label.rotate(90, expand=True), (middle - height // 2, margin - 4 - width))
        for column in range(count):
            text = str(int(confusion[row, column]))
            text_width, text_height = _text_size(text, font)
            draw.text((margin + column * cell + (cell - text_width) // 2, middle - text_height // 2),
                      text, fill="white" if share[row, column] > 0.5 else "black", font=font)
    return np.asarray(image)


def prediction_grid(images: np.ndarray, predicted: np.ndarray, labels: np.ndarray,
                    classes: Sequence[str]) -> np.ndarray:
    """uint8 NHWC images in a grid, each over its predicted ("p:") and true ("t:") class."""
    font = _font()
    side = images.shape[1] * GRID_SCALE
    line = _text_size("Ag", font)[1] + 3
    tile_width, tile_height = side + 16, side + 2 * line + 6
    rows = -(-len(images) // GRID_COLUMNS)
    canvas = Image.new("RGB", (GRID_COLUMNS * tile_width, rows * tile_height), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (pixels, guess, truth) in enumerate(zip(images, predicted, labels, strict=True)):
        left, top = (index % GRID_COLUMNS) * tile_width + 8, (index // GRID_COLUMNS) * tile_height + 3
        tile = Image.fromarray(pixels).resize((side, side), Image.Resampling.NEAREST)
        canvas.paste(tile, (left, top))
        draw.text((left, top + side + 2), _fit(f"p: {classes[guess]}", side + 6, font),
                  fill=_RIGHT if guess == truth else _WRONG, font=font)
        draw.text((left, top + side + 2 + line), _fit(f"t: {classes[truth]}", side + 6, font),
                  fill="black", font=font)
    return np.asarray(canvas)


@functools.cache
def _font() -> Font:
    return ImageFont.load_default()


def _text_size(text: str, font: Font) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(right - left), int(bottom - min(top, 0))


def _fit(text: str, width: int, font: Font) -> str:
    """`text`, cut short with ".." when it is wider than `width` pixels."""
    if _text_size(text, font)[0] <= width:
        return text
    while len(text) > 1 and _text_size(text + "..", font)[0] > width:
        text = text[:-1]
    return text + ".."
