"""Loading one store version into ONNX Runtime (convserve.serving.loader): real sessions of the
trained model and of tiny hand-built ONNX graphs, each made to pass or fail one check."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from convserve.contracts.errors import IntegrityError, ModelLoadError, VersionNotFound
from convserve.contracts.model_card import GateDecision
from convserve.serving.loader import (
    CPU,
    CUDA,
    TENSORRT,
    SessionSettings,
    available_providers,
    choose_providers,
    cuda_device_count,
    load_version,
)
from convserve.serving.runners import PlainRunner
from convserve.store.base import ModelStore
from tests.servers import images, publish

ON_CPU = SessionSettings(providers=("cpu",), intra_op_threads=1, warmup_batch_sizes=(1,))


def _tiny_model(path: Path, *, softmax: bool = True, rows: int | None = None,
                metadata: dict[str, str] | None = None,
                input_type: int = TensorProto.UINT8) -> Path:
    """uint8 [N, 32, 32, 3] -> float [N, 2]: the first two pixels' values, softmaxed. `rows`:
    reshape to that many rows first (a model whose output ignores the batch size)."""
    nodes = [helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT)]
    shape = [rows, -1] if rows else [0, -1]
    nodes += [helper.make_node("Reshape", ["x", "shape"], ["flat"]),
              helper.make_node("Slice", ["flat", "starts", "ends", "axes"], ["two"])]
    nodes.append(helper.make_node("Softmax", ["two"], ["probabilities"], axis=1) if softmax
                 else helper.make_node("Identity", ["two"], ["probabilities"]))
    constants = [helper.make_tensor("shape", TensorProto.INT64, [2], shape),
                 helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
                 helper.make_tensor("ends", TensorProto.INT64, [1], [2]),
                 helper.make_tensor("axes", TensorProto.INT64, [1], [1])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("pixels", input_type, ["N", 32, 32, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])],
        initializer=constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, metadata if metadata is not None
                           else {"convserve.classes": json.dumps(["a", "b"])})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _publish(store: ModelStore, model: Path, card: dict | None = None) -> int:
    result = store.publish(model, card or {}, lambda _: GateDecision(True, ("test",)),
                           actor="test")
    assert result.version is not None
    return result.version


# --- loading the trained model -----------------------------------------------------------------


def test_the_trained_model_loads_on_cpu_with_its_classes_and_predicts(
        store: ModelStore, onnx_models: dict[str, Path]) -> None:
    version = publish(store, onnx_models["good"])
    model = load_version(store, version, SessionSettings(providers=("cpu",),
                                                         warmup_batch_sizes=(1, 3)))
    card = json.loads((onnx_models["good"].parent / "card.json").read_text())
    assert model.version == version and model.providers == [CPU]
    assert model.classes == tuple(card["classes"]) and len(model.classes) == 10
    assert model.path == store.model_path(version) and isinstance(model.runner, PlainRunner)
    assert (model.input_name, model.output_name) == (card["input"]["name"],
                                                     model.session.get_outputs()[0].name)
    assert model.open_seconds > 0 and model.warmup_seconds > 0
    probabilities = model.predict(images(5))
    assert probabilities.shape == (5, 10) and probabilities.dtype == np.float32
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def test_the_classes_come_from_the_models_own_metadata(store: ModelStore,
                                                       onnx_models: dict[str, Path]) -> None:
    version = _publish(store, onnx_models["other"], {"classes": ["x", "y"]})  # a stale card
    assert load_version(store, version, ON_CPU).classes == ("cat", "dog")


def test_a_model_without_metadata_takes_the_cards_classes(store: ModelStore,
                                                          tmp_path: Path) -> None:
    model = _tiny_model(tmp_path / "m.onnx", metadata={})
    version = _publish(store, model, {"classes": ["left", "right"]})
    loaded = load_version(store, version, ON_CPU)
    assert loaded.classes == ("left", "right")
    assert loaded.predict(images(2)).shape == (2, 2)


# --- what it refuses ---------------------------------------------------------------------------


def test_a_file_onnx_runtime_cannot_read_is_a_model_load_error(store: ModelStore,
                                                               tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    version = _publish(store, junk, {"classes": ["a"]})
    with pytest.raises(ModelLoadError, match=f"version {version}: ONNX Runtime cannot load"):
        load_version(store, version, ON_CPU)


def test_a_missing_version_or_a_tampered_file_is_the_stores_error(store: ModelStore,
                                                                   tmp_path: Path) -> None:
    with pytest.raises(VersionNotFound):
        load_version(store, 7, ON_CPU)
    version = _publish(store, _tiny_model(tmp_path / "m.onnx"))
    path = store.model_path(version)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(IntegrityError, match="hashes to"):
        load_version(store, version, ON_CPU)


@pytest.mark.parametrize(("build", "fragment"), [
    ({"input_type": TensorProto.FLOAT}, "expected one input uint8 [N, 32, 32, 3]"),
    ({"metadata": {"convserve.classes": json.dumps(["a", "b", "c"])}},
     "output float [N, 3]"),
    ({"metadata": {"convserve.classes": "not json"}}, "unreadable convserve metadata"),
    ({"metadata": {"convserve.classes": json.dumps([])}},
     "expected a non-empty list of class names"),
    ({"softmax": False}, "expected softmax rows summing to 1"),
])
def test_an_unservable_model_is_a_model_load_error(store: ModelStore, tmp_path: Path,
                                                   build: dict, fragment: str) -> None:
    version = _publish(store, _tiny_model(tmp_path / "m.onnx", **build))
    with pytest.raises(ModelLoadError, match=re.escape(fragment)):
        load_version(store, version, ON_CPU)


def test_warm_up_runs_every_batch_size_it_is_given(store: ModelStore, tmp_path: Path) -> None:
    """A model whose output always has 2 rows passes a warm-up of batch 2 only."""
    version = _publish(store, _tiny_model(tmp_path / "m.onnx", rows=2))
    load_version(store, version, SessionSettings(providers=("cpu",), warmup_batch_sizes=(2,)))
    with pytest.raises(ModelLoadError, match=re.escape(
            "expected output [3, 2] in warm-up, got [2, 2]")):
        load_version(store, version, SessionSettings(providers=("cpu",),
                                                     warmup_batch_sizes=(2, 3)))


# --- providers and settings --------------------------------------------------------------------


@pytest.mark.parametrize(("requested", "available", "chosen"), [
    (("auto",), [CPU], [CPU]),
    (("auto",), [CUDA, CPU], [CUDA, CPU]),
    (("cuda", "cpu"), [CPU], [CPU]),                       # a GPU request on a CPU host
    (("tensorrt", "cuda"), [TENSORRT, CUDA, CPU], [TENSORRT, CUDA, CPU]),
    (("CPU", "cuda"), [CUDA, CPU], [CPU, CUDA]),           # the order asked for
    (("cuda", "auto"), [CUDA, CPU], [CUDA, CPU]),          # each once
    (("NoSuchExecutionProvider",), [CPU], [CPU]),
])
def test_choose_providers(requested: tuple[str, ...], available: list[str],
                          chosen: list[str]) -> None:
    assert choose_providers(requested, available) == chosen


def test_available_providers_offer_a_gpu_only_with_a_device() -> None:
    providers = available_providers()
    assert CPU in providers
    if cuda_device_count() == 0:
        assert CUDA not in providers and TENSORRT not in providers


@pytest.mark.parametrize("settings", [
    {"graph_optimization": "max"}, {"providers": ()}, {"intra_op_threads": -1},
    {"warmup_batch_sizes": (1, 0)}])
def test_bad_session_settings_are_refused(settings: dict) -> None:
    with pytest.raises(ValueError):
        SessionSettings(**settings)

