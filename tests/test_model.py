"""The AutoEncoder keeps the reference's parameter count and state-dict layout, and maps [0, 1] to [0, 1]."""
import pytest
import torch
from torch import nn

from Auto_encoder import IMAGENET_MEAN, IMAGENET_STD, AutoEncoder, activations_in_place, for_inference

ENCODER_CHANNELS = [(3, 32), (32, 64), (64, 128), (128, 256), (256, 512), (512, 512)]
DECODER_CHANNELS = [(512, 512), (512, 256), (256, 128), (128, 64), (64, 32)]
BN_KEYS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def reference_layout():
    """(key, shape) of the reference model's state dict, in order."""
    layout = []
    for part, channels in (("encoder", ENCODER_CHANNELS), ("decoder", DECODER_CHANNELS)):
        for step, (c_in, c_out) in enumerate(channels):
            conv_shape = (c_out, c_in, 3, 3) if part == "encoder" else (c_in, c_out, 3, 3)  # ConvTranspose: in, out
            layout += [(f"{part}.{3 * step}.weight", conv_shape), (f"{part}.{3 * step}.bias", (c_out,))]
            layout += [(f"{part}.{3 * step + 1}.{k}", () if k == "num_batches_tracked" else (c_out,)) for k in BN_KEYS]
    layout += [("decoder.15.weight", (3, 32, 3, 3)), ("decoder.15.bias", (3,))]
    return layout


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AutoEncoder().eval()


def test_parameter_count(model):
    assert sum(p.numel() for p in model.parameters()) == 7_861_251


def test_state_dict_matches_reference_layout(model):
    state = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == reference_layout()
    assert len(state) == 79
    assert next(iter(state)) == "encoder.0.weight" and list(state)[-1] == "decoder.15.bias"


def test_layer_types(model):
    assert len(model.encoder) == 18 and len(model.decoder) == 17
    for i in range(0, 18, 3):
        assert isinstance(model.encoder[i], nn.Conv2d) and not isinstance(model.encoder[i], nn.ConvTranspose2d)
        assert isinstance(model.encoder[i + 1], nn.BatchNorm2d)
        assert isinstance(model.encoder[i + 2], nn.LeakyReLU)
    assert [model.encoder[i].stride for i in range(0, 18, 3)] == [(1, 1)] + [(2, 2)] * 5
    for i in range(0, 15, 3):
        assert isinstance(model.decoder[i], nn.ConvTranspose2d)
        assert isinstance(model.decoder[i + 1], nn.BatchNorm2d)
        assert isinstance(model.decoder[i + 2], nn.LeakyReLU)
    assert type(model.decoder[15]) is nn.Conv2d
    assert isinstance(model.decoder[16], nn.Sigmoid)


def test_normalisation_buffers_not_in_state_dict(model):
    buffers = dict(model.named_buffers())
    assert torch.allclose(buffers["mean"].flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.allclose(buffers["std"].flatten(), torch.tensor(IMAGENET_STD))
    assert "mean" not in model.state_dict() and "std" not in model.state_dict()


def test_reference_state_dict_loads_strictly(model):
    fresh = AutoEncoder()
    fresh.load_state_dict(model.state_dict(), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_forward_keeps_shape_and_range(model):
    torch.manual_seed(1)
    batch = torch.cat([torch.rand(2, 3, 64, 64), torch.zeros(1, 3, 64, 64), torch.ones(1, 3, 64, 64)])
    with torch.no_grad():
        out = model(batch)
    assert out.shape == batch.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.isfinite(out).all()


def test_forward_applies_imagenet_normalisation(model):
    """The same input, normalised by hand and fed to the raw layers, gives the same output."""
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), model.decoder(model.encoder((x - mean) / std)), atol=1e-6)


def test_encode_and_embed_shapes(model):
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        latent = model.encode(x)
        features = model.embed(x)
        out = model(x)
    assert latent.shape == (2, 512, 2, 3)
    assert out.shape == x.shape
    assert features.shape == (2, 512)
    assert torch.allclose(features, latent.mean((2, 3)), atol=1e-6)
    assert not torch.allclose(features[0], features[1])  # one feature per image, not per batch


@pytest.mark.parametrize("shape", [(1, 3, 48, 64), (1, 3, 64, 100), (1, 3, 16, 16)])
def test_side_not_multiple_of_32_is_value_error(model, shape):
    with pytest.raises(ValueError, match="multiple.*32") as info:
        model(torch.rand(shape))
    assert f"{shape[2]} x {shape[3]}" in str(info.value)
    with pytest.raises(ValueError, match="multiple.*32"):
        model.embed(torch.rand(shape))


@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 1, 64, 64), (1, 4, 64, 64)])
def test_wrong_layout_is_value_error(model, shape):
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        model(torch.rand(shape))


def test_for_inference_computes_the_same_function():
    """With trained-looking BatchNorm statistics and affine parameters, the inference copy matches the
    eval-mode network, has no BatchNorm left, and the original keeps its layers, weights and activations."""
    torch.manual_seed(1)
    model = AutoEncoder()
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.2, 3.0)
            layer.weight.data.uniform_(0.5, 1.5)
            layer.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(m.inplace for m in folded.modules() if isinstance(m, nn.LeakyReLU))
    assert not any(m.inplace for m in model.modules() if isinstance(m, nn.LeakyReLU))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 11
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
        assert torch.allclose(folded.embed(x), model.embed(x), rtol=1e-4, atol=1e-5)


def test_activations_in_place_train_to_the_same_gradients_and_state():
    """Training runs the network with its LeakyReLUs in place: the same loss, gradients and BatchNorm
    statistics as the network as built, and the same state-dict keys."""
    torch.manual_seed(2)
    plain = AutoEncoder().train()
    in_place = activations_in_place(AutoEncoder().train())
    in_place.load_state_dict(plain.state_dict())
    assert list(in_place.state_dict()) == list(plain.state_dict())
    assert all(m.inplace for m in in_place.modules() if isinstance(m, nn.LeakyReLU))
    x = torch.rand(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    for net in (plain, in_place):
        torch.nn.functional.mse_loss(net(x), x).backward()
    for (name, a), b in zip(plain.named_parameters(), in_place.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7), name
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), in_place.state_dict().values()))
