"""Scoring an exported model with ONNX Runtime: the artifact that is served, not the torch module.

numpy + onnxruntime only. The parity check and the promotion gate both score through here, on the
CPU provider with a fixed thread count, so a decision does not depend on which GPU a job ran on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from convserve.contracts.model_metadata import read_metadata
from convserve.training.metrics import ValidationMetrics, validation_metrics

SCORING_BATCH_SIZE = 1024


class OnnxClassifier:
    """An ONNX Runtime session over one exported model file, with its convserve metadata."""

    def __init__(self, path: Path, *, threads: int = 0) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (one per core)
        options.log_severity_level = 3  # errors only: CUDA-library warnings are noise on CPU hosts
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name
        self.metadata = read_metadata(self.session.get_modelmeta().custom_metadata_map)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.metadata.get("classes", ()))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Softmax probabilities [N, classes] for uint8 NHWC images, scored in fixed-size chunks."""
        chunks = [self.session.run(None, {self._input: images[i:i + SCORING_BATCH_SIZE]})[0]
                  for i in range(0, len(images), SCORING_BATCH_SIZE)]
        return np.concatenate(chunks)

    def score(self, images: np.ndarray, labels: np.ndarray) -> ValidationMetrics:
        predicted = self.probabilities(images).argmax(axis=1)
        return validation_metrics(predicted, labels, self.classes)
