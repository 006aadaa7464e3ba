"""The server's side of Predict: request -> uint8 pixels, probabilities -> reply.

The server decodes and validates a whole request here before it reaches any queue (one bad input
never fails its neighbours in a batch); the client encodes with the same rules (convserve.arrays),
so a wrong array is refused before it is sent. Raw images are decoded without copying (uint8 NHWC,
the model's native input) or with one vectorised conversion; only encoded images (PNG/JPEG) go
through PIL, one by one.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from convserve.contracts.errors import InvalidInput, LimitExceeded
from convserve.contracts.model_signature import SIGNATURE, dims_text
from convserve.pb.convserve.v1 import convserve_pb2 as pb
from convserve.serving.images import to_model_pixels

MAX_TOP_K = 1000
ENCODED_FORMATS = ("PNG", "JPEG")
_LITTLE_ENDIAN: dict[int, np.dtype] = {pb.UINT8: np.dtype("u1"), pb.FLOAT32: np.dtype("<f4")}
_ITEM_SHAPES = {pb.NHWC: SIGNATURE.shape_in("NHWC"), pb.NCHW: SIGNATURE.shape_in("NCHW")}


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the decoder, all checked from the headers before any pixel is
    decoded. Images decode one at a time, so the memory one encoded request holds while decoding
    is bounded by one image: at most `max_decoded_pixels` in the file's mode (up to 4 bytes a
    pixel) plus its RGB copy (3 bytes a pixel), 117 MiB at the defaults; JPEGs decode at a
    reduced scale and hold far less."""

    max_images: int = 1024                   # per request; beyond: LimitExceeded
    max_encoded_image_bytes: int = 4 << 20   # per encoded image; beyond: LimitExceeded
    max_decoded_pixels: int = 4096 * 4096    # width*height before decoding: decompression-bomb guard
    max_image_side: int = 4096               # width and height each: no 1 x 16M strips
    max_request_pixels: int = 4 * 4096 * 4096  # all of one request's images: its decoding work


# ------------------------------------------------------------------------------------ server side

def decode_images(request: pb.PredictRequest, limits: Limits) -> np.ndarray:
    """The request's images as uint8 [N, 32, 32, 3] NHWC RGB, C-contiguous (possibly read-only).

    Also validates `top_k`, so every refusable request is refused before any inference runs.
    """
    check_top_k(request.top_k)
    which = request.WhichOneof("images")
    if which == "raw":
        return decode_raw(request.raw, limits)
    if which == "encoded":
        return _decode_encoded(request.encoded.images, limits)
    raise InvalidInput("PredictRequest has no images: expected `raw` or `encoded` to be set")


def check_top_k(top_k: int) -> None:
    if top_k > MAX_TOP_K:
        raise InvalidInput(f"top_k: expected at most {MAX_TOP_K}, got {top_k}")


def decode_raw(raw: pb.RawImages, limits: Limits, what: str = "raw images") -> np.ndarray:
    """Raw images as uint8 NHWC; `what` names them in refusals (Open Inference: its input)."""
    dtype = _raw_dtype(raw.dtype)
    layout = raw.layout or pb.NHWC  # LAYOUT_UNSPECIFIED reads as NHWC
    shape = _checked_shape(list(raw.shape), layout, limits, what)
    data = raw.data  # protobuf hands out a bytes object; everything below views it, no copy
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(f"{what}: expected {expected} bytes for shape {list(shape)} "
                           f"{dtype.name}, got {len(data)}")
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    if dtype == np.float32:
        array = _unit_floats_to_uint8(array)
    if layout == pb.NCHW:
        # The graph takes NHWC; one transposing copy (of uint8, the cheapest point to do it).
        array = np.ascontiguousarray(array.transpose(0, 2, 3, 1))
    return array


def _raw_dtype(dtype: int) -> np.dtype:
    if dtype not in _LITTLE_ENDIAN:
        name = pb.DType.Name(dtype) if dtype in pb.DType.values() else str(dtype)
        raise InvalidInput(f"raw images: expected dtype UINT8 or FLOAT32, got {name}")
    return _LITTLE_ENDIAN[dtype]


def _checked_shape(shape: list[int], layout: int, limits: Limits,
                   what: str) -> tuple[int, ...]:
    if layout not in _ITEM_SHAPES:
        raise InvalidInput(f"{what}: expected layout NHWC or NCHW, got {layout}")
    item = _ITEM_SHAPES[layout]
    name = pb.Layout.Name(layout)
    if len(shape) != 4 or tuple(shape[1:]) != item:
        raise InvalidInput(f"{what}: expected shape {dims_text(item)} for {name}, got {shape}")
    _check_count(shape[0], limits, what=what)
    return tuple(shape)


def _check_count(count: int, limits: Limits, *, what: str) -> None:
    if count < 1:
        raise InvalidInput(f"{what}: expected at least 1 image, got {count}")
    if count > limits.max_images:
        raise LimitExceeded(f"{what}: at most {limits.max_images} images per request, got {count}")


def _unit_floats_to_uint8(values: np.ndarray) -> np.ndarray:
    # Checking min/max (not each value) keeps this two vectorised passes; NaN fails isfinite.
    if not np.isfinite(values).all():
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise InvalidInput(f"raw float32 images: expected finite values in [0, 1], got {bad} "
                           "NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise InvalidInput(f"raw float32 images: expected values in [0, 1] (ToTensor convention), "
                           f"got min {low:g}, max {high:g}")
    # Exact for images that came from 8-bit pixels: k/255*255 rounds back to k.
    return np.rint(values * np.float32(255)).astype(np.uint8)


def _decode_encoded(images: Sequence[bytes], limits: Limits) -> np.ndarray:
    """Every header first (format, sides, pixels, and the request's total), then the pixels:
    a request over any limit is refused before any image of it is decoded."""
    _check_count(len(images), limits, what="encoded images")
    opened: list[tuple[str, Image.Image]] = []
    try:
        total = 0
        for index, data in enumerate(images):
            where = f"encoded image {index + 1} of {len(images)}"
            image = _open(data, where, limits)
            opened.append((where, image))
            total += image.size[0] * image.size[1]
            if total > limits.max_request_pixels:
                raise LimitExceeded(
                    f"encoded images: at most {limits.max_request_pixels} decoded pixels per "
                    f"request (all images together), got more by image {index + 1} of "
                    f"{len(images)}; send fewer or smaller images per request")
        out = np.empty((len(images), *SIGNATURE.image_shape), dtype=np.uint8)
        for index, (where, image) in enumerate(opened):
            out[index] = _pixels(image, where)
        return out
    finally:
        for _, image in opened:
            image.close()


def _open(data: bytes, where: str, limits: Limits) -> Image.Image:
    """The image with only its header read (PIL decodes pixels lazily), checked."""
    if len(data) > limits.max_encoded_image_bytes:
        raise LimitExceeded(f"{where}: at most {limits.max_encoded_image_bytes} bytes, "
                            f"got {len(data)}")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:  # PIL's own, larger guard fires inside open()
        raise InvalidInput(f"{where}: expected at most {limits.max_decoded_pixels} pixels, "
                           f"got more ({error})") from None
    except Exception as error:  # PIL raises many types for bad data; all mean "cannot decode"
        raise InvalidInput(f"{where}: cannot decode ({type(error).__name__}: {error})") from None
    try:
        _check_header(image, where, limits)
    except InvalidInput:
        image.close()
        raise
    return image


def _pixels(image: Image.Image, where: str) -> np.ndarray:
    try:
        return to_model_pixels(image)  # the same decoding as training's image folders
    except Exception as error:  # truncated or corrupt data shows only when decoding
        raise InvalidInput(f"{where}: cannot decode ({type(error).__name__}: {error})") from None


def _check_header(image: Image.Image, where: str, limits: Limits) -> None:
    """Format and size from the header alone, before any pixel is decoded."""
    if image.format not in ENCODED_FORMATS:
        raise InvalidInput(f"{where}: expected PNG or JPEG, got {image.format}")
    width, height = image.size
    if width * height > limits.max_decoded_pixels:
        raise InvalidInput(f"{where}: expected at most {limits.max_decoded_pixels} pixels, got "
                           f"{width}x{height} = {width * height}")
    if max(width, height) > limits.max_image_side:
        raise InvalidInput(f"{where}: expected width and height of at most "
                           f"{limits.max_image_side}, got {width}x{height}")


def predict_response(version: int, classes: Sequence[str], probabilities: np.ndarray,
                     top_k: int) -> pb.PredictResponse:
    """The reply for float32 probabilities [N, C]: bytes + shape, argmax, and top_k if asked."""
    check_top_k(top_k)
    probs = np.ascontiguousarray(probabilities, dtype="<f4")
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(f"expected probabilities [N, {len(classes)}], got {list(probs.shape)}")
    predicted = probs.argmax(axis=1)
    response = pb.PredictResponse(
        model_version=version,
        class_names=list(classes),
        probabilities=probs.tobytes(),
        shape=list(probs.shape),
        predicted_class=predicted.tolist(),
        predicted_name=np.array(list(classes), dtype=object)[predicted].tolist(),
    )
    if top_k > 0:
        response.top_k.extend(_top_k(probs, min(top_k, probs.shape[1])))
    return response


def _top_k(probs: np.ndarray, k: int) -> list[pb.TopK]:
    # Stable sort of the negated rows: ties keep the lower class index first, deterministically.
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(probs, order, axis=1)
    return [pb.TopK(class_index=i, probability=p)
            for i, p in zip(order.tolist(), values.tolist(), strict=True)]
