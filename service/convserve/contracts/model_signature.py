"""The model's signature, in one place: the one input (its name, dtype, layout and image size) and
the one output the exported ONNX graph has. Training's export writes the graph and the card's
`input`/`output` from it; the loader checks a session against it; the codec and the client's
arrays shape images to it; the Open Inference metadata and Triton config report it in their own
spellings (`UINT8`, `TYPE_UINT8`, `FORMAT_NHWC`); a card without an `input` reads as it
(model_card.InputSpec). Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A dtype's name in each vocabulary the signature is reported in. The signature names dtypes as
# numpy does; each table holds the dtypes a signature may use.
_OPEN_INFERENCE = {"uint8": "UINT8", "float32": "FP32"}  # KServe v2 `datatype`s
_ONNX = {"uint8": "uint8", "float32": "float"}           # ONNX Runtime's `tensor(...)` element names
_LAYOUTS = ("NHWC", "NCHW")


@dataclass(frozen=True)
class ModelSignature:
    """What the served graph takes and returns: `input_name`, `input_dtype` images [N, ...] in
    `layout` (RGB), and `output_name`, `output_dtype` [N, classes] (softmax probabilities)."""

    input_name: str
    input_dtype: str
    layout: str
    height: int
    width: int
    channels: int
    channel_order: str
    output_name: str
    output_dtype: str

    def __post_init__(self) -> None:
        if self.layout not in _LAYOUTS:
            raise ValueError(f"layout: expected one of {list(_LAYOUTS)}, got {self.layout!r}")
        for dtype in (self.input_dtype, self.output_dtype):
            if dtype not in _OPEN_INFERENCE:
                raise ValueError(f"dtype: expected one of {list(_OPEN_INFERENCE)}, got {dtype!r}")

    # --- shapes -------------------------------------------------------------------------------

    def shape_in(self, layout: str) -> tuple[int, int, int]:
        """One image's shape in `layout` ("NHWC": H, W, C; "NCHW": C, H, W)."""
        if layout == "NHWC":
            return (self.height, self.width, self.channels)
        if layout == "NCHW":
            return (self.channels, self.height, self.width)
        raise ValueError(f"layout: expected one of {list(_LAYOUTS)}, got {layout!r}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """One image as the graph takes it (NHWC: (32, 32, 3))."""
        return self.shape_in(self.layout)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The graph's input, -1 for its dynamic batch dimension: (-1, 32, 32, 3)."""
        return (-1, *self.image_shape)

    def output_shape(self, classes: int) -> tuple[int, int]:
        return (-1, classes)

    # --- the same dtypes in the vocabularies that report them ---------------------------------

    @property
    def input_datatype(self) -> str:
        """The input's Open Inference datatype: "UINT8"."""
        return _OPEN_INFERENCE[self.input_dtype]

    @property
    def output_datatype(self) -> str:
        """The output's Open Inference datatype: "FP32"."""
        return _OPEN_INFERENCE[self.output_dtype]

    @property
    def triton_input_type(self) -> str:
        """Triton's model config `data_type` of the input: "TYPE_UINT8"."""
        return "TYPE_" + self.input_datatype

    @property
    def triton_output_type(self) -> str:
        return "TYPE_" + self.output_datatype

    @property
    def triton_format(self) -> str:
        """Triton's model config `format` of the input: "FORMAT_NHWC"."""
        return "FORMAT_" + self.layout

    @property
    def onnx_input_type(self) -> str:
        """The input's type as ONNX Runtime reports it: "tensor(uint8)"."""
        return f"tensor({_ONNX[self.input_dtype]})"

    @property
    def onnx_output_type(self) -> str:
        """The output's type as ONNX Runtime reports it: "tensor(float)"."""
        return f"tensor({_ONNX[self.output_dtype]})"

    def onnx_text(self, classes: int) -> str:
        """The graph's signature in ONNX's type names, for messages: "one input uint8
        [N, 32, 32, 3] and one output float [N, 10]"."""
        return (f"one input {_ONNX[self.input_dtype]} {dims_text(self.image_shape)} and one "
                f"output {_ONNX[self.output_dtype]} {dims_text((classes,))}")

    # --- the card's (and the ONNX metadata's) `input` and `output` -----------------------------

    def card_input(self) -> dict[str, Any]:
        return {"name": self.input_name, "dtype": self.input_dtype, "layout": self.layout,
                "shape": list(self.input_shape), "channel_order": self.channel_order}

    def card_output(self, classes: int) -> dict[str, Any]:
        return {"name": self.output_name, "dtype": self.output_dtype,
                "shape": list(self.output_shape(classes))}


def dims_text(dims: tuple[int, ...]) -> str:
    """A batch of `dims` as messages write it: "[N, 32, 32, 3]"."""
    return "[" + ", ".join(["N", *map(str, dims)]) + "]"


SIGNATURE = ModelSignature(
    input_name="pixels", input_dtype="uint8", layout="NHWC", height=32, width=32, channels=3,
    channel_order="RGB", output_name="probabilities", output_dtype="float32")
