"""Open Inference Protocol (KServe v2) tensors: its input as the model's pixels, its outputs from
the model's probabilities. Shared by both transports (gRPC: raw bytes or typed contents; HTTP:
JSON lists or binary data). Every input goes through `codec.decode_raw`, so it is checked exactly
as Predict's raw images are, with the same limits and the same words."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np

from convserve.contracts.errors import InvalidInput
from convserve.contracts.model_signature import SIGNATURE
from convserve.pb.convserve.v1 import convserve_pb2 as pb
from convserve.serving import codec

INPUT = SIGNATURE.input_name
OUTPUT = SIGNATURE.output_name
DATATYPES = {"UINT8": pb.UINT8, "FP32": pb.FLOAT32}  # what `pixels` may be: as Predict takes
_MAX_DIM = 2**62  # a shape entry beyond this is nonsense, and would not fit an int64 field


def pixels(datatype: str, shape: Sequence[int], data: bytes, limits: codec.Limits
           ) -> np.ndarray:
    """The input as uint8 [N, 32, 32, 3]. [N, 3, 32, 32] is read as NCHW (the shapes cannot be
    confused); FP32 is in [0, 1], as torchvision's ToTensor gives it."""
    if datatype not in DATATYPES:
        raise InvalidInput(f"input {INPUT!r}: expected datatype UINT8 or FP32, got {datatype!r}")
    dims = checked_shape(shape)
    layout = pb.NCHW if len(dims) == 4 and tuple(dims[1:]) == SIGNATURE.shape_in("NCHW") else pb.NHWC
    raw = pb.RawImages(data=data, dtype=DATATYPES[datatype], shape=dims, layout=layout)
    return codec.decode_raw(raw, limits, what=f"input {INPUT!r}")


def checked_shape(shape: Sequence[object]) -> list[int]:
    if not all(isinstance(d, int) and not isinstance(d, bool) and abs(d) < _MAX_DIM
               for d in shape):
        raise InvalidInput(f"input {INPUT!r}: expected a shape of integers, got {list(shape)!r}")
    return [int(d) for d in shape]  # type: ignore[call-overload]


def values_to_bytes(datatype: str, shape: Sequence[int], values: object) -> bytes:
    """Typed values (gRPC `contents`, JSON `data`, flat or nested) as the input's raw bytes."""
    dims = checked_shape(shape)
    try:
        array = np.asarray(values)
    except (ValueError, TypeError):  # ragged nesting
        raise InvalidInput(f"input {INPUT!r}: expected a flat or regularly nested list of "
                           "numbers") from None
    expected_kinds = "iu" if datatype == "UINT8" else "iuf"
    if array.size and array.dtype.kind not in expected_kinds:
        raise InvalidInput(f"input {INPUT!r}: expected {datatype} numbers, got values of type "
                           f"{array.dtype.name}")
    if array.size != math.prod(dims):
        raise InvalidInput(f"input {INPUT!r}: shape {dims} needs {math.prod(dims)} values, got "
                           f"{array.size}")
    if datatype == "UINT8":
        if array.size and (array.min() < 0 or array.max() > 255):
            raise InvalidInput(f"input {INPUT!r}: UINT8 values must be in 0..255, got "
                               f"{array.min()}..{array.max()}")
        return array.astype(np.uint8).tobytes()
    return array.astype("<f4").tobytes()


def class_count(value: object, classes: int) -> int:
    """The classification extension's `classification` parameter: how many top classes."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= classes:
        raise InvalidInput(f"output {OUTPUT!r}: classification must be an integer in "
                           f"1..{classes}, got {value!r}")
    return value


def classification(probabilities: np.ndarray, classes: Sequence[str], k: int) -> list[bytes]:
    """Triton's classification extension: per image its top k as b"value:index:label", best
    first, flattened row by row (shape [N, k])."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(probabilities, order, axis=1)
    return [f"{value:f}:{index}:{classes[index]}".encode()
            for row_values, row_order in zip(values.tolist(), order.tolist(), strict=True)
            for value, index in zip(row_values, row_order, strict=True)]


def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    """A BYTES tensor as raw (binary) data: each element preceded by its 4-byte LE length."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)
