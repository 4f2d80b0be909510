"""metrics.py agrees with scikit-image on real tiles and realistic reconstructions, and the losses are its metrics."""
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from core import losses
from core import metrics
from Auto_encoder import AutoEncoder

TOL = 1e-4


def reference_ssim(a, b):
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1, channel_axis=-1)


def to_batch(arrays):
    """H x W x 3 float arrays in [0, 1] -> N x 3 x H x W float32 tensor."""
    return torch.from_numpy(np.stack(arrays).astype(np.float32)).permute(0, 3, 1, 2).contiguous()


def to_array(tensor):
    return tensor.permute(1, 2, 0).double().numpy()


def blurred(image):
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.2))) / 255.0


def noised(image):
    noise = np.random.default_rng(0).normal(0, 0.04, image.shape)
    return np.clip(image / 255.0 + noise, 0, 1)


def jpeg(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=25)
    return np.asarray(Image.open(buffer).convert("RGB")) / 255.0


@pytest.fixture(scope="module")
def originals(sample_tiles):
    """Six of the held-out H&E tiles, uint8 H x W x 3."""
    return [array for _, array in sample_tiles[::3]]


@pytest.fixture(scope="module")
def autoencoder_output(originals):
    torch.manual_seed(0)
    model = AutoEncoder().eval()
    with torch.no_grad():
        out = model(to_batch([o / 255.0 for o in originals[:3]]))
    return [to_array(t) for t in out]


def check_against_skimage(originals, reconstructions):
    x = to_batch([o / 255.0 for o in originals])
    y = to_batch(reconstructions)
    got = metrics.per_image(y, x)
    assert set(got) == {"MSE", "PSNR", "SSIM"}
    for i, (original, recon) in enumerate(zip(originals, reconstructions)):
        # The reference sees exactly the float32 values the metric saw.
        a, b = to_array(x[i]), to_array(y[i])
        assert got["SSIM"][i].item() == pytest.approx(reference_ssim(b, a), abs=TOL)
        assert got["PSNR"][i].item() == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1), abs=TOL)
        assert got["MSE"][i].item() == pytest.approx(np.mean((a - b) ** 2), abs=1e-7, rel=1e-5)
    return got


@pytest.mark.parametrize("distort", [blurred, noised, jpeg], ids=["blur", "noise", "jpeg"])
def test_agrees_with_skimage_on_distorted_real_tiles(originals, distort):
    got = check_against_skimage(originals, [distort(o) for o in originals])
    assert (got["SSIM"] < 0.999).all() and (got["SSIM"] > 0).all()  # the distortions are visible


def test_agrees_with_skimage_on_autoencoder_output(originals, autoencoder_output):
    check_against_skimage(originals[:3], autoencoder_output)


def test_ssim_is_windowed_not_global(originals):
    """Swapping two halves keeps global statistics but destroys local structure."""
    image = originals[0] / 255.0
    swapped = np.concatenate([image[:, 128:], image[:, :128]], axis=1)
    value = metrics.ssim(to_batch([swapped]), to_batch([image]), reduce=False).item()
    assert value == pytest.approx(reference_ssim(swapped, image), abs=TOL)
    assert value < 0.5


def test_ssim_reduce(originals):
    x = to_batch([o / 255.0 for o in originals])
    y = to_batch([blurred(o) for o in originals])
    per = metrics.ssim(y, x, reduce=False)
    assert per.shape == (len(originals),)
    assert metrics.ssim(y, x).item() == pytest.approx(per.mean().item(), abs=1e-6)


def test_identical_images(originals):
    x = to_batch([o / 255.0 for o in originals[:2]])
    got = metrics.per_image(x, x.clone())
    assert torch.all(got["MSE"] == 0)
    assert torch.allclose(got["PSNR"], torch.full((2,), metrics.MAX_PSNR_DB))
    assert torch.allclose(got["SSIM"], torch.ones(2), atol=1e-6)


def test_mse_and_psnr_agree_with_numpy():
    rng = np.random.default_rng(1)
    a, b = rng.random((3, 32, 32, 3)), rng.random((3, 32, 32, 3))
    got = metrics.per_image(to_batch(list(b)), to_batch(list(a)))
    expected = ((a.astype(np.float32) - b.astype(np.float32)).astype(np.float64) ** 2).mean(axis=(1, 2, 3))
    assert np.allclose(got["MSE"].numpy(), expected, rtol=1e-5, atol=0)
    assert np.allclose(got["PSNR"].numpy(), 10 * np.log10(1 / expected), atol=1e-4)


def test_half_precision_input_is_computed_in_float32(originals):
    x = to_batch([o / 255.0 for o in originals[:2]])
    y = to_batch([jpeg(o) for o in originals[:2]])
    full = metrics.per_image(y, x)
    half = metrics.per_image(y.half(), x.half())
    assert half["SSIM"].dtype == torch.float32
    assert torch.allclose(full["SSIM"], half["SSIM"], atol=2e-3)


def test_ssim_loss_is_one_minus_ssim(originals, autoencoder_output):
    x = to_batch([o / 255.0 for o in originals[:3]])
    y = to_batch(autoencoder_output).requires_grad_(True)
    loss = losses.LOSSES["ssim"](y, x)
    expected = 1 - np.mean([reference_ssim(to_array(y[i].detach()), to_array(x[i])) for i in range(3)])
    assert loss.item() == pytest.approx(expected, abs=TOL)
    assert loss.item() == pytest.approx(1 - metrics.ssim(y.detach(), x).item(), abs=1e-7)
    loss.backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_mse_loss_is_mean_squared_error(originals):
    x = to_batch([o / 255.0 for o in originals[:3]])
    y = to_batch([noised(o) for o in originals[:3]])
    expected = np.mean((y.double().numpy() - x.double().numpy()) ** 2)
    assert losses.LOSSES["mse"](y, x).item() == pytest.approx(expected, rel=1e-5)


def test_ssim_window_made_once_per_device_and_equal_to_the_library_default():
    """metrics.ssim passes its own window so that a GPU step never copies one from the host; the values stay
    exactly those of pytorch_msssim's own window."""
    from pytorch_msssim import ssim as library_ssim
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    y = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert torch.equal(metrics.ssim(x, y, reduce=False),
                       library_ssim(x, y, data_range=1.0, size_average=False, win_size=11, win_sigma=1.5))
    assert metrics._window(x.device, 3) is metrics._window(x.device, 3)


def test_ssim_loss_trains_after_ssim_was_first_computed_for_inference():
    """Validation computes SSIM under inference_mode before training steps do; the cached window must not
    be an inference tensor, which backward refuses."""
    metrics._window.cache_clear()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        metrics.ssim(x, x)
    y = x.clone().requires_grad_(True)
    losses.LOSSES["ssim"](y * 0.9, x).backward()
    assert torch.isfinite(y.grad).all()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_per_image_ssim_in_chunks_is_the_whole_batch_value(originals, layout):
    """On a CPU per-image SSIM is computed a few images at a time: the values are exactly pytorch_msssim's
    for the whole batch at once."""
    from pytorch_msssim import ssim as whole_batch
    x = to_batch([o / 255.0 for o in originals] * 2)[:7].contiguous(memory_format=layout)
    y = to_batch([blurred(o) for o in originals] * 2)[:7].contiguous(memory_format=layout)
    assert len(x) > metrics.CPU_CHUNK and len(x) % metrics.CPU_CHUNK
    expected = whole_batch(y, x, data_range=1.0, size_average=False, win=metrics._window(x.device, 3))
    assert torch.equal(metrics.ssim(y, x, reduce=False), expected)
