"""Training benchmark: the tutorial's loop against convserve's, in one process, on the same data.

    .venv/bin/python benchmarks/train.py [--train-images 5000] [--epochs 3] [--device auto]
                                         [--batch-size 64] [--out FILE]

Both loops train the same ConvNet on the same synthetic CIFAR-shaped images (`synthetic:<n>`).

- tutorial: the seed's loop as it is written: a `DataLoader` (batch 64, no workers) over a dataset
  that turns each uint8 image into a PIL image and through `transforms.ToTensor()` (what
  torchvision's CIFAR10 does per item), the model ending in softmax, `loss.item()` every batch,
  then a training-accuracy pass, a validation pass and a validation-accuracy pass, eager.
- convserve: `convserve.training.train.train` with its defaults (data on the device once, on-device
  augmentation, compiled step on CUDA, metrics kept on the device), TensorBoard and checkpoints
  included, at `--batch-size`.

Reported per loop: epoch images/s (training images / wall time of a whole epoch as the loop runs
it, steady state: epochs after the first), their ratio, compile time (convserve's first step), and
peak memory (CUDA: allocator peak; CPU: the process's peak RSS after the loop, cumulative).
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from convserve.contracts.spec import TrainConfig  # noqa: E402
from convserve.training.data import Dataset, load_dataset  # noqa: E402
from convserve.training.model import ConvNet  # noqa: E402
from convserve.training.progress import ProgressReporter  # noqa: E402
from convserve.training.train import resolve_device, train  # noqa: E402


class TutorialImages(torch.utils.data.Dataset):
    """Per item: uint8 HWC -> PIL image -> ToTensor (float CHW in [0, 1]), like CIFAR10's."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels
        self.transform = transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


class TutorialNet(ConvNet):
    """The tutorial's forward: the ConvNet, then softmax (its bug, kept: this is its loop)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(super().forward(x), dim=1)


def tutorial_epoch(network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   train_loader: DataLoader, val_loader: DataLoader,
                   device: torch.device) -> None:
    """One epoch of the seed's `ConvolutionalNeuralNet.train`, statement for statement."""
    loss_function = torch.nn.CrossEntropyLoss()

    def accuracy(loader: DataLoader) -> float:
        network.eval()
        correct = total = 0
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            predictions = torch.argmax(network(images), dim=1)
            correct += sum(predictions == labels).item()  # the tutorial's Python sum
            total += len(images)
        return round(correct / total, 3)

    network.train()
    for images, labels in train_loader:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad()
        loss = loss_function(network(images), labels)
        loss.item()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy(train_loader)
    network.eval()
    with torch.no_grad():
        for images, labels in val_loader:
            images, labels = images.to(device), labels.to(device)
            loss_function(network(images), labels).item()
        accuracy(val_loader)
    network.train()  # the tutorial leaves eval mode on; training needs train mode next epoch


def run_tutorial(data: Dataset, epochs: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    network = TutorialNet(len(data.classes)).to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    train_loader = DataLoader(TutorialImages(data.train_images, data.train_labels), 64)
    val_loader = DataLoader(TutorialImages(data.val_images, data.val_labels), 64)
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        tutorial_epoch(network, optimizer, train_loader, val_loader, device)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return {"epoch_seconds": seconds, "compile_seconds": 0.0}


def run_convserve(data: Dataset, epochs: int, device: torch.device, batch_size: int,
                  tmp: Path) -> dict:
    config = TrainConfig(dataset=data.name, epochs=epochs, batch_size=batch_size,
                         device=str(device))
    reporter = ProgressReporter(tmp / "events.jsonl")
    try:
        result = train(config, data, tmp / "run", reporter)
    finally:
        reporter.close()
    return {"epoch_seconds": result.log.epoch_seconds, "compile_seconds": result.compile_seconds,
            "compiled": result.compiled, "val_accuracy": result.validation.accuracy}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def steady_images_per_s(n_train: int, seconds: list[float]) -> float:
    steady = seconds[1:] or seconds  # the first epoch pays compile and warm-up
    return n_train / (sum(steady) / len(steady))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=3, help="per loop; the first is warm-up")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64, help="convserve's batch size")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs: expected at least 2 (the first epoch is warm-up)")

    device = resolve_device(args.device)
    # val_fraction 0.2 of n: the synthetic source makes n training images and n/4 validation.
    data = load_dataset(f"synthetic:{args.train_images}", "datasets", seed=0)
    n_train = len(data.train_labels)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in (("tutorial", lambda: run_tutorial(data, args.epochs, device)),
                          ("convserve", lambda: run_convserve(data, args.epochs, device,
                                                              args.batch_size, Path(tmp)))):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            result = run()
            result["images_per_s"] = steady_images_per_s(n_train, result["epoch_seconds"])
            result["peak_mb"] = peak_memory_mb(device)
            rows[name] = result
    table = report(rows, args, device, n_train)
    print(table)
    if args.out:
        args.out.write_text(table)


def report(rows: dict, args: argparse.Namespace, device: torch.device, n_train: int) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU, {torch.get_num_threads()} threads")
    ratio = rows["convserve"]["images_per_s"] / rows["tutorial"]["images_per_s"]
    memory = "CUDA allocator peak" if device.type == "cuda" else "process peak RSS after the loop"
    lines = [
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; device: {name}; torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        f"command: .venv/bin/python benchmarks/train.py --train-images {args.train_images} "
        f"--epochs {args.epochs} --device {args.device} --batch-size {args.batch_size}",
        "",
        f"| loop | batch | epoch images/s (steady) | epoch seconds | compile s | {memory} MB |",
        "|---|---|---|---|---|---|",
    ]
    for loop, batch in (("tutorial", 64), ("convserve", args.batch_size)):
        r = rows[loop]
        lines.append(f"| {loop} | {batch} | {r['images_per_s']:,.0f} | "
                     f"{', '.join(f'{s:.2f}' for s in r['epoch_seconds'])} | "
                     f"{r['compile_seconds']:.2f} | {r['peak_mb']:,.0f} |")
    lines += ["", f"ratio convserve / tutorial: {ratio:.2f} ({n_train} training images, "
                  f"convserve compiled: {rows['convserve']['compiled']})"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
