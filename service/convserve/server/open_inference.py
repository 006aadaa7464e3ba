"""The Open Inference Protocol's (KServe v2) model, behind both of its transports (gRPC:
open_inference_grpc.py, HTTP: open_inference_http.py): which model and version a request names,
its metadata and Triton-style config, readiness, statistics, and ModelInfer itself, through the
same validation (codec), Predictor and status map as Predict.

One model, named `--model-name` (default "convserve"). Version "" is the promoted model; "N" pins
version N of the store (loaded on first use); any other version is NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convserve.contracts.commands import package_version
from convserve.contracts.errors import InvalidInput, NoModel, NotFound
from convserve.contracts.model_signature import SIGNATURE
from convserve.serving import codec, tensors
from convserve.serving.predictor import Predictor
from convserve.store.base import ModelStore

PLATFORM = "onnxruntime_onnx"
# ModelStatistics answers, but "statistics" is not advertised: perf_analyzer then reads it every
# window and expects Triton's queue/compute breakdown, which this server does not time separately.
EXTENSIONS = ("classification", "model_configuration", "binary_tensor_data", "model_repository")
INLINE_BYTES = 1 << 20  # larger inputs are converted in the decode pool, off the event loop


@dataclass(frozen=True)
class Input:
    """One input tensor as a transport received it: raw bytes or typed values."""

    name: str
    datatype: str
    shape: Sequence[int]
    data: bytes | None = None
    values: object = None


@dataclass(frozen=True)
class Requested:
    """One requested output; `classification` is the extension's parameter, when given."""

    name: str
    classification: object = None


@dataclass(frozen=True)
class Output:
    name: str
    datatype: str                     # "FP32" (probabilities) or "BYTES" (classification)
    shape: list[int]
    floats: np.ndarray | None = None  # FP32, C order
    strings: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class Inferred:
    version: int
    outputs: list[Output]


@dataclass
class Statistics:
    """Counted where ModelInfer enters (both transports), per version that served."""

    inference_count: int = 0          # images
    execution_count: int = 0          # calls
    success_count: int = 0
    success_ns: int = 0
    last_inference_ms: int = 0


class OpenInference:
    def __init__(self, model_name: str, store: ModelStore, predictor: Predictor,
                 limits: codec.Limits, decode_pool: Executor | None = None,
                 batch_timeout_s: float = 0.0) -> None:
        self.model_name = model_name
        self.store = store
        self.limits = limits
        self.batch_timeout_s = batch_timeout_s
        self._predictor = predictor
        self._decode_pool = decode_pool
        self.draining = False  # set when the server stops: not ready any more
        self.failures = 0
        self.failure_ns = 0
        self.statistics: dict[int, Statistics] = {}

    # --- which model ---------------------------------------------------------------------------

    def version(self, name: str, version: str) -> int:
        """0 for the promoted model, N for a pinned version; NOT_FOUND otherwise."""
        if name != self.model_name:
            raise NotFound(f"unknown model {name!r}: this server serves {self.model_name!r}")
        if not version:
            return 0
        if not version.isdigit() or int(version) not in self.store.versions():
            raise NotFound(f"model {name!r} has no version {version!r}; versions: "
                           f"{', '.join(map(str, self.store.versions())) or 'none'}")
        return int(version)

    def live_version(self) -> int | None:
        return self._predictor.manager.live_version

    def server_ready(self) -> bool:
        """A model is live and the server is not draining (as grpc.health's SERVING)."""
        return not self.draining and self.live_version() is not None

    def ready(self, name: str, version: str) -> bool:
        try:
            return not self.draining and bool(self.version(name, version) or self.live_version())
        except NotFound:
            return False

    def served_version(self, name: str, version: str) -> int:
        """The version a metadata call describes: the pinned one, else the live one."""
        number = self.version(name, version) or self.live_version()
        if not number:
            raise NoModel("no model is promoted yet: train one (Train) or promote a version")
        return number

    def classes(self, version: int) -> tuple[str, ...]:
        """The live model's own (in memory: what it serves), else the version's card's."""
        if version == self.live_version():
            return self._predictor.manager.current().classes
        return self.store.model_card(version).classes

    def versions(self) -> list[str]:
        return [str(v) for v in self.store.versions()]

    # --- what the protocol reports, in its JSON form (gRPC parses the same into its messages) --

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "convserve", "version": package_version(),
                "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, version: str) -> dict[str, Any]:
        classes = self.classes(self.served_version(name, version))
        return {"name": self.model_name, "versions": self.versions(), "platform": PLATFORM,
                "inputs": [{"name": SIGNATURE.input_name, "datatype": SIGNATURE.input_datatype,
                            "shape": list(SIGNATURE.input_shape)}],
                "outputs": [{"name": SIGNATURE.output_name, "datatype": SIGNATURE.output_datatype,
                             "shape": list(SIGNATURE.output_shape(len(classes)))}]}

    def model_config(self, name: str, version: str) -> dict[str, Any]:
        """Triton's model configuration: what perf_analyzer and tritonclient read. FP32 in
        [0, 1] is accepted too (as by Predict); the config states the native input."""
        classes = self.classes(self.served_version(name, version))
        return {"name": self.model_name, "platform": PLATFORM, "backend": "onnxruntime",
                "max_batch_size": self.limits.max_images,
                "input": [{"name": SIGNATURE.input_name, "data_type": SIGNATURE.triton_input_type,
                           "format": SIGNATURE.triton_format, "dims": list(SIGNATURE.image_shape)}],
                "output": [{"name": SIGNATURE.output_name, "data_type": SIGNATURE.triton_output_type,
                            "dims": [len(classes)]}],
                "dynamic_batching": {
                    "max_queue_delay_microseconds": round(self.batch_timeout_s * 1e6)}}

    def model_statistics(self, name: str, version: str) -> dict[str, Any]:
        wanted = self.version(name, version) if name else 0
        return {"model_stats": [
            {"name": self.model_name, "version": str(number),
             "last_inference": counted.last_inference_ms,
             "inference_count": counted.inference_count,
             "execution_count": counted.execution_count,
             "inference_stats": {
                 "success": {"count": counted.success_count, "ns": counted.success_ns},
                 "fail": {"count": self.failures, "ns": self.failure_ns}}}
            for number, counted in sorted(self.statistics.items())
            if not wanted or number == wanted]}

    def repository_index(self, ready_only: bool) -> list[dict[str, str]]:
        live = str(self.live_version())
        models = [{"name": self.model_name, "version": v,
                   "state": "READY" if v == live else "UNAVAILABLE",
                   "reason": "" if v == live else "not the promoted version; loads when a "
                                                  "request pins it"}
                  for v in self.versions()]
        return [m for m in models if m["state"] == "READY"] if ready_only else models

    # --- ModelInfer ----------------------------------------------------------------------------

    async def infer(self, name: str, version: str, inputs: Sequence[Input],
                    requested: Sequence[Requested]) -> Inferred:
        started = time.perf_counter_ns()
        try:
            # A pinned version is looked up in the store (a directory listing): off the loop, as
            # Predict's pinned calls are; the promoted one needs no lookup.
            number = (await asyncio.to_thread(self.version, name, version) if version
                      else self.version(name, version))
            pixels = await self._pixels(inputs)
            model, probabilities = await self._predictor.predict(pixels, number)
            outputs = self._outputs(probabilities, model.classes, requested)
        except BaseException:
            self.failures += 1
            self.failure_ns += time.perf_counter_ns() - started
            raise
        stats = self.statistics.setdefault(model.version, Statistics())
        stats.inference_count += len(pixels)
        stats.execution_count += 1
        stats.success_count += 1
        stats.success_ns += time.perf_counter_ns() - started
        stats.last_inference_ms = time.time_ns() // 1_000_000
        return Inferred(model.version, outputs)

    async def _pixels(self, inputs: Sequence[Input]) -> np.ndarray:
        if len(inputs) != 1 or inputs[0].name != tensors.INPUT:
            raise InvalidInput(f"expected one input named {tensors.INPUT!r}, got "
                               f"{[i.name for i in inputs]}")
        given = inputs[0]
        if given.data is None:
            data = tensors.values_to_bytes(given.datatype, given.shape, given.values)
        else:
            data = given.data
        if len(data) <= INLINE_BYTES:
            return tensors.pixels(given.datatype, given.shape, data, self.limits)
        return await asyncio.get_running_loop().run_in_executor(
            self._decode_pool, tensors.pixels, given.datatype, given.shape, data, self.limits)

    @staticmethod
    def _outputs(probabilities: np.ndarray, classes: Sequence[str],
                 requested: Sequence[Requested]) -> list[Output]:
        probs = np.ascontiguousarray(probabilities, dtype="<f4")
        outputs = []
        for wanted in requested or [Requested(tensors.OUTPUT)]:
            if wanted.name != tensors.OUTPUT:
                raise InvalidInput(f"unknown output {wanted.name!r}: this model has "
                                   f"{tensors.OUTPUT!r}")
            if wanted.classification is None:
                outputs.append(Output(tensors.OUTPUT, SIGNATURE.output_datatype, list(probs.shape),
                                      floats=probs))
                continue
            k = tensors.class_count(wanted.classification, len(classes))
            outputs.append(Output(tensors.OUTPUT, "BYTES", [len(probs), k],
                                  strings=tensors.classification(probs, classes, k)))
        return outputs

