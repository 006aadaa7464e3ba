"""The training spec: one frozen training configuration, what a job was asked to do, saved in
checkpoints and cards. The job runner checks requests with it and the training process runs it.
Standard library only."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

CompileChoice = Literal["auto", "on", "off"]
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
AUGMENT_MODES = ("none", "crop", "flip", "crop+flip")
SCHEDULES = ("constant", "cosine", "onecycle")
PRECISIONS = ("auto", "fp32", "bf16")
LOADERS = ("auto", "device", "dataloader")


class ConfigError(ValueError):
    """A configuration value out of range; the message names the field, the value and the range."""


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "digits"
    datasets_root: str = "datasets"
    download: bool = False
    val_fraction: float = 0.2
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    # "auto" compiles on CUDA (where it pays) and runs eager on CPU (where compiling costs
    # more than a short job gains); "on"/"off" force it on any device.
    compile: CompileChoice = "auto"
    compile_mode: str = "default"
    device: str = "auto"
    # The recipe (training/recipe.py). The tutorial's is none/constant/0/0; the defaults are the
    # measured improvement (docs/benchmarks.md). "flip" suits natural images, not digits.
    augment: str = "crop"
    schedule: str = "onecycle"
    label_smoothing: float = 0.1
    weight_decay: float = 5e-4
    precision: str = "auto"            # auto: bf16 autocast on CUDA, fp32 on CPU
    # Where batches come from (training/batches.py): the split on the device, or a DataLoader
    # (auto: the DataLoader only on CUDA when the split does not fit in half the free memory).
    loader: str = "auto"
    loader_workers: int = 2

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        _check(1 <= self.batch_size <= 65536, "batch_size", self.batch_size, "1..65536")
        _check(0.0 < self.lr <= 10.0, "lr", self.lr, "a float in (0, 10]")
        _check(0.0 < self.val_fraction < 1.0, "val_fraction", self.val_fraction, "a float in (0, 1)")
        _check(self.compile in ("auto", "on", "off"), "compile", self.compile, "auto, on or off")
        _check(self.compile_mode in COMPILE_MODES, "compile_mode", self.compile_mode,
               ", ".join(COMPILE_MODES))
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               "device", self.device, "auto, cpu, cuda or cuda:N")
        _check(self.augment in AUGMENT_MODES, "augment", self.augment, ", ".join(AUGMENT_MODES))
        _check(self.schedule in SCHEDULES, "schedule", self.schedule, ", ".join(SCHEDULES))
        _check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", self.label_smoothing,
               "a float in [0, 1)")
        _check(0.0 <= self.weight_decay <= 1.0, "weight_decay", self.weight_decay, "0..1")
        _check(self.precision in PRECISIONS, "precision", self.precision, ", ".join(PRECISIONS))
        _check(self.loader in LOADERS, "loader", self.loader, ", ".join(LOADERS))
        _check(0 <= self.loader_workers <= 64, "loader_workers", self.loader_workers, "0..64")

    @classmethod
    def tutorial(cls, **overrides: Any) -> TrainConfig:
        """The seed tutorial's recipe (no augmentation, constant rate, plain loss and Adam)."""
        recipe: dict[str, Any] = {"augment": "none", "schedule": "constant",
                                  "label_smoothing": 0.0, "weight_decay": 0.0}
        return cls(**(recipe | overrides))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training config keys {unknown}; known: {sorted(known)}")
        return cls(**values)

    @property
    def datasets_path(self) -> Path:
        return Path(self.datasets_root)


def _check(ok: bool, field: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{field}={value!r} is out of range: expected {expected}")
