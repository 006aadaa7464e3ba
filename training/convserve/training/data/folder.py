"""`folder:<name>`: an image-folder tree under the datasets root (one folder per class), its paths
confined to the root, every file decoded as Predict decodes it."""

from __future__ import annotations

import struct
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from convserve.contracts.errors import DatasetError
from convserve.serving.images import to_model_pixels
from convserve.training.data.dataset import DATASET_NAMES_HELP, Dataset, show, split_dataset

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
# Pillow surfaces corrupt or truncated files through many exception types, depending on
# the format plugin that trips over them.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error,
                  Image.DecompressionBombError)


def load_folder(name: str, root: Path, relative: str, seed: int,
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
    return split_dataset(name, tuple(class_dirs), images, labels, seed, val_fraction)


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
        raise DatasetError(f"folder dataset name {show(relative)} contains a NUL byte")
    parts = PurePosixPath(relative.replace("\\", "/"))
    if parts.is_absolute():
        raise DatasetError(f"folder dataset name {show(relative)} must be a relative path "
                           f"inside the dataset root, not an absolute path")
    if ".." in parts.parts:
        raise DatasetError(f"folder dataset name {show(relative)} must not contain '..'")
    base = root / relative
    resolved = _resolve(base)
    if resolved == root_resolved or not resolved.is_relative_to(root_resolved):
        raise DatasetError(f"folder dataset {show(relative)} resolves outside the dataset "
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

