"""convserve.serving.tensors: Open Inference tensors read exactly as Predict reads raw images, and
the classification extension's strings."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from convserve.contracts.errors import InvalidInput, LimitExceeded
from convserve.serving import codec, tensors

LIMITS = codec.Limits(max_images=4)


def test_uint8_nhwc_bytes_are_the_pixels_and_nchw_is_transposed() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        tensors.pixels("UINT8", [2, 32, 32, 3], pixels.tobytes(), LIMITS), pixels)
    nchw = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(
        tensors.pixels("UINT8", [2, 3, 32, 32], nchw.tobytes(), LIMITS), pixels)


def test_fp32_in_unit_range_becomes_the_same_uint8_as_predict_makes() -> None:
    floats = np.random.default_rng(1).random((1, 32, 32, 3), dtype=np.float32)
    raw = codec.decode_raw(codec.pb.RawImages(data=floats.tobytes(), dtype=codec.pb.FLOAT32,
                                              shape=[1, 32, 32, 3]), LIMITS)
    np.testing.assert_array_equal(tensors.pixels("FP32", [1, 32, 32, 3], floats.tobytes(), LIMITS),
                                  raw)


@pytest.mark.parametrize(("datatype", "shape", "size", "error", "message"), [
    ("INT8", [1, 32, 32, 3], 3072, InvalidInput, "expected datatype UINT8 or FP32, got 'INT8'"),
    ("UINT8", [1, 32, 32], 3072, InvalidInput, "expected shape [N, 32, 32, 3]"),
    ("UINT8", [1, 32, 32, 3], 3071, InvalidInput, "expected 3072 bytes"),
    ("UINT8", [5, 32, 32, 3], 5 * 3072, LimitExceeded, "at most 4 images"),
    ("UINT8", [1, 32, 32, 2**70], 3072, InvalidInput, "expected a shape of integers"),
    ("UINT8", [1, 32, 32, True], 3072, InvalidInput, "expected a shape of integers"),
])
def test_bad_tensors_are_refused_in_predicts_words(datatype: str, shape: list, size: int,
                                                   error: type, message: str) -> None:
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")) as refused:
        tensors.pixels(datatype, shape, bytes(size), LIMITS)
    assert "input 'pixels'" in str(refused.value)


@pytest.mark.parametrize(("datatype", "values", "message"), [
    ("UINT8", [256] + [0] * 3071, "UINT8 values must be in 0..255"),
    ("UINT8", [-1] + [0] * 3071, "UINT8 values must be in 0..255"),
    ("UINT8", [0.5] * 3072, "expected UINT8 numbers, got values of type float64"),
    ("FP32", ["a"] * 3072, "expected FP32 numbers"),
    ("UINT8", [0] * 3000, "needs 3072 values, got 3000"),
    ("UINT8", [[0, 1], [2]], "regularly nested"),
])
def test_typed_values_are_checked_before_they_become_bytes(datatype: str, values: list,
                                                           message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        tensors.values_to_bytes(datatype, [1, 32, 32, 3], values)


def test_typed_values_flat_or_nested_give_the_same_bytes() -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    flat = tensors.values_to_bytes("UINT8", [1, 32, 32, 3], pixels.ravel().tolist())
    nested = tensors.values_to_bytes("UINT8", [1, 32, 32, 3], pixels.tolist())
    assert flat == nested == pixels.tobytes()


def test_classification_is_value_index_label_best_first_and_serializes_with_lengths() -> None:
    probabilities = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], dtype=np.float32)
    top = tensors.classification(probabilities, ("cat", "dog", "eel"), 2)
    assert top == [b"0.700000:1:dog", b"0.200000:2:eel", b"0.500000:0:cat", b"0.250000:1:dog"]
    raw = tensors.serialize_bytes(top[:2])
    assert raw == struct.pack("<I", 14) + top[0] + struct.pack("<I", 14) + top[1]


@pytest.mark.parametrize("k", [0, 4, True, 2.0, "2"])
def test_a_class_count_outside_one_to_the_classes_is_refused(k: object) -> None:
    with pytest.raises(InvalidInput, match="classification must be an integer in 1..3"):
        tensors.class_count(k, 3)
