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

from pathlib import Path

from convserve.contracts.errors import DatasetError
from convserve.training.data.cifar10 import load_cifar10
from convserve.training.data.dataset import DATASET_NAMES_HELP, Dataset, check_seed, check_val_fraction, show
from convserve.training.data.digits import load_digits
from convserve.training.data.folder import load_folder
from convserve.training.data.synthetic import SYNTHETIC_RE, load_synthetic, parse_synthetic_size

__all__ = ["DATASET_NAMES_HELP", "Dataset", "load_dataset"]

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
    check_seed(seed)
    check_val_fraction(val_fraction)
    root = Path(root)
    if name == "digits":
        return load_digits(name, seed, val_fraction)
    if name == "cifar10":
        return load_cifar10(name, root, download)
    if name.startswith("folder:"):
        return load_folder(name, root, name.removeprefix("folder:"), seed, val_fraction)
    match = SYNTHETIC_RE.fullmatch(name)
    if match:
        return load_synthetic(name, parse_synthetic_size(match.group(1)), seed)
    raise DatasetError(f"unknown dataset {show(name)}; expected one of: {DATASET_NAMES_HELP}")

