"""What every dataset source returns: a Dataset (uint8 NHWC 32x32 RGB images, int64 labels, a train
and a validation split), DatasetError, and the checks and image operations the sources share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from convserve.contracts.errors import DatasetError
from convserve.contracts.model_signature import SIGNATURE, dims_text
from convserve.contracts.spec import DATASET_FORMS

IMAGE_SIZE = SIGNATURE.height  # the model's input: square images (height == width), NHWC
DATASET_NAMES_HELP = DATASET_FORMS  # the training spec owns the forms a name may take


@dataclass(frozen=True, eq=False)  # eq=False: element-wise array equality has no truth value
class Dataset:
    """In-memory images and labels, split into train and validation."""

    name: str
    classes: tuple[str, ...]
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray

    def __post_init__(self) -> None:
        for split in ("train", "val"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            check_images(images, split)
            check_labels(labels, len(images), len(self.classes), split)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary for model cards."""
        return {
            "name": self.name,
            "classes": list(self.classes),
            "num_classes": len(self.classes),
            "train_size": len(self.train_labels),
            "val_size": len(self.val_labels),
            "image_shape": list(SIGNATURE.image_shape),
        }


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def show(value: object, limit: int = 80) -> str:
    """Quote untrusted text for an error message, bounded and with control chars escaped."""
    text = repr(str(value))
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DatasetError(f"seed must be a non-negative integer, got {show(seed)}")


def check_val_fraction(val_fraction: float) -> None:
    is_number = isinstance(val_fraction, (int, float, np.floating)) and not isinstance(
        val_fraction, bool)
    if not is_number or not 0.0 < float(val_fraction) < 1.0:  # `not <` also rejects NaN
        raise DatasetError(f"val_fraction must be strictly between 0 and 1, "
                           f"got {show(val_fraction)}")


def check_images(images: np.ndarray, split: str) -> None:
    expected = SIGNATURE.image_shape
    if (not isinstance(images, np.ndarray) or images.dtype != SIGNATURE.input_dtype
            or images.ndim != 4 or images.shape[1:] != expected or not images.flags.c_contiguous):
        found = (f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray)
                 else type(images).__name__)
        raise DatasetError(f"{split} images must be C-contiguous {SIGNATURE.input_dtype} "
                           f"{dims_text(expected)}, found {found}")


def check_labels(labels: np.ndarray, count: int, num_classes: int, split: str) -> None:
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.shape != (count,):
        raise DatasetError(f"{split} labels must be int64 [{count}], found "
                           f"{getattr(labels, 'dtype', type(labels).__name__)} "
                           f"{getattr(labels, 'shape', '')}")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{split} labels must lie in [0, {num_classes}), found "
                           f"[{labels.min()}, {labels.max()}]")


def _bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] weights for 1-D bilinear resampling with pixel-centre alignment.

    Centres align as in PIL / ``align_corners=False``, with edge clamping, so applying it on
    both axes matches PIL's bilinear upsampling while staying one vectorised matmul.
    """
    centres = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0.0, src - 1.0)
    low = np.floor(centres).astype(np.int64)
    high = np.minimum(low + 1, src - 1)
    frac = centres - low
    weights = np.zeros((dst, src))
    rows = np.arange(dst)
    np.add.at(weights, (rows, low), 1.0 - frac)
    np.add.at(weights, (rows, high), frac)
    return weights


def upsample(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly resize float [N, H, W, ...] images to [N, size, size, ...]."""
    rows = _bilinear_matrix(images.shape[1], size)
    cols = _bilinear_matrix(images.shape[2], size)
    return np.einsum("ih,nhw...,jw->nij...", rows, images, cols, optimize=True)


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(np.rint(images), 0, 255).astype(np.uint8))


def stratified_split(labels: np.ndarray, val_fraction: float,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices holding out ``val_fraction`` of each class.

    Every class keeps at least one image on each side, so the caller must ensure each class
    has two or more.
    """
    train_parts, val_parts = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = min(max(round(len(members) * val_fraction), 1), len(members) - 1)
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(val_parts))


def split_dataset(name: str, classes: tuple[str, ...], images: np.ndarray, labels: np.ndarray,
                   seed: int, val_fraction: float) -> Dataset:
    train_idx, val_idx = stratified_split(labels, val_fraction, np.random.default_rng(seed))
    return Dataset(name=name, classes=classes,
                   train_images=images[train_idx], train_labels=labels[train_idx],
                   val_images=images[val_idx], val_labels=labels[val_idx])

