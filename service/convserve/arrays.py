"""numpy arrays to and from Predict's wire format: what the client SDK needs, and no more
(numpy and the generated messages; no Pillow, no ONNX Runtime). convserve.serving.codec, the server's
side, checks requests against the same shapes.
"""

from __future__ import annotations

import math

import numpy as np

from convserve.contracts.errors import InvalidInput
from convserve.contracts.model_signature import SIGNATURE, dims_text
from convserve.pb.convserve.v1 import convserve_pb2 as pb

IMAGE_SHAPE = SIGNATURE.shape_in("NHWC")   # H, W, C: the model's input (32, 32, 3)
NCHW_SHAPE = SIGNATURE.shape_in("NCHW")    # C, H, W: (3, 32, 32), as torchvision's ToTensor gives
_SHAPES_TEXT = (f"{list(IMAGE_SHAPE)}, {list(NCHW_SHAPE)}, {dims_text(IMAGE_SHAPE)} or "
                f"{dims_text(NCHW_SHAPE)}")


def encode_raw(images: np.ndarray) -> pb.RawImages:
    """uint8 or float32 images, [32,32,3] / [3,32,32] (one) or [N,32,32,3] / [N,3,32,32]."""
    array = np.asarray(images)
    native = array.dtype.newbyteorder("=")
    if native not in (np.uint8, np.float32):
        raise InvalidInput(f"images: expected dtype uint8 or float32, got {array.dtype}")
    if array.ndim == 3:
        array = array[np.newaxis]
    if array.ndim != 4 or array.shape[1:] not in (IMAGE_SHAPE, NCHW_SHAPE):
        raise InvalidInput(f"images: expected shape {_SHAPES_TEXT}, got {list(np.shape(images))}")
    if array.shape[0] < 1:
        raise InvalidInput(f"images: expected at least 1 image, got shape {list(array.shape)}")
    # The two shapes differ (32 != 3), so the shape tells the layout unambiguously.
    layout = pb.NHWC if array.shape[1:] == IMAGE_SHAPE else pb.NCHW
    wire = np.ascontiguousarray(array, dtype=native.newbyteorder("<"))
    return pb.RawImages(
        data=wire.tobytes(),
        dtype=pb.UINT8 if native == np.uint8 else pb.FLOAT32,
        layout=layout,
        shape=list(wire.shape),
    )


def probabilities_of(response: pb.PredictResponse) -> np.ndarray:
    """float32 [N, C] viewing the response's bytes (read-only; copy it to modify)."""
    shape = list(response.shape)
    data = response.probabilities
    if len(shape) != 2 or min(shape) < 0 or math.prod(shape) * 4 != len(data):
        raise ValueError(f"malformed PredictResponse: expected {len(data)} bytes of float32 to "
                         f"match a 2-d shape, got shape {shape}")
    return np.frombuffer(data, dtype="<f4").reshape(shape)
