"""numpy arrays to and from Predict's wire format: what the client SDK needs, and no more
(numpy and the generated messages; no Pillow, no ONNX Runtime). convserve.serving.codec, the server's
side, checks requests against the same shapes.
"""

from __future__ import annotations

import math

import numpy as np

from convserve.contracts.errors import InvalidInput
from convserve.pb.convserve.v1 import convserve_pb2 as pb

IMAGE_SHAPE = (32, 32, 3)                  # H, W, C: the model's input, NHWC
NCHW_SHAPE = (3, 32, 32)

def encode_raw(images: np.ndarray) -> pb.RawImages:
    """uint8 or float32 images, [32,32,3] / [3,32,32] (one) or [N,32,32,3] / [N,3,32,32]."""
    array = np.asarray(images)
    native = array.dtype.newbyteorder("=")
    if native not in (np.uint8, np.float32):
        raise InvalidInput(f"images: expected dtype uint8 or float32, got {array.dtype}")
    if array.ndim == 3:
        array = array[np.newaxis]
    if array.ndim != 4 or array.shape[1:] not in (IMAGE_SHAPE, NCHW_SHAPE):
        raise InvalidInput("images: expected shape [32, 32, 3], [3, 32, 32], [N, 32, 32, 3] or "
                           f"[N, 3, 32, 32], got {list(np.shape(images))}")
    if array.shape[0] < 1:
        raise InvalidInput(f"images: expected at least 1 image, got shape {list(array.shape)}")
    # 32 != 3, so where the 3 sits tells the layout unambiguously.
    layout = pb.NHWC if array.shape[-1] == 3 else pb.NCHW
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
