"""convserve.serving.loader and convserve.serving.manager on real files: one exported ConvNet, a
real ModelStore and real ONNX Runtime sessions. The only stand-in is the provider list given to
`choose_providers` (this host has no GPU, so the CUDA branch can only be exercised as a pure function)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from convserve.contracts.errors import IntegrityError, ModelLoadError, NoModel, NotFound
from convserve.contracts.model_card import GateDecision
from convserve.serving.loader import (
    CPU,
    CUDA,
    SessionSettings,
    available_providers,
    choose_providers,
    cuda_device_count,
    load_version,
)
from convserve.serving.manager import ModelManager
from convserve.store.base import ModelStore
from tests.conftest import REPO_ROOT, python_env
from tests.waits import until

CLASSES = ["airplane", "bird", "cat"]
TRT = "TensorrtExecutionProvider"
# One thread, no spinning: these tests share two cores with other work.
SETTINGS = SessionSettings(providers=("cpu",), intra_op_threads=1, inter_op_threads=1,
                           allow_spinning=False, warmup_batch_sizes=(1, 4))


# ------------------------------------------------------------------------------------ models


def metadata(classes: list[str]) -> dict:
    """The shape of convserve.training.pipeline.model_metadata, reduced to what serving reads."""
    return {
        "classes": classes,
        "input": {"name": "pixels", "dtype": "uint8", "layout": "NHWC", "shape": [-1, 32, 32, 3],
                  "channel_order": "RGB"},
        "output": {"name": "probabilities", "dtype": "float32", "shape": [-1, len(classes)]},
    }


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one torch export of this module (~10 s); the other models are edits of it."""
    import torch

    from convserve.training.export import export_onnx, serving_model
    from convserve.training.model import ConvNet, Preprocess

    torch.manual_seed(0)
    model = serving_model(ConvNet(len(CLASSES)), Preprocess([0.5] * 3, [0.25] * 3))
    return export_onnx(model, tmp_path_factory.mktemp("models") / "first.onnx", metadata(CLASSES))


def edited(source: Path, target: Path, edit: Callable[[onnx.ModelProto], None]) -> Path:
    proto = onnx.load(str(source))
    edit(proto)
    onnx.save(proto, str(target))
    return target


@pytest.fixture(scope="module")
def second(first: Path) -> Path:
    """Same graph, different weights (last conv's bias shifted): other probabilities."""
    def shift_bias(proto: onnx.ModelProto) -> None:
        bias = next(t for t in proto.graph.initializer if t.name.endswith("conv7.bias"))
        shifted = numpy_helper.to_array(bias) + np.array([3.0, -3.0, 0.0], dtype=np.float32)
        bias.CopyFrom(numpy_helper.from_array(shifted, bias.name))

    return edited(first, first.with_name("second.onnx"), shift_bias)


@pytest.fixture(scope="module")
def unlabelled(first: Path) -> Path:
    """An export without class names in its metadata (the card must supply them)."""
    def drop_metadata(proto: onnx.ModelProto) -> None:
        del proto.metadata_props[:]

    return edited(first, first.with_name("unlabelled.onnx"), drop_metadata)


@pytest.fixture(scope="module")
def float_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid ONNX model with the wrong signature: float [N, 3] in, softmax [N, 3] out."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=1)], "wrong", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    path = tmp_path_factory.mktemp("wrong") / "float_input.onnx"
    onnx.save(proto, str(path))
    return path


def publish(store: ModelStore, model: Path, classes: list[str] = CLASSES) -> int:
    result = store.publish(model, {"classes": classes},
                           lambda champion: GateDecision(True, ("test",)), actor="test")
    assert result.version is not None
    return result.version


def corrupt(store: ModelStore, version: int) -> bytes:
    """Append a byte to a published (read-only) model file; returns the original content."""
    path = store.model_path(version)
    original = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(original + b"\0")
    return original


def pixels(n: int = 5) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def direct(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=[CPU])
    return session.run(None, {"pixels": images})[0]


# ------------------------------------------------------------------------------------ loader


def test_loaded_model_predicts_like_a_direct_session(store: ModelStore, first: Path) -> None:
    version = publish(store, first, classes=["from", "the", "card"])
    model = load_version(store, version, SETTINGS)
    assert (model.version, model.classes, model.providers) == (1, tuple(CLASSES), [CPU])
    assert model.path == store.model_path(version) and model.card.version == 1
    probabilities = model.predict(pixels())
    assert probabilities.dtype == np.float32 and probabilities.shape == (5, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probabilities, direct(model.path, pixels()), rtol=1e-6, atol=1e-7)


def test_auto_providers_serve_on_this_host(store: ModelStore, first: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    publish(store, first)
    with caplog.at_level(logging.INFO, logger="convserve.serving.loader"):
        model = load_version(store, 1, SessionSettings(intra_op_threads=1, warmup_batch_sizes=()))
    assert model.providers[-1] == CPU
    assert f"loaded version 1 (3 classes) from {model.path} on {model.providers}" in caplog.text


def test_classes_fall_back_to_the_card(store: ModelStore, unlabelled: Path) -> None:
    version = publish(store, unlabelled, classes=["x", "y", "z"])
    assert load_version(store, version, SETTINGS).classes == ("x", "y", "z")


def test_corrupted_file_is_refused(store: ModelStore, first: Path) -> None:
    corrupt(store, publish(store, first))
    with pytest.raises(IntegrityError, match="card sha256 .* but model.onnx hashes to"):
        load_version(store, 1, SETTINGS)


def test_unservable_files_are_refused(store: ModelStore, tmp_path: Path, float_input: Path,
                                      unlabelled: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf")
    publish(store, garbage)
    publish(store, float_input)
    publish(store, unlabelled, classes=["a", "b", "c", "d"])
    with pytest.raises(ModelLoadError, match="version 1: ONNX Runtime cannot load"):
        load_version(store, 1, SETTINGS)
    with pytest.raises(ModelLoadError, match=r"expected one input uint8 \[N, 32, 32, 3\] and one "
                       r"output float \[N, 3\]; got inputs \[\('x', 'tensor\(float\)'"):
        load_version(store, 2, SETTINGS)
    with pytest.raises(ModelLoadError, match=r"output float \[N, 4\]; got .*\['batch', 3\]"):
        load_version(store, 3, SETTINGS)


@pytest.mark.parametrize(("requested", "available", "expected"), [
    (("auto",), [TRT, CUDA, CPU], [CUDA, CPU]),          # auto never picks TensorRT
    (("auto",), [CPU], [CPU]),
    (("cuda",), [CPU], [CPU]),                           # GPU asked for, none here: CPU serves
    (("cpu",), [CUDA, CPU], [CPU]),
    ((CUDA, CPU), [CUDA, CPU], [CUDA, CPU]),
    ((TRT, "cuda"), [TRT, CUDA, CPU], [TRT, CUDA, CPU]),
    (("NoSuchExecutionProvider",), [CUDA, CPU], [CPU]),
    (("auto", "cuda", CUDA), [CUDA, CPU], [CUDA, CPU]),  # no duplicates
])
def test_choose_providers(requested: tuple[str, ...], available: list[str],
                          expected: list[str]) -> None:
    # The given provider lists stand in for GPU hosts: the CUDA path cannot run on this machine.
    assert choose_providers(requested, available) == expected


def test_cuda_is_offered_exactly_when_a_device_is_present() -> None:
    # Runs on every host: on this CPU-only one it checks the CUDA-less branch, on a GPU host the
    # other; CPU is always there as the fallback.
    providers = available_providers()
    assert CPU in providers
    built_with_cuda = CUDA in ort.get_available_providers()
    assert (CUDA in providers) == (built_with_cuda and cuda_device_count() > 0)


def test_session_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="graph_optimization: expected one of"):
        SessionSettings(graph_optimization="max")
    with pytest.raises(ValueError, match="warmup_batch_sizes: expected sizes >= 1, got"):
        SessionSettings(warmup_batch_sizes=(0,))


# ------------------------------------------------------------------------------------ manager


def test_no_model_until_one_is_promoted(store: ModelStore, first: Path) -> None:
    manager = ModelManager(store, SETTINGS)
    assert manager.refresh() is False and manager.live_version is None
    with pytest.raises(NoModel, match=f"no model is promoted yet in {store.root}; train one"):
        manager.current()
    with pytest.raises(NoModel):
        manager.get(0)


def test_refresh_swaps_and_old_handles_keep_working(store: ModelStore, first: Path,
                                                    second: Path) -> None:
    live: list[int] = []
    manager = ModelManager(store, SETTINGS, on_live=lambda model: live.append(model.version))
    publish(store, first)
    assert manager.refresh() is True
    assert (manager.live_version, live) == (1, [1])
    held = manager.current()  # a batch in flight keeps this reference
    assert manager.refresh() is False  # nothing new: no reload, no callback

    publish(store, second)
    assert manager.refresh() is True
    assert (manager.live_version, live, manager.get(0).version) == (2, [1, 2], 2)
    images = pixels()
    np.testing.assert_allclose(held.predict(images), direct(first, images), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(manager.current().predict(images), direct(second, images),
                               rtol=1e-6, atol=1e-7)
    assert not np.allclose(direct(first, images), direct(second, images))


def test_a_broken_promotion_keeps_the_old_model(store: ModelStore, first: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    manager = ModelManager(store, SETTINGS)
    publish(store, first)
    manager.refresh()
    publish(store, first)
    original = corrupt(store, 2)
    with caplog.at_level(logging.ERROR, logger="convserve.serving.manager"):
        assert manager.refresh() is False
        assert manager.refresh() is False  # within the retry interval: not even attempted
    assert manager.live_version == 1 and manager.current().predict(pixels(1)).shape == (1, 3)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "promoted version 2 cannot be loaded; keeping version 1" in errors[0].message

    store.model_path(2).write_bytes(original)  # repaired, but the retry interval has not passed
    assert manager.refresh() is False and manager.live_version == 1


def test_failed_versions_are_retried_after_the_interval(store: ModelStore, first: Path) -> None:
    manager = ModelManager(store, SETTINGS, retry_after_s=0.0)
    original = corrupt(store, publish(store, first))
    assert manager.refresh() is False
    with pytest.raises(NoModel, match="promoted version 1 could not be loaded .*IntegrityError"):
        manager.current()
    store.model_path(1).write_bytes(original)
    assert manager.refresh() is True and manager.live_version == 1


def test_pinned_versions_while_another_is_live(store: ModelStore, first: Path, second: Path) -> None:
    manager = ModelManager(store, SETTINGS)
    publish(store, first)
    publish(store, second)
    manager.refresh()
    pinned = manager.get(1)
    assert (pinned.version, manager.live_version) == (1, 2)
    assert manager.get(1) is pinned and manager.get(2) is manager.current()
    images = pixels()
    np.testing.assert_allclose(pinned.predict(images), direct(first, images), rtol=1e-6, atol=1e-7)
    with pytest.raises(NotFound, match=r"model version 99 not found; versions: \[1, 2\]"):
        manager.get(99)

    store.promote(1, reason="rollback", actor="test")
    assert manager.refresh() is True
    assert manager.current() is pinned  # already loaded and warm: the rollback reuses it


def test_pinned_cache_is_a_bounded_lru(store: ModelStore, first: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(3):
        publish(store, first)
    manager = ModelManager(store, SETTINGS, cache_size=1)
    manager.refresh()  # version 3 is live
    with caplog.at_level(logging.INFO, logger="convserve.serving.loader"):
        one = manager.get(1)
        manager.get(2)  # evicts 1
        again = manager.get(1)  # evicts 2, loads 1 anew
        assert manager.get(1) is again  # cached
    loads = [r.message.split(" (")[0] for r in caplog.records if r.message.startswith("loaded")]
    assert loads == ["loaded version 1", "loaded version 2", "loaded version 1"]
    assert again is not one
    np.testing.assert_array_equal(one.predict(pixels(2)), again.predict(pixels(2)))  # evicted ≠ dead


def test_run_picks_up_a_promotion_at_its_next_poll(store: ModelStore, first: Path,
                                                   second: Path) -> None:
    """How soon is the poll interval's business (0.5 s by default); what is checked is that the
    loop keeps polling and that the first poll after a promotion swaps it in."""
    publish(store, first)
    manager = ModelManager(store, SETTINGS, poll_interval_s=0.1)
    polls = 0
    refresh = manager.refresh

    def counted_refresh() -> bool:
        nonlocal polls
        polls += 1
        return refresh()

    manager.refresh = counted_refresh  # type: ignore[method-assign]

    async def until_live(version: int) -> None:
        await until(lambda: manager.live_version == version, f"version {version} to become live")

    async def scenario() -> int:
        stop = asyncio.Event()
        task = asyncio.create_task(manager.run(stop))
        await until_live(1)
        await asyncio.to_thread(publish, store, second)
        published_at = polls  # a poll under way now may already see version 2
        await until_live(2)
        stop.set()
        await asyncio.wait_for(task, timeout=30)
        return polls - published_at

    assert asyncio.run(scenario()) <= 1


def test_serving_modules_do_not_import_torch() -> None:
    code = ("import sys, convserve.serving.codec, convserve.serving.loader, convserve.serving.manager; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', "
            "'onnxscript') or m in ('convserve.training.export', 'convserve.training.model', "
            "'convserve.training.train')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=python_env(),
                            capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
