"""`digits`: scikit-learn's bundled 8x8 handwritten digits, upsampled to 32x32; fully offline."""

from __future__ import annotations

import numpy as np

from convserve.training.data.dataset import IMAGE_SIZE, Dataset, split_dataset, to_uint8, upsample


def load_digits(name: str, seed: int, val_fraction: float) -> Dataset:
    # Imported here: scikit-learn is slow to import and only this source needs it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)  # 0..16 -> 0..255
    gray = upsample(pixels, IMAGE_SIZE)
    images = to_uint8(np.repeat(gray[..., None], 3, axis=-1))
    labels = np.asarray(bunch.target, dtype=np.int64)
    classes = tuple(str(c) for c in range(10))
    return split_dataset(name, classes, images, labels, seed, val_fraction)

