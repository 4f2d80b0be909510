"""Reconstruction quality of the reference's training recipe against ours, at an equal number of
training images drawn in the same order, both evaluated on the held-out tiles."""
import math
import os
import time

import torch
from tqdm import tqdm

from core import inference
from Auto_encoder import DOWNSAMPLING, AutoEncoder, fits
from Dataset import find_images
from benchmarks import ours, reference, tables
from core.errors import UserError
from core.devices import autocast_dtype, precision_name

TILE = 256
BATCH = 16  # the reference's batch; ours takes the same images in the same order in batches of args.batch


def check(args):
    if not os.path.isdir(args.train_folder):
        raise UserError(f"training folder {args.train_folder!r} not found: make it with python Prepare_Tiles.py "
                        "--slide_path=<slide.svs> --tile_stride=64 --exclude_tiles_in=input_images, "
                        "or pass --train_folder=PATH")
    if not fits(args.crop) or args.crop > TILE:
        raise UserError(f"--crop={args.crop} must be a multiple of {DOWNSAMPLING} between {DOWNSAMPLING} and {TILE}")
    if args.images < 1:
        raise UserError(f"--images={args.images} must be at least 1")
    if args.batch < 1:
        raise UserError(f"--batch={args.batch} must be at least 1")
    if args.weight_decay < 0:
        raise UserError(f"--weight_decay={args.weight_decay} must not be negative")


def batches_of(paths, images, seed):
    """Batches of BATCH tile paths, images in all: whole shuffled passes over paths, seeded."""
    steps = math.ceil(images / BATCH)
    order = torch.Generator().manual_seed(seed)
    passes = math.ceil(steps * BATCH / len(paths))
    sequence = torch.cat([torch.randperm(len(paths), generator=order) for _ in range(passes)]).tolist()
    return [[paths[i] for i in sequence[s * BATCH:(s + 1) * BATCH]] for s in range(steps)]


def regrouped(batches, size):
    """The images of batches, in the same order, in batches of size (the last one may be smaller)."""
    images = [path for batch in batches for path in batch]
    return [images[i:i + size] for i in range(0, len(images), size)]


def train_reference(state, batches, crop, device, seed):
    torch.manual_seed(seed)  # the reference's augmentations draw from torch's global generator
    model = reference.network(state, device).train()
    optim = reference.optimizer(model)
    transform = reference.train_transform(TILE, crop)
    for paths in tqdm(batches, desc="reference recipe", unit="step", leave=False):
        reference.train_step(model, optim, paths, transform, device)
    return model.eval()


def train_ours(state, batches, args, device):
    """Ours: the same images in batches of args.batch; peak learning rate args.lr, cosine-decayed to 1 % by
    the last step (Config's lr_schedule "cosine", stepped per batch instead of per epoch)."""
    batches = regrouped(batches, args.batch)
    trainer = ours.Trainer(state, device, autocast_dtype(device, args.mixed_precision, training=True), args.seed,
                           lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(trainer.optimizer, T_max=max(1, len(batches) - 1),
                                                          eta_min=0.01 * args.lr)
    for paths in tqdm(batches, desc="our recipe", unit="step", leave=False):
        trainer.step_on_files(paths, TILE, args.crop, args.augment)
        schedule.step()
    return trainer.model.eval()


def reference_scores(model, paths, device):
    """As the reference evaluates: un-normalised tiles one at a time, Sigmoid output against the tile."""
    transform = reference.eval_transform(TILE)
    return mean_metrics(reference.reconstruct(model, path, transform, device)[2] for path in paths)


def our_scores(model, paths, device, amp_dtype):
    chunks = (paths[i:i + BATCH] for i in range(0, len(paths), BATCH))
    return mean_metrics(inference.reconstruct(model, ours.decode(chunk, TILE, "cpu"), device, amp_dtype)[2]
                        for chunk in chunks)


def mean_metrics(batches):
    """Per-image means of MSE, PSNR and SSIM over metric dicts of any batch sizes."""
    values = {}
    for metrics in batches:
        for name, value in metrics.items():
            values.setdefault(name, []).append(value.float().cpu())
    return {name: torch.cat(parts).mean().item() for name, parts in values.items()}


def recipes(args, images, train_paths, test_paths, device):
    our_dtype = precision_name(autocast_dtype(device, args.mixed_precision, training=True))
    return [
        f"- Reference: per-image PIL chain on the CPU (Resize {TILE}, RandomCrop {args.crop}, rotation +-45, "
        "flips, affine, colour jitter, blur, ImageNet Normalize); normalised inputs and targets through the "
        f"Sigmoid; fp32 NCHW; Adam lr {reference.LEARNING_RATE:g} constant, weight decay "
        f"{reference.WEIGHT_DECAY:g}; batch {BATCH}. Evaluated as the reference does: un-normalised [0, 1] "
        "tiles in, Sigmoid output compared with them.",
        f"- Ours: uint8 decode, prepare_batch(crop {args.crop}, augment {'on' if args.augment else 'off'}); [0, 1] "
        f"inputs and targets (normalisation inside the model); channels_last, {our_dtype}; Adam lr {args.lr:g} "
        f"cosine-decayed to 1% over {math.ceil(images / args.batch)} steps, weight decay "
        f"{args.weight_decay:g}; batch {args.batch}. "
        "Evaluated with inference.reconstruct.",
        f"- Both: the same {images} training images in the same order from {len(train_paths)} tiles in "
        f"{args.train_folder} (seed {args.seed}, same initial weights); evaluated on the {len(test_paths)} "
        f"held-out tiles of {args.test_folder} at {TILE} x {TILE}; PSNR and windowed SSIM from metrics.per_image.",
    ]


def run(args):
    check(args)
    started = time.perf_counter()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    train_paths, test_paths = find_images(args.train_folder), find_images(args.test_folder)
    batches = batches_of(train_paths, args.images, args.seed)
    images = len(batches) * BATCH
    described = recipes(args, images, train_paths, test_paths, device)
    print("\n".join(described), flush=True)
    torch.manual_seed(args.seed)
    state = AutoEncoder().state_dict()
    seconds, means = {}, {}
    start = time.perf_counter()
    model = train_reference(state, batches, args.crop, device, args.seed)
    seconds["reference"] = time.perf_counter() - start
    means["reference"] = reference_scores(model, test_paths, device)
    start = time.perf_counter()
    model = train_ours(state, batches, args, device)
    seconds["ours"] = time.perf_counter() - start
    means["ours"] = our_scores(model, test_paths, device, autocast_dtype(device, args.mixed_precision))
    gain = {name: means["ours"][name] - means["reference"][name] for name in ("PSNR", "SSIM", "MSE")}
    rows = [[recipe, str(images), f"{seconds[recipe]:.0f}", f"{means[recipe]['PSNR']:.2f}",
             f"{means[recipe]['SSIM']:.4f}", f"{means[recipe]['MSE']:.5f}"] for recipe in ("reference", "ours")]
    rows.append(["ours - reference", "", "", f"{gain['PSNR']:+.2f}", f"{gain['SSIM']:+.4f}", f"{gain['MSE']:+.5f}"])
    table = tables.markdown_table(["recipe", "training images", "training s", "PSNR (dB)", "SSIM (windowed)", "MSE"],
                                  rows)
    tables.report(args.output, "Benchmark: reconstruction quality against the reference",
                  ["\n".join(tables.machine_lines()), "\n".join(described), table,
                   f"Wall time {time.perf_counter() - started:.0f} s on {device.type}; {tables.load_average()} "
                   "at the end."])
