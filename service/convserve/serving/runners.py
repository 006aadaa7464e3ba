"""How one ONNX Runtime session runs a batch: a plain `run`, I/O binding, or CUDA graphs.

- `PlainRunner` (CPU): `session.run`; the input array is handed over without a copy.
- `BoundRunner` (CUDA, TensorRT): I/O binding. The input goes to the device in one copy and the
  output is allocated on the device and copied back once, instead of ORT staging both through
  host buffers of its own on every call.
- `GraphRunner` (CUDA with `cuda_graphs`): the CUDA provider captures one CUDA graph per fixed
  batch size ("bucket") and replays it, so a batch costs one graph launch instead of one kernel
  launch per node. A graph reads and writes fixed device addresses, so each bucket owns its
  input and output buffers; a batch is padded up to the next bucket (a batch larger than the
  largest bucket runs in chunks) and the padding rows are dropped from the result.

The runners only use ORT's device-neutral API (OrtValue, IOBinding), so the tests run them on CPU
with `device="cpu"`; only the device itself (and graph capture, a CUDA-provider feature) needs a
GPU, and the GPU tests cover it where one is present.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from convserve.contracts.model_signature import SIGNATURE

Runner = Callable[[np.ndarray], np.ndarray]  # uint8 [N, 32, 32, 3] -> float32 [N, C]


class PlainRunner:
    def __init__(self, session: ort.InferenceSession, input_name: str, output_name: str) -> None:
        self._session, self._input, self._output = session, input_name, output_name

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self._session.run([self._output], {self._input: pixels})[0]


class BoundRunner:
    """I/O binding with a fresh binding per call, so concurrent calls never share one."""

    def __init__(self, session: ort.InferenceSession, input_name: str, output_name: str,
                 device: str = "cuda", device_id: int = 0) -> None:
        self._session, self._input, self._output = session, input_name, output_name
        self._device, self._device_id = device, device_id

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        binding = self._session.io_binding()
        binding.bind_cpu_input(self._input, pixels)
        binding.bind_output(self._output, self._device, self._device_id)
        self._session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def buckets_up_to(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two up to `max_batch_size`, and `max_batch_size` itself: at most ~2x padding."""
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    return (*buckets, max_batch_size)


def check_buckets(buckets: Sequence[int], what: str = "buckets") -> None:
    if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
        raise ValueError(f"{what}: expected increasing sizes >= 1, got {list(buckets)}")


def bucket_for(count: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding `count` images; None when it exceeds the largest."""
    return next((b for b in buckets if b >= count), None)


def pad_batch(pixels: np.ndarray, size: int) -> np.ndarray:
    """`pixels` with zero images appended up to `size` rows (the same array when already full)."""
    if len(pixels) == size:
        return pixels
    padded = np.zeros((size, *pixels.shape[1:]), dtype=pixels.dtype)
    padded[: len(pixels)] = pixels
    return padded


@dataclass
class _Slot:
    """One bucket's fixed buffers: a captured graph replays reads and writes at these addresses."""

    inputs: ort.OrtValue
    outputs: ort.OrtValue
    binding: ort.IOBinding
    run_options: ort.RunOptions


class GraphRunner:
    """One CUDA graph per bucket (`gpu_graph_id` = the bucket's index). Calls are serialised by a
    lock: each bucket has one set of buffers, and a replay must not overlap an update of them."""

    def __init__(self, session: ort.InferenceSession, input_name: str, output_name: str,
                 num_classes: int, buckets: Sequence[int], device: str = "cuda",
                 device_id: int = 0) -> None:
        check_buckets(buckets)
        self._session, self._input, self._output = session, input_name, output_name
        self._num_classes = num_classes
        self.buckets = tuple(buckets)
        self._device, self._device_id = device, device_id
        self._slots: dict[int, _Slot] = {}
        self._lock = threading.Lock()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        largest = self.buckets[-1]
        if len(pixels) > largest:
            return np.concatenate([self(pixels[start:start + largest])
                                   for start in range(0, len(pixels), largest)])
        bucket = bucket_for(len(pixels), self.buckets)
        assert bucket is not None  # len(pixels) <= largest
        with self._lock:
            slot = self._slot(bucket)
            slot.inputs.update_inplace(np.ascontiguousarray(pad_batch(pixels, bucket)))
            self._session.run_with_iobinding(slot.binding, slot.run_options)
            probabilities = slot.binding.copy_outputs_to_cpu()[0]
        return probabilities[: len(pixels)]

    def _slot(self, bucket: int) -> _Slot:
        slot = self._slots.get(bucket)
        if slot is None:
            inputs = ort.OrtValue.ortvalue_from_shape_and_type(
                [bucket, *SIGNATURE.image_shape], np.dtype(SIGNATURE.input_dtype), self._device,
                self._device_id)
            outputs = ort.OrtValue.ortvalue_from_shape_and_type(
                [bucket, self._num_classes], np.dtype(SIGNATURE.output_dtype), self._device,
                self._device_id)
            binding = self._session.io_binding()
            binding.bind_ortvalue_input(self._input, inputs)
            binding.bind_ortvalue_output(self._output, outputs)
            run_options = ort.RunOptions()
            # Which captured graph to replay; the first runs with a new id capture it.
            run_options.add_run_config_entry("gpu_graph_id", str(self.buckets.index(bucket)))
            slot = self._slots[bucket] = _Slot(inputs, outputs, binding, run_options)
        return slot
