"""What a training run writes to TensorBoard, read back the way TensorBoard reads it."""

from __future__ import annotations

import inspect
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.backend.event_processing.event_accumulator import (
    STORE_EVERYTHING_SIZE_GUIDANCE,
    EventAccumulator,
)
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

import convserve.training.train as train_module
from convserve.contracts.spec import TrainConfig
from convserve.training.data import Dataset, load_dataset
from convserve.training.progress import ProgressReporter
from convserve.training.tensorboard import (
    GRID_COLUMNS,
    GRID_IMAGES,
    confusion_image,
    prediction_grid,
)
from convserve.training.train import TrainResult, evaluate, train

EPOCHS = 2
PER_EPOCH_PLUGINS = ("scalars", "images", "histograms", "tensors")  # tensors: the PR curves


@dataclass
class ShortRun:
    config: TrainConfig
    data: Dataset
    result: TrainResult
    board: EventAccumulator
    probabilities: np.ndarray  # the final net's, on the validation split


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> ShortRun:
    """A real 2-epoch run on 160 synthetic images (32 validation), about two seconds."""
    run_dir = tmp_path_factory.mktemp("board")
    config = TrainConfig(dataset="synthetic:160", epochs=EPOCHS, compile="off", lr=3e-3)
    data = load_dataset(config.dataset, Path("unused"), seed=0)
    result = _train(config, data, run_dir)
    # The net is left as the last epoch's validation saw it, so this is that pass again.
    _, _, probabilities = evaluate(result.net, result.preprocess, torch.from_numpy(data.val_images),
                                   torch.from_numpy(data.val_labels), data.classes, 64)
    return ShortRun(config, data, result, _read(run_dir), probabilities)


def _train(config: TrainConfig, data: Dataset, run_dir: Path, *, resume: bool = False
           ) -> TrainResult:
    reporter = ProgressReporter(None)
    try:
        return train(config, data, run_dir, reporter, resume=resume)
    finally:
        reporter.close()


def _read(run_dir: Path) -> EventAccumulator:
    board = EventAccumulator(str(run_dir / "tensorboard"),
                             size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
    board.Reload()
    return board


def _steps_by_tag(board: EventAccumulator) -> dict[str, list[int]]:
    tags = board.Tags()
    read = {"scalars": board.Scalars, "images": board.Images, "histograms": board.Histograms,
            "tensors": board.Tensors}
    return {tag: [event.step for event in read[plugin](tag)]
            for plugin in PER_EPOCH_PLUGINS for tag in tags[plugin]}


def _decode(board: EventAccumulator, tag: str) -> np.ndarray:
    event = board.Images(tag)[-1]
    image = Image.open(io.BytesIO(event.encoded_image_string))
    assert image.format == "PNG" and image.size == (event.width, event.height)
    return np.asarray(image.convert("RGB"))


def test_every_plugin_gets_one_entry_per_epoch(short_run: ShortRun) -> None:
    steps = _steps_by_tag(short_run.board)
    classes = short_run.data.classes
    names = [name for name, _ in short_run.result.net.named_parameters()]
    expected = {"Loss/train", "Loss/val", "Accuracy/train", "Accuracy/val", "LearningRate",
                *(f"Recall/{c}" for c in classes), "Validation/confusion",
                "Validation/predictions", *(f"PR/{c}" for c in classes),
                *(f"Weights/{name}" for name in names)}
    assert set(steps) == expected
    assert all(s == [1, 2] for s in steps.values()), steps
    accuracy = [s.value for s in short_run.board.Scalars("Accuracy/val")]
    assert accuracy == pytest.approx(short_run.result.log.validation_accuracy_per_epoch)
    # add_graph is left out on purpose (convserve.training.tensorboard says why).
    assert not short_run.board.Tags()["graph"]


def test_confusion_image_is_the_final_validation(short_run: ShortRun) -> None:
    decoded = _decode(short_run.board, "Validation/confusion")
    validation = short_run.result.validation
    assert validation.confusion.sum() == len(short_run.data.val_labels)
    assert decoded.shape[0] == decoded.shape[1] > 10 * 24  # square, a cell of >= 24 px per class
    np.testing.assert_array_equal(decoded, confusion_image(validation.confusion,
                                                           short_run.data.classes))


def test_prediction_grid_shows_the_first_validation_images(short_run: ShortRun) -> None:
    decoded = _decode(short_run.board, "Validation/predictions")
    data = short_run.data
    predicted = short_run.probabilities[:GRID_IMAGES].argmax(axis=1)
    expected = prediction_grid(data.val_images[:GRID_IMAGES], predicted,
                               data.val_labels[:GRID_IMAGES], data.classes)
    np.testing.assert_array_equal(decoded, expected)
    assert decoded.shape[1] % GRID_COLUMNS == 0 and decoded.shape[0] > 4 * 64
    first = data.val_images[0].repeat(2, axis=0).repeat(2, axis=1)  # shown at twice the size
    assert _contains(decoded[:100, :100], first)
    last = data.val_images[GRID_IMAGES - 1].repeat(2, axis=0).repeat(2, axis=1)
    assert _contains(decoded[-110:, -110:], last)


def _contains(area: np.ndarray, tile: np.ndarray) -> bool:
    windows = np.lib.stride_tricks.sliding_window_view(area, tile.shape)
    return bool((windows == tile).all(axis=(-3, -2, -1)).any())


def test_pr_curves_count_each_class_against_the_rest(short_run: ShortRun) -> None:
    board, data = short_run.board, short_run.data
    for index, name in enumerate(data.classes):
        tag = f"PR/{name}"
        assert board.SummaryMetadata(tag).plugin_data.plugin_name == "pr_curves"
        curve = tensor_util.make_ndarray(board.Tensors(tag)[-1].tensor_proto)
        assert curve.shape == (6, 127)  # TP, FP, TN, FN, precision, recall at 127 thresholds
        tp, fp, tn, fn = curve[:4]
        positive = data.val_labels == index
        assert (tp + fp + tn + fn == len(positive)).all()
        assert tp[0] + fn[0] == positive.sum()
        # TP at threshold i/126: positives whose probability falls in bucket i or above.
        buckets = np.floor(short_run.probabilities[:, index] * 126).astype(np.int64)
        expected_tp = [(positive & (buckets >= i)).sum() for i in range(127)]
        np.testing.assert_array_equal(tp, expected_tp)


def test_histograms_summarise_every_parameter(short_run: ShortRun) -> None:
    for name, parameter in short_run.result.net.named_parameters():
        histogram = short_run.board.Histograms(f"Weights/{name}")[-1].histogram_value
        values = parameter.detach().double()
        assert histogram.num == values.numel()
        assert (histogram.min, histogram.max) == (values.min().item(), values.max().item())
        assert histogram.sum == pytest.approx(values.sum().item(), abs=1e-4)
        assert sum(histogram.bucket) == values.numel()


def test_hparams_hold_the_settings_and_name_the_final_metrics(short_run: ShortRun) -> None:
    content = short_run.board.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["dataset"].string_value == "synthetic:160"
    assert start.hparams["lr"].number_value == pytest.approx(3e-3)
    assert start.hparams["epochs"].number_value == EPOCHS
    assert start.hparams["device_used"].string_value == "cpu"
    assert set(start.hparams) == {*short_run.config.to_dict(), "device_used", "compiled"}
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["Accuracy/val", "Loss/val"]
    end = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_end_info"]).session_end_info
    assert end.status == 1  # STATUS_SUCCESS
    # The plugin shows a metric's last scalar: the final epoch's.
    final = short_run.board.Scalars("Accuracy/val")[-1]
    assert (final.step, final.value) == (EPOCHS, pytest.approx(short_run.result.validation.accuracy))


def test_the_hparams_plugin_lists_this_run_with_its_final_metrics(short_run: ShortRun,
                                                                  ) -> None:
    """Through the plugin itself (as `tensorboard --logdir <run>/tensorboard` serves it): the
    summaries are in the run's own directory, so its row is the run with the curves."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    logdir = short_run.board.path
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, logdir)
    hparams = backend_context.Context(base_plugin.TBContext(logdir=logdir,
                                                            data_provider=provider))
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=10,
                                               allowed_statuses=[api_pb2.STATUS_SUCCESS])
    response = list_session_groups.Handler(context.RequestContext(), hparams, "", request).run()
    (group,) = response.session_groups
    assert [session.name for session in group.sessions] == ["."]  # the run directory itself
    assert group.hparams["batch_size"].number_value == 64
    metrics = {m.name.tag: (m.training_step, m.value) for m in group.metric_values}
    batches = -(-len(short_run.data.val_labels) // short_run.config.batch_size)
    val_loss = np.mean(short_run.result.log.validation_loss_per_batch[-batches:])
    assert metrics["Accuracy/val"] == (EPOCHS, pytest.approx(short_run.result.validation.accuracy))
    assert metrics["Loss/val"] == (EPOCHS, pytest.approx(val_loss, rel=1e-5))


def test_resume_after_a_kill_in_the_last_epoch_keeps_every_step_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after epoch 4 of 4 reached TensorBoard but before its checkpoint: the resumed run
    starts from epoch 3's, keeps steps 1-3 and replaces the orphaned step 4."""
    config = TrainConfig(dataset="synthetic:64", epochs=4, compile="off")
    data = load_dataset(config.dataset, Path("unused"), seed=0)
    save_checkpoint = train_module.save_checkpoint

    class Killed(Exception):
        pass

    def die_before_the_last(*args: object, **kwargs: object) -> Path:
        # By name, however train.py passes it (today: positionally).
        epoch = inspect.signature(save_checkpoint).bind(*args, **kwargs).arguments["epoch"]
        if epoch == config.epochs:
            raise Killed
        return save_checkpoint(*args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "save_checkpoint", die_before_the_last)
        with pytest.raises(Killed):
            _train(config, data, tmp_path)
    killed = _read(tmp_path)
    assert [s.step for s in killed.Scalars("Accuracy/val")] == [1, 2, 3, 4]
    epoch_3 = killed.Scalars("Accuracy/train")[2]

    resumed = _train(config, data, tmp_path, resume=True)
    board = _read(tmp_path)
    # This accumulator never purges tensors (the PR curves); the one TensorBoard serves from does.
    steps = {tag: s for tag, s in _steps_by_tag(board).items() if not tag.startswith("PR/")}
    assert len(steps) > 30 and all(s == [1, 2, 3, 4] for s in steps.values()), steps
    assert board.Scalars("Accuracy/train")[2] == epoch_3  # written once, by the first process
    assert [s.value for s in board.Scalars("Accuracy/val")] == pytest.approx(
        resumed.log.validation_accuracy_per_epoch)
    served = plugin_event_accumulator.EventAccumulator(
        str(tmp_path / "tensorboard"), size_guidance={plugin_event_accumulator.TENSORS: 0})
    served.Reload()
    series = {tag: [e.step for e in served.Tensors(tag)] for tag in served.Tags()["tensors"]}
    hparams = {tag: series.pop(tag) for tag in served.PluginTagToContent("hparams")}
    assert set(series) == set(steps) | {f"PR/{c}" for c in data.classes}
    assert all(s == [1, 2, 3, 4] for s in series.values()), series
    assert len(hparams) == 3 and all(s == [4] for s in hparams.values()), hparams


def test_confusion_image_shades_each_row_by_its_share() -> None:
    classes = ("cat", "dog", "a-class-name-far-too-long-to-print-in-full")
    dark = np.array([8, 48, 107], dtype=np.uint8)
    diagonal = confusion_image(np.diag([50, 1, 3]), classes)
    split = confusion_image(np.array([[25, 25, 0], [1, 1, 0], [0, 2, 2]]), classes)
    # A row all on one cell gets the darkest shade, whatever the class's size; half shares never.
    assert (diagonal == dark).all(axis=-1).sum() > 3 * 16 * 16
    assert not (split == dark).all(axis=-1).any()
    assert diagonal.shape == split.shape and diagonal.shape[1] < 300  # long names are cut short
    assert diagonal.dtype == np.uint8 and diagonal.shape[2] == 3


def test_prediction_grid_marks_right_and_wrong_predictions() -> None:
    # Grey images: the only coloured pixels are the labels' (anti-aliased, hence "mostly").
    grey = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 1), dtype=np.uint8)
    images = grey.repeat(3, axis=-1)
    labels = np.array([0, 1, 0, 1, 0])
    right = prediction_grid(images, labels, labels, ("cat", "dog"))
    wrong = prediction_grid(images, 1 - labels, labels, ("cat", "dog"))
    assert right.shape == wrong.shape and right.shape[0] > 2 * 64  # 5 images: two rows of 4
    assert _mostly(right, 1) > 20 and _mostly(right, 0) == 0
    assert _mostly(wrong, 0) > 20 and _mostly(wrong, 1) == 0


def _mostly(image: np.ndarray, channel: int) -> int:
    """How many pixels are mostly red (channel 0) or green (1)."""
    pixels = image.astype(np.int64)
    others = np.delete(pixels, channel, axis=-1).max(axis=-1)
    return int((pixels[..., channel] > others + 60).sum())
