"""One training run from configuration to a parity-checked ONNX model and its card.

Run directory layout (also a job directory of the model store, later):
    config.json         the TrainConfig as run
    events.jsonl        progress events (JSON lines) a parent process can follow
    tensorboard/        SummaryWriter scalars
    checkpoints/last.pt the last finished epoch (resume point)
    log.json            the tutorial's log_dict (per-batch losses, per-epoch accuracies)
    model.onnx          the exported serving graph (the candidate)
    card.json           what the model is, how good it is, and the gate's decision

With a model store the candidate then goes through the gate (`convserve.training.gate`) and, if promoted,
is published as the store's next immutable version; a rejected one stays here for inspection.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from convserve.contracts.errors import ExportError, StoreError, Unavailable
from convserve.contracts.gate_policy import GatePolicy
from convserve.contracts.job_state import Phase
from convserve.contracts.model_card import GateDecision
from convserve.contracts.model_signature import SIGNATURE
from convserve.contracts.spec import TrainConfig
from convserve.store.base import ModelStore, PublishResult
from convserve.store.durable_files import replace_file
from convserve.store.job_dir import CARD_FILE, MODEL_FILE, job_artifacts
from convserve.training import distributed, gate
from convserve.training.data import Dataset, load_dataset
from convserve.training.export import (
    ParityReport,
    check_parity,
    export_onnx,
    git_commit,
    package_versions,
    serving_model,
)
from convserve.training.metrics import ValidationMetrics
from convserve.training.onnx_eval import OnnxClassifier
from convserve.training.progress import ProgressReporter
from convserve.training.train import TrainResult, train

log = logging.getLogger("convserve.training")

@dataclass(frozen=True)
class Publication:
    """Where and under which rules a finished candidate is gated and published."""

    store: ModelStore
    policy: GatePolicy
    actor: str                 # "job:<id>" for service jobs, "cli:<user>" for offline runs
    job_id: str | None = None
    # A job's fence: raises ClaimLost once another attempt holds the job (its job store's
    # JobStore.fence), called under the store's lock right before publishing. None: unfenced.
    fence: Callable[[], None] | None = None


@dataclass(frozen=True)
class RunOutcome:
    run_dir: Path
    model_path: Path
    card: dict[str, Any]
    parity: ParityReport
    onnx_validation: ValidationMetrics
    published: PublishResult | None = None  # None when no store was given


def run(config: TrainConfig, run_dir: Path, reporter: ProgressReporter, *,
        resume: bool = False, publication: Publication | None = None,
        world: distributed.World | None = None) -> RunOutcome | None:
    """Train, export, check parity, score the exported file and, with a store, gate and publish.

    Raises ExportError on a parity mismatch, after writing the card (with the gate's rejection
    when a store was given) so that the failed candidate can be inspected. Under torchrun, ranks
    other than 0 only train, and return None."""
    world = world or distributed.World()
    run_dir.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        write_json(run_dir / "config.json", config.to_dict())
    reporter.event("state", state=Phase.LOADING_DATA, dataset=config.dataset)
    data = load_dataset(config.dataset, config.datasets_path, download=config.download,
                        seed=config.seed, val_fraction=config.val_fraction)
    reporter.event("state", state=Phase.TRAINING, device=config.device, epochs=config.epochs,
                   train_images=len(data.train_labels), val_images=len(data.val_labels))
    result = train(config, data, run_dir, reporter, resume=resume, world=world,
                   on_checkpoint=_job_files_saver(publication, run_dir))
    if not world.is_main:
        return None
    write_json(run_dir / "log.json", result.log.to_dict())

    reporter.event("state", state=Phase.EXPORTING)
    model = serving_model(result.net, result.preprocess)
    metadata = model_metadata(config, data, result)
    model_path = export_onnx(model, run_dir / MODEL_FILE, metadata)
    parity = check_parity(model, model_path, data.val_images)
    onnx_validation = OnnxClassifier(model_path).score(data.val_images, data.val_labels)
    card = build_card(metadata, result, parity, onnx_validation)
    reporter.event("exported", model=str(model_path), parity=parity.to_dict(),
                   onnx_val_accuracy=onnx_validation.accuracy)
    published = None
    if publication is not None:
        reporter.event("state", state=Phase.GATING)
        published = gate_and_publish(publication, model_path, card, parity, onnx_validation, data)
        card = {**card, "gate": published.decision.to_dict(), "version": published.version}
        reporter.event("gate", **published.decision.to_dict(), version=published.version)
    write_json(run_dir / CARD_FILE, card)
    if not parity.passed:
        raise ExportError(
            f"ONNX parity check failed on {parity.images} validation images: max |p_onnx - "
            f"p_torch| = {parity.max_abs_diff:.3g} (limit {parity.tolerance:g}), argmax equal: "
            f"{parity.argmax_equal}; the candidate is kept in {run_dir} for inspection")
    return RunOutcome(run_dir, model_path, card, parity, onnx_validation, published)


def _job_files_saver(publication: Publication | None, run_dir: Path) -> Callable[[], None] | None:
    """After each epoch, a job's checkpoint and TensorBoard files go where another trainer
    resumes from them (the S3 store's jobs/<id>/; nothing to do for a directory store). A store
    that is down does not stop training: the next epoch saves them again."""
    if publication is None or publication.job_id is None:
        return None
    store, job_id = publication.store, publication.job_id

    def save() -> None:
        try:
            store.save_job_files(job_id, run_dir, job_artifacts(run_dir))
        except (StoreError, Unavailable) as error:
            log.warning("could not save the checkpoint to the model store (the next epoch "
                        "tries again): %s", error)

    return save


def gate_and_publish(publication: Publication, model_path: Path, card: dict[str, Any],
                     parity: ParityReport, onnx_validation: ValidationMetrics,
                     data: Dataset) -> PublishResult:
    """Run the gate under the store's lock and publish the candidate if it passes.

    A failed parity check is decided without touching the store: nothing about the champion can
    make a mismatched export servable."""
    if not parity.passed:
        decision = gate.evaluate(publication.policy, parity, data.classes, onnx_validation, None)
        return PublishResult(promoted=False, version=None,
                             previous=publication.store.promoted_version(),
                             decision=decision)
    decide = gate.decide_against(publication.store, publication.policy, parity, data.classes,
                                 onnx_validation, data.val_images, data.val_labels)
    if publication.fence is not None:
        publication.fence()  # first outside the store's lock: any wait for the job store is here

    def fenced(champion: int | None) -> GateDecision:
        # Under the store's lock: an attempt whose job was taken over never publishes, however
        # late it gets here (its trainer hung past the heartbeat while it kept training).
        if publication.fence is not None:
            publication.fence()
        return decide(champion)

    return publication.store.publish(model_path, card, fenced, actor=publication.actor,
                                     job_id=publication.job_id)


def model_metadata(config: TrainConfig, data: Dataset, result: TrainResult) -> dict[str, Any]:
    """What travels inside the ONNX file (metadata_props) and heads the card."""
    return {
        "classes": list(data.classes),
        "input": SIGNATURE.card_input(),
        "output": {**SIGNATURE.card_output(len(data.classes)), "meaning": "softmax probabilities"},
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
    """Write-then-rename, fsync'd (`durable_files`): a reader (another process tailing the run)
    never sees half a file, and a crash leaves the old file or the new."""
    replace_file(path, json.dumps(value, indent=2, allow_nan=False) + "\n")


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
        *_gate_lines(outcome),
        f"total:      {time.perf_counter() - started:.1f} s",
        f"tensorboard: tensorboard --logdir {outcome.run_dir / 'tensorboard'}",
    ])


def _gate_lines(outcome: RunOutcome) -> list[str]:
    if outcome.published is None:
        return []
    published = outcome.published
    verdict = (f"PROMOTED as version {published.version}" if published.promoted
               else "REJECTED (the served model is unchanged; candidate kept in the run dir)")
    return [f"gate:       {verdict}", f"            {published.decision.reason}"]
