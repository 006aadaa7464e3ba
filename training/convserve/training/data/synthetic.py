"""`synthetic` / `synthetic:<n_train>`: deterministic, learnable CIFAR-shaped data (class templates
plus shifted, noisy samples), for tests and benchmarks without files."""

from __future__ import annotations

import functools
import re

import numpy as np

from convserve.contracts.errors import DatasetError
from convserve.training.data.dataset import DATASET_NAMES_HELP, IMAGE_SIZE, Dataset, upsample

SYNTHETIC_CLASSES = 10
SYNTHETIC_DEFAULT_TRAIN = 5000
# Names come from remote callers: cap the size so "synthetic:<huge>" cannot exhaust memory
# (100k images is ~300 MB of uint8, twice CIFAR-10's training set).
SYNTHETIC_MAX_TRAIN = 100_000
SYNTHETIC_MIN_TRAIN = SYNTHETIC_CLASSES
# Templates come from a fixed seed so the task itself never changes with `seed`; only the
# per-image sampling does.
_SYNTHETIC_TEMPLATE_SEED = 0x5EED_C1FA
_SYNTHETIC_MAX_SHIFT = 4
_SYNTHETIC_AMPLITUDE = 45.0
_SYNTHETIC_CHUNK = 1024
SYNTHETIC_RE = re.compile(r"synthetic(?::([0-9]{1,9}))?")


def parse_synthetic_size(text: str | None) -> int:
    if text is None:
        return SYNTHETIC_DEFAULT_TRAIN
    n_train = int(text)
    if not SYNTHETIC_MIN_TRAIN <= n_train <= SYNTHETIC_MAX_TRAIN:
        raise DatasetError(f"synthetic size must be between {SYNTHETIC_MIN_TRAIN} and "
                           f"{SYNTHETIC_MAX_TRAIN}, got {n_train}; expected one of: "
                           f"{DATASET_NAMES_HELP}")
    return n_train


@functools.cache
def _synthetic_templates() -> np.ndarray:
    """[classes, shifts, 32, 32, 3] int16 smooth class templates (deviation from grey).

    Each template is a pattern shared by all classes plus a weaker class-specific one, so
    classes overlap enough that learning them takes a few epochs, not a single step. Every
    shifted crop is precomputed so per-image shifts become one gather.
    """
    rng = np.random.default_rng(_SYNTHETIC_TEMPLATE_SEED)
    shift = _SYNTHETIC_MAX_SHIFT
    span = IMAGE_SIZE + 2 * shift
    shared = upsample(rng.standard_normal((1, 4, 4, 3)), span)
    coarse = upsample(rng.standard_normal((SYNTHETIC_CLASSES, 4, 4, 3)), span)
    fine = upsample(rng.standard_normal((SYNTHETIC_CLASSES, 7, 7, 3)), span)
    fields = shared + 0.35 * (coarse + 0.6 * fine)
    fields -= fields.mean(axis=(1, 2, 3), keepdims=True)
    fields /= fields.std(axis=(1, 2, 3), keepdims=True)
    # Clipped to +-5 sigma so the int16 contrast product in _synthetic_split cannot overflow.
    fields = np.rint(_SYNTHETIC_AMPLITUDE * np.clip(fields, -5.0, 5.0)).astype(np.int16)
    offsets = [(dy, dx) for dy in range(2 * shift + 1) for dx in range(2 * shift + 1)]
    return np.stack([fields[:, dy:dy + IMAGE_SIZE, dx:dx + IMAGE_SIZE] for dy, dx in offsets],
                    axis=1)


def _synthetic_split(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Balanced, shuffled labels and their images drawn from the class templates.

    Integer arithmetic, raw generator bits and reused chunk buffers keep this fast: float
    Gaussian noise and fresh temporaries per step were several times slower.
    """
    templates = _synthetic_templates()
    n_crops = templates.shape[1]
    flat_templates = templates.reshape(SYNTHETIC_CLASSES * n_crops, -1)
    labels = rng.permutation(np.arange(count, dtype=np.int64) % SYNTHETIC_CLASSES)
    rows = labels * n_crops + rng.integers(0, n_crops, count)
    # Contrast in 1/32 steps (0.6..1.4); brightness +-40 around grey less the noise mean.
    contrast = rng.integers(19, 46, (count, 1)).astype(np.int16)
    brightness = rng.integers(24, 105, (count, 1)).astype(np.int16)
    images = np.empty((count, flat_templates.shape[1]), np.uint8)
    pixels = np.empty((min(count, _SYNTHETIC_CHUNK), flat_templates.shape[1]), np.int16)
    noise = np.empty_like(pixels)
    # Fixed-size chunks bound peak memory and keep the random stream order fixed.
    for start in range(0, count, _SYNTHETIC_CHUNK):
        part = slice(start, start + _SYNTHETIC_CHUNK)
        n = len(rows[part])
        chunk, chunk_noise = pixels[:n], noise[:n]
        np.take(flat_templates, rows[part], axis=0, out=chunk)
        chunk *= contrast[part]
        chunk >>= 5
        chunk += brightness[part]
        _triangular_noise(rng, out=chunk_noise)
        chunk += chunk_noise
        np.clip(chunk, 0, 255, out=chunk)
        np.copyto(images[part], chunk, casting="unsafe")
    return images.reshape(count, IMAGE_SIZE, IMAGE_SIZE, 3), labels


def _triangular_noise(rng: np.random.Generator, *, out: np.ndarray) -> None:
    """Fill int16 ``out`` with 0..127 (mean 63.5, std ~26): two random bytes summed, /4."""
    size = out.size
    words = rng.bit_generator.random_raw((2 * size + 7) // 8)
    # Little-endian view so the bytes, and thus the images, match on every platform.
    raw = words.astype("<u8", copy=False).view(np.uint8)
    flat = out.reshape(-1)
    np.add(raw[:size], raw[size:2 * size], out=flat, dtype=np.int16)
    flat >>= 2


def load_synthetic(name: str, n_train: int, seed: int) -> Dataset:
    # Independent streams, so the split sizes do not shift each other's samples.
    train_images, train_labels = _synthetic_split(n_train, np.random.default_rng([seed, 0]))
    val_images, val_labels = _synthetic_split(n_train // 5, np.random.default_rng([seed, 1]))
    classes = tuple(f"class{i}" for i in range(SYNTHETIC_CLASSES))
    return Dataset(name=name, classes=classes,
                   train_images=train_images, train_labels=train_labels,
                   val_images=val_images, val_labels=val_labels)

