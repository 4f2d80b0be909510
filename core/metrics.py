"""Per-image reconstruction metrics on [0, 1] images, computed in float32.

SSIM is the standard Gaussian-windowed SSIM of Wang et al. (2004): 11 x 11 window, sigma 1.5,
K1 = 0.01, K2 = 0.03, data range 1, averaged over pixels and channels. The training loss uses the
same function, so "SSIM" means one thing everywhere in this project.
"""
import functools

import torch
from pytorch_msssim import ssim as _ssim

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
MAX_PSNR_DB = 100.0  # PSNR of a perfect reconstruction (MSE 0) is reported as this, not infinity


@functools.lru_cache(maxsize=8)
def _window(device, channels):
    """pytorch_msssim's Gaussian window (channels x 1 x 1 x SSIM_WINDOW), made once per device: left to
    the library, it is built on the CPU and copied to the GPU on every call, a wait inside each training step."""
    with torch.inference_mode(False):  # first made during evaluation, it must still serve a training loss
        offsets = torch.arange(SSIM_WINDOW, dtype=torch.float32) - SSIM_WINDOW // 2
        window = torch.exp(-offsets ** 2 / (2 * SSIM_SIGMA ** 2))
        return (window / window.sum()).view(1, 1, 1, -1).repeat(channels, 1, 1, 1).to(device)


CPU_CHUNK = 2  # images per SSIM call for per-image values on a CPU


def ssim(x, y, reduce=True):
    """Windowed SSIM of two N x 3 x H x W batches in [0, 1]: a scalar, or one value per image."""
    if not reduce and x.device.type == "cpu" and len(x) > CPU_CHUNK:
        # A few images at a time keep SSIM's filtered maps in the CPU's cache: faster, with the same values
        # (each image's SSIM never depended on the others).
        return torch.cat([ssim(a, b, reduce=False) for a, b in zip(x.split(CPU_CHUNK), y.split(CPU_CHUNK))])
    return _ssim(x.float(), y.float(), data_range=1.0, size_average=reduce, win=_window(x.device, x.shape[1]))


def mse(x, y):
    """Mean squared error per image."""
    return (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)


def psnr_from_mse(values):
    """PSNR in dB for a peak value of 1."""
    return (10.0 * torch.log10(1.0 / values.clamp_min(10.0 ** (-MAX_PSNR_DB / 10.0))))


def per_image(reconstruction, original):
    """Dict of MSE, PSNR and SSIM tensors, one value per image of the batch."""
    errors = mse(reconstruction, original)
    return {"MSE": errors, "PSNR": psnr_from_mse(errors), "SSIM": ssim(reconstruction, original, reduce=False)}

