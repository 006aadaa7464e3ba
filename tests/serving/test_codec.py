"""convserve.serving.codec: every decode path, the client-side encoder and the response builders."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from convserve import arrays
from convserve.contracts.errors import InvalidInput, LimitExceeded
from convserve.pb.convserve.v1 import convserve_pb2 as pb
from convserve.serving import codec

LIMITS = codec.Limits()


def random_pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def raw_request(data: bytes, shape: list[int], dtype: int = pb.UINT8,
                layout: int = pb.LAYOUT_UNSPECIFIED, top_k: int = 0) -> pb.PredictRequest:
    return pb.PredictRequest(raw=pb.RawImages(data=data, dtype=dtype, layout=layout, shape=shape),
                             top_k=top_k)


def encoded_request(*images: bytes) -> pb.PredictRequest:
    return pb.PredictRequest(encoded=pb.EncodedImages(images=list(images)))


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def root_buffer(array: np.ndarray) -> object:
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array.base


# ------------------------------------------------------------------------------------ raw


def test_uint8_nhwc_is_a_view_of_the_request_bytes() -> None:
    pixels = random_pixels(3)
    decoded = codec.decode_images(raw_request(pixels.tobytes(), [3, 32, 32, 3]), LIMITS)
    assert decoded.dtype == np.uint8 and decoded.shape == (3, 32, 32, 3)
    assert decoded.flags.c_contiguous
    np.testing.assert_array_equal(decoded, pixels)
    # protobuf hands out one bytes object per field access; the array views that object, no copy.
    assert isinstance(root_buffer(decoded), bytes)
    assert not decoded.flags.owndata and not decoded.flags.writeable


def test_uint8_nchw_equals_the_transpose() -> None:
    pixels = random_pixels(2)
    nchw = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
    decoded = codec.decode_images(raw_request(nchw.tobytes(), [2, 3, 32, 32], layout=pb.NCHW), LIMITS)
    assert decoded.flags.c_contiguous
    np.testing.assert_array_equal(decoded, pixels)


@pytest.mark.parametrize("layout", [pb.NHWC, pb.NCHW])
def test_float32_in_unit_range_converts_exactly(layout: int) -> None:
    pixels = np.arange(2 * 32 * 32 * 3, dtype=np.int64).reshape(2, 32, 32, 3) % 256
    pixels = pixels.astype(np.uint8)
    floats = (pixels / np.float32(255)).astype("<f4")  # every k/255, k = 0..255
    if layout == pb.NCHW:
        floats = np.ascontiguousarray(floats.transpose(0, 3, 1, 2))
    decoded = codec.decode_images(
        raw_request(floats.tobytes(), list(floats.shape), pb.FLOAT32, layout), LIMITS)
    assert decoded.dtype == np.uint8 and decoded.flags.c_contiguous
    np.testing.assert_array_equal(decoded, pixels)


def test_float32_out_of_range_names_min_and_max() -> None:
    floats = np.full((1, 32, 32, 3), 0.5, dtype="<f4")
    floats[0, 0, 0] = [-0.25, 1.5, 0.0]
    with pytest.raises(InvalidInput, match=r"\[0, 1\].*min -0\.25, max 1\.5"):
        codec.decode_images(raw_request(floats.tobytes(), [1, 32, 32, 3], pb.FLOAT32), LIMITS)


def test_float32_nan_is_refused() -> None:
    floats = np.full((1, 32, 32, 3), 0.5, dtype="<f4")
    floats[0, 1, 2, 0] = np.nan
    with pytest.raises(InvalidInput, match="expected finite values.*got 1 NaN"):
        codec.decode_images(raw_request(floats.tobytes(), [1, 32, 32, 3], pb.FLOAT32), LIMITS)


def test_unspecified_dtype_is_refused() -> None:
    with pytest.raises(InvalidInput, match="expected dtype UINT8 or FLOAT32, got DTYPE_UNSPECIFIED"):
        codec.decode_images(raw_request(bytes(3072), [1, 32, 32, 3], pb.DTYPE_UNSPECIFIED), LIMITS)


@pytest.mark.parametrize(("shape", "layout", "message"), [
    ([2, 32, 32], pb.NHWC, r"expected shape \[N, 32, 32, 3\] for NHWC, got \[2, 32, 32\]"),
    ([2, 3, 32, 32], pb.NHWC, r"expected shape \[N, 32, 32, 3\] for NHWC, got \[2, 3, 32, 32\]"),
    ([2, 32, 32, 3], pb.NCHW, r"expected shape \[N, 3, 32, 32\] for NCHW, got \[2, 32, 32, 3\]"),
    ([1, 32, 32, 3, 1], pb.NHWC, r"got \[1, 32, 32, 3, 1\]"),
])
def test_wrong_dims_say_expected_and_got(shape: list[int], layout: int, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        codec.decode_images(raw_request(bytes(6144), shape, layout=layout), LIMITS)


def test_wrong_byte_count_says_expected_and_got() -> None:
    with pytest.raises(InvalidInput, match=r"expected 6144 bytes for shape \[2, 32, 32, 3\] uint8, got 6000"):
        codec.decode_images(raw_request(bytes(6000), [2, 32, 32, 3]), LIMITS)
    with pytest.raises(InvalidInput, match=r"expected 24576 bytes .* float32, got 6144"):
        codec.decode_images(raw_request(bytes(6144), [2, 32, 32, 3], pb.FLOAT32), LIMITS)


def test_zero_images_and_no_images_are_refused() -> None:
    with pytest.raises(InvalidInput, match="expected at least 1 image, got 0"):
        codec.decode_images(raw_request(b"", [0, 32, 32, 3]), LIMITS)
    with pytest.raises(InvalidInput, match="expected at least 1 image, got 0"):
        codec.decode_images(encoded_request(), LIMITS)
    with pytest.raises(InvalidInput, match="expected `raw` or `encoded`"):
        codec.decode_images(pb.PredictRequest(), LIMITS)


def test_too_many_images_exceed_the_limit() -> None:
    limits = codec.Limits(max_images=2)
    with pytest.raises(LimitExceeded, match="at most 2 images per request, got 3"):
        codec.decode_images(raw_request(random_pixels(3).tobytes(), [3, 32, 32, 3]), limits)
    png = image_bytes(Image.new("RGB", (32, 32)), "PNG")
    with pytest.raises(LimitExceeded, match="at most 2 images per request, got 3"):
        codec.decode_images(encoded_request(png, png, png), limits)


def test_top_k_above_the_maximum_is_refused_before_decoding() -> None:
    request = raw_request(random_pixels(1).tobytes(), [1, 32, 32, 3], top_k=1001)
    with pytest.raises(InvalidInput, match="top_k: expected at most 1000, got 1001"):
        codec.decode_images(request, LIMITS)


# ------------------------------------------------------------------------------------ encoded


def test_png_at_32x32_decodes_exactly() -> None:
    pixels = random_pixels(1)[0]
    decoded = codec.decode_images(encoded_request(image_bytes(Image.fromarray(pixels), "PNG")), LIMITS)
    np.testing.assert_array_equal(decoded, pixels[np.newaxis])


def test_png_and_jpeg_of_any_size_and_mode_become_32x32_rgb() -> None:
    red = Image.new("RGB", (50, 40), (250, 10, 10))
    gray = Image.new("L", (50, 40), 128)
    rgba = Image.new("RGBA", (64, 64), (10, 200, 10, 7))
    images = [image_bytes(red, "PNG"), image_bytes(red, "JPEG"), image_bytes(gray, "JPEG"),
              image_bytes(gray, "PNG"), image_bytes(rgba, "PNG")]
    decoded = codec.decode_images(encoded_request(*images), LIMITS)
    assert decoded.shape == (5, 32, 32, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded[0], np.broadcast_to([250, 10, 10], (32, 32, 3)))
    assert np.abs(decoded[1].astype(int) - [250, 10, 10]).max() <= 8  # JPEG is lossy
    assert np.abs(decoded[2].astype(int) - 128).max() <= 2
    np.testing.assert_array_equal(decoded[3], 128)
    np.testing.assert_array_equal(decoded[4], np.broadcast_to([10, 200, 10], (32, 32, 3)))


def test_garbage_bytes_name_the_image() -> None:
    png = image_bytes(Image.new("RGB", (32, 32)), "PNG")
    with pytest.raises(InvalidInput, match=r"encoded image 2 of 3: cannot decode \("):
        codec.decode_images(encoded_request(png, b"not an image at all", png), LIMITS)


def test_truncated_png_cannot_be_decoded() -> None:
    png = image_bytes(Image.fromarray(random_pixels(1)[0]), "PNG")
    with pytest.raises(InvalidInput, match="encoded image 1 of 1: cannot decode"):
        codec.decode_images(encoded_request(png[: len(png) // 2]), LIMITS)


def test_gif_is_refused() -> None:
    gif = image_bytes(Image.new("RGB", (32, 32)), "GIF")
    with pytest.raises(InvalidInput, match="encoded image 1 of 1: expected PNG or JPEG, got GIF"):
        codec.decode_images(encoded_request(gif), LIMITS)


def test_large_declared_size_is_refused_before_decoding() -> None:
    # A 1-bit 5000x5000 PNG is a few kB but would decode to 75 MB as RGB.
    bomb = image_bytes(Image.new("1", (5000, 5000)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(InvalidInput, match=r"at most 16777216 pixels, got 5000x5000 = 25000000"):
        codec.decode_images(encoded_request(bomb), LIMITS)


def test_a_long_strip_is_refused_by_its_side_before_decoding() -> None:
    # 1 x 16,777,216 pixels is within the pixel limit but decodes through huge row buffers
    # (it raised a server's peak RSS by 587 MB): refused from the header by its width.
    strip = image_bytes(Image.new("1", (16_777_216, 1)), "PNG")
    assert len(strip) < 64_000
    with pytest.raises(InvalidInput, match=r"expected width and height of at most 4096, got "
                                           r"16777216x1"):
        codec.decode_images(encoded_request(strip), LIMITS)


def test_a_request_over_its_decode_budget_is_refused_before_any_image_decodes() -> None:
    # Five 4096x4096 headers whose pixel data is cut off: had any been decoded, the answer
    # would be "cannot decode"; the budget (4 x 4096 x 4096 pixels) refuses the request first.
    full = image_bytes(Image.new("1", (4096, 4096)), "PNG")
    header_only = full[:200]
    with pytest.raises(LimitExceeded, match=r"at most 67108864 decoded pixels per request "
                                            r"\(all images together\), got more by image 5 of 5"):
        codec.decode_images(encoded_request(*[header_only] * 5), LIMITS)
    with pytest.raises(InvalidInput, match="encoded image 1 of 4: cannot decode"):
        codec.decode_images(encoded_request(*[header_only] * 4), LIMITS)


def test_pil_decompression_bomb_guard_is_answered_as_invalid_input() -> None:
    bomb = image_bytes(Image.new("1", (14000, 14000)), "PNG")  # past PIL's own limit
    with pytest.raises(InvalidInput, match=r"encoded image 1 of 1: expected at most 16777216 pixels"):
        codec.decode_images(encoded_request(bomb), LIMITS)


def test_oversized_encoded_image_exceeds_the_limit() -> None:
    png = image_bytes(Image.fromarray(random_pixels(1)[0]), "PNG")
    limits = codec.Limits(max_encoded_image_bytes=100)
    with pytest.raises(LimitExceeded, match=f"encoded image 1 of 1: at most 100 bytes, got {len(png)}"):
        codec.decode_images(encoded_request(png), limits)


# ------------------------------------------------------------------------------------ client side


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("form", ["hwc", "chw", "nhwc", "nchw"])
def test_encode_raw_round_trips_through_decode(dtype: type, form: str) -> None:
    pixels = random_pixels(4, seed=1)
    array = pixels if dtype is np.uint8 else (pixels / np.float32(255)).astype(np.float32)
    if form in ("chw", "nchw"):
        array = array.transpose(0, 3, 1, 2)  # non-contiguous on purpose
    if form in ("hwc", "chw"):
        array, pixels = array[0], pixels[:1]
    raw = arrays.encode_raw(array)
    assert raw.layout == (pb.NCHW if "ch" in form else pb.NHWC)
    decoded = codec.decode_images(pb.PredictRequest(raw=raw), LIMITS)
    np.testing.assert_array_equal(decoded, pixels)


def test_encode_raw_converts_big_endian_floats() -> None:
    floats = (random_pixels(1) / np.float32(255)).astype(">f4")
    raw = arrays.encode_raw(floats)
    np.testing.assert_array_equal(np.frombuffer(raw.data, "<f4").reshape(1, 32, 32, 3), floats)


@pytest.mark.parametrize(("array", "message"), [
    (np.zeros((1, 32, 32, 3), np.float64), "expected dtype uint8 or float32, got float64"),
    (np.zeros((1, 32, 32, 3), np.int32), "expected dtype uint8 or float32, got int32"),
    (np.zeros((32, 32), np.uint8), r"got \[32, 32\]"),
    (np.zeros((2, 32, 32, 4), np.uint8), r"\[N, 32, 32, 3\] or \[N, 3, 32, 32\], got \[2, 32, 32, 4\]"),
    (np.zeros((0, 32, 32, 3), np.uint8), r"expected at least 1 image"),
])
def test_encode_raw_refuses_locally(array: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        arrays.encode_raw(array)


# ------------------------------------------------------------------------------------ responses


def sample_probabilities() -> np.ndarray:
    return np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.2, 0.6]], dtype=np.float32)


def test_predict_response_argmax_and_round_trip() -> None:
    probs = sample_probabilities()
    response = codec.predict_response(7, ["cat", "dog", "eel"], probs, top_k=0)
    assert response.model_version == 7
    assert list(response.class_names) == ["cat", "dog", "eel"]
    assert list(response.shape) == [3, 3]
    assert list(response.predicted_class) == [1, 0, 2]
    assert list(response.predicted_name) == ["dog", "cat", "eel"]
    assert len(response.top_k) == 0
    wire = pb.PredictResponse.FromString(response.SerializeToString())
    np.testing.assert_array_equal(arrays.probabilities_of(wire), probs)


def test_top_k_is_sorted_and_clamped_to_the_class_count() -> None:
    probs = sample_probabilities()
    two = codec.predict_response(1, ["a", "b", "c"], probs, top_k=2).top_k
    assert [list(t.class_index) for t in two] == [[1, 2], [0, 2], [2, 0]]  # tie: lower index first
    np.testing.assert_allclose([list(t.probability) for t in two], [[0.6, 0.3], [0.5, 0.3], [0.6, 0.2]])
    clamped = codec.predict_response(1, ["a", "b", "c"], probs, top_k=50).top_k
    assert [list(t.class_index) for t in clamped] == [[1, 2, 0], [0, 2, 1], [2, 0, 1]]
    with pytest.raises(InvalidInput, match="top_k: expected at most 1000, got 5000"):
        codec.predict_response(1, ["a", "b", "c"], probs, top_k=5000)


def test_probabilities_of_refuses_a_malformed_response() -> None:
    response = pb.PredictResponse(probabilities=bytes(8), shape=[1, 3])
    with pytest.raises(ValueError, match=r"expected 8 bytes .* got shape \[1, 3\]"):
        arrays.probabilities_of(response)


def test_encoded_images_decode_exactly_as_training_reads_them(tmp_path) -> None:
    """No training/serving skew: a folder dataset and Predict give the same pixels for one file."""
    from convserve.training.data import load_dataset

    rng = np.random.default_rng(7)
    files = {
        "a": ("wide.png", Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16))),
        "b": ("photo.jpg", Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))),
    }
    payloads = []
    for split in ("train", "val"):
        for label, (name, image) in files.items():
            (tmp_path / "set" / split / label).mkdir(parents=True, exist_ok=True)
            image.save(tmp_path / "set" / split / label / name)
    for label, (name, _) in files.items():
        payloads.append((tmp_path / "set" / "val" / label / name).read_bytes())

    trained_on = load_dataset("folder:set", tmp_path).val_images
    served = codec.decode_images(pb.PredictRequest(encoded=pb.EncodedImages(images=payloads)),
                                 codec.Limits())
    np.testing.assert_array_equal(served, trained_on)
    assert served[0].max() > 200 and served[0].min() < 50  # 16-bit scaled, not clipped white
    # Both sides above share convserve.serving.images; check them against Pillow used directly, written
    # out here step by step: 16-bit scaled to 8 (/257, rounded), JPEG decoded at a reduced
    # scale, RGB, a bilinear resize to 32x32.
    wide = np.asarray(Image.open(tmp_path / "set" / "val" / "a" / "wide.png")).astype(np.float64)
    wide8 = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8))
    photo = Image.open(tmp_path / "set" / "val" / "b" / "photo.jpg")
    photo.draft("RGB", (32, 32))
    expected = [np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
                for image in (wide8, photo)]
    np.testing.assert_array_equal(served, np.stack(expected))


def test_decoding_a_request_at_every_limit_holds_one_image_at_a_time(tmp_path) -> None:
    """The memory bound stated in codec.Limits: the largest request the limits allow (4 RGBA
    images of 4096x4096, the request's whole decode budget) raises peak RSS by at most one
    image in its mode plus its RGB copy (7 bytes a pixel, 112 MiB), not by all four."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT, python_env

    png = tmp_path / "big.png"
    Image.new("RGBA", (4096, 4096), (10, 20, 30, 255)).save(png)
    script = f"""
import json, resource
from pathlib import Path
from convserve import arrays
from convserve.serving import codec
from convserve.pb.convserve.v1 import convserve_pb2 as pb
data = Path({str(png)!r}).read_bytes()
request = pb.PredictRequest(encoded=pb.EncodedImages(images=[data] * 4))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pixels = codec.decode_images(request, codec.Limits())
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"shape": list(pixels.shape), "grew_mib": (after - before) / 1024}}))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=python_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["shape"] == [4, 32, 32, 3]
    one_image_mib = 4096 * 4096 * (4 + 3) / 2**20
    assert report["grew_mib"] <= one_image_mib + 16, report


def _png_header(width: int, height: int, bit_depth: int, color_type: int) -> bytes:
    """A PNG signature and IHDR chunk declaring any size, and no pixel data."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)))


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(width=st.integers(1, 2**31 - 1), height=st.integers(1, 2**31 - 1),
       depth_and_type=st.sampled_from([(1, 0), (8, 0), (16, 0), (8, 2), (16, 2), (8, 6), (4, 3)]),
       tail=st.binary(max_size=64))
def test_hostile_png_headers_are_refused_or_decoded_never_crash(width: int, height: int,
                                                                  depth_and_type: tuple[int, int],
                                                                  tail: bytes) -> None:
    """Any declared size, mode and garbage after the header: a clear refusal (or, for a small
    image whose data happens to decode, pixels); never another exception, never a huge
    allocation (the limits are checked from the header first)."""
    data = _png_header(width, height, *depth_and_type) + tail
    try:
        pixels = codec.decode_images(encoded_request(data), LIMITS)
    except (InvalidInput, LimitExceeded) as error:
        assert "encoded image" in str(error)
    else:
        assert pixels.shape == (1, 32, 32, 3) and width * height <= LIMITS.max_decoded_pixels


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(cut=st.integers(0, 2000), flips=st.lists(st.tuples(st.integers(0, 2000),
                                                          st.integers(1, 255)), max_size=4))
def test_truncated_and_corrupted_real_images_are_refused_cleanly(cut: int,
                                                                  flips: list[tuple[int, int]]
                                                                  ) -> None:
    for fmt in ("PNG", "JPEG"):
        data = bytearray(image_bytes(Image.fromarray(random_pixels(1, seed=5)[0]).resize((64, 48)),
                                     fmt))
        for where, mask in flips:
            data[where % len(data)] ^= mask
        data = data[:max(1, len(data) - cut)]
        try:
            pixels = codec.decode_images(encoded_request(bytes(data)), LIMITS)
        except (InvalidInput, LimitExceeded) as error:
            assert str(error).startswith("encoded image 1 of 1")
        else:
            assert pixels.shape == (1, 32, 32, 3)
