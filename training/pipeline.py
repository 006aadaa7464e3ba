"""One training run from configuration to a parity-checked ONNX model and its card.

Run directory layout (also a job directory of the model store, later):
    config.json         the TrainConfig as run
    events.jsonl        progress events (JSON lines) a parent process can follow
    tensorboard/        SummaryWriter scalars
    checkpoints/last.pt the last finished epoch (resume point)
    log.json            the tutorial's log_dict (per-batch losses, per-epoch accuracies)
    model.onnx          the exported serving graph
    card.json           what the model is and how good it is
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.data import Dataset, load_dataset
from training.export import (
    INPUT_LAYOUT,
    INPUT_NAME,
    OUTPUT_NAME,
    ExportError,
    ParityReport,
    check_parity,
    export_onnx,
    git_commit,
    package_versions,
    serving_model,
)
from training.metrics import ValidationMetrics
from training.onnx_eval import OnnxClassifier
from training.progress import ProgressReporter
from training.train import TrainResult, train

MODEL_FILE = "model.onnx"
CARD_FILE = "card.json"


@dataclass(frozen=True)
class RunOutcome:
    run_dir: Path
    model_path: Path
    card: dict[str, Any]
    parity: ParityReport
    onnx_validation: ValidationMetrics


def run(config: TrainConfig, run_dir: Path, reporter: ProgressReporter, *,
        resume: bool = False) -> RunOutcome:
    """Train, export, check parity and score the exported file; raises ExportError on a mismatch
    (after writing the card, so the failed candidate can be inspected)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", config.to_dict())
    reporter.event("state", state="LOADING_DATA", dataset=config.dataset)
    data = load_dataset(config.dataset, config.datasets_path, download=config.download,
                        seed=config.seed, val_fraction=config.val_fraction)
    reporter.event("state", state="TRAINING", device=config.device, epochs=config.epochs,
                   train_images=len(data.train_labels), val_images=len(data.val_labels))
    result = train(config, data, run_dir, reporter, resume=resume)
    write_json(run_dir / "log.json", result.log.to_dict())

    reporter.event("state", state="EXPORTING")
    model = serving_model(result.net, result.preprocess)
    metadata = model_metadata(config, data, result)
    model_path = export_onnx(model, run_dir / MODEL_FILE, metadata)
    parity = check_parity(model, model_path, data.val_images)
    onnx_validation = OnnxClassifier(model_path).score(data.val_images, data.val_labels)
    card = build_card(metadata, result, parity, onnx_validation)
    write_json(run_dir / CARD_FILE, card)
    reporter.event("exported", model=str(model_path), parity=parity.to_dict(),
                   onnx_val_accuracy=onnx_validation.accuracy)
    if not parity.passed:
        raise ExportError(
            f"ONNX parity check failed on {parity.images} validation images: max |p_onnx - "
            f"p_torch| = {parity.max_abs_diff:.3g} (limit {parity.tolerance:g}), argmax equal: "
            f"{parity.argmax_equal}; the candidate is kept in {run_dir} for inspection")
    return RunOutcome(run_dir, model_path, card, parity, onnx_validation)


def model_metadata(config: TrainConfig, data: Dataset, result: TrainResult) -> dict[str, Any]:
    """What travels inside the ONNX file (metadata_props) and heads the card."""
    return {
        "classes": list(data.classes),
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": INPUT_LAYOUT,
                  "shape": [-1, 32, 32, 3], "channel_order": "RGB"},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [-1, len(data.classes)],
                   "meaning": "softmax probabilities"},
        "normalization": {"mean": result.mean, "std": result.std,
                          "formula": "(pixel/255 - mean) / std, per RGB channel"},
        "dataset": data.describe(),
        "training_config": config.to_dict(),
        "metrics": {"torch_val_accuracy": result.validation.accuracy,
                    "train_accuracy": result.log.training_accuracy_per_epoch[-1]},
        "versions": package_versions(),
        "git_commit": git_commit(),
    }


def build_card(metadata: dict[str, Any], result: TrainResult, parity: ParityReport,
               onnx_validation: ValidationMetrics) -> dict[str, Any]:
    validation = onnx_validation.to_dict()
    return {
        **metadata,
        "model_file": MODEL_FILE,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "metrics": {
            **metadata["metrics"],
            "onnx_val_accuracy": onnx_validation.accuracy,
            "val_images": int(onnx_validation.confusion.sum()),
            "per_class": validation["per_class"],
            "confusion_matrix": validation["confusion_matrix"],
        },
        "training": {
            "epochs": result.epochs_completed,
            "train_seconds": round(result.train_seconds, 3),
            "compile_seconds": round(result.compile_seconds, 3),
            "compiled": result.compiled,
            "device": result.device,
            "validation_accuracy_per_epoch": result.log.validation_accuracy_per_epoch,
            "training_accuracy_per_epoch": result.log.training_accuracy_per_epoch,
        },
        "parity": parity.to_dict(),
    }


def write_json(path: Path, value: Any) -> None:
    """Write-then-rename: a reader (another process tailing the run) never sees half a file."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(value, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(partial, path)


def summary(outcome: RunOutcome, started: float) -> str:
    card = outcome.card
    metrics, training = card["metrics"], card["training"]
    return "\n".join([
        f"model:      {outcome.model_path}",
        f"card:       {outcome.run_dir / CARD_FILE}",
        f"dataset:    {card['dataset']['name']} ({metrics['val_images']} validation images, "
        f"{len(card['classes'])} classes)",
        f"accuracy:   {metrics['onnx_val_accuracy']:.4f} by ONNX Runtime, "
        f"{metrics['torch_val_accuracy']:.4f} by torch (validation split)",
        f"parity:     max |p_onnx - p_torch| = {outcome.parity.max_abs_diff:.2g}, "
        f"argmax equal: {outcome.parity.argmax_equal}",
        f"training:   {training['epochs']} epochs in {training['train_seconds']:.1f} s on "
        f"{training['device']}" + (f" (compile {training['compile_seconds']:.1f} s)"
                                   if training["compiled"] else ""),
        f"total:      {time.perf_counter() - started:.1f} s",
        f"tensorboard: tensorboard --logdir {outcome.run_dir / 'tensorboard'}",
    ])
