"""The model signature has one home; every spelling of it the wire formats use is pinned here,
independently of the module (the literals are the test's, not the signature's)."""

from __future__ import annotations

import pytest

from convserve.contracts.model_card import InputSpec, ModelCard
from convserve.contracts.model_signature import SIGNATURE, ModelSignature, dims_text


def test_the_signature_is_uint8_nhwc_32x32x3_pixels_in_and_float32_probabilities_out() -> None:
    assert (SIGNATURE.input_name, SIGNATURE.input_dtype, SIGNATURE.layout) == (
        "pixels", "uint8", "NHWC")
    assert (SIGNATURE.output_name, SIGNATURE.output_dtype) == ("probabilities", "float32")
    assert SIGNATURE.image_shape == (32, 32, 3) and SIGNATURE.shape_in("NCHW") == (3, 32, 32)
    assert SIGNATURE.input_shape == (-1, 32, 32, 3) and SIGNATURE.output_shape(10) == (-1, 10)


def test_each_vocabulary_spells_it_as_its_protocol_does() -> None:
    assert (SIGNATURE.input_datatype, SIGNATURE.output_datatype) == ("UINT8", "FP32")
    assert (SIGNATURE.triton_input_type, SIGNATURE.triton_output_type,
            SIGNATURE.triton_format) == ("TYPE_UINT8", "TYPE_FP32", "FORMAT_NHWC")
    assert (SIGNATURE.onnx_input_type, SIGNATURE.onnx_output_type) == (
        "tensor(uint8)", "tensor(float)")
    assert SIGNATURE.onnx_text(10) == ("one input uint8 [N, 32, 32, 3] and one output float "
                                       "[N, 10]")
    assert dims_text((3, 32, 32)) == "[N, 3, 32, 32]"


def test_the_card_states_it_and_a_card_without_it_reads_as_it() -> None:
    assert SIGNATURE.card_input() == {"name": "pixels", "dtype": "uint8", "layout": "NHWC",
                                      "shape": [-1, 32, 32, 3], "channel_order": "RGB"}
    assert SIGNATURE.card_output(2) == {"name": "probabilities", "dtype": "float32",
                                        "shape": [-1, 2]}
    assert ModelCard.from_dict({}).input == InputSpec() == InputSpec(
        "pixels", "uint8", "NHWC", (-1, 32, 32, 3))
    assert ModelCard.from_dict({"input": SIGNATURE.card_input()}).input == InputSpec()


@pytest.mark.parametrize("change", [{"layout": "HWCN"}, {"input_dtype": "int7"},
                                    {"output_dtype": "float16"}])
def test_a_signature_no_protocol_can_spell_is_refused(change: dict[str, str]) -> None:
    fields = {**vars(SIGNATURE), **change}
    with pytest.raises(ValueError):
        ModelSignature(**fields)
