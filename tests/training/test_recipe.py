"""The training recipe: on-device augmentation, schedules, optimiser choice, and resume with them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from convserve.contracts.errors import ConfigError
from convserve.contracts.spec import TrainConfig
from convserve.training import recipe
from convserve.training.data import load_dataset
from convserve.training.progress import ProgressReporter
from convserve.training.train import train
from tests.conftest import SMALL_SYNTHETIC


def batch(count: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(
        1, 256, (count, 32, 32, 3), dtype=np.uint8))  # no zeros: padding is recognisable


def test_crop_takes_each_image_from_its_own_window_of_the_padded_image() -> None:
    images = batch()
    cropped = recipe.augment(images, "crop", torch.Generator().manual_seed(7))
    replay = torch.Generator().manual_seed(7)  # the same draws, in the same order
    top = torch.randint(0, 9, (16, 1, 1), generator=replay).flatten().tolist()
    left = torch.randint(0, 9, (16, 1, 1), generator=replay).flatten().tolist()
    padded = np.pad(images.numpy(), ((0, 0), (4, 4), (4, 4), (0, 0)))
    assert cropped.shape == images.shape and cropped.dtype == torch.uint8
    for i in range(16):
        np.testing.assert_array_equal(cropped[i].numpy(),
                                      padded[i, top[i]:top[i] + 32, left[i]:left[i] + 32])
    assert len(set(zip(top, left, strict=True))) > 1  # offsets differ between images


def test_flip_mirrors_some_images_and_leaves_the_others() -> None:
    images = batch(64)
    flipped = recipe.augment(images, "flip", torch.Generator().manual_seed(1))
    mirrored = [bool(torch.equal(f, i.flip(1))) for f, i in zip(flipped, images, strict=True)]
    kept = [bool(torch.equal(f, i)) for f, i in zip(flipped, images, strict=True)]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True))
    assert 10 < sum(mirrored) < 54


def test_augmentation_is_repeatable_from_the_seed_and_none_is_the_identity() -> None:
    images = batch()
    first = recipe.augment(images, "crop+flip", torch.Generator().manual_seed(3))
    again = recipe.augment(images, "crop+flip", torch.Generator().manual_seed(3))
    other = recipe.augment(images, "crop+flip", torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert recipe.augment(images, "none", torch.Generator()) is images


def _rates(schedule: str, steps: int = 100) -> list[float]:
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    scheduler = recipe.make_schedule(optimizer, schedule, steps)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_schedules_have_their_documented_shapes() -> None:
    assert set(_rates("constant")) == {0.5}
    cosine = _rates("cosine")
    assert cosine[0] == pytest.approx(0.5) and cosine[-1] < 0.01
    assert all(a >= b for a, b in zip(cosine, cosine[1:], strict=False))
    cycle = _rates("onecycle")
    peak = int(np.argmax(cycle))
    assert cycle[0] == pytest.approx(0.05) and peak == 15 and cycle[peak] == pytest.approx(0.5)
    assert cycle[-1] < 0.01
    with pytest.raises(ValueError, match="schedule: expected one of"):
        recipe.make_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1), "step", 10)


def test_weight_decay_selects_decoupled_adamw() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert type(recipe.make_optimizer(params, 1e-3, 0.0, torch.device("cpu"))) is torch.optim.Adam
    decayed = recipe.make_optimizer(params, 1e-3, 5e-4, torch.device("cpu"))
    assert type(decayed) is torch.optim.AdamW and decayed.param_groups[0]["weight_decay"] == 5e-4


@pytest.mark.parametrize(("field", "value", "message"), [
    ("augment", "rotate", "augment='rotate' is unknown: expected one of none, crop, flip, crop+flip"),
    ("schedule", "step", "schedule='step' is unknown"),
    ("label_smoothing", 1.0, "label_smoothing=1.0 is out of range"),
    ("weight_decay", -1.0, "weight_decay=-1.0 is out of range"),
    ("precision", "fp16", "precision='fp16' is unknown: expected one of auto, fp32, bf16"),
])
def test_recipe_fields_are_validated(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        TrainConfig(**{field: value})


def test_the_tutorial_preset_turns_every_improvement_off() -> None:
    tutorial = TrainConfig.tutorial(epochs=3)
    assert (tutorial.augment, tutorial.schedule, tutorial.label_smoothing,
            tutorial.weight_decay, tutorial.epochs) == ("none", "constant", 0.0, 0.0, 3)
    assert TrainConfig().augment != "none" and TrainConfig().schedule != "constant"


class _Interrupted(Exception):
    pass


class _StopAfterFirstEpoch(ProgressReporter):
    """Raises right after the first epoch's checkpoint is written: a crash between epochs."""

    def event(self, kind: str, **fields) -> None:
        super().event(kind, **fields)
        if kind == "epoch":
            raise _Interrupted


def test_an_interrupted_run_with_the_default_recipe_resumes_exactly(tmp_path: Path) -> None:
    """Augmentation draws and the schedule's position are restored: the resumed run's losses
    equal an uninterrupted run's, batch for batch."""
    data = load_dataset(SMALL_SYNTHETIC, Path("unused"), seed=0)
    config = TrainConfig(dataset=SMALL_SYNTHETIC, epochs=2, compile="off",
                         augment="crop+flip", schedule="onecycle")
    whole_reporter = ProgressReporter(tmp_path / "whole.jsonl")
    whole = train(config, data, tmp_path / "whole", whole_reporter)
    whole_reporter.close()

    stopping = _StopAfterFirstEpoch(tmp_path / "split.jsonl")
    with pytest.raises(_Interrupted):
        train(config, data, tmp_path / "split", stopping)
    stopping.close()
    reporter = ProgressReporter(tmp_path / "split.jsonl")
    resumed = train(config, data, tmp_path / "split", reporter, resume=True)
    reporter.close()
    assert resumed.log.training_loss_per_batch == whole.log.training_loss_per_batch
    assert resumed.validation.accuracy == whole.validation.accuracy


def test_the_dataloader_path_trains_exactly_like_the_device_path(tmp_path: Path) -> None:
    """The plain path (DataLoader, 2 worker processes) and the fast path (the split indexed on the
    device) see the same batches in the same order, so on CPU they train the same model."""
    data = load_dataset(SMALL_SYNTHETIC, Path("unused"), seed=0)
    results = {}
    for loader in ("device", "dataloader"):
        config = TrainConfig(dataset=SMALL_SYNTHETIC, epochs=2, compile="off", loader=loader,
                             loader_workers=2)
        reporter = ProgressReporter(tmp_path / f"{loader}.jsonl")
        results[loader] = train(config, data, tmp_path / loader, reporter)
        reporter.close()
    device, plain = results["device"], results["dataloader"]
    assert plain.log.training_loss_per_batch == pytest.approx(device.log.training_loss_per_batch,
                                                              abs=1e-6)
    assert plain.validation.accuracy == pytest.approx(device.validation.accuracy, abs=0.02)


def test_precision_and_loader_choices() -> None:
    from convserve.training.batches import use_loader
    from convserve.training.train import autocast_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(TrainConfig(), cpu) is None
    assert autocast_dtype(TrainConfig(), cuda) is torch.bfloat16
    assert autocast_dtype(TrainConfig(precision="fp32"), cuda) is None
    assert autocast_dtype(TrainConfig(precision="bf16"), cpu) is torch.bfloat16
    images = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    assert not use_loader(TrainConfig(), images, cpu)  # on CPU the split is already in memory
    assert use_loader(TrainConfig(loader="dataloader"), images, cpu)


# ----------------------------------------------------------------------------------- on a GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this host")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("loader", ["device", "dataloader"])
def test_the_cuda_fast_path_trains_compiled_in_bf16_like_cpu(tmp_path: Path, loader: str,
                                                             monkeypatch) -> None:
    data = load_dataset("synthetic:2000", Path("unused"), seed=0)
    autocasts: list[tuple[str, torch.dtype]] = []
    real_autocast = torch.autocast

    def recording_autocast(device_type: str, dtype=None, **kwargs):  # the step's precision
        autocasts.append((device_type, dtype))
        return real_autocast(device_type, dtype=dtype, **kwargs)

    monkeypatch.setattr(torch, "autocast", recording_autocast)
    runs = {}
    for device in ("cuda", "cpu"):
        config = TrainConfig(dataset="synthetic:2000", epochs=4, device=device, loader=loader,
                             compile="on" if device == "cuda" else "off")
        reporter = ProgressReporter(tmp_path / f"{device}.jsonl")
        runs[device] = train(config, data, tmp_path / device, reporter)
        reporter.close()
    gpu = runs["cuda"]
    assert gpu.compiled and gpu.device.startswith("cuda") and gpu.compile_seconds > 0
    assert gpu.net.conv5.weight.is_contiguous(memory_format=torch.channels_last)
    assert ("cuda", torch.bfloat16) in autocasts  # the CUDA steps ran in bf16 autocast
    checkpoint = torch.load(tmp_path / "cuda" / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["optimizer"]["param_groups"][0]["fused"] is True  # fused Adam(W)
    assert abs(gpu.validation.accuracy - runs["cpu"].validation.accuracy) <= 0.1
