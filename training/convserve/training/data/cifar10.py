"""`cifar10`: CIFAR-10 through torchvision under the datasets root (its official train/test split);
downloaded only when asked."""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import numpy as np

from convserve.contracts.errors import DatasetError
from convserve.training.data.dataset import Dataset

CIFAR10_FOLDER = "cifar-10-batches-py"


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


def load_cifar10(name: str, root: Path, download: bool) -> Dataset:
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

