"""The training spec: every setting of a training run defined once, with its default, its range and
a help sentence, and `TrainConfig`, the frozen configuration built from them.

One definition serves every way in: the Train RPC (convserve.server.messages), the SDK
(convserve.client.calls), the remote `convserve train` and the offline `python -m
convserve.training` all build a `TrainConfig`, so an out-of-range value is refused with the same
message wherever it comes from. The job runner writes the spec into the job directory
(contracts/job_spec.py) and the training process reads it back. Standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from convserve.contracts.errors import ConfigError

CompileChoice = Literal["auto", "on", "off"]
COMPILE_CHOICES = ("auto", "on", "off")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
AUGMENT_MODES = ("none", "crop", "flip", "crop+flip")
SCHEDULES = ("constant", "cosine", "onecycle")
PRECISIONS = ("auto", "fp32", "bf16")
LOADERS = ("auto", "device", "dataloader")
# Names arrive from remote callers: only these forms, and folder paths stay relative and below
# the datasets root (the data layer confines them again when it resolves the folder).
DATASET_FORMS = "digits, cifar10, synthetic, synthetic:<n>, folder:<relative path>"
_DATASET_RE = re.compile(r"digits|cifar10|synthetic(:[0-9]{1,9})?|folder:[A-Za-z0-9._/-]{1,200}")
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:[0-9]{1,2})?")
MAX_SEED = 2**32 - 1  # per-epoch seeds are seed * 1_000_003 + epoch, within 64 bits


@dataclass(frozen=True)
class Setting:
    """One training setting: its type, what it accepts, and the help sentence every CLI shows."""

    kind: type                          # int, float, str or bool
    help: str
    accepts: Callable[[Any], bool] = lambda value: True
    expected: str = ""                  # the accepted range, as refusals word it
    choices: tuple[str, ...] = ()
    requestable: bool = False           # a Train request may set it; else the server decides
    group: str = ""                     # the offline CLI's --help section
    refusal: str = "is out of range"    # names and choices: "is unknown"

    def check(self, name: str, value: object) -> None:
        if not _has_kind(value, self.kind) or not self.accepts(value):
            raise ConfigError(f"{name}={value!r} {self.refusal}: expected {self.expected}")


def _has_kind(value: object, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, kind)


def _one_of(choices: tuple[str, ...], help: str, **more: Any) -> Setting:
    return Setting(str, help, lambda v: v in choices, "one of " + ", ".join(choices),
                   choices=choices, refusal="is unknown", **more)


def _between(kind: type, low: float, high: float, help: str, *, low_open: bool = False,
             high_open: bool = False, **more: Any) -> Setting:
    def accepts(value: float) -> bool:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return above and below
    if kind is int:
        expected = f"an integer in {low}..{high}"
    else:
        expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return Setting(kind, help, accepts, expected, **more)


RECIPE = ("recipe (the tutorial's: --augment none --schedule constant --label-smoothing 0 "
          "--weight-decay 0)")

# The single definition. Defaults live on TrainConfig below, checked against this table by a test.
SETTINGS: dict[str, Setting] = {
    "dataset": Setting(str, "the data to train on: " + DATASET_FORMS,
                       lambda v: bool(_DATASET_RE.fullmatch(v))
                       and ".." not in v.removeprefix("folder:").split("/")
                       and not v.startswith("folder:/"),
                       "one of " + DATASET_FORMS, requestable=True, refusal="is unknown"),
    "datasets_root": Setting(str, "folder that dataset names resolve in", lambda v: bool(v),
                             "a folder"),
    "download": Setting(bool, "allow downloading a missing public dataset (cifar10)",
                        expected="true or false"),
    "val_fraction": _between(float, 0, 1, "validation share where a dataset has no split",
                             low_open=True, high_open=True, requestable=True),
    "epochs": _between(int, 1, 10_000, "passes over the training split", requestable=True),
    "batch_size": _between(int, 1, 4096, "images per optimiser step", requestable=True),
    "lr": _between(float, 0, 1, "peak learning rate (Adam)", low_open=True, requestable=True),
    "seed": _between(int, 0, MAX_SEED, "seed of every random choice: splits, init, order",
                     requestable=True),
    "compile": _one_of(COMPILE_CHOICES, "torch.compile the model: auto = on CUDA only"),
    "compile_mode": _one_of(COMPILE_MODES, "torch.compile's mode"),
    "device": Setting(str, "auto, cpu, cuda or cuda:N", lambda v: bool(_DEVICE_RE.fullmatch(v)),
                      "auto, cpu, cuda or cuda:N", refusal="is unknown"),
    "augment": _one_of(AUGMENT_MODES, "on-device augmentation (flip suits natural images, not "
                       "digits)", requestable=True, group=RECIPE),
    "schedule": _one_of(SCHEDULES, "per-step learning-rate schedule, peaking at lr",
                        requestable=True, group=RECIPE),
    "label_smoothing": _between(float, 0, 1, "label smoothing of the loss", high_open=True,
                                requestable=True, group=RECIPE),
    "weight_decay": _between(float, 0, 1, "decoupled (AdamW) weight decay when > 0",
                             requestable=True, group=RECIPE),
    "precision": _one_of(PRECISIONS, "auto: bf16 autocast on CUDA, fp32 on CPU", group=RECIPE),
    "loader": _one_of(LOADERS, "where batches come from: the split on the device, or a "
                      "DataLoader with workers and pinned memory (auto: the DataLoader only when "
                      "the split does not fit in half the free GPU memory)"),
    "loader_workers": _between(int, 0, 64, "DataLoader worker processes"),
}
REQUEST_SETTINGS = tuple(name for name, s in SETTINGS.items() if s.requestable)


@dataclass(frozen=True)
class TrainConfig:
    """A training run's configuration; constructing one checks every value against SETTINGS."""

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
        for name, setting in SETTINGS.items():
            setting.check(name, getattr(self, name))

    @classmethod
    def tutorial(cls, **overrides: Any) -> TrainConfig:
        """The seed tutorial's recipe (no augmentation, constant rate, plain loss and Adam)."""
        recipe: dict[str, Any] = {"augment": "none", "schedule": "constant",
                                  "label_smoothing": 0.0, "weight_decay": 0.0}
        return cls(**(recipe | overrides))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        unknown = sorted(set(values) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"unknown training settings {unknown}; known: {sorted(SETTINGS)}")
        return cls(**values)

    def request_values(self) -> dict[str, Any]:
        """The settings a Train request carries."""
        return {name: getattr(self, name) for name in REQUEST_SETTINGS}

    @property
    def datasets_path(self) -> Path:
        return Path(self.datasets_root)


def add_arguments(parser: argparse.ArgumentParser, names: Iterable[str], *,
                  defaults: TrainConfig | None) -> None:
    """One `--flag` per setting. With `defaults` the flags default to them (the offline CLI);
    without, an absent flag is None: "the server's default" (the remote CLI)."""
    groups: dict[str, argparse._ActionsContainer] = {"": parser}
    for name in names:
        setting = SETTINGS[name]
        group = groups.get(setting.group) or groups.setdefault(
            setting.group, parser.add_argument_group(setting.group))
        default = getattr(defaults, name) if defaults is not None else None
        shown = f" (default: {default})" if defaults is not None else " (default: the server's)"
        flag = "--" + name.replace("_", "-")
        if setting.kind is bool:
            group.add_argument(flag, action="store_true", default=bool(default),
                               help=setting.help)
            continue
        # No argparse `choices`: TrainConfig refuses a bad value, in the words the RPC uses.
        metavar = "{" + ",".join(setting.choices) + "}" if setting.choices else name.upper()
        group.add_argument(flag, dest=name, type=setting.kind, default=default, metavar=metavar,
                           help=setting.help + shown)


def values_from(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The settings given on a command line that add_arguments built (None: not given)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}
