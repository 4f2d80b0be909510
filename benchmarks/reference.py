"""The reference system's way of training and evaluating, emulated from its documented recipe.

Per-image PIL augmentation chain on the CPU, fp32 NCHW training on ImageNet-normalised inputs and
targets, and an evaluation that takes one tile at a time and draws one matplotlib figure per tile.
The network is ours with its built-in normalisation made an identity: the reference normalises in
its data pipeline, so its network sees whatever tensor it is given.
"""
import os

import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from Auto_encoder import IMAGENET_MEAN, IMAGENET_STD, AutoEncoder
from core.metrics import per_image

LEARNING_RATE, WEIGHT_DECAY = 1e-4, 1e-5


def train_transform(tile_size, crop=0):
    """The reference's per-image training chain; crop (quality mode) makes it train on crop-sized tiles."""
    return transforms.Compose([
        transforms.Resize(tile_size),
        *([transforms.RandomCrop(crop)] if crop else []),
        transforms.RandomRotation((-45, 45)),
        transforms.RandomHorizontalFlip(),
        transforms.RandomVerticalFlip(),
        transforms.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=5),
        transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1),
        transforms.GaussianBlur(kernel_size=5, sigma=(0.1, 2.0)),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(tile_size):
    """The reference evaluates un-normalised [0, 1] tiles (with a model trained on normalised ones)."""
    return transforms.Compose([transforms.Resize(tile_size), transforms.ToTensor()])


def load(path, transform):
    with Image.open(path) as img:
        return transform(img.convert("RGB"))


def network(state, device):
    model = AutoEncoder()
    model.load_state_dict(state)
    model.mean.zero_()
    model.std.fill_(1.0)
    return model.to(device)


def optimizer(model):
    return torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)


def train_step(model, optim, paths, transform, device):
    batch = torch.stack([load(path, transform) for path in paths]).to(device)
    loss = F.mse_loss(model(batch), batch)
    optim.zero_grad()
    loss.backward()
    optim.step()
    return loss


@torch.no_grad()
def reconstruct(model, path, transform, device):
    """(tile, reconstruction, metrics) of one tile, as the reference evaluates it."""
    x = load(path, transform).unsqueeze(0).to(device)
    recon = model(x)
    return x, recon, per_image(recon, x)


def evaluate(model_path, paths, out_dir, tile_size, device):
    """One tile at a time, a matplotlib figure per tile saved at 150 dpi, then the metrics sheet."""
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    model = network(torch.load(model_path, map_location="cpu"), device).eval()
    transform = eval_transform(tile_size)
    rows = []
    for path in paths:
        x, recon, metrics = reconstruct(model, path, transform, device)
        values = {name: value.item() for name, value in metrics.items()}
        figure, axes = plt.subplots(1, 2, figsize=(10, 5))
        for ax, image, title in zip(axes, (x, recon), ("Original", "Reconstruction")):
            ax.imshow(image[0].permute(1, 2, 0).cpu().numpy())
            ax.set_title(title)
            ax.axis("off")
        figure.suptitle(f"MSE: {values['MSE']:.5f}, PSNR: {values['PSNR']:.2f} dB, SSIM: {values['SSIM']:.4f}")
        figure.text(0.5, 0.04, os.path.basename(path), ha="center")
        stem = os.path.splitext(os.path.basename(path))[0]
        figure.savefig(os.path.join(out_dir, stem + "_comparison.png"), dpi=150)
        plt.close(figure)
        rows.append({"Image Path": path, **values})
    pd.DataFrame(rows).to_excel(os.path.join(out_dir, "metrics.xlsx"), index=False)
