"""This project's side as the benchmark drives it: our training step, the training, evaluation and
feature engines run as their scripts run them, and the network alone or replaced by a no-op."""
import contextlib
from unittest import mock

import numpy as np
import torch

import Extract_Features
from core import evaluation_engine
from core import inference
from core import training_engine
from core import training_state
from Auto_encoder import AutoEncoder, activations_in_place
from Dataset import load_image
from benchmarks import reference
from benchmarks.measure import quietly
from core.cli import load_config
from core.devices import TRAINING_LAYOUT, autocast
from core.losses import LOSSES


def decode(paths, tile_size, device):
    """The tiles as one uint8 N x 3 x H x W tensor on device, decoded as the loader workers decode them."""
    return torch.stack([load_image(path, tile_size) for path in paths]).to(device, non_blocking=True)


class Trainer:
    """Our training step as training_engine takes it (forward_loss, optimizer_step), on a network with
    the given weights, Adam (the reference's settings unless given), and a seeded augmentation generator."""

    def __init__(self, state, device, amp_dtype, seed, lr=reference.LEARNING_RATE,
                 weight_decay=reference.WEIGHT_DECAY):
        self.model = activations_in_place(AutoEncoder())
        self.model.load_state_dict(state)
        self.model.to(device, memory_format=TRAINING_LAYOUT).train()
        self.optimizer = training_state.adam(self.model, device, lr, weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        self.generator = torch.Generator().manual_seed(seed)
        self.device, self.amp_dtype = device, amp_dtype

    def step(self, images, crop=0, augment=True):
        """One optimisation step on uint8 tiles already on the device."""
        loss = training_engine.forward_loss(self.model, images, LOSSES["mse"], crop, augment, self.generator,
                                            self.amp_dtype)
        training_engine.optimizer_step(loss, self.optimizer, self.scaler)
        return loss

    def step_on_files(self, paths, tile_size, crop=0, augment=True):
        """One optimisation step, decoding the tiles first (as the reference's step does)."""
        return self.step(decode(paths, tile_size, self.device), crop, augment)


def inference_network(state, device):
    """The network as the evaluation and feature scripts run it (inference.inference_model)."""
    return inference.inference_model(state, device)


@torch.inference_mode()
def forward_all(method, tiles, batch, amp_dtype):
    """method (the network, or its embed) over float [0, 1] tiles already on the device, in batches."""
    with autocast(tiles.device.type, amp_dtype):
        for chunk in tiles.split(batch):
            method(chunk)


def device_args(device, precision):
    gpus = str(device.index or 0) if device.type == "cuda" else "cpu"
    return [f"--GPUs={gpus}", f"--mixed_precision={precision}"]


def run_training(device, precision, folder, out_dir, settings, seed):
    """Training_MSE.py's work in this process: train(load_config(...), 'mse') into out_dir, from scratch
    (resume off), without validation, every other setting as Config.py has it. settings: the run's tile,
    crop, batch and epochs."""
    cfg = load_config([*device_args(device, precision), f"--folder_path_train={folder}",
                       f"--tile_size={settings.tile}", f"--train_crop_size={settings.crop}",
                       f"--batch_size_train={settings.batch}", f"--num_epochs={settings.epochs}",
                       "--val_fraction=0", "--resume=false", f"--seed={seed}",
                       f"--model_saved_location_mse={out_dir}", f"--training_loss_file_mse={out_dir}/loss.csv"])
    quietly(lambda: training_engine.train(cfg, "mse"))


def run_evaluation(device, precision, folder, model_path, out_dir, tile, batch, workers):
    """Evaluation_MSE.py's work in this process: comparison PNGs and the workbook into out_dir."""
    cfg = load_config([*device_args(device, precision), f"--tile_size={tile}", f"--batch_size_test={batch}",
                       f"--num_workers={workers}", f"--folder_path_test={folder}", f"--model_path_mse={model_path}",
                       f"--recon_output_mse={out_dir}/png", f"--reconstruction_metrics_mse={out_dir}/metrics.xlsx"])
    quietly(lambda: evaluation_engine.evaluate(cfg, "mse"))


def run_features(device, precision, folder, model_path, out_dir, tile, batch, workers):
    """Extract_Features.py's work in this process: CSV, .npy, paths and PCA plot into out_dir."""
    cfg = load_config([*device_args(device, precision), f"--tile_size={tile}", f"--batch_size_test={batch}",
                       f"--num_workers={workers}", f"--folder_path_features={folder}",
                       f"--model_path_ssim={model_path}", f"--features_output={out_dir}/features.csv"])
    quietly(lambda: Extract_Features.extract_features(cfg))


def run_slide_features(device, precision, slide, model_path, out_dir, tile, stride, batch, workers):
    """Extract_Features.py's slide mode in this process on one slide, into a new out_dir; its Seconds."""
    from core import slide_features
    cfg = load_config([*device_args(device, precision), f"--tile_size={tile}", f"--tile_stride={stride}",
                       f"--batch_size_test={batch}", f"--num_workers={workers}", f"--folder_path_slides={slide}",
                       f"--model_path_ssim={model_path}", f"--features_folder={out_dir}"])
    rows = quietly(lambda: slide_features.extract_slide_features(cfg))
    return float(rows[0]["Seconds"])


def slide_tiles(slide_path, tile, stride, device):
    """The tiles the slide mode describes, read once from the slide, as uint8 N x 3 x T x T on device."""
    from core.slides import open_slide, tile_grid
    defaults = load_config([])  # the slide mode's target_mpp and tissue_fraction, as run_slide_features has them
    with open_slide(slide_path) as slide:
        grid = tile_grid(slide, tile, stride, defaults.target_mpp, defaults.tissue_fraction)
        tiles = [slide.read_region(x, y, grid.side0, grid.side0, tile, tile) for x, y in grid.coords.tolist()]
    return torch.from_numpy(np.stack(tiles).transpose(0, 3, 1, 2).copy()).to(device)


@contextlib.contextmanager
def network_replaced():
    """Inside, every AutoEncoder returns its input as the reconstruction and the input's first values as
    features: the engines run as usual around it, so their time is that of everything but the network."""
    with mock.patch.object(AutoEncoder, "forward", lambda self, x: x), \
            mock.patch.object(AutoEncoder, "embed", lambda self, x: x.flatten(1)[:, :Extract_Features.FEATURE_DIM]):
        yield
