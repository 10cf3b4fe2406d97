"""The paper's networks: shapes, input layouts, layer names."""
import pytest
import torch

from ddfast.paper import models


@pytest.mark.parametrize("name,shape", [("mlp", (3, 1, 28, 28)), ("lenet", (3, 1, 28, 28)),
                                        ("convnet", (3, 3, 32, 32)), ("nin", (3, 3, 32, 32))])
def test_output_shape(name, shape):
    m = models.build_model(name)
    assert m(torch.randn(shape)).shape == (3, 10)


def test_mlp_sizes_and_flat_input():
    m = models.MLP()
    assert [tuple(p.shape) for p in m.parameters()] == [(500, 784), (500,), (150, 500), (150,), (10, 150), (10,)]
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(m(x), m(x.reshape(4, 784)))
    with pytest.raises(ValueError, match="784"):
        m(torch.randn(2, 100))


def test_lenet_layers():
    m = models.LeNet()
    assert models.layer_names(m) == ["conv1", "conv2", "fc1", "fc2"]
    assert m.conv1.weight.shape == (20, 1, 5, 5) and m.conv2.weight.shape == (50, 20, 5, 5)
    assert m.fc1.weight.shape == (500, 800) and m.fc2.weight.shape == (10, 500)


def test_unknown_model():
    with pytest.raises(ValueError, match="model"):
        models.build_model("resnet")
