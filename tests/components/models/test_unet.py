"""U-Net denoiser: shapes at several sizes, conditioning, construction errors, ONNX export."""
import numpy as np
import pytest
import torch

from components.models.unet import UNet, UNetConfig, UNetConfigError, count_params, timestep_embedding

TINY = dict(channels=[8, 16], blocks_per_level=1, time_dim=16, groups=4)


def inputs(batch, size, num_classes=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, size, size, generator=gen)
    t = torch.randint(0, 100, (batch,), generator=gen)
    y = torch.randint(0, num_classes + 1, (batch,), generator=gen)  # null class included
    return x, t, y


def randomise_output(net):
    """The last conv starts at zero (the net predicts no noise); give it weights to see the conditioning."""
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    for block in net.modules():
        if hasattr(block, "conv2"):
            torch.nn.init.normal_(block.conv2.weight, std=0.05)


@pytest.mark.parametrize("size,channels,blocks", [(8, [8, 16], 1), (16, [8, 16, 16], 2), (32, [8, 8, 16, 16], 1)])
def test_output_has_the_input_shape(size, channels, blocks):
    net = UNet(UNetConfig(**{**TINY, "channels": channels, "blocks_per_level": blocks}), image_size=size)
    x, t, y = inputs(3, size)
    out = net(x, t, y)
    assert out.shape == (3, 1, size, size) and out.dtype == torch.float32


def test_initial_prediction_is_zero_and_gradients_reach_it():
    net = UNet(UNetConfig(**TINY), image_size=8)
    x, t, y = inputs(4, 8)
    out = net(x, t, y)
    assert torch.count_nonzero(out) == 0
    ((out - x) ** 2).mean().backward()
    assert net.conv_out.weight.grad.abs().sum() > 0


def test_time_and_class_change_the_prediction():
    net = UNet(UNetConfig(**TINY), image_size=8, num_classes=3)
    randomise_output(net)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        base = net(x, torch.tensor([10]), torch.tensor([0]))
        assert not torch.allclose(base, net(x, torch.tensor([60]), torch.tensor([0])))
        assert not torch.allclose(base, net(x, torch.tensor([10]), torch.tensor([3])))  # 3 = null class


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0, 5]), 8)
    assert emb.shape == (2, 8)
    assert torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.allclose(emb.pow(2)[:, :4] + emb.pow(2)[:, 4:], torch.ones(2, 4))


@pytest.mark.parametrize("kwargs,size,match", [
    ({"channels": [8, 16, 16]}, 10, "image_size 10 is not divisible by 4"),
    ({"channels": [8, 10]}, 8, "groups"),
    ({"channels": []}, 8, "channels"),
    ({"time_dim": 15}, 8, "time_dim"),
])
def test_impossible_shapes_are_refused_at_construction(kwargs, size, match):
    with pytest.raises(UNetConfigError, match=match):
        UNet(UNetConfig(**{**TINY, **kwargs}), image_size=size)


def test_default_size_is_near_the_reference_peer():
    # params.yaml's digits-unet shape: about the 0.65M parameters of diffusers' UNet2DModel peer
    assert 0.55e6 < count_params(UNet(UNetConfig(), image_size=8)) < 0.75e6


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_exports_to_onnx_with_a_dynamic_batch(tmp_path):
    """The TorchScript exporter (quick); the parity check of the real export lives with export tests."""
    ort = pytest.importorskip("onnxruntime")
    net = UNet(UNetConfig(**TINY), image_size=8).eval()
    randomise_output(net)
    path = tmp_path / "unet.onnx"
    x, t, y = inputs(2, 8)
    torch.onnx.export(net, (x, t, y), str(path), input_names=["x", "t", "y"], output_names=["eps"],
                      dynamic_axes={"x": {0: "batch"}, "t": {0: "batch"}, "y": {0: "batch"}, "eps": {0: "batch"}},
                      opset_version=20, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, t, y = inputs(5, 8, seed=1)
    (got,) = session.run(None, {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})
    with torch.no_grad():
        want = net(x, t, y).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
