"""One way to turn any decoded picture into the model's pixels, for training and serving alike.

`convserve.training.data` (image-folder datasets) and `convserve.serving.codec` (encoded images
sent to Predict) both call `to_model_pixels`, so a PNG or JPEG becomes the same uint8 32x32 RGB
array whether it is trained on or served: no training/serving skew in decoding. numpy and Pillow
only.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from convserve.contracts.model_signature import SIGNATURE

SIZE = (SIGNATURE.width, SIGNATURE.height)  # Pillow's order: (32, 32)


def to_model_pixels(image: Image.Image) -> np.ndarray:
    """uint8 [32, 32, 3] RGB from an opened (not yet loaded) image of any mode and size."""
    # JPEG only (a no-op otherwise): libjpeg decodes at a reduced scale that stays >= 32x32,
    # far faster for photos; the bilinear resize below then finishes the job.
    image.draft("RGB", SIZE)
    rgb = _to_8bit(image).convert("RGB")
    if rgb.size != SIZE:
        rgb = rgb.resize(SIZE, Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Rescale 16-bit grayscale ("I;16*", or "I" as older Pillow opens such PNGs) to "L".

    Pillow's convert("RGB") clips these modes at 255 instead of scaling, which turns an ordinary
    16-bit grayscale PNG almost entirely white.
    """
    if image.mode != "I" and not image.mode.startswith("I;16"):
        return image
    wide = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8))
