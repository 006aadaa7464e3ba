"""Tests for convserve.training.data: every dataset source against real files in tmp_path, no mocks."""

from __future__ import annotations

import json
import math
import os
import pickle
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convserve.contracts.errors import DatasetError
from convserve.training.data import DATASET_NAMES_HELP, Dataset, load_dataset
from tests.conftest import python_env

DIGITS_TOTAL = 1797


# --- helpers --------------------------------------------------------------------------------


def assert_well_formed(ds: Dataset, num_classes: int) -> None:
    assert len(ds.classes) == num_classes
    for images, labels in ((ds.train_images, ds.train_labels), (ds.val_images, ds.val_labels)):
        assert isinstance(images, np.ndarray) and isinstance(labels, np.ndarray)
        assert images.dtype == np.uint8
        assert images.ndim == 4 and images.shape[1:] == (32, 32, 3)
        assert images.flags.c_contiguous
        assert labels.dtype == np.int64
        assert labels.shape == (len(images),)
        if len(labels):
            assert labels.min() >= 0 and labels.max() < num_classes


def row_hashes(images: np.ndarray) -> list[bytes]:
    return [row.tobytes() for row in images]


def nearest_mean_accuracy(ds: Dataset) -> float:
    """Fit class means on train, classify val by Euclidean distance to them."""
    x_train = ds.train_images.reshape(len(ds.train_images), -1).astype(np.float64)
    x_val = ds.val_images.reshape(len(ds.val_images), -1).astype(np.float64)
    means = np.stack([x_train[ds.train_labels == c].mean(axis=0)
                      for c in range(len(ds.classes))])
    dists = (x_val**2).sum(1)[:, None] - 2 * x_val @ means.T + (means**2).sum(1)[None, :]
    return float((dists.argmin(axis=1) == ds.val_labels).mean())


def write_image(path: Path, pixels: np.ndarray | Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    img.save(path)
    return path


def solid(color: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """[h, w, 3] uint8 image of one colour; size is (height, width)."""
    return np.broadcast_to(np.array(color, np.uint8), (*size, 3)).copy()


def make_class_tree(folder: Path, colors: dict[str, tuple[int, int, int]], per_class: int,
                    size: tuple[int, int] = (32, 32)) -> None:
    for name, color in colors.items():
        for i in range(per_class):
            write_image(folder / name / f"img{i}.png", solid(color, size))


def mean_colors(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1, 3).mean(axis=1)


def expect_error(name: str, root: Path, *fragments: str, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(name, root, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# --- digits ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", "/nonexistent-root-is-unused")


def test_digits_shapes_and_dtypes(digits: Dataset) -> None:
    assert_well_formed(digits, 10)
    assert digits.name == "digits"
    # Grayscale replicated across the three channels.
    assert np.array_equal(digits.train_images[..., 0], digits.train_images[..., 2])


def test_digits_value_range_spans_0_to_255(digits: Dataset) -> None:
    both = np.concatenate([digits.train_images, digits.val_images])
    assert both.min() == 0
    assert both.max() == 255
    # Not a 0..16 range merely cast: most images reach near-white strokes.
    assert np.median(both.reshape(len(both), -1).max(axis=1)) > 200


def test_digits_classes_and_sizes(digits: Dataset) -> None:
    assert digits.classes == tuple(str(i) for i in range(10))
    n_train, n_val = len(digits.train_labels), len(digits.val_labels)
    assert n_train + n_val == DIGITS_TOTAL
    assert abs(n_val - 0.2 * DIGITS_TOTAL) <= 10
    assert digits.describe() == {
        "name": "digits", "classes": list(digits.classes), "num_classes": 10,
        "train_size": n_train, "val_size": n_val, "image_shape": [32, 32, 3],
    }


def test_digits_split_is_stratified(digits: Dataset) -> None:
    train_counts = np.bincount(digits.train_labels, minlength=10)
    val_counts = np.bincount(digits.val_labels, minlength=10)
    assert (val_counts > 0).all() and (train_counts > 0).all()
    for train_n, val_n in zip(train_counts, val_counts, strict=True):
        assert abs(val_n / (train_n + val_n) - 0.2) < 0.01


def test_digits_same_seed_gives_identical_split(digits: Dataset) -> None:
    again = load_dataset("digits", "/unused", seed=0)
    for field in ("train_images", "train_labels", "val_images", "val_labels"):
        assert np.array_equal(getattr(digits, field), getattr(again, field)), field


def test_digits_different_seed_gives_different_partition_of_same_images(
        digits: Dataset) -> None:
    other = load_dataset("digits", "/unused", seed=1)
    assert set(row_hashes(digits.val_images)) != set(row_hashes(other.val_images))
    # Both seeds partition the same 1797 images.
    assert (Counter(row_hashes(digits.train_images)) + Counter(row_hashes(digits.val_images))
            == Counter(row_hashes(other.train_images)) + Counter(row_hashes(other.val_images)))


def test_digits_train_and_val_are_disjoint(digits: Dataset) -> None:
    train, val = set(row_hashes(digits.train_images)), set(row_hashes(digits.val_images))
    assert len(train) + len(val) == DIGITS_TOTAL  # the 1797 digits are pairwise distinct
    assert not train & val


def test_digits_val_fraction_changes_split_size() -> None:
    ds = load_dataset("digits", "/unused", val_fraction=0.5)
    assert abs(len(ds.val_labels) - DIGITS_TOTAL / 2) <= 10
    assert len(ds.train_labels) + len(ds.val_labels) == DIGITS_TOTAL


def test_digits_labels_stay_aligned_with_images(digits: Dataset) -> None:
    # A shuffled-label bug would leave nearest-class-mean at chance (10%).
    assert nearest_mean_accuracy(digits) > 0.8


# --- synthetic ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic300() -> Dataset:
    return load_dataset("synthetic:300", "/unused", seed=0)


def test_synthetic_shapes_and_sizes(synthetic300: Dataset) -> None:
    assert_well_formed(synthetic300, 10)
    assert synthetic300.name == "synthetic:300"
    assert len(synthetic300.train_labels) == 300
    assert len(synthetic300.val_labels) == 300 // 5
    assert synthetic300.classes == tuple(f"class{i}" for i in range(10))
    assert (np.bincount(synthetic300.train_labels, minlength=10) == 30).all()
    assert (np.bincount(synthetic300.val_labels, minlength=10) == 6).all()


@pytest.mark.parametrize(("name", "n_train"), [("synthetic", 5000), ("synthetic:10", 10),
                                               ("synthetic:57", 57)])
def test_synthetic_sizes(name: str, n_train: int) -> None:
    ds = load_dataset(name, "/unused")
    assert_well_formed(ds, 10)
    assert len(ds.train_labels) == n_train
    assert len(ds.val_labels) == n_train // 5


def test_synthetic_is_bit_identical_for_same_args(synthetic300: Dataset) -> None:
    again = load_dataset("synthetic:300", "/unused", seed=0)
    for field in ("train_images", "train_labels", "val_images", "val_labels"):
        assert np.array_equal(getattr(synthetic300, field), getattr(again, field)), field


def test_synthetic_differs_across_seeds(synthetic300: Dataset) -> None:
    other = load_dataset("synthetic:300", "/unused", seed=1)
    assert not np.array_equal(synthetic300.train_images, other.train_images)
    assert not np.array_equal(synthetic300.val_images, other.val_images)


def test_synthetic_val_is_not_a_copy_of_train(synthetic300: Dataset) -> None:
    assert not set(row_hashes(synthetic300.train_images)) & set(
        row_hashes(synthetic300.val_images))


@pytest.mark.parametrize("name", ["synthetic:0", "synthetic:9", "synthetic:100001",
                                  "synthetic:999999999"])
def test_synthetic_out_of_range_size_is_refused(name: str) -> None:
    expect_error(name, Path("/unused"), "between", DATASET_NAMES_HELP)


@pytest.mark.parametrize("name", ["synthetic:", "synthetic:-5", "synthetic:1e3",
                                  "synthetic:abc", "synthetic: 300", "synthetic:300 ",
                                  "synthetic:" + "9" * 10, "synthetic:\u0663\u0660\u0660"])
def test_synthetic_malformed_size_is_refused(name: str) -> None:
    expect_error(name, Path("/unused"), DATASET_NAMES_HELP)


def test_synthetic_is_learnable_but_not_trivial(synthetic300: Dataset) -> None:
    assert nearest_mean_accuracy(synthetic300) > 0.3  # chance is 0.1
    for c in range(10):
        members = synthetic300.train_images[synthetic300.train_labels == c]
        assert len(set(row_hashes(members))) == len(members)
        assert members.astype(np.float64).std(axis=0).mean() > 5.0
    # Pixels use a broad part of the uint8 range rather than a constant.
    assert synthetic300.train_images.std() > 20


# --- cifar10 --------------------------------------------------------------------------------

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck"]


def write_cifar_fixture(root: Path, per_batch: int = 2, n_test: int = 3) -> dict[str, np.ndarray]:
    """Tiny CIFAR-10 in torchvision's on-disk format: pickled dicts of str keys
    ("data" uint8 [n, 3072] planar CHW rows, "labels"), plus batches.meta "label_names"."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(123)
    rows_train, labels_train = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        rows_train.append(data)
        labels_train += labels
        with (folder / f"data_batch_{i}").open("wb") as f:
            pickle.dump({"batch_label": f"training batch {i} of 5", "labels": labels,
                         "data": data, "filenames": [f"{i}_{k}.png" for k in range(per_batch)]},
                        f)
    test_data = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_labels = [9, 0, 4][:n_test]
    with (folder / "test_batch").open("wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "labels": test_labels,
                     "data": test_data}, f)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({"num_cases_per_batch": per_batch, "label_names": CIFAR_NAMES,
                     "num_vis": 3072}, f)
    return {"train_rows": np.concatenate(rows_train), "train_labels": np.array(labels_train),
            "val_rows": test_data, "val_labels": np.array(test_labels)}


def test_cifar10_loads_local_files_in_nhwc(tmp_path: Path) -> None:
    expected = write_cifar_fixture(tmp_path)
    # Mark known pixels: (image 3, channel 2, row 5, col 7) and (image 0, channel 0, 31, 0).
    ds_expected_marks = [(3, 2, 5, 7, 201), (0, 0, 31, 0, 17), (7, 1, 0, 31, 99)]
    train_rows = expected["train_rows"]
    for image, channel, row, col, value in ds_expected_marks:
        train_rows[image, channel * 1024 + row * 32 + col] = value
    # Rewrite the batches holding the marked images (2 per batch).
    folder = tmp_path / "cifar-10-batches-py"
    for batch in {m[0] // 2 for m in ds_expected_marks}:
        path = folder / f"data_batch_{batch + 1}"
        with path.open("rb") as f:
            entry = pickle.load(f)
        entry["data"] = train_rows[2 * batch: 2 * batch + 2].copy()
        with path.open("wb") as f:
            pickle.dump(entry, f)

    ds = load_dataset("cifar10", tmp_path)
    assert_well_formed(ds, 10)
    assert ds.name == "cifar10"
    assert ds.classes == tuple(CIFAR_NAMES)
    assert len(ds.train_labels) == 10 and len(ds.val_labels) == 3
    for image, channel, row, col, value in ds_expected_marks:
        assert ds.train_images[image, row, col, channel] == value
    assert np.array_equal(ds.train_images,
                          train_rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert np.array_equal(ds.val_images,
                          expected["val_rows"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert ds.train_labels.tolist() == expected["train_labels"].tolist()
    assert ds.val_labels.tolist() == [9, 0, 4]


def test_cifar10_missing_folder_names_it_and_mentions_download(tmp_path: Path) -> None:
    expect_error("cifar10", tmp_path, str(tmp_path / "cifar-10-batches-py"), "download")


def test_cifar10_incomplete_folder_is_a_dataset_error(tmp_path: Path) -> None:
    write_cifar_fixture(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    expect_error("cifar10", tmp_path, "cifar-10-batches-py")


def test_cifar10_corrupt_batch_is_a_dataset_error(tmp_path: Path) -> None:
    write_cifar_fixture(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    expect_error("cifar10", tmp_path, "cifar-10-batches-py")


# --- folder:<name> --------------------------------------------------------------------------

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def assert_colors_match_labels(ds: Dataset, colors: dict[str, tuple[int, int, int]]) -> None:
    for images, labels in ((ds.train_images, ds.train_labels), (ds.val_images, ds.val_labels)):
        for color, label in zip(mean_colors(images), labels, strict=True):
            assert np.allclose(color, colors[ds.classes[label]], atol=1), (color, label)


def test_folder_train_val_layout(tmp_path: Path) -> None:
    colors = {"zebra": BLUE, "ant": RED}  # created out of order: classes must come out sorted
    make_class_tree(tmp_path / "pets" / "train", colors, per_class=3)
    make_class_tree(tmp_path / "pets" / "val", colors, per_class=1)
    ds = load_dataset("folder:pets", tmp_path)
    assert_well_formed(ds, 2)
    assert ds.name == "folder:pets"
    assert ds.classes == ("ant", "zebra")
    assert len(ds.train_labels) == 6 and len(ds.val_labels) == 2
    assert sorted(ds.val_labels.tolist()) == [0, 1]
    assert_colors_match_labels(ds, colors)


def test_folder_single_tree_is_split_stratified_and_seeded(tmp_path: Path) -> None:
    colors = {"c": BLUE, "a": RED, "b": GREEN}
    for name, color in colors.items():  # distinct images, so rows identify them
        for i in range(5):
            write_image(tmp_path / "shapes" / name / f"{i}.png",
                        solid(tuple(max(v - 10 * i, 0) for v in color)))
    ds = load_dataset("folder:shapes", tmp_path, seed=0)
    assert_well_formed(ds, 3)
    assert ds.classes == ("a", "b", "c")
    assert len(ds.train_labels) == 12 and len(ds.val_labels) == 3
    assert np.bincount(ds.val_labels, minlength=3).tolist() == [1, 1, 1]
    assert not set(row_hashes(ds.train_images)) & set(row_hashes(ds.val_images))
    for images, labels in ((ds.train_images, ds.train_labels), (ds.val_images, ds.val_labels)):
        for color, label in zip(mean_colors(images), labels, strict=True):
            assert int(np.argmax(color)) == {"a": 0, "b": 1, "c": 2}[ds.classes[label]]
    again = load_dataset("folder:shapes", tmp_path, seed=0)
    assert np.array_equal(ds.val_images, again.val_images)
    val_sets = {frozenset(row_hashes(load_dataset("folder:shapes", tmp_path, seed=s).val_images))
                for s in range(6)}
    assert len(val_sets) > 1


def test_folder_converts_modes_to_rgb(tmp_path: Path) -> None:
    cls = tmp_path / "modes" / "x"
    write_image(cls / "a_gray.png", np.full((32, 32), 77, np.uint8))
    write_image(cls / "b_rgba.png", np.broadcast_to(np.array([10, 20, 30, 0], np.uint8),
                                                    (32, 32, 4)).copy())
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([200, 100, 50] + [0] * 765)
    write_image(cls / "c_palette.png", palette)
    write_image(cls / "d_gray16.png", np.full((32, 32), 200 * 257, np.uint16))
    write_image(cls / "e_bw.bmp", Image.new("1", (32, 32), 1))
    for mode_name in ("a_gray.png", "b_rgba.png", "c_palette.png", "d_gray16.png"):
        assert Image.open(cls / mode_name).mode in {"L", "RGBA", "P", "I;16"}
    write_image(tmp_path / "modes" / "y" / "1.png", solid(RED))
    write_image(tmp_path / "modes" / "y" / "2.png", solid(RED))
    ds = load_dataset("folder:modes", tmp_path, val_fraction=0.2)
    assert_well_formed(ds, 2)
    images = np.concatenate([ds.train_images, ds.val_images])
    labels = np.concatenate([ds.train_labels, ds.val_labels])
    found = {tuple(int(v) for v in img[0, 0]) for img in images[labels == 0]}
    assert found == {(77, 77, 77), (10, 20, 30), (200, 100, 50), (200, 200, 200),
                     (255, 255, 255)}
    for img in images:  # each source image is one flat colour
        assert (img == img[0, 0]).all()


def test_folder_resizes_to_32x32_keeping_orientation(tmp_path: Path) -> None:
    left_red_right_green = solid(RED, (40, 50))  # 40 rows (height) x 50 columns (width)
    left_red_right_green[:, 25:] = GREEN
    top_blue = solid(BLACK := (0, 0, 0), (40, 50))
    top_blue[:20] = BLUE
    for i in range(2):
        write_image(tmp_path / "wide" / "lr" / f"{i}.png", left_red_right_green)
        write_image(tmp_path / "wide" / "tb" / f"{i}.jpg", top_blue)
    ds = load_dataset("folder:wide", tmp_path)
    images = np.concatenate([ds.train_images, ds.val_images])
    labels = np.concatenate([ds.train_labels, ds.val_labels])
    assert images.shape == (4, 32, 32, 3)
    for img in images[labels == ds.classes.index("lr")]:
        assert (img[:, :12] == RED).all()
        assert (img[:, 20:] == GREEN).all()
    for img in images[labels == ds.classes.index("tb")]:  # JPEG: allow lossy error
        assert np.abs(img[:10].astype(int) - BLUE).max() < 25
        assert np.abs(img[22:].astype(int) - BLACK).max() < 25


def test_folder_ignores_hidden_and_non_image_entries(tmp_path: Path) -> None:
    make_class_tree(tmp_path / "ds", {"a": RED, "b": GREEN}, per_class=2)
    (tmp_path / "ds" / ".cache").mkdir()
    write_image(tmp_path / "ds" / ".cache" / "x.png", solid(BLUE))
    write_image(tmp_path / "ds" / "a" / ".hidden.png", solid(BLUE))
    (tmp_path / "ds" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "ds" / "README.md").write_text("top-level file, not a class")
    ds = load_dataset("folder:ds", tmp_path)
    assert ds.classes == ("a", "b")
    assert len(ds.train_labels) + len(ds.val_labels) == 4
    assert_colors_match_labels(ds, {"a": RED, "b": GREEN})


def test_folder_nested_name_and_link_inside_root_are_allowed(tmp_path: Path) -> None:
    make_class_tree(tmp_path / "group" / "ds", {"a": RED, "b": GREEN}, per_class=2)
    assert load_dataset("folder:group/ds", tmp_path).classes == ("a", "b")
    (tmp_path / "alias").symlink_to(tmp_path / "group" / "ds", target_is_directory=True)
    assert load_dataset("folder:alias", tmp_path).classes == ("a", "b")


def test_folder_class_mismatch_between_train_and_val(tmp_path: Path) -> None:
    make_class_tree(tmp_path / "ds" / "train", {"a": RED, "b": GREEN}, per_class=1)
    make_class_tree(tmp_path / "ds" / "val", {"a": RED, "c": BLUE}, per_class=1)
    expect_error("folder:ds", tmp_path, "differ", "a, b", "a, c")


def test_folder_train_without_val(tmp_path: Path) -> None:
    make_class_tree(tmp_path / "ds" / "train", {"a": RED, "b": GREEN}, per_class=2)
    expect_error("folder:ds", tmp_path, "val", "missing")


def test_folder_val_class_without_images(tmp_path: Path) -> None:
    make_class_tree(tmp_path / "ds" / "train", {"a": RED, "b": GREEN}, per_class=2)
    make_class_tree(tmp_path / "ds" / "val", {"a": RED}, per_class=1)
    (tmp_path / "ds" / "val" / "b").mkdir()
    expect_error("folder:ds", tmp_path, "0 image(s)")


def test_folder_empty(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    expect_error("folder:ds", tmp_path, "empty")


def test_folder_class_dirs_without_images(tmp_path: Path) -> None:
    (tmp_path / "ds" / "a").mkdir(parents=True)
    (tmp_path / "ds" / "b").mkdir()
    (tmp_path / "ds" / "b" / "notes.txt").write_text("no images here")
    expect_error("folder:ds", tmp_path, "no images")


def test_folder_single_tree_class_with_one_image(tmp_path: Path) -> None:
    make_class_tree(tmp_path / "ds", {"a": RED}, per_class=3)
    make_class_tree(tmp_path / "ds", {"b": GREEN}, per_class=1)
    expect_error("folder:ds", tmp_path, "1 image(s)", "at least 2")


def test_folder_unreadable_image_names_the_file(tmp_path: Path) -> None:
    make_class_tree(tmp_path / "ds", {"a": RED, "b": GREEN}, per_class=2)
    bad = tmp_path / "ds" / "b" / "x.png"
    bad.write_bytes(b"\x00garbage, not a PNG\xff" * 10)
    expect_error("folder:ds", tmp_path, str(bad.resolve()), "cannot read image")


def test_folder_truncated_image_names_the_file(tmp_path: Path) -> None:
    make_class_tree(tmp_path / "ds", {"a": RED, "b": GREEN}, per_class=2)
    good = write_image(tmp_path / "full.png", np.random.default_rng(0).integers(
        0, 256, (64, 64, 3), dtype=np.uint8))
    bad = tmp_path / "ds" / "a" / "cut.png"
    bad.write_bytes(good.read_bytes()[:200])
    expect_error("folder:ds", tmp_path, str(bad.resolve()))


@pytest.mark.timeout(30)
def test_folder_skips_fifo_named_like_an_image(tmp_path: Path) -> None:
    make_class_tree(tmp_path / "ds", {"a": RED, "b": GREEN}, per_class=2)
    os.mkfifo(tmp_path / "ds" / "a" / "pipe.png")  # opening it would block forever
    ds = load_dataset("folder:ds", tmp_path)
    assert len(ds.train_labels) + len(ds.val_labels) == 4


def test_folder_unlistable_class_dir_is_a_dataset_error(tmp_path: Path) -> None:
    make_class_tree(tmp_path / "ds", {"a": RED, "b": GREEN}, per_class=2)
    locked = tmp_path / "ds" / "b"
    locked.chmod(0)
    try:
        if os.geteuid() != 0:
            expect_error("folder:ds", tmp_path, str(locked))
            return
        # Root passes permission bits through CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (and CI
        # runs as root): load in a child without them (util-linux's setpriv), so the refusal
        # is real there too.
        script = ("import sys; from pathlib import Path\n"
                  "from convserve.contracts.errors import DatasetError\n"
                  "from convserve.training.data import load_dataset\n"
                  "try:\n    load_dataset('folder:ds', Path(sys.argv[1]))\n"
                  "except DatasetError as error:\n    print(error)\n"
                  "else:\n    print('loaded: the locked directory was read')\n")
        result = subprocess.run(
            ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--",
             sys.executable, "-c", script, str(tmp_path)],
            env=python_env(), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        message = result.stdout.strip()
        assert "\n" not in message and str(locked) in message, message
    finally:
        locked.chmod(0o755)


def test_folder_missing(tmp_path: Path) -> None:
    expect_error("folder:nope", tmp_path, "not found", "nope")


def test_folder_root_itself_is_refused(tmp_path: Path) -> None:
    make_class_tree(tmp_path, {"a": RED, "b": GREEN}, per_class=2)
    for name in ("folder:.", "folder:./", "folder:a/.."):
        with pytest.raises(DatasetError):
            load_dataset(name, tmp_path)


@pytest.fixture
def confined(tmp_path: Path) -> tuple[Path, Path]:
    """(root, outside): a valid dataset lives outside root, so an escape would load it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    make_class_tree(outside, {"a": RED, "b": GREEN}, per_class=2)
    return root, outside


@pytest.mark.parametrize("relative, why", [
    ("../outside", "must not contain '..'"), ("/etc", "not an absolute path"),
    ("a/../../outside", "must not contain '..'"), ("..", "must not contain '..'"),
    ("a/../../../etc", "must not contain '..'"), ("a\\..\\..\\outside", "must not contain '..'"),
    ("./../outside", "must not contain '..'"), ("nul\x00byte", "contains a NUL byte")])
def test_folder_path_escapes_are_refused(confined: tuple[Path, Path], relative: str,
                                         why: str) -> None:
    root, _ = confined
    (root / "a").mkdir()
    # Refused for the reason given, not merely "not found" (an escape that happened to miss
    # would pass that).
    expect_error(f"folder:{relative}", root, why)


def test_folder_absolute_path_to_valid_dataset_is_refused(confined: tuple[Path, Path]) -> None:
    root, outside = confined
    expect_error(f"folder:{outside}", root, "relative")


def test_folder_symlinked_dataset_dir_outside_root(confined: tuple[Path, Path]) -> None:
    root, outside = confined
    (root / "link").symlink_to(outside, target_is_directory=True)
    expect_error("folder:link", root, "outside")


def test_folder_symlinked_class_dir_outside_root(confined: tuple[Path, Path]) -> None:
    root, outside = confined
    make_class_tree(root / "ds", {"a": RED}, per_class=2)
    (root / "ds" / "b").symlink_to(outside / "b", target_is_directory=True)
    expect_error("folder:ds", root, "outside")


def test_folder_symlinked_image_outside_root(confined: tuple[Path, Path]) -> None:
    root, outside = confined
    make_class_tree(root / "ds", {"a": RED, "b": GREEN}, per_class=2)
    (root / "ds" / "a" / "stolen.png").symlink_to(outside / "b" / "img0.png")
    expect_error("folder:ds", root, "stolen.png", "outside")


def test_folder_symlink_loop_is_a_dataset_error(tmp_path: Path) -> None:
    make_class_tree(tmp_path / "ds", {"a": RED, "b": GREEN}, per_class=2)
    (tmp_path / "ds" / "a" / "loop.png").symlink_to(tmp_path / "ds" / "a" / "loop.png")
    with pytest.raises(DatasetError):
        load_dataset("folder:ds", tmp_path)


# --- names and arguments --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "mnist", "folder:", "digits ", "DIGITS", "cifar10:x",
                                  "cifar100", "Synthetic", "synthetic:", "folder"])
def test_unknown_names_list_accepted_forms(name: str, tmp_path: Path) -> None:
    message = expect_error(name, tmp_path, DATASET_NAMES_HELP)
    for form in ("digits", "cifar10", "folder:<relative path>", "synthetic:<n>"):
        assert form in message


@pytest.mark.parametrize("name", [None, 3, b"digits", ["digits"]])
def test_non_string_names_are_refused(name: object, tmp_path: Path) -> None:
    expect_error(name, tmp_path, DATASET_NAMES_HELP)  # type: ignore[arg-type]


def test_error_messages_are_single_line_and_bounded(tmp_path: Path) -> None:
    message = expect_error("mni\nst\r\n" + "x" * 10_000, tmp_path)
    assert "\r" not in message
    assert len(message) < 400
    assert issubclass(DatasetError, ValueError)


@pytest.mark.parametrize("val_fraction", [0, 0.0, 1, 1.0, -0.1, 1.5, math.nan, math.inf,
                                          "0.2", None, True])
def test_bad_val_fraction_is_refused(val_fraction: object, tmp_path: Path) -> None:
    for name in ("digits", "synthetic:10", "folder:x"):
        expect_error(name, tmp_path, "val_fraction", val_fraction=val_fraction)


@pytest.mark.parametrize("seed", [-1, 1.5, True, "1", None])
def test_bad_seed_is_refused(seed: object, tmp_path: Path) -> None:
    expect_error("synthetic:10", tmp_path, "seed", seed=seed)


def test_numpy_scalar_arguments_are_accepted() -> None:
    ds = load_dataset("synthetic:20", "/unused", seed=np.int64(3), val_fraction=np.float32(0.3))
    assert np.array_equal(ds.train_images,
                          load_dataset("synthetic:20", "/unused", seed=3).train_images)


# --- network isolation, model-card summary, array invariants --------------------------------


def test_cifar10_without_download_never_opens_a_connection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    for target, attr in ((socket.socket, "connect"), (socket, "create_connection"),
                         (socket, "getaddrinfo")):
        monkeypatch.setattr(target, attr, refuse)
    # Missing folder: refused up front with the flag to pass, no fetch attempted.
    expect_error("cifar10", tmp_path, str(tmp_path / "cifar-10-batches-py"), "--download")
    write_cifar_fixture(tmp_path)  # fixture md5s differ from the official ones
    assert len(load_dataset("cifar10", tmp_path).train_labels) == 10


def test_describe_is_json_serialisable(synthetic300: Dataset) -> None:
    card = json.loads(json.dumps(synthetic300.describe()))
    assert card["name"] == "synthetic:300"
    assert card["classes"] == [f"class{i}" for i in range(10)]
    assert card["train_size"] == 300 and card["val_size"] == 60


def test_dataset_rejects_malformed_arrays() -> None:
    good, labels = np.zeros((2, 32, 32, 3), np.uint8), np.zeros(2, np.int64)
    with pytest.raises(DatasetError, match="uint8"):
        Dataset("x", ("a",), good.astype(np.float32), labels, good, labels)
    with pytest.raises(DatasetError, match="C-contiguous"):
        Dataset("x", ("a",), good[:, :, ::-1], labels, good, labels)
    with pytest.raises(DatasetError, match="labels"):
        Dataset("x", ("a",), good, labels + 1, good, labels)
