"""The ConvNet is the tutorial's, layer for layer, and returns logits."""

import math

import pytest
import torch
from torch import nn

from convserve.training.model import ConvNet, Preprocess, ServingModel, count_parameters


@pytest.mark.parametrize(("classes", "expected"), [(10, 198_930), (2, 197_898)])
def test_parameter_count_matches_the_tutorial(classes: int, expected: int) -> None:
    assert count_parameters(ConvNet(classes)) == expected


def test_layers_have_the_documented_channels() -> None:
    convs = [m for m in ConvNet(10).modules() if isinstance(m, nn.Conv2d)]
    shapes = [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs]
    assert shapes == [(3, 8, (3, 3), (1, 1)), (8, 8, (3, 3), (1, 1)), (8, 32, (3, 3), (1, 1)),
                      (32, 32, (3, 3), (1, 1)), (32, 128, (3, 3), (1, 1)),
                      (128, 128, (3, 3), (1, 1)), (128, 10, (1, 1), (0, 0))]


def test_pooling_comes_before_batchnorm_in_layers_2_4_6() -> None:
    model = ConvNet(10).eval()
    seen: dict[str, tuple[int, ...]] = {}
    for name in ("batchnorm1", "batchnorm2", "batchnorm4", "batchnorm6"):
        getattr(model, name).register_forward_hook(
            lambda _m, args, _out, name=name: seen.__setitem__(name, tuple(args[0].shape)))
    model(torch.zeros(1, 3, 32, 32))
    # A BatchNorm fed after its max-pool sees the halved size.
    assert seen == {"batchnorm1": (1, 8, 32, 32), "batchnorm2": (1, 8, 16, 16),
                    "batchnorm4": (1, 32, 8, 8), "batchnorm6": (1, 128, 4, 4)}


def test_forward_returns_logits_not_probabilities() -> None:
    torch.manual_seed(0)
    out = ConvNet(10).eval()(torch.randn(8, 3, 32, 32) * 3)
    assert out.shape == (8, 10)
    assert not torch.allclose(out.sum(dim=1), torch.ones(8), atol=1e-3)
    assert (out < 0).any()  # softmax output could never be negative


def test_initialisation_is_xavier_uniform_with_bias_one_hundredth() -> None:
    torch.manual_seed(0)
    model = ConvNet(10)
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert torch.all(conv.bias == 0.01)
        assert conv.weight.abs().max() <= bound
        # Uniform(-b, b) has std b/sqrt(3): PyTorch's default (kaiming, a=sqrt(5)) would not.
        assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)


def test_fewer_than_two_classes_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        ConvNet(1)


def test_preprocess_matches_the_documented_formula() -> None:
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    pixels = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    expected = (pixels.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(Preprocess(mean, std)(pixels), expected)


def test_serving_model_outputs_probabilities() -> None:
    model = ServingModel(Preprocess([0.5] * 3, [0.25] * 3), ConvNet(3)).eval()
    probs = model(torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8))
    assert probs.shape == (5, 3)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(5))
    assert (probs >= 0).all()
