"""The exported ONNX file: self-contained, uint8 NHWC in, softmax out, equal to the torch model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from convserve.training.export import check_parity, export_onnx, serving_model
from convserve.training.model import ConvNet, Preprocess
from convserve.training.onnx_eval import OnnxClassifier
from tests.conftest import SMALL_SYNTHETIC


def test_export_is_one_checked_file_with_the_documented_signature(small_run) -> None:
    path = small_run.model_path
    assert sorted(p.name for p in path.parent.glob("model.onnx*")) == ["model.onnx"]
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    (graph_input,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert graph_input.name == "pixels"
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims[1:] == [32, 32, 3] and isinstance(dims[0], str)  # dynamic batch


def test_metadata_travels_in_the_file_and_the_card(small_run) -> None:
    classifier = OnnxClassifier(small_run.model_path)
    meta = classifier.metadata
    assert meta["classes"] == [f"class{i}" for i in range(10)]
    assert meta["input"]["layout"] == "NHWC" and meta["input"]["dtype"] == "uint8"
    assert len(meta["normalization"]["mean"]) == 3
    assert meta["training_config"]["dataset"] == "synthetic:640"
    assert meta["dataset"]["name"] == "synthetic:640"
    assert meta["versions"]["torch"].startswith("2.14")
    assert meta["metrics"]["torch_val_accuracy"] == small_run.card["metrics"]["torch_val_accuracy"]
    card = json.loads((small_run.run_dir / "card.json").read_text())
    assert card["classes"] == meta["classes"]
    assert card["parity"]["passed"] is True
    assert card["metrics"]["onnx_val_accuracy"] == pytest.approx(small_run.onnx_validation.accuracy)
    assert sum(map(sum, card["metrics"]["confusion_matrix"])) == card["metrics"]["val_images"]


@pytest.mark.parametrize("batch", [1, 7, 300])
def test_any_batch_size_gives_probabilities(small_run, batch: int) -> None:
    images = np.random.default_rng(batch).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    probs = OnnxClassifier(small_run.model_path).probabilities(images)
    assert probs.shape == (batch, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_parity_of_the_trained_model_is_within_tolerance(small_run) -> None:
    parity = small_run.parity
    assert parity.passed and parity.images == 128
    assert parity.max_abs_diff <= 1e-5 and parity.argmax_equal


def test_parity_check_catches_a_model_that_differs_from_its_export(tmp_path) -> None:
    torch.manual_seed(0)
    net = ConvNet(10)
    model = serving_model(net, Preprocess([0.5] * 3, [0.25] * 3))
    path = export_onnx(model, tmp_path / "model.onnx", {"classes": [str(i) for i in range(10)]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary left
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    assert check_parity(model, path, images).passed
    with torch.no_grad():
        net.conv7.bias.add_(torch.linspace(-2, 2, 10))  # the file no longer matches the model
    report = check_parity(model, path, images)
    assert not report.passed and report.max_abs_diff > 1e-3


def test_a_run_whose_export_disagrees_with_torch_fails_and_publishes_nothing(tmp_path,
                                                                             monkeypatch) -> None:
    """README: "the run fails unless" parity holds. An exporter that writes a valid ONNX file
    computing something else (the real export with one weight tensor scaled) must make the
    whole run fail with ExportError, publish no version and leave the champion in place."""
    from onnx import numpy_helper

    from convserve.contracts.errors import ExportError
    from convserve.contracts.gate_policy import GatePolicy
    from convserve.contracts.spec import TrainConfig
    from convserve.store.directory import DirectoryStore
    from convserve.store.job_dir import read_events
    from convserve.training import pipeline
    from convserve.training.progress import ProgressReporter
    from tests.servers import publish

    real_export = pipeline.export_onnx

    def faulty_export(model, path, metadata):
        written = real_export(model, path, metadata)
        graph = onnx.load(str(written))
        weight = next(t for t in graph.graph.initializer if len(t.dims) == 4)  # a conv kernel
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
        onnx.save(graph, str(written))
        return written

    monkeypatch.setattr(pipeline, "export_onnx", faulty_export)
    store = DirectoryStore(tmp_path / "store")
    champion = publish(store, _untrained_model(tmp_path))
    reporter = ProgressReporter(tmp_path / "run" / "events.jsonl")
    with pytest.raises(ExportError, match="ONNX parity check failed"):
        pipeline.run(TrainConfig(dataset=SMALL_SYNTHETIC, epochs=1, compile="off"),
                     tmp_path / "run", reporter,
                     publication=pipeline.Publication(store, GatePolicy(min_accuracy=0.0),
                                                      actor="test"))
    reporter.close()
    assert store.versions() == [champion] and store.promoted_version() == champion
    card = json.loads((tmp_path / "run" / "card.json").read_text())
    assert card["gate"]["promoted"] is False and "parity" in card["gate"]["reason"]
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
    exported = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["type"] == "exported"]
    assert exported and exported[0]["parity"]["max_abs_diff"] > exported[0]["parity"]["tolerance"]


def test_a_run_whose_claim_was_taken_over_never_publishes(tmp_path) -> None:
    """The fencing token: an attempt of a job whose trainer was declared dead (the job's claim
    file names a later attempt) is refused under the store's lock, however good the model."""
    from convserve.contracts.errors import ClaimLost
    from convserve.contracts.gate_policy import GatePolicy
    from convserve.contracts.spec import TrainConfig
    from convserve.store.directory import DirectoryStore
    from convserve.store.job_dir import check_claim, write_claim
    from convserve.training import pipeline
    from convserve.training.progress import ProgressReporter

    store = DirectoryStore(tmp_path / "store")
    run_dir = store.work.job_dir("job1", create=True)
    write_claim(run_dir, 2, "trainer-b")  # attempt 2 holds the job; this run is attempt 1
    reporter = ProgressReporter(run_dir / "events.jsonl")
    with pytest.raises(ClaimLost, match="attempt 1 of job job1 no longer holds it .now: 2 "
                                        "trainer-b."):
        pipeline.run(TrainConfig(dataset=SMALL_SYNTHETIC, epochs=1, compile="off"), run_dir,
                     reporter, publication=pipeline.Publication(
                         store, GatePolicy(min_accuracy=0.0), actor="job:job1", job_id="job1",
                         fence=lambda: check_claim(run_dir, 1)))
    reporter.close()
    assert store.versions() == [] and store.promoted_version() is None
    write_claim(run_dir, 1, "trainer-a")  # while it holds the claim, the same run publishes
    outcome = pipeline.run(TrainConfig(dataset=SMALL_SYNTHETIC, epochs=1, compile="off"),
                           run_dir, ProgressReporter(None), publication=pipeline.Publication(
                               store, GatePolicy(min_accuracy=0.0), actor="job:job1",
                               job_id="job1", fence=lambda: check_claim(run_dir, 1)))
    assert outcome.published is not None and outcome.published.version == 1


def _untrained_model(tmp_path):
    """A champion to keep: the untrained ConvNet exported, with the classes of SMALL_SYNTHETIC."""
    from convserve.training.data import load_dataset

    classes = load_dataset(SMALL_SYNTHETIC, tmp_path, seed=0).classes
    torch.manual_seed(0)
    model = serving_model(ConvNet(len(classes)), Preprocess([0.5] * 3, [0.25] * 3))
    return export_onnx(model, tmp_path / "champion" / "model.onnx", {"classes": list(classes)})
