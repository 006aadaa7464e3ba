"""The training loop of the seed tutorial, made repeatable, compiled and resumable.

Per epoch it keeps the tutorial's `log_dict` (training loss per batch, validation loss per batch,
training and validation accuracy per epoch), writes TensorBoard (`convserve.training.tensorboard`),
emits progress events and saves a checkpoint. Images stay uint8 on the device; `Preprocess`
normalises each batch inside the model, exactly as the exported graph does.

The fast path: the whole dataset is moved to the device once (or, when it does not fit, a DataLoader
brings each batch: `convserve.training.batches`), batches have fixed shapes, augmentation runs on the batch on
the device
(`convserve.training.recipe`), losses and correct counts stay on the device until the epoch ends, and on
CUDA the step runs in bf16 autocast, channels_last, with fused Adam and cudnn autotuning.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from convserve.contracts.errors import ConfigError, ResumeError
from convserve.contracts.spec import TrainConfig
from convserve.store.durable_files import replace_with
from convserve.store.job_dir import TENSORBOARD_DIR, checkpoint_path
from convserve.training import distributed, recipe
from convserve.training.batches import (
    DeviceBatches,
    LoaderBatches,
    steps_per_epoch,
    training_batches,
)
from convserve.training.data import Dataset
from convserve.training.metrics import ValidationMetrics, validation_metrics
from convserve.training.model import ConvNet, Preprocess
from convserve.training.progress import ProgressReporter, enumerate_with_estimate
from convserve.training.tensorboard import TrainingBoard, run_settings

EVAL_BATCH_SIZE = 512
# Settings a resumed run may change: how long it runs, where and how fast, not what it learns.
RESUMABLE_CHANGES = frozenset({"epochs", "compile", "compile_mode", "device", "download",
                               "datasets_root", "loader", "loader_workers"})



@dataclass
class TrainLog:
    """The tutorial's `log_dict`, one list per entry, plus what the card and TensorBoard need."""

    training_loss_per_batch: list[float] = field(default_factory=list)
    validation_loss_per_batch: list[float] = field(default_factory=list)
    training_accuracy_per_epoch: list[float] = field(default_factory=list)
    validation_accuracy_per_epoch: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[float]]:
        return dict(vars(self))


@dataclass
class TrainResult:
    net: ConvNet                   # the trained, uncompiled module (export needs this one)
    preprocess: Preprocess
    mean: list[float]              # the normalisation baked into `preprocess`, 0..1 units
    std: list[float]
    log: TrainLog
    validation: ValidationMetrics  # of the final epoch, by torch
    epochs_completed: int
    train_seconds: float           # the epochs' wall time, this process and earlier ones
    compile_seconds: float         # first compiled step (graph capture + codegen); 0 when eager
    device: str
    compiled: bool


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {choice!r} requested but CUDA is not available on this host")
    return torch.device(choice)


def should_compile(config: TrainConfig, device: torch.device) -> bool:
    return config.compile == "on" or (config.compile == "auto" and device.type == "cuda")


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 NHWC images, in 0..1 units (baked into the graph)."""
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    std = np.maximum(pixels.std(axis=0), 1e-3)  # a constant channel must not divide by zero
    return pixels.mean(axis=0).tolist(), std.tolist()


def train(config: TrainConfig, data: Dataset, run_dir: Path, reporter: ProgressReporter, *,
          resume: bool = False, world: distributed.World | None = None,
          on_checkpoint: Callable[[], None] | None = None) -> TrainResult:
    """Train on `data`. Under torchrun (`world` with several ranks) each rank trains on its shard
    with DistributedDataParallel and only rank 0 writes checkpoints and TensorBoard, then calls
    `on_checkpoint()` (a job saves them where another trainer resumes); the caller joins and
    leaves the process group (`distributed.start` / `stop`)."""
    world = world or distributed.World()
    device = resolve_device(config.device)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    if config.batch_size % world.world_size:
        raise ConfigError(f"batch_size={config.batch_size} is out of range: expected a multiple "
                          f"of the {world.world_size} processes (it is the global batch)")
    rank_batch = config.batch_size // world.world_size  # same steps and global batch as 1 process
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    state = _start_or_resume(config, data, run_dir, reporter, device, world, rank_batch, resume)
    compiled = should_compile(config, device)
    trained: torch.nn.Module = state.net
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(state.net, device_ids=[device.index]
                                          if device.index is not None else None)
    forward = torch.compile(trained, mode=config.compile_mode) if compiled else trained
    step = Step(forward, state.preprocess, state.optimizer, state.schedule, config, device)
    batches = training_batches(config, data.train_images, data.train_labels, rank_batch, world,
                               device)
    validation, compile_seconds = _epochs(config, data, run_dir, reporter, world, state, step,
                                          batches, compiled, on_checkpoint)
    return TrainResult(net=state.net, preprocess=state.preprocess, mean=state.mean,
                       std=state.std, log=state.log, validation=validation,
                       epochs_completed=config.epochs, train_seconds=sum(state.log.epoch_seconds),
                       compile_seconds=compile_seconds, device=str(device), compiled=compiled)


@dataclass
class _State:
    """The model, its optimiser and schedule, and the log: fresh, or from the last checkpoint."""

    net: ConvNet
    preprocess: Preprocess
    mean: list[float]
    std: list[float]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    log: TrainLog
    start_epoch: int
    steps: int
    device: torch.device


def _start_or_resume(config: TrainConfig, data: Dataset, run_dir: Path,
                     reporter: ProgressReporter, device: torch.device, world: distributed.World,
                     rank_batch: int, resume: bool) -> _State:
    checkpoint = load_checkpoint(run_dir, config) if resume else None
    mean, std = (checkpoint["normalization"]["mean"], checkpoint["normalization"]["std"]) \
        if checkpoint else channel_stats(data.train_images)
    preprocess = Preprocess(mean, std).to(device)
    net = ConvNet(len(data.classes)).to(device)
    if device.type == "cuda" or world.distributed:
        # Preprocess turns NHWC uint8 into an NCHW view that is already channels_last in memory;
        # keeping the weights channels_last too avoids a layout conversion per convolution (and
        # gives DDP's gradient buckets the layout the gradients arrive in).
        net = net.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each convolution once
    steps = steps_per_epoch(len(data.train_images) // world.world_size, rank_batch)
    optimizer = recipe.make_optimizer(list(net.parameters()), config.lr, config.weight_decay,
                                      device)
    schedule = recipe.make_schedule(optimizer, config.schedule, config.epochs * steps)
    state = _State(net, preprocess, mean, std, optimizer, schedule, TrainLog(), 0, steps, device)
    if checkpoint:
        net.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["schedule"])
        state.log, state.start_epoch = TrainLog(**checkpoint["log"]), checkpoint["epoch"]
        reporter.event("resumed", epoch=state.start_epoch,
                       checkpoint=str(checkpoint_path(run_dir)))
    return state


def _epochs(config: TrainConfig, data: Dataset, run_dir: Path, reporter: ProgressReporter,
            world: distributed.World, state: _State, step: Step,
            batches: DeviceBatches | LoaderBatches, compiled: bool,
            on_checkpoint: Callable[[], None] | None) -> tuple[ValidationMetrics, float]:
    """The epochs still to run: train, validate, log, checkpoint. Returns the last validation and
    the compile time (the first step's)."""
    net, preprocess, log = state.net, state.preprocess, state.log
    val_x = torch.from_numpy(data.val_images).to(state.device)
    val_y = torch.from_numpy(data.val_labels).to(state.device)
    validation: ValidationMetrics | None = None
    compile_seconds = 0.0
    board = (TrainingBoard(run_dir / TENSORBOARD_DIR, state.start_epoch, data,
                           run_settings(config, state.device, compiled)) if world.is_main else None)
    with board if board is not None else contextlib.nullcontext():
        for epoch in range(state.start_epoch, config.epochs):
            started = time.perf_counter()
            batch_losses, train_accuracy, first_step_s = _train_epoch(
                step, batches.epoch(epoch), config, epoch, state.steps, reporter, world)
            if epoch == state.start_epoch and compiled:
                compile_seconds = first_step_s
                reporter.event("compiled", seconds=round(first_step_s, 3), mode=config.compile_mode)
            val_losses, validation, probabilities = evaluate(net, preprocess, val_x, val_y,
                                                             data.classes, config.batch_size)
            log.training_loss_per_batch += batch_losses
            log.validation_loss_per_batch += val_losses
            log.training_accuracy_per_epoch.append(train_accuracy)
            log.validation_accuracy_per_epoch.append(validation.accuracy)
            log.epoch_seconds.append(time.perf_counter() - started)
            if board is not None:
                board.write_epoch(epoch + 1, net, state.optimizer, batch_losses, val_losses,
                                  train_accuracy, validation, probabilities)
                if epoch + 1 == config.epochs:
                    board.write_hparams(epoch + 1)
                save_checkpoint(run_dir, net, state.optimizer, state.schedule, config, epoch + 1,
                                log, state.mean, state.std, data.classes)
                if on_checkpoint is not None:
                    on_checkpoint()
            _report_epoch(reporter, epoch + 1, config.epochs, batch_losses, val_losses,
                          train_accuracy, validation, log.epoch_seconds[-1])
    if validation is None:  # resumed a run that had already finished: score it once more
        _, validation, _ = evaluate(net, preprocess, val_x, val_y, data.classes,
                                    config.batch_size)
    return validation, compile_seconds


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA by default (fp32 weights and optimiser; bf16 needs no loss scaling)."""
    if config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@dataclass
class Step:
    """One optimisation step on one batch, with the recipe applied."""

    forward: Any
    preprocess: Preprocess
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    config: TrainConfig
    device: torch.device

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the batch's loss and logits (both detached, on the device)."""
        images = recipe.augment(images, self.config.augment, generator)
        dtype = autocast_dtype(self.config, self.device)
        with torch.autocast(self.device.type, dtype=dtype or torch.float32,
                            enabled=dtype is not None):
            logits = self.forward(self.preprocess(images))
            # On logits (see ConvNet's docstring); smoothing is part of the recipe.
            loss = F.cross_entropy(logits.float(), labels,
                                   label_smoothing=self.config.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        return loss.detach(), logits.detach()


def _train_epoch(step_fn: Step, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                 config: TrainConfig, epoch: int, steps: int, reporter: ProgressReporter,
                 world: distributed.World) -> tuple[list[float], float, float]:
    """One pass over the training split; returns per-batch losses, accuracy, first-step seconds.

    Losses and correct counts stay on the device until the epoch ends: one host sync per epoch
    instead of the tutorial's `.item()` per batch. Under torchrun both are combined over ranks
    (losses averaged step by step, counts summed), so rank 0 logs the whole job's figures.
    """
    device = step_fn.device
    step_fn.forward.train()
    losses: list[torch.Tensor] = []
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    first_step_s = 0.0
    # Augmentation draws from its own generator, seeded by (seed, epoch, rank) like the batch
    # order, so a resumed run augments exactly as an uninterrupted one; each rank draws its own.
    generator = torch.Generator(device=device).manual_seed(
        config.seed * 1_000_003 + epoch + 1 + 7919 * world.rank)
    for step, (images, labels), estimate in enumerate_with_estimate(batches, steps):
        step_started = time.perf_counter()
        loss, logits = step_fn(images, labels, generator)
        losses.append(loss)
        correct += (logits.argmax(dim=1) == labels).sum()
        seen += len(labels)
        if step == 0:
            _sync(device)
            first_step_s = time.perf_counter() - step_started
        if estimate is not None:
            remaining = estimate.eta_s + (config.epochs - epoch - 1) * steps / max(estimate.rate, 1e-9)
            reporter.progress(epoch=epoch + 1, epochs=config.epochs, step=step + 1, steps=steps,
                              images_per_s=estimate.rate * config.batch_size, eta_s=remaining)
    mean_losses = distributed.all_sum(torch.stack(losses).float(), world) / world.world_size
    counts = distributed.all_sum(torch.stack([correct, torch.tensor(seen, device=device)]), world)
    return mean_losses.cpu().tolist(), counts[0].item() / counts[1].item(), first_step_s


@torch.inference_mode()
def evaluate(net: ConvNet, preprocess: Preprocess, images: torch.Tensor, labels: torch.Tensor,
             classes: tuple[str, ...], loss_batch_size: int
             ) -> tuple[list[float], ValidationMetrics, np.ndarray]:
    """Validation loss per batch (the tutorial's batch size), metrics and the softmax
    probabilities [N, C] (TensorBoard's PR curves), in eval mode.

    Runs the uncompiled module: eval mode is a different graph, and a second compilation would
    cost more than this pass on the small validation split.
    """
    was_training = net.training
    net.eval()
    logits = torch.cat([net(preprocess(images[i:i + EVAL_BATCH_SIZE]))
                        for i in range(0, len(images), EVAL_BATCH_SIZE)])
    losses = [F.cross_entropy(logits[i:i + loss_batch_size], labels[i:i + loss_batch_size])
              for i in range(0, len(labels), loss_batch_size)]
    net.train(was_training)
    predicted = logits.argmax(dim=1).cpu().numpy()
    metrics = validation_metrics(predicted, labels.cpu().numpy(), classes)
    probabilities = logits.float().softmax(dim=1).cpu().numpy()
    return torch.stack(losses).cpu().tolist(), metrics, probabilities


def save_checkpoint(run_dir: Path, net: ConvNet, optimizer: torch.optim.Optimizer,
                    schedule: torch.optim.lr_scheduler.LRScheduler, config: TrainConfig,
                    epoch: int, log: TrainLog, mean: list[float], std: list[float],
                    classes: tuple[str, ...]) -> Path:
    """Everything needed to continue after `epoch` epochs; written to a temporary file, fsync'd and
    renamed (`durable_files.replace_with`) so that a kill or a power cut mid-write leaves the
    previous checkpoint intact."""
    path = checkpoint_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "config": config.to_dict(),
        "epoch": epoch,
        "log": log.to_dict(),
        "normalization": {"mean": list(mean), "std": list(std)},
        "classes": list(classes),
    }
    replace_with(path, lambda partial: torch.save(state, partial))
    return path


def load_checkpoint(run_dir: Path, config: TrainConfig) -> dict[str, Any]:
    path = checkpoint_path(run_dir)
    if not path.is_file():
        raise ResumeError(f"nothing to resume: no checkpoint at {path}")
    # weights_only=True: a checkpoint is data, never code (no arbitrary unpickling).
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = TrainConfig.from_dict(state["config"])
    # Only the length of the run may change on resume; anything else would silently train a
    # different model than the checkpoint's first epochs did.
    mismatched = [k for k, v in saved.to_dict().items()
                  if k not in RESUMABLE_CHANGES and v != config.to_dict()[k]]
    if mismatched:
        raise ResumeError(f"checkpoint {path} was made with different {', '.join(mismatched)}; "
                          "start a new run directory instead")
    return state


def _report_epoch(reporter: ProgressReporter, epoch: int, epochs: int, batch_losses: list[float],
                  val_losses: list[float], train_accuracy: float, validation: ValidationMetrics,
                  seconds: float) -> None:
    metrics = {
        "train_loss": round(float(np.mean(batch_losses)), 6),
        "val_loss": round(float(np.mean(val_losses)), 6),
        "train_accuracy": round(train_accuracy, 6),
        "val_accuracy": round(validation.accuracy, 6),
    }
    if not all(math.isfinite(v) for v in metrics.values()):
        raise FloatingPointError(f"training diverged at epoch {epoch}: {metrics}")
    reporter.event("epoch", epoch=epoch, epochs=epochs, seconds=round(seconds, 3), **metrics)
    reporter.line(f"epoch {epoch}/{epochs}  train loss {metrics['train_loss']:.4f} "
                  f"acc {train_accuracy:.3f}  val loss {metrics['val_loss']:.4f} "
                  f"acc {validation.accuracy:.3f}  ({seconds:.1f}s)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
