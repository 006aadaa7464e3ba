"""Export the trained ConvNet to one self-contained ONNX file and prove it computes the same thing.

The exported graph is `ServingModel`: uint8 pixels [N, 32, 32, 3] (NHWC, RGB; the layout images
already have in memory and on the wire) -> normalisation -> ConvNet -> softmax [N, classes], with a
dynamic batch dimension. It is exported from the *uncompiled* module in eval mode: BatchNorm uses
its running statistics and no torch.compile artefacts leak into the graph.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from convserve.contracts.errors import ExportError
from convserve.contracts.model_metadata import METADATA_PREFIX
from convserve.contracts.model_signature import SIGNATURE
from convserve.store.durable_files import replace_with
from convserve.training.model import ConvNet, Preprocess, ServingModel
from convserve.training.onnx_eval import OnnxClassifier

INPUT_NAME = SIGNATURE.input_name     # the graph's names (contracts/model_signature.py)
OUTPUT_NAME = SIGNATURE.output_name
OPSET = 18
PARITY_TOLERANCE = 1e-5
PACKAGES = ("torch", "torchvision", "onnx", "onnxscript", "onnxruntime-gpu", "numpy")



@dataclass(frozen=True)
class ParityReport:
    images: int
    max_abs_diff: float
    argmax_equal: bool
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.argmax_equal

    def to_dict(self) -> dict[str, Any]:
        return {**vars(self), "passed": self.passed}


def serving_model(net: ConvNet, preprocess: Preprocess) -> ServingModel:
    """The CPU, eval-mode serving graph (copies nothing the caller keeps training)."""
    return ServingModel(preprocess, net).to("cpu").eval()


def export_onnx(model: ServingModel, path: Path, metadata: dict[str, Any]) -> Path:
    """Write `model` to `path` as one ONNX file carrying `metadata` in its metadata_props."""
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, *SIGNATURE.image_shape, dtype=getattr(torch, SIGNATURE.input_dtype))
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        program = torch.onnx.export(
            model, (example,), dynamo=True, verbose=False, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], opset_version=OPSET,
            dynamic_shapes=({0: batch},), optimize=True)  # forward's one argument: batch is free
    except Exception as error:  # the exporter raises many types; all mean "no file"
        raise ExportError(f"ONNX export failed: {type(error).__name__}: {error}") from error
    if program is None:  # only the legacy (TorchScript) exporter returns nothing
        raise ExportError("ONNX export produced no program")
    proto = program.model_proto
    for key, value in sorted(metadata.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, json.dumps(value, sort_keys=True)
    onnx.checker.check_model(proto, full_check=True)
    # Weights inline (no external .data file): the 0.8 MB model is one self-contained artifact;
    # written to a temporary name, fsync'd and renamed (`durable_files`): all or nothing.
    replace_with(path, lambda partial: onnx.save_model(proto, str(partial), format="protobuf",
                                                       save_as_external_data=False))
    return path


@torch.inference_mode()
def torch_probabilities(model: ServingModel, images: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(images)).numpy()


def check_parity(model: ServingModel, onnx_path: Path, images: np.ndarray,
                 tolerance: float = PARITY_TOLERANCE) -> ParityReport:
    """Run the exported file in ONNX Runtime and the torch model on the same images."""
    expected = torch_probabilities(model, images)
    actual = OnnxClassifier(onnx_path).probabilities(images)
    if actual.shape != expected.shape:
        raise ExportError(f"ONNX output shape {actual.shape} != torch output shape {expected.shape}")
    return ParityReport(
        images=len(images),
        max_abs_diff=float(np.max(np.abs(actual - expected))),
        argmax_equal=bool(np.array_equal(actual.argmax(axis=1), expected.argmax(axis=1))),
        tolerance=tolerance,
    )


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(cwd: Path | None = None) -> str:
    """The source commit the model was trained from ("unknown" outside a git checkout)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent,
                                capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = result.stdout.strip()
    if result.returncode != 0 or not commit:
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=cwd or Path(__file__).parent, capture_output=True, text=True,
                           timeout=5, check=False).stdout.strip()
    return commit + ("-dirty" if dirty else "")
