"""One ONNX Runtime session for one store version: verified, signature-checked and warmed up.

The loader knows nothing about which version is live (that is `convserve.serving.manager`); it turns a
version number into a `LoadedModel` or a clear error. Providers are chosen CUDA -> CPU: "auto"
asks for CUDA only when this onnxruntime build has it *and* the driver reports a device, so a
CPU host with the GPU wheel does not even try (and does not print CUDA library errors).
How a session runs a batch (plain run, I/O binding, CUDA graphs) is `convserve.serving.runners`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from convserve.contracts.errors import ModelLoadError
from convserve.contracts.model_card import ModelCard
from convserve.contracts.model_metadata import read_metadata
from convserve.contracts.model_signature import SIGNATURE
from convserve.serving.runners import (
    BoundRunner,
    GraphRunner,
    PlainRunner,
    Runner,
    buckets_up_to,
    check_buckets,
)
from convserve.store.base import ModelStore

log = logging.getLogger("convserve.serving.loader")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
_GPU_PROVIDERS = frozenset({CUDA, TENSORRT})
_ALIASES = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT}
_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class SessionSettings:
    providers: tuple[str, ...] = ("auto",)   # "auto", "cpu", "cuda" or ORT provider names
    intra_op_threads: int = 0                # 0: ONNX Runtime's default (one per core)
    inter_op_threads: int = 0
    graph_optimization: str = "all"          # disable | basic | extended | all
    allow_spinning: bool = True              # turn off when training shares the host's cores
    warmup_batch_sizes: tuple[int, ...] = (1, 8)
    # GPU only (ignored on CPU): CUDA graphs replayed per fixed batch size (these buckets; the
    # largest is the biggest batch one graph runs), and TensorRT's fp16 mode and engine cache.
    cuda_graphs: bool = False
    graph_buckets: tuple[int, ...] = buckets_up_to(256)
    tensorrt_fp16: bool = False
    tensorrt_cache_dir: str = ""             # "" = no engine cache (TensorRT rebuilds at load)

    def __post_init__(self) -> None:
        if self.graph_optimization not in _OPTIMIZATION_LEVELS:
            raise ValueError(f"graph_optimization: expected one of {list(_OPTIMIZATION_LEVELS)}, "
                             f"got {self.graph_optimization!r}")
        if not self.providers:
            raise ValueError("providers: expected at least one name (or 'auto'), got none")
        if min(self.intra_op_threads, self.inter_op_threads) < 0:
            raise ValueError(f"threads: expected >= 0, got intra {self.intra_op_threads}, "
                             f"inter {self.inter_op_threads}")
        if any(size < 1 for size in self.warmup_batch_sizes):
            raise ValueError(f"warmup_batch_sizes: expected sizes >= 1, got {self.warmup_batch_sizes}")
        check_buckets(self.graph_buckets, "graph_buckets")


@dataclass
class LoadedModel:
    version: int
    classes: tuple[str, ...]
    card: ModelCard
    path: Path
    providers: list[str]          # what the session actually uses
    session: ort.InferenceSession
    runner: Runner | None = None  # None: a plain session.run
    open_seconds: float = 0.0     # verify, open, check: what loading it took before warm-up
    warmup_seconds: float = 0.0
    input_name: str = field(init=False)
    output_name: str = field(init=False)

    def __post_init__(self) -> None:
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self._run: Runner = self.runner or PlainRunner(self.session, self.input_name,
                                                       self.output_name)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, 32, 32, 3] -> float32 [N, C] (SIGNATURE). Thread-safe (every runner is)."""
        return self._run(pixels)


def load_version(store: ModelStore, version: int, settings: SessionSettings) -> LoadedModel:
    """Verify version's sha256, open it in ONNX Runtime, check its signature, warm it up.

    IntegrityError / VersionNotFound come from the store unchanged; anything that makes an intact
    file unservable is a ModelLoadError.
    """
    started = time.perf_counter()
    opened = store.open_version(version)  # the file and its card, checked together once
    path, card = opened.path, opened.card
    requested = choose_providers(settings.providers, available_providers())
    input_name = card.input.name
    session = _open_session(path, version, settings,
                            provider_options(requested, settings, input_name))
    classes = _classes(session, card, version)
    _check_signature(session, len(classes), version)
    model = LoadedModel(version, classes, card, path, session.get_providers(), session)
    model.runner = choose_runner(model, settings)
    ready = time.perf_counter()
    # A graph is captured per bucket on its first runs: warm every bucket, not just a few sizes.
    graphs = isinstance(model.runner, GraphRunner)
    _warm_up(model, settings.graph_buckets if graphs else settings.warmup_batch_sizes,
             repeats=3 if graphs else 1)
    model.open_seconds, model.warmup_seconds = ready - started, time.perf_counter() - ready
    _log_providers(model, settings, requested)
    return model


def choose_runner(model: LoadedModel, settings: SessionSettings) -> Runner:
    """CUDA graphs or I/O binding when the session really runs on a GPU provider, else plain."""
    first = model.providers[0]
    if first == CUDA and settings.cuda_graphs:
        return GraphRunner(model.session, model.input_name, model.output_name,
                           len(model.classes), settings.graph_buckets)
    if first in _GPU_PROVIDERS:
        return BoundRunner(model.session, model.input_name, model.output_name)
    return PlainRunner(model.session, model.input_name, model.output_name)


def provider_options(providers: Sequence[str], settings: SessionSettings, input_name: str
                     ) -> list[tuple[str, dict[str, Any]]]:
    """Each provider with its options: CUDA graphs on the CUDA provider; for TensorRT, fp16, the
    engine cache, and one optimisation profile covering batch 1..the largest bucket (so a new
    batch size never rebuilds the engine)."""
    out: list[tuple[str, dict[str, Any]]] = []
    for name in providers:
        options: dict[str, Any] = {}
        if name == CUDA:
            options = {"device_id": "0", "enable_cuda_graph": "1" if settings.cuda_graphs else "0"}
        elif name == TENSORRT:
            largest = settings.graph_buckets[-1]
            image = "x".join(map(str, SIGNATURE.image_shape))  # 32x32x3
            options = {
                "device_id": "0",
                "trt_fp16_enable": "True" if settings.tensorrt_fp16 else "False",
                "trt_profile_min_shapes": f"{input_name}:1x{image}",
                "trt_profile_opt_shapes": f"{input_name}:{largest}x{image}",
                "trt_profile_max_shapes": f"{input_name}:{largest}x{image}",
            }
            if settings.tensorrt_cache_dir:
                options |= {"trt_engine_cache_enable": "True",
                            "trt_engine_cache_path": settings.tensorrt_cache_dir,
                            "trt_timing_cache_enable": "True"}
        out.append((name, options))
    return out


# ------------------------------------------------------------------------------------ providers

def choose_providers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """The providers to ask ONNX Runtime for, in priority order, always ending with CPU.

    "auto" means CUDA when available; "cpu"/"cuda" are short names; a name that is not available
    is dropped (so a GPU request on a CPU host still serves, on CPU).
    """
    chosen: list[str] = []
    for name in requested:
        provider = CUDA if name == "auto" else _ALIASES.get(name.lower(), name)
        if provider in available and provider not in chosen:
            chosen.append(provider)
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


def available_providers() -> list[str]:
    """This build's providers, minus the GPU ones when the driver reports no CUDA device."""
    providers = ort.get_available_providers()
    if cuda_device_count() == 0:
        providers = [p for p in providers if p not in _GPU_PROVIDERS]
    return providers


@functools.cache
def cuda_device_count() -> int:
    """CUDA devices the driver sees (0 without a driver), asked through libcuda, not torch."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    except OSError:
        return 0


def _log_providers(model: LoadedModel, settings: SessionSettings, requested: list[str]) -> None:
    explicit = [_ALIASES.get(n.lower(), n) for n in settings.providers if n != "auto"]
    missing = [n for n in dict.fromkeys(explicit + requested) if n not in model.providers]
    if missing:
        # Unavailable names are dropped, and ORT itself falls back silently when the CUDA
        # libraries (cuDNN, cuBLAS) cannot be loaded: say so once per load.
        log.warning("version %d: providers %s requested but not usable here; serving on %s",
                    model.version, missing, model.providers)
    log.info("loaded version %d (%d classes) from %s on %s", model.version, len(model.classes),
             model.path, model.providers)


# ------------------------------------------------------------------------------------ session

def session_options(settings: SessionSettings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    options.graph_optimization_level = _OPTIMIZATION_LEVELS[settings.graph_optimization]
    options.log_severity_level = 3  # errors only: per-node placement warnings are noise
    if not settings.allow_spinning:
        # Idle worker threads spin for a while by default, burning cores a training job needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def _open_session(path: Path, version: int, settings: SessionSettings,
                  providers: list[tuple[str, dict[str, Any]]]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), session_options(settings), providers=providers)
    except Exception as error:  # ORT raises its own pybind types (Fail, InvalidGraph, ...)
        raise ModelLoadError(f"version {version}: ONNX Runtime cannot load {path}: "
                             f"{type(error).__name__}: {error}") from None


def _classes(session: ort.InferenceSession, card: ModelCard, version: int) -> tuple[str, ...]:
    """Class names from the model's own metadata; the card's are a fallback for older files."""
    try:
        metadata = read_metadata(session.get_modelmeta().custom_metadata_map)
    except ValueError as error:  # a convserve.* entry that is not JSON
        raise ModelLoadError(f"version {version}: unreadable convserve metadata: {error}") from None
    classes = metadata.get("classes") or list(card.classes)
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ModelLoadError(f"version {version}: expected a non-empty list of class names in the "
                             f"model metadata or card, got {classes!r}")
    return tuple(classes)


def _check_signature(session: ort.InferenceSession, num_classes: int, version: int) -> None:
    """The signature's one input (uint8 [?, 32, 32, 3]) and one output (float [?, C], C = number
    of classes). Their names are not checked: the session's own are used."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    got = (f"got inputs {[(i.name, i.type, i.shape) for i in inputs]}, "
           f"outputs {[(o.name, o.type, o.shape) for o in outputs]}")
    input_ok = (len(inputs) == 1 and inputs[0].type == SIGNATURE.onnx_input_type
                and _dims_match(inputs[0].shape, SIGNATURE.image_shape))
    output_ok = (len(outputs) == 1 and outputs[0].type == SIGNATURE.onnx_output_type
                 and _dims_match(outputs[0].shape, (num_classes,)))
    if not (input_ok and output_ok):
        raise ModelLoadError(f"version {version}: expected {SIGNATURE.onnx_text(num_classes)}; {got}")


def _dims_match(shape: Sequence[int | str | None], expected: tuple[int, ...]) -> bool:
    """Batch dim free; a symbolic dim passes here and is checked by the warm-up run."""
    return len(shape) == 1 + len(expected) and all(
        dim == want or not isinstance(dim, int) for dim, want in zip(shape[1:], expected, strict=True))


def _warm_up(model: LoadedModel, batch_sizes: Sequence[int], repeats: int = 1) -> None:
    """Run each batch size, so the first request does not pay for allocation, kernel selection
    or graph capture, and check that what comes out is one probability row per image."""
    for size in batch_sizes:
        try:
            for _ in range(repeats):
                out = model.predict(np.zeros((size, *SIGNATURE.image_shape), SIGNATURE.input_dtype))
        except Exception as error:
            raise ModelLoadError(f"version {model.version}: warm-up with batch {size} failed: "
                                 f"{type(error).__name__}: {error}") from None
        if out.shape != (size, len(model.classes)):
            raise ModelLoadError(f"version {model.version}: expected output [{size}, "
                                 f"{len(model.classes)}] in warm-up, got {list(out.shape)}")
        sums = out.sum(axis=1)
        if not np.all(np.abs(sums - 1) <= _SUM_TOLERANCE):
            raise ModelLoadError(f"version {model.version}: expected softmax rows summing to 1 "
                                 f"in warm-up, got sums {sums[:4].tolist()}")
