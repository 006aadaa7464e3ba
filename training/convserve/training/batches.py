"""Where the training step's batches come from: the device-resident split, or a DataLoader.

- `DeviceBatches` (the fast path): the whole uint8 split is moved to the device once and each
  batch is one index into it: no host work and no copy per step.
- `LoaderBatches` (the plain path, for splits too large for the device's memory): a
  `torch.utils.data.DataLoader` with worker processes and pinned memory gathers each batch on the
  host, and the batch is copied to the device without blocking.

Both draw the same images in the same order: the epoch's permutation depends only on (seed,
epoch) and, under torchrun, each rank takes its own shard of it (`epoch_batches`). So a resumed
run sees exactly the batches an uninterrupted one would have, and the two paths train the same
model (tests/training/test_recipe.py checks they agree).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from convserve.contracts.spec import TrainConfig
from convserve.training import distributed

Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 images [B, 32, 32, 3], int64 labels [B]


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    # Full batches only (when there is at least one): every step has the same shape, so a
    # compiled graph is captured once; the reshuffle each epoch still visits every image.
    return max(1, n_train // batch_size)


def epoch_batches(n_train: int, batch_size: int, seed: int, epoch: int, device: torch.device,
                  world: distributed.World | None = None) -> Iterator[torch.Tensor]:
    """Index batches for one epoch of this rank: a permutation that depends only on (seed, epoch),
    sharded across ranks (every rank draws the same permutation)."""
    world = world or distributed.World()
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = distributed.shard(torch.randperm(n_train, generator=generator), world).to(device)
    for step in range(steps_per_epoch(n_train // world.world_size, batch_size)):
        yield order[step * batch_size:(step + 1) * batch_size]


class DeviceBatches:
    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                 world: distributed.World, device: torch.device) -> None:
        self._images = torch.from_numpy(images).to(device)
        self._labels = torch.from_numpy(labels).to(device)
        self._batch_size, self._seed, self._world = batch_size, seed, world
        self.steps = steps_per_epoch(len(labels) // world.world_size, batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        for index in epoch_batches(len(self._labels), self._batch_size, self._seed, epoch,
                                   self._images.device, self._world):
            yield self._images[index], self._labels[index]


class _EpochOrder(Sampler[list[int]]):
    """A batch sampler yielding `epoch_batches`' index batches for the epoch set last."""

    def __init__(self, n_train: int, batch_size: int, seed: int, world: distributed.World) -> None:
        self.n_train, self.batch_size, self.seed, self.world = n_train, batch_size, seed, world
        self.epoch = 0

    def __iter__(self) -> Iterator[list[int]]:
        for index in epoch_batches(self.n_train, self.batch_size, self.seed, self.epoch,
                                   torch.device("cpu"), self.world):
            yield index.tolist()

    def __len__(self) -> int:
        return steps_per_epoch(self.n_train // self.world.world_size, self.batch_size)


class _Arrays(torch.utils.data.Dataset):
    """Images and labels in host memory; `__getitems__` gathers a whole batch in one indexing."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Batch:
        return torch.from_numpy(self.images[index]), torch.tensor(int(self.labels[index]))

    def __getitems__(self, indices: list[int]) -> Batch:
        return torch.from_numpy(self.images[indices]), torch.from_numpy(self.labels[indices])


def _whole_batch(batch: Any) -> Any:
    return batch  # `__getitems__` already returns the collated batch (a Batch)


class LoaderBatches:
    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                 world: distributed.World, device: torch.device, workers: int) -> None:
        self._order = _EpochOrder(len(labels), batch_size, seed, world)
        self._device = device
        self._loader = DataLoader(_Arrays(images, labels), batch_sampler=self._order,
                                  collate_fn=_whole_batch, num_workers=workers,
                                  pin_memory=device.type == "cuda",
                                  persistent_workers=workers > 0)
        self.steps = len(self._order)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        self._order.epoch = epoch  # read by the sampler in this process, not in the workers
        for images, labels in self._loader:
            yield (images.to(self._device, non_blocking=True),
                   labels.to(self._device, non_blocking=True))


def use_loader(config: TrainConfig, images: np.ndarray, device: torch.device) -> bool:
    """The DataLoader path when asked for, or ("auto") on CUDA when the split takes more than
    half of the device's free memory; on CPU the split is already in memory: index it."""
    if config.loader != "auto":
        return config.loader == "dataloader"
    if device.type != "cuda":
        return False
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return images.nbytes > free_bytes // 2


def training_batches(config: TrainConfig, images: np.ndarray, labels: np.ndarray,
                     batch_size: int, world: distributed.World, device: torch.device
                     ) -> DeviceBatches | LoaderBatches:
    if use_loader(config, images, device):
        return LoaderBatches(images, labels, batch_size, config.seed, world, device,
                             config.loader_workers)
    return DeviceBatches(images, labels, batch_size, config.seed, world, device)
