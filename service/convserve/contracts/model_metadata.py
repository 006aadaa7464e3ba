"""What an exported model carries about itself: convserve's entries in the ONNX file's
metadata_props (written by convserve.training.export, read by the server's loader). Standard
library only.
"""

from __future__ import annotations

import json
from typing import Any

METADATA_PREFIX = "convserve."


def read_metadata(props: dict[str, str]) -> dict[str, Any]:
    """convserve's entries of an ONNX model's metadata_props, JSON-decoded, prefix removed."""
    return {key[len(METADATA_PREFIX):]: json.loads(value) for key, value in props.items()
            if key.startswith(METADATA_PREFIX)}
