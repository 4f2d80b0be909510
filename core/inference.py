"""Running a trained model on tiles: the set-up shared by evaluation, feature extraction and the notebook,
and the one way each of them (and training's validation) feeds tiles to the network."""
import types

import torch

from core import checkpoint_io
from Auto_encoder import DOWNSAMPLING, AutoEncoder, fits, for_inference
from Dataset import ImageFolder
from core.errors import UserError
from core.devices import autocast, autocast_dtype, precision_mode, select_device
from core.loaders import loader, worker_count
from core.metrics import per_image


def inference_model(state_dict, device):
    """An AutoEncoder with these weights as every script runs it outside training: BatchNorm folded into
    the convolutions, activations in place (Auto_encoder.for_inference), channels_last on device."""
    model = AutoEncoder()
    model.load_state_dict(state_dict)
    return for_inference(model).to(device, memory_format=torch.channels_last)


def load_model(path, device):
    """inference_model with the weights of path (any checkpoint layout we accept)."""
    model = AutoEncoder()
    checkpoint_io.load_weights(model, path)
    return inference_model(model.state_dict(), device)


def check_settings(cfg):
    """The Config values every inference script (evaluation, features) relies on."""
    if not fits(cfg.tile_size):
        raise UserError(f"tile_size={cfg.tile_size} must be a multiple of {DOWNSAMPLING} (for example 256)")
    if cfg.batch_size_test < 1:
        raise UserError(f"batch_size_test={cfg.batch_size_test} must be at least 1")
    precision_mode(cfg.mixed_precision)


def setup(cfg, folder, model_path, batch_size=None, exclude=()):
    """What an inference run needs, in the order a bad setting or file is best found: the tiles under
    folder (less the paths in exclude: this run's outputs), the device and precision from Config, the model
    of model_path, and a loader of batch_size (default batch_size_test) tiles. Returns a namespace of
    dataset, device, amp_dtype, model and loader."""
    dataset = ImageFolder(folder, cfg.tile_size, exclude=exclude)
    device = select_device(cfg.GPUs)
    amp_dtype = autocast_dtype(device, cfg.mixed_precision)
    model = load_model(model_path, device)
    tiles = loader(dataset, batch_size or cfg.batch_size_test, worker_count(cfg.num_workers), device)
    return types.SimpleNamespace(dataset=dataset, device=device, amp_dtype=amp_dtype, model=model, loader=tiles)


@torch.inference_mode()
def run_model(method, images, device, amp_dtype=None):
    """uint8 N x 3 x H x W tiles -> (their float [0, 1] channels_last tensor, method of it in float32), under
    autocast to amp_dtype (None: fp32): the one way every script feeds tiles to the network outside training."""
    x = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last).float().div_(255.0)
    with autocast(device.type, amp_dtype):
        return x, method(x).float()


@torch.inference_mode()
def reconstruct(model, images, device, amp_dtype=None):
    """uint8 N x 3 x H x W tiles -> (float [0, 1] originals, float [0, 1] reconstructions, metrics dict)."""
    x, recon = run_model(model, images, device, amp_dtype)
    recon = recon.clamp_(0, 1)
    return x, recon, per_image(recon, x)
