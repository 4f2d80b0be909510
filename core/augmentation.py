"""The reference's training augmentations, applied to a whole batch at once on the training device.

Loader workers only decode tiles to uint8; here each tile of the batch gets its own random
parameters for: random crop (train_crop_size), rotation (-45..45 deg), horizontal and vertical flip,
affine (rotation +-10 deg, translation +-10 %, scale 0.9-1.1, shear +-5 deg), colour jitter
(brightness, contrast, saturation +-20 %, hue +-0.1 turn) and Gaussian blur (5 x 5, sigma 0.1-2).
Crop, rotation, flips and affine are folded into one sampling grid; areas that rotate in from outside
the tile are filled by reflection rather than black corners.
"""
import math

import torch
import torch.nn.functional as F

# RGB <-> YIQ: hue is a rotation of the (I, Q) chroma plane.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)
_GRAY = torch.tensor([0.299, 0.587, 0.114])


def _on(values, x):
    """Parameters drawn on the CPU (by the seeded generator), moved to x's device and dtype. On CUDA through
    pinned memory and without waiting: a plain copy would make every training step wait for the GPU."""
    if x.device.type == "cuda":
        return values.pin_memory().to(x.device, x.dtype, non_blocking=True)
    return values.to(x.device, x.dtype)


def _uniform(n, low, high, generator):
    return torch.rand(n, generator=generator) * (high - low) + low


def _geometry(x, crop, augment, generator):
    """One grid_sample for crop + rotation + flips + affine, per-sample parameters."""
    n, _, height, width = x.shape
    size = crop or height
    scale_crop = size / height
    if augment:
        angle = torch.deg2rad(_uniform(n, -45, 45, generator) + _uniform(n, -10, 10, generator))
        shear = torch.deg2rad(_uniform(n, -5, 5, generator))
        zoom = _uniform(n, 0.9, 1.1, generator)
        flip_x = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        flip_y = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        shift = _uniform(2 * n, -0.2, 0.2, generator).view(n, 2) * scale_crop  # 10 % of the side
    else:
        angle = shear = torch.zeros(n)
        zoom = flip_x = flip_y = torch.ones(n)
        shift = torch.zeros(n, 2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    shear_m = torch.zeros(n, 2, 2)
    shear_m[:, 0, 0] = 1
    shear_m[:, 0, 1] = torch.tan(shear)
    shear_m[:, 1, 1] = 1
    flips = torch.diag_embed(torch.stack([flip_x, flip_y], 1))
    linear = rotation @ shear_m @ flips * (scale_crop / zoom).view(n, 1, 1)
    room = 1.0 - scale_crop  # where the crop centre may lie, in [-1, 1] coordinates
    centre = (torch.rand(n, 2, generator=generator) * 2 - 1) * room + shift
    theta = _on(torch.cat([linear, centre.unsqueeze(2)], dim=2), x)
    grid = F.affine_grid(theta, (n, 3, size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _colour(x, generator):
    n = x.shape[0]
    brightness = _on(_uniform(n, 0.8, 1.2, generator), x).view(n, 1, 1, 1)
    contrast = _on(_uniform(n, 0.8, 1.2, generator), x).view(n, 1, 1, 1)
    saturation = _on(_uniform(n, 0.8, 1.2, generator), x).view(n, 1, 1, 1)
    hue = _uniform(n, -0.1, 0.1, generator) * 2 * math.pi
    gray_weights = _on(_GRAY, x).view(1, 3, 1, 1)

    x = (x * brightness).clamp(0, 1)
    mean_gray = (x * gray_weights).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    x = (x * contrast + mean_gray * (1 - contrast)).clamp(0, 1)
    gray = (x * gray_weights).sum(1, keepdim=True)
    x = (x * saturation + gray * (1 - saturation)).clamp(0, 1)
    cos, sin = torch.cos(hue), torch.sin(hue)
    turn = torch.zeros(n, 3, 3)
    turn[:, 0, 0] = 1
    turn[:, 1, 1], turn[:, 1, 2], turn[:, 2, 1], turn[:, 2, 2] = cos, -sin, sin, cos
    matrix = _on(_YIQ_TO_RGB @ turn @ _RGB_TO_YIQ, x)
    return torch.einsum("nij,njhw->nihw", matrix, x).clamp(0, 1)


def _blur(x, generator, kernel_size=5):
    n, channels, height, width = x.shape
    sigma = _uniform(n, 0.1, 2.0, generator).view(n, 1)
    offsets = torch.arange(kernel_size, dtype=torch.float32) - kernel_size // 2
    kernel = torch.exp(-offsets.view(1, -1) ** 2 / (2 * sigma ** 2))
    kernel = _on(kernel / kernel.sum(1, keepdim=True), x)
    kernel = kernel.repeat_interleave(channels, 0)  # one kernel per (image, channel)
    flat = x.reshape(1, n * channels, height, width)
    pad = kernel_size // 2
    flat = F.pad(flat, (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * channels, 1, 1, kernel_size), groups=n * channels)
    flat = F.conv2d(flat, kernel.view(n * channels, 1, kernel_size, 1), groups=n * channels)
    return flat.view(n, channels, height, width)


def crop_batch(x, crop, generator):
    """Random square crop per image, without interpolation."""
    n, _, height, width = x.shape
    tops = torch.randint(0, height - crop + 1, (n,), generator=generator).tolist()
    lefts = torch.randint(0, width - crop + 1, (n,), generator=generator).tolist()
    return torch.stack([x[i, :, t:t + crop, l:l + crop] for i, (t, l) in enumerate(zip(tops, lefts))])


def prepare_batch(images, crop=0, augment=False, generator=None):
    """uint8 N x 3 x H x W (already on the device) -> float [0, 1] training batch, cropped and augmented."""
    x = images.float().div_(255.0)
    crop = crop if crop and crop < x.shape[-1] else 0
    if augment:
        x = _geometry(x, crop, True, generator)
        x = _colour(x, generator)
        x = _blur(x, generator).clamp_(0, 1)
    elif crop:
        x = crop_batch(x, crop, generator)
    return x
