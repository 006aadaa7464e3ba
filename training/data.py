"""Dataset sources for training, selected by a name string.

Every source yields a :class:`Dataset` of uint8 NHWC RGB images at 32x32 with int64 labels,
held in memory. Normalisation is deliberately absent: the exported ONNX graph takes raw uint8
pixels and normalises inside the model, so training must see the same raw pixels.

Accepted names (see ``DATASET_NAMES_HELP``):

* ``digits``: scikit-learn's bundled 8x8 handwritten digits, upsampled; works fully offline.
* ``cifar10``: CIFAR-10 via torchvision under ``root`` (official train / test split).
* ``folder:<name>``: an image-folder tree under ``root/<name>``.
* ``synthetic`` / ``synthetic:<n_train>``: deterministic, learnable CIFAR-shaped data.

Names arrive from remote callers (the Train RPC), so they are parsed strictly, ``folder:``
paths are confined to ``root``, and every failure is a one-line :class:`DatasetError`.
"""

from __future__ import annotations

import functools
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from convserve.images import to_model_pixels

__all__ = ["DATASET_NAMES_HELP", "Dataset", "DatasetError", "load_dataset"]

DATASET_NAMES_HELP = "digits, cifar10, folder:<name>, synthetic[:<n>]"

IMAGE_SIZE = 32
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})

CIFAR10_FOLDER = "cifar-10-batches-py"

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

# Pillow surfaces corrupt or truncated files through many exception types, depending on
# the format plugin that trips over them.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error,
                  Image.DecompressionBombError)

_SYNTHETIC_RE = re.compile(r"synthetic(?::([0-9]{1,9}))?")


class DatasetError(ValueError):
    """A dataset name or dataset on disk that cannot be used.

    The message says what was expected and what was found; it is shown to remote callers,
    so it is always a single line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


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
            _check_images(images, split)
            _check_labels(labels, len(images), len(self.classes), split)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary for model cards."""
        return {
            "name": self.name,
            "classes": list(self.classes),
            "num_classes": len(self.classes),
            "train_size": len(self.train_labels),
            "val_size": len(self.val_labels),
            "image_shape": [IMAGE_SIZE, IMAGE_SIZE, 3],
        }


def load_dataset(name: str, root: Path | str, *, download: bool = False, seed: int = 0,
                 val_fraction: float = 0.2) -> Dataset:
    """Load the dataset selected by ``name`` (one of ``DATASET_NAMES_HELP``).

    ``root`` holds on-disk datasets (``cifar10``, ``folder:``); ``download`` only applies to
    ``cifar10``. ``seed`` drives every random split or sample, and ``val_fraction`` is the
    share held out where a source has no validation split of its own.
    """
    if not isinstance(name, str):
        raise DatasetError(f"dataset name must be a string, got {type(name).__name__}; "
                           f"expected one of: {DATASET_NAMES_HELP}")
    _check_seed(seed)
    _check_val_fraction(val_fraction)
    root = Path(root)
    if name == "digits":
        return _load_digits(name, seed, val_fraction)
    if name == "cifar10":
        return _load_cifar10(name, root, download)
    if name.startswith("folder:"):
        return _load_folder(name, root, name.removeprefix("folder:"), seed, val_fraction)
    match = _SYNTHETIC_RE.fullmatch(name)
    if match:
        return _load_synthetic(name, _parse_synthetic_size(match.group(1)), seed)
    raise DatasetError(f"unknown dataset {_show(name)}; expected one of: {DATASET_NAMES_HELP}")


# --- validation helpers -------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _show(value: object, limit: int = 80) -> str:
    """Quote untrusted text for an error message, bounded and with control chars escaped."""
    text = repr(str(value))
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DatasetError(f"seed must be a non-negative integer, got {_show(seed)}")


def _check_val_fraction(val_fraction: float) -> None:
    is_number = isinstance(val_fraction, (int, float, np.floating)) and not isinstance(
        val_fraction, bool)
    if not is_number or not 0.0 < float(val_fraction) < 1.0:  # `not <` also rejects NaN
        raise DatasetError(f"val_fraction must be strictly between 0 and 1, "
                           f"got {_show(val_fraction)}")


def _check_images(images: np.ndarray, split: str) -> None:
    expected = (IMAGE_SIZE, IMAGE_SIZE, 3)
    if (not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4
            or images.shape[1:] != expected or not images.flags.c_contiguous):
        found = (f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray)
                 else type(images).__name__)
        raise DatasetError(f"{split} images must be C-contiguous uint8 [N, 32, 32, 3], "
                           f"found {found}")


def _check_labels(labels: np.ndarray, count: int, num_classes: int, split: str) -> None:
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.shape != (count,):
        raise DatasetError(f"{split} labels must be int64 [{count}], found "
                           f"{getattr(labels, 'dtype', type(labels).__name__)} "
                           f"{getattr(labels, 'shape', '')}")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{split} labels must lie in [0, {num_classes}), found "
                           f"[{labels.min()}, {labels.max()}]")


# --- shared image operations ----------------------------------------------------------------


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


def _upsample(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly resize float [N, H, W, ...] images to [N, size, size, ...]."""
    rows = _bilinear_matrix(images.shape[1], size)
    cols = _bilinear_matrix(images.shape[2], size)
    return np.einsum("ih,nhw...,jw->nij...", rows, images, cols, optimize=True)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(np.rint(images), 0, 255).astype(np.uint8))


def _stratified_split(labels: np.ndarray, val_fraction: float,
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


def _split_dataset(name: str, classes: tuple[str, ...], images: np.ndarray, labels: np.ndarray,
                   seed: int, val_fraction: float) -> Dataset:
    train_idx, val_idx = _stratified_split(labels, val_fraction, np.random.default_rng(seed))
    return Dataset(name=name, classes=classes,
                   train_images=images[train_idx], train_labels=labels[train_idx],
                   val_images=images[val_idx], val_labels=labels[val_idx])


# --- digits ---------------------------------------------------------------------------------


def _load_digits(name: str, seed: int, val_fraction: float) -> Dataset:
    # Imported here: scikit-learn is slow to import and only this source needs it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)  # 0..16 -> 0..255
    gray = _upsample(pixels, IMAGE_SIZE)
    images = _to_uint8(np.repeat(gray[..., None], 3, axis=-1))
    labels = np.asarray(bunch.target, dtype=np.int64)
    classes = tuple(str(c) for c in range(10))
    return _split_dataset(name, classes, images, labels, seed, val_fraction)


# --- cifar10 --------------------------------------------------------------------------------


@functools.cache
def _cifar10_class() -> type:
    """Build the CIFAR10 subclass on first use, keeping torchvision out of module import."""
    from torchvision.datasets import CIFAR10

    class _LocalCIFAR10(CIFAR10):
        """CIFAR10 that trusts existing local files unless it is downloading.

        torchvision checks md5 sums of the full official files, which rejects any reduced
        copy (test fixtures, subsets). Without a download there is nothing to repair, so
        only presence is checked; with a download the full check decides whether to fetch.
        """

        def __init__(self, root: Path, *, train: bool, download: bool) -> None:
            self._verify_md5 = download  # read by the overrides during super().__init__
            super().__init__(root=root, train=train, download=download)

        def _check_integrity(self) -> bool:
            if self._verify_md5:
                return super()._check_integrity()
            folder = Path(self.root) / self.base_folder
            return all((folder / f).is_file() for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            if self._verify_md5:
                super()._load_meta()
                return
            # torchvision's own reader, minus its md5 check of batches.meta.
            path = Path(self.root) / self.base_folder / self.meta["filename"]
            if not path.is_file():
                raise RuntimeError(f"metadata file {path} not found")
            with path.open("rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return _LocalCIFAR10


def _load_cifar10(name: str, root: Path, download: bool) -> Dataset:
    folder = root / CIFAR10_FOLDER
    if not download and not folder.is_dir():
        raise DatasetError(f"CIFAR-10 not found: expected folder {folder}; pass download=True "
                           f"(--download) to fetch it")
    cls = _cifar10_class()
    try:
        train = cls(root, train=True, download=download)
        val = cls(root, train=False, download=download)
    except Exception as exc:  # torchvision raises RuntimeError, pickle/IO/network many others
        raise DatasetError(f"CIFAR-10 under {folder} could not be loaded "
                           f"({type(exc).__name__}: {exc})") from exc
    classes = tuple(str(c) for c in train.classes)
    return Dataset(name=name, classes=classes,
                   train_images=_cifar_images(train.data, folder),
                   train_labels=np.asarray(train.targets, dtype=np.int64),
                   val_images=_cifar_images(val.data, folder),
                   val_labels=np.asarray(val.targets, dtype=np.int64))


def _cifar_images(data: np.ndarray, folder: Path) -> np.ndarray:
    # A silent astype would wrap out-of-range values, so anything but uint8 is refused.
    if data.dtype != np.uint8:
        raise DatasetError(f"CIFAR-10 under {folder} holds {data.dtype} pixels, expected uint8")
    return np.ascontiguousarray(data)


# --- folder:<name> --------------------------------------------------------------------------


def _load_folder(name: str, root: Path, relative: str, seed: int,
                 val_fraction: float) -> Dataset:
    root_resolved = _resolve(root)
    base = _confined_dataset_dir(root, root_resolved, relative)
    train_dir, val_dir = base / "train", base / "val"
    if train_dir.is_dir() or val_dir.is_dir():
        for part in (train_dir, val_dir):
            if not part.is_dir():
                raise DatasetError(f"dataset folder {base} has a train/val layout but "
                                   f"{part} is missing")
        train_classes = _class_dirs(train_dir, root_resolved)
        val_classes = _class_dirs(val_dir, root_resolved)
        if list(train_classes) != list(val_classes):
            raise DatasetError(f"class folders differ between {train_dir} "
                               f"({', '.join(train_classes)}) and {val_dir} "
                               f"({', '.join(val_classes)})")
        classes = tuple(train_classes)
        train_images, train_labels = _read_tree(train_classes, root_resolved, min_per_class=1)
        val_images, val_labels = _read_tree(val_classes, root_resolved, min_per_class=1)
        return Dataset(name=name, classes=classes,
                       train_images=train_images, train_labels=train_labels,
                       val_images=val_images, val_labels=val_labels)
    class_dirs = _class_dirs(base, root_resolved)
    images, labels = _read_tree(class_dirs, root_resolved, min_per_class=2)
    return _split_dataset(name, tuple(class_dirs), images, labels, seed, val_fraction)


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # symlink loops: RuntimeError before 3.13
        raise DatasetError(f"cannot resolve path {path}: {exc}") from exc


def _confined_dataset_dir(root: Path, root_resolved: Path, relative: str) -> Path:
    """Validate a caller-supplied ``folder:`` name and return its directory inside root."""
    if not relative:
        raise DatasetError(f"folder dataset needs a name after 'folder:'; "
                           f"expected one of: {DATASET_NAMES_HELP}")
    if "\x00" in relative:
        raise DatasetError(f"folder dataset name {_show(relative)} contains a NUL byte")
    parts = PurePosixPath(relative.replace("\\", "/"))
    if parts.is_absolute():
        raise DatasetError(f"folder dataset name {_show(relative)} must be a relative path "
                           f"inside the dataset root, not an absolute path")
    if ".." in parts.parts:
        raise DatasetError(f"folder dataset name {_show(relative)} must not contain '..'")
    base = root / relative
    resolved = _resolve(base)
    if resolved == root_resolved or not resolved.is_relative_to(root_resolved):
        raise DatasetError(f"folder dataset {_show(relative)} resolves outside the dataset "
                           f"root {root}")
    if not resolved.is_dir():
        raise DatasetError(f"dataset folder {base} not found (expected a folder of "
                           f"<class>/ image folders or train/ and val/)")
    return resolved


def _class_dirs(folder: Path, root_resolved: Path) -> dict[str, Path]:
    """Sorted, non-hidden class subfolders of ``folder``, each confined to root."""
    classes: dict[str, Path] = {}
    for entry in _list_dir(folder):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        classes[entry.name] = _confined(entry, root_resolved)
    if not classes:
        raise DatasetError(f"dataset folder {folder} is empty: expected one subfolder per "
                           f"class, found none")
    return classes


def _list_dir(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as exc:  # unreadable folder: permissions, I/O errors, races
        raise DatasetError(f"cannot list folder {folder}: {type(exc).__name__}: "
                           f"{exc.strerror or exc}") from exc


def _confined(path: Path, root_resolved: Path) -> Path:
    resolved = _resolve(path)
    if not resolved.is_relative_to(root_resolved):
        raise DatasetError(f"{path} is a link that resolves outside the dataset root")
    return resolved


def _image_files(class_dir: Path, root_resolved: Path) -> list[Path]:
    files = []
    for entry in _list_dir(class_dir):
        if entry.name.startswith(".") or entry.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        # Checked before is_file() so an outside link is refused, not silently skipped.
        resolved = _confined(entry, root_resolved)
        if resolved.is_file():  # also skips FIFOs and devices, which would block or stream
            files.append(resolved)
    return files


def _read_tree(class_dirs: dict[str, Path], root_resolved: Path,
               min_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image under the class folders; label = position in ``class_dirs``."""
    per_class = [_image_files(d, root_resolved) for d in class_dirs.values()]
    if not any(per_class):
        folders = sorted({str(d.parent) for d in class_dirs.values()})
        raise DatasetError(f"dataset folder {', '.join(folders)} is empty: no images "
                           f"({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
    for class_dir, files in zip(class_dirs.values(), per_class, strict=True):
        if len(files) < min_per_class:
            raise DatasetError(f"class folder {class_dir} has {len(files)} image(s), "
                               f"needs at least {min_per_class}")
    images = np.stack([_read_image(f) for files in per_class for f in files])
    labels = np.repeat(np.arange(len(per_class), dtype=np.int64), [len(f) for f in per_class])
    return images, labels


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return to_model_pixels(img)  # exactly what Predict does with an encoded image
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


# --- synthetic ------------------------------------------------------------------------------


def _parse_synthetic_size(text: str | None) -> int:
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
    shared = _upsample(rng.standard_normal((1, 4, 4, 3)), span)
    coarse = _upsample(rng.standard_normal((SYNTHETIC_CLASSES, 4, 4, 3)), span)
    fine = _upsample(rng.standard_normal((SYNTHETIC_CLASSES, 7, 7, 3)), span)
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


def _load_synthetic(name: str, n_train: int, seed: int) -> Dataset:
    # Independent streams, so the split sizes do not shift each other's samples.
    train_images, train_labels = _synthetic_split(n_train, np.random.default_rng([seed, 0]))
    val_images, val_labels = _synthetic_split(n_train // 5, np.random.default_rng([seed, 1]))
    classes = tuple(f"class{i}" for i in range(SYNTHETIC_CLASSES))
    return Dataset(name=name, classes=classes,
                   train_images=train_images, train_labels=train_labels,
                   val_images=val_images, val_labels=val_labels)
