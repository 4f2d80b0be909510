"""This project against the reference system's way of doing the same work, side by side in one run.

    python benchmark.py                                   # speed: data, training, evaluation, features
    python benchmark.py --quality --images=5000 --crop=128   # reconstruction quality of the two recipes

The reference is emulated from its documented recipe: torchvision's per-image PIL augmentation chain,
fp32 NCHW training on ImageNet-normalised inputs and targets, one matplotlib figure per evaluated tile.
Our side calls this project's own code. Both run in this process on this machine, so the ratios hold
for this machine; the table (markdown) is printed and written to --output, with the machine and the
exact command. Any CUDA GPU is benchmarked too, with our mixed precision against the reference's fp32.
"""
import argparse
import contextlib
import io
import itertools
import math
import os
import platform
import random
import shlex
import shutil
import sys
import tempfile
import time
import types

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision import transforms
from tqdm import tqdm

import Extract_Features
import evaluation_engine
import inference
from Auto_encoder import DOWNSAMPLING, IMAGENET_MEAN, IMAGENET_STD, AutoEncoder
from Dataset import find_images, load_image
from augmentation import prepare_batch
from cli import UserError, load_config, run_main
from malloc_tuning import keep_freed_memory
from runtime import PRECISIONS, autocast, autocast_dtype, cpu_count, cpu_has_native_bf16, precision_name
from metrics import LOSSES, per_image
from training_engine import forward_loss, learning_rate, optimizer_step

TILE = 256
BATCH = 16
REFERENCE_LR, WEIGHT_DECAY = 1e-4, 1e-5
METRIC_NAMES = evaluation_engine.METRIC_NAMES
QUALITY_DEFAULTS = {"images": 5000, "crop": 128, "train_folder": "training_tiles", "lr": 3e-4, "augment": False}
HEADER = ["section", "reference (img/s)", "ours (img/s)", "ratio", "target", "met?"]


# ---------------------------------------------------------------------------------------------------
# The reference's way
# ---------------------------------------------------------------------------------------------------
def reference_train_transform(tile_size, crop=0):
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


def reference_eval_transform(tile_size):
    """The reference evaluates un-normalised [0, 1] tiles (with a model trained on normalised ones)."""
    return transforms.Compose([transforms.Resize(tile_size), transforms.ToTensor()])


def reference_load(path, transform):
    with Image.open(path) as img:
        return transform(img.convert("RGB"))


def reference_model(state, device):
    """Our layers with the built-in normalisation made an identity: the reference normalises in its
    data pipeline, so its network sees whatever tensor it is given."""
    model = AutoEncoder()
    model.load_state_dict(state)
    model.mean.zero_()
    model.std.fill_(1.0)
    return model.to(device)


def reference_train_step(model, optimizer, paths, transform, device):
    batch = torch.stack([reference_load(path, transform) for path in paths]).to(device)
    loss = F.mse_loss(model(batch), batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


@torch.no_grad()
def reference_reconstruct(model, path, transform, device):
    x = reference_load(path, transform).unsqueeze(0).to(device)
    recon = model(x)
    return x, recon, per_image(recon, x)


def reference_evaluate(model_path, paths, out_dir, tile_size, device):
    """One tile at a time, a matplotlib figure per tile saved at 150 dpi, then the metrics sheet."""
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    model = reference_model(torch.load(model_path, map_location="cpu"), device).eval()
    transform = reference_eval_transform(tile_size)
    rows = []
    for path in paths:
        x, recon, metrics = reference_reconstruct(model, path, transform, device)
        values = {name: metrics[name].item() for name in METRIC_NAMES}
        figure, axes = plt.subplots(1, 2, figsize=(10, 5))
        for ax, image, title in zip(axes, (x, recon), ("Original", "Reconstruction")):
            ax.imshow(image[0].permute(1, 2, 0).cpu().numpy())
            ax.set_title(title)
            ax.axis("off")
        figure.suptitle(f"MSE: {values['MSE']:.5f}, PSNR: {values['PSNR']:.2f} dB, SSIM: {values['SSIM']:.4f}")
        figure.text(0.5, 0.04, os.path.basename(path), ha="center")
        figure.savefig(os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + "_comparison.png"),
                       dpi=150)
        plt.close(figure)
        rows.append({"Image Path": path, **values})
    pd.DataFrame(rows).to_excel(os.path.join(out_dir, "metrics.xlsx"), index=False)


# ---------------------------------------------------------------------------------------------------
# Ours: the same pieces, in the same order, as training_engine's loop
# ---------------------------------------------------------------------------------------------------
def our_model(state, device):
    model = AutoEncoder()
    model.load_state_dict(state)
    return model.to(device, memory_format=torch.channels_last)


def our_train_step(model, optimizer, scaler, paths, tile_size, device, generator, amp_dtype, crop=0, augment=True):
    images = torch.stack([load_image(path, tile_size) for path in paths]).to(device, non_blocking=True)
    loss = forward_loss(model, images, LOSSES["mse"], crop, augment, generator, amp_dtype)
    optimizer_step(loss, optimizer, scaler)
    return loss


def decoded(paths, tile_size, device):
    """The tiles as one float [0, 1] channels_last tensor on the device: what the model itself is fed."""
    tiles = torch.stack([load_image(path, tile_size) for path in paths])
    return tiles.to(device).float().div_(255.0).contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(work, items, device, min_calls=1, min_seconds=0.0, warmups=1):
    """Images per second of work() (which handles `items` images), after untimed warm-up calls; calls
    repeat until both minimums are met, so a fast part is not judged on one short call."""
    for _ in range(warmups):
        work()
    calls, elapsed = 0, 0.0
    while calls < min_calls or elapsed < min_seconds:
        sync(device)
        start = time.perf_counter()
        work()
        sync(device)
        elapsed += time.perf_counter() - start
        calls += 1
    return items * calls / elapsed


def seconds_of(work, device):
    """Seconds of one call of work(), after one untimed call."""
    work()
    sync(device)
    start = time.perf_counter()
    work()
    sync(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def torch_threads(count):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quietly(work):
    """work() with the engines' prints and progress bars held back; shown only when it fails."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            return work()
    except BaseException:
        print(buffer.getvalue(), file=sys.stderr)
        raise


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------------
def speedup_row(section, reference, ours, target):
    ratio = ours / reference
    return [section, f"{reference:.2f}", f"{ours:.2f}", f"{ratio:.2f}x", f">= {target:g}x",
            "yes" if ratio >= target else "no"]


def share_row(section, baseline, ours, target):
    share = ours / baseline
    return [section, f"{baseline:.2f}", f"{ours:.2f}", f"{share:.0%}", f">= {target:.0%}",
            "yes" if share >= target else "no"]


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def machine_lines(threads):
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return [f"- CPU: {cpu} ({bf16}), {cpu_count()} logical cores available, torch threads {threads}",
            f"- GPU: {gpu}",
            f"- torch {torch.__version__}, torchvision {torchvision.__version__}, Python {platform.python_version()}",
            f"- Command: `{' '.join(shlex.quote(arg) for arg in [os.path.basename(sys.executable), *sys.argv])}`"]


def load_note():
    """Other processes on the CPU skew every number; the load average says whether they were there."""
    return f"load average (1 min) {os.getloadavg()[0]:.2f}"


def write_report(path, title, sections):
    text = f"# {title}\n\n" + "\n\n".join(sections) + "\n"
    print("\n" + text)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)
    print(f"Written to {path}")


# ---------------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------------
def data_pipeline_rate(paths, plan, load):
    """Section 1, on one thread (a DataLoader worker runs torch single-threaded): load(path) per tile."""
    with torch_threads(1):
        return throughput(lambda: [load(path) for path in paths], len(paths), torch.device("cpu"),
                          min_seconds=plan.min_seconds)


def fresh_dirs(work_dir, prefix):
    """A function that makes and returns a new, empty folder under work_dir on each call."""
    count = itertools.count()

    def new_dir():
        path = os.path.join(work_dir, f"{prefix}_{next(count)}")
        os.makedirs(path)
        return path
    return new_dir


def pillow_copies(paths, folder):
    """Each tile in paths saved again by Pillow with its default PNG settings, in folder; their paths."""
    copies = []
    for index, path in enumerate(paths):
        copies.append(os.path.join(folder, f"pillow_{index}.png"))
        with Image.open(path) as img:
            img.save(copies[-1])
    return copies


def training_plan(device, plan, paths):
    """(warm-up calls, timed steps, the batch's tile paths) of the training rates on device."""
    warmups = 3 if device.type == "cuda" else 1  # cuDNN picks its kernels over the first calls
    steps = 20 if device.type == "cuda" else plan.steps
    return warmups, steps, [paths[i % len(paths)] for i in range(plan.batch)]


def reference_rates(device, plan, paths, model_path, work_dir):
    """The reference's training and evaluation rates on one device (sections 2 and 3a)."""
    warmups, steps, batch_paths = training_plan(device, plan, paths)
    seed_everything(plan.seed)
    model = reference_model(torch.load(model_path, map_location="cpu"), device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=REFERENCE_LR, weight_decay=WEIGHT_DECAY)
    transform = reference_train_transform(plan.tile)
    train = throughput(lambda: reference_train_step(model, optimizer, batch_paths, transform, device),
                       plan.batch, device, min_calls=steps, warmups=warmups)
    new_dir = fresh_dirs(work_dir, f"reference_{device.type}")
    evaluate = throughput(lambda: reference_evaluate(model_path, paths, new_dir(), plan.tile, device),
                          len(paths), device, min_seconds=plan.min_seconds)
    return {"train": train, "eval": evaluate}


def device_rows(device, plan, paths, model_path, work_dir, notes, reference):
    """Sections 1b to 4 on one device; reference: reference_rates on it."""
    on_gpu = device.type == "cuda"
    train_dtype = autocast_dtype(device, plan.precision, training=True)
    amp_dtype = autocast_dtype(device, plan.precision)  # inference
    train_label = f"{device.type}, ours in {precision_name(train_dtype)}"
    label = f"{device.type}, ours in {precision_name(amp_dtype)}"
    warmups, steps, batch_paths = training_plan(device, plan, paths)
    state = torch.load(model_path, map_location="cpu")
    new_dir = fresh_dirs(work_dir, device.type)
    seed_everything(plan.seed)
    model = our_model(state, device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=REFERENCE_LR, weight_decay=WEIGHT_DECAY)
    scaler = torch.amp.GradScaler("cuda", enabled=train_dtype == torch.float16)
    generator = torch.Generator().manual_seed(plan.seed)
    our_train = throughput(lambda: our_train_step(model, optimizer, scaler, batch_paths, plan.tile, device, generator,
                                                  train_dtype),
                           plan.batch, device, min_calls=steps, warmups=warmups)
    del model, optimizer

    images = torch.stack([load_image(path, plan.tile) for path in batch_paths]).to(device)
    augment = throughput(lambda: prepare_batch(images, 0, True, generator), plan.batch, device,
                         min_calls=3, min_seconds=plan.min_seconds, warmups=warmups)
    share = our_train / augment
    size = f"{plan.tile} px, batch {plan.batch}"
    rows = [[f"1b. batched augmentation, share of our training step ({size}, {train_label})", "-", f"{augment:.2f}",
             f"{share:.1%}", "<= 10%", "yes" if share <= 0.10 else "no"],
            speedup_row(f"2. training ({size}, {train_label})", reference["train"], our_train, 5 if on_gpu else 1.4)]

    gpus = "0" if on_gpu else "cpu"
    n = len(paths)
    common = [f"--tile_size={plan.tile}", f"--batch_size_test={plan.batch}", f"--GPUs={gpus}",
              f"--mixed_precision={plan.precision}"]

    def our_evaluation(workers):
        out = new_dir()
        cfg = load_config([*common, f"--num_workers={workers}", f"--folder_path_test={plan.folder}",
                           f"--model_path_mse={model_path}", f"--recon_output_mse={out}/png",
                           f"--reconstruction_metrics_mse={out}/metrics.xlsx"])
        quietly(lambda: evaluation_engine.evaluate(cfg, "mse"))

    def our_features(workers):
        cfg = load_config([*common, f"--num_workers={workers}", f"--folder_path_features={plan.folder}",
                           f"--model_path_ssim={model_path}", f"--features_output={new_dir()}/features.csv"])
        quietly(lambda: Extract_Features.extract_features(cfg))

    def fastest(run):
        rates = {workers: throughput(lambda: run(workers), n, device, min_seconds=plan.min_seconds)
                 for workers in (0, 2)}
        best = max(rates, key=rates.get)
        return rates[best], best, ", ".join(f"num_workers={w}: {r:.2f} img/s" for w, r in rates.items())

    our_eval, eval_workers, eval_rates = fastest(our_evaluation)
    model = inference.load_model(model_path, device)
    tiles = decoded(paths, plan.tile, device)

    @torch.inference_mode()
    def forward(method):
        for chunk in tiles.split(plan.batch):
            with autocast(device.type, amp_dtype):
                method(chunk)

    forward_only = throughput(lambda: forward(model), n, device, min_seconds=plan.min_seconds, warmups=warmups)
    our_feat, feat_workers, feat_rates = fastest(our_features)
    encoder_only = throughput(lambda: forward(model.encode), n, device, min_seconds=plan.min_seconds,
                              warmups=warmups)
    rows += [speedup_row(f"3a. evaluation end to end, {n} tiles ({label}; ours num_workers={eval_workers})",
                         reference["eval"], our_eval, 3),
             share_row(f"3b. evaluation end to end vs forward-only in the reference column ({label})",
                       forward_only, our_eval, 0.8),
             share_row(f"4. feature extraction vs encoder-only in the reference column ({label}; "
                       f"num_workers={feat_workers})", encoder_only, our_feat, 0.8)]
    notes.append(f"- {label}: evaluation {eval_rates}; feature extraction {feat_rates}.")
    notes.append(f"- {label}: " + fixed_costs(model, tiles, paths, plan, model_path, new_dir(), device,
                                               our_eval, our_feat))
    return rows


def fixed_costs(model, tiles, paths, plan, model_path, out, device, our_eval, our_feat):
    """Where the engines' time goes beyond the forward pass, for one run over the tiles."""
    n = len(paths)
    load = seconds_of(lambda: inference.load_model(model_path, device), device)
    with torch.inference_mode():
        recon = torch.cat([model(chunk).float() for chunk in tiles.split(plan.batch)])
    originals = tiles.mul(255).round().to(torch.uint8).cpu()
    recon_u8 = recon.clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    metrics = per_image(recon.clamp(0, 1), tiles.float())
    rows = [{"Image Path": path, **{name: metrics[name][i].item() for name in METRIC_NAMES}}
            for i, path in enumerate(paths)]

    def pngs():
        for i, row in enumerate(rows):
            evaluation_engine.save_comparison(originals[i], recon_u8[i], row, os.path.basename(paths[i]),
                                              os.path.join(out, f"{i}_comparison.png"))

    png = seconds_of(pngs, device)
    workbook = seconds_of(lambda: evaluation_engine.write_workbook(os.path.join(out, "m.xlsx"), rows, {},
                                                                   model_path, plan.folder), device)
    with torch.inference_mode():
        features = torch.cat([model.embed(chunk) for chunk in tiles.split(plan.batch)]).float().cpu().numpy()
    outputs = Extract_Features.output_paths(os.path.join(out, "features.csv"))
    feature_files = seconds_of(lambda: Extract_Features.write_outputs(outputs, features, paths, {}, plan.folder),
                               device)
    return (f"evaluation run {n / our_eval:.2f} s = model load {load:.2f} s + comparison PNGs {png:.2f} s "
            f"on one thread (the engine writes them on 2 threads while it reads the next batch) + workbook "
            f"{workbook:.2f} s + decode, forward and metrics; feature run {n / our_feat:.2f} s includes model load "
            f"and the output files (CSV, .npy, PCA plot) {feature_files:.2f} s.")


def speed(args):
    if args.quick:
        plan = types.SimpleNamespace(tile=64, batch=4, steps=1, count=4, copies=1, min_seconds=0.0)
    else:  # a 256-pixel batch-16 training step takes seconds on a CPU: 6 timed steps keep the run short
        # Sixteen copies of the tiles in subfolders (256 tiles): a run's fixed costs (model load, PCA plot,
        # workbook) are spread over a folder as they are in real use, if far less so than over 100,000 tiles;
        # the notes list them separately.
        plan = types.SimpleNamespace(tile=TILE, batch=BATCH, steps=6, count=None, copies=16, min_seconds=2.0)
    plan.seed, plan.precision = args.seed, args.mixed_precision
    started = time.perf_counter()
    load_before = load_note()
    notes = []
    with tempfile.TemporaryDirectory(prefix="benchmark_") as work_dir:
        plan.folder = args.test_folder
        paths = find_images(args.test_folder)
        plan.folder = os.path.join(work_dir, "tiles")
        for copy in range(plan.copies):
            os.makedirs(os.path.join(plan.folder, f"copy_{copy}"))
            for path in paths[:plan.count]:
                shutil.copy(path, os.path.join(plan.folder, f"copy_{copy}"))
        paths = find_images(plan.folder)
        seed_everything(args.seed)
        model_path = os.path.join(work_dir, "model.pth")
        torch.save(AutoEncoder().state_dict(), model_path)
        print(f"Benchmarking on {len(paths)} tiles ({plan.copies} copies of those in {args.test_folder}) ...", flush=True)
        devices = [torch.device("cpu")] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else [])
        # The reference runs first, with glibc's malloc as it ships; then malloc is set as our scripts set
        # it (cli.keep_freed_memory) for everything of ours, forward-only and encoder-only rates included.
        print("  the reference ...", flush=True)
        transform = reference_train_transform(plan.tile)
        reference_data = data_pipeline_rate(paths, plan, lambda path: reference_load(path, transform))
        references = {device: reference_rates(device, plan, paths, model_path, work_dir) for device in devices}
        kept = keep_freed_memory()
        ours_data = data_pipeline_rate(paths, plan, lambda path: load_image(path, plan.tile))
        rows = [speedup_row("1. data pipeline per loader worker (1 thread; ours: decode + resize only)",
                            reference_data, ours_data, 5)]
        # The sample tiles are PNGs as Prepare_Tiles writes them (Dataset.png_bytes), which decode faster than
        # Pillow's default PNGs: the same pixels saved by Pillow show what tiles from other tools give.
        pillow_paths = pillow_copies(paths[:len(paths) // plan.copies], work_dir)
        pillow_data = data_pipeline_rate(pillow_paths, plan, lambda path: load_image(path, plan.tile))
        notes.append(f"- Section 1, ours on the same tiles saved with Pillow's default PNG settings (as tiles from "
                     f"other tools usually are): {pillow_data:.2f} img/s, {pillow_data / reference_data:.2f}x the "
                     f"reference; on the tiles as shipped (written by Prepare_Tiles): {ours_data:.2f} img/s.")
        for device in devices:
            print(f"  ours on {device.type} ...", flush=True)
            rows += device_rows(device, plan, paths, model_path, work_dir, notes, references[device])
    wall = time.perf_counter() - started
    notes = [f"- Wall time of this run: {wall:.0f} s; {load_before} at the start, {load_note()} at the end.",
             f"- Model: a fresh AutoEncoder (seed {args.seed}); weights do not change speed.",
             "- Reference: torchvision's per-image PIL chain, fp32 NCHW, normalised input and target, "
             "one process; evaluation one tile at a time with a matplotlib figure per tile at 150 dpi, "
             "then a pandas/openpyxl sheet (checkpoint load included).",
             "- Ours, training: uint8 decode, prepare_batch(augment=True), channels_last, autocast in the "
             f"precision mixed_precision={plan.precision!r} picks (named in each row), LOSSES['mse'], Adam; both "
             "training loops decode their tiles inside the timed step.",
             "- Ours, evaluation and features: evaluation_engine.evaluate and Extract_Features.extract_features "
             "end to end (model load, decode, forward, metrics, PNGs, workbook / CSV, .npy, PCA plot), timed "
             "with num_workers 0 and 2; the faster is reported.",
             "- malloc: the reference ran with glibc's defaults; ours, forward-only and encoder-only with the "
             "setting every script of ours applies (cli.keep_freed_memory: freed memory kept for reuse) "
             + ("applied." if kept else "NOT applied here (not glibc, KEEP_FREED_MEMORY=0, or malloc tuned by "
                "the environment)."),
             "- 3b and 4 put the forward-only / encoder-only rate (the same inference model, for_inference, "
             f"in the same precision, on the decoded tiles, batches of {plan.batch}, no I/O) in the reference "
             "column.",
             *notes]
    table = markdown_table(HEADER, rows)
    write_report(args.output or "benchmark_results.md", "Benchmark: speed against the reference",
                 ["\n".join(machine_lines(torch.get_num_threads())), table, "\n".join(notes)])


# ---------------------------------------------------------------------------------------------------
# Quality
# ---------------------------------------------------------------------------------------------------
def quality(args):
    if not os.path.isdir(args.train_folder):
        raise UserError(f"training folder {args.train_folder!r} not found: make it with python Prepare_Tiles.py "
                        "--slide_path=<slide.svs> --tile_stride=64 --exclude_tiles_in=input_images, "
                        "or pass --train_folder=PATH")
    if args.crop % DOWNSAMPLING or not DOWNSAMPLING <= args.crop <= TILE:
        raise UserError(f"--crop={args.crop} must be a multiple of {DOWNSAMPLING} between {DOWNSAMPLING} and {TILE}")
    if args.images < 1:
        raise UserError(f"--images={args.images} must be at least 1")
    started = time.perf_counter()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    train_paths = find_images(args.train_folder)
    test_paths = find_images(args.test_folder)
    steps = math.ceil(args.images / BATCH)
    order = torch.Generator().manual_seed(args.seed)
    sequence = torch.cat([torch.randperm(len(train_paths), generator=order)
                          for _ in range(math.ceil(steps * BATCH / len(train_paths)))])[:steps * BATCH].tolist()
    batches = [[train_paths[i] for i in sequence[s * BATCH:(s + 1) * BATCH]] for s in range(steps)]
    schedule = types.SimpleNamespace(lr_schedule="cosine", num_epochs=steps, learning_rate=args.lr)
    seed_everything(args.seed)
    state = AutoEncoder().state_dict()
    train_dtype = autocast_dtype(device, args.mixed_precision, training=True)
    eval_dtype = autocast_dtype(device, args.mixed_precision)
    recipes = [
        f"- Reference: per-image PIL chain on the CPU (Resize {TILE}, RandomCrop {args.crop}, rotation +-45, "
        "flips, affine, colour jitter, blur, ImageNet Normalize); normalised inputs and targets through the "
        f"Sigmoid; fp32 NCHW; Adam lr {REFERENCE_LR:g} constant, weight decay {WEIGHT_DECAY:g}; batch {BATCH}. "
        "Evaluated as the reference does: un-normalised [0, 1] tiles in, Sigmoid output compared with them.",
        f"- Ours: uint8 decode, prepare_batch(crop {args.crop}, augment {'on' if args.augment else 'off'}); "
        f"[0, 1] inputs and targets (normalisation inside the model); channels_last, {precision_name(train_dtype)}; "
        f"Adam lr {args.lr:g} "
        f"cosine-decayed to 1% over {steps} steps, weight decay {WEIGHT_DECAY:g}; batch {BATCH}. "
        "Evaluated with evaluation_engine.reconstruct.",
        f"- Both: the same {steps * BATCH} training images in the same order from {len(train_paths)} tiles in "
        f"{args.train_folder} (seed {args.seed}, same initial weights); evaluated on the {len(test_paths)} "
        f"held-out tiles of {args.test_folder} at {TILE} x {TILE}; PSNR and windowed SSIM from metrics.per_image.",
    ]
    print("\n".join(recipes), flush=True)

    seed_everything(args.seed)
    reference = reference_model(state, device).train()
    optimizer = torch.optim.Adam(reference.parameters(), lr=REFERENCE_LR, weight_decay=WEIGHT_DECAY)
    transform = reference_train_transform(TILE, args.crop)
    start = time.perf_counter()
    for paths in tqdm(batches, desc="reference recipe", unit="step", leave=False):
        reference_train_step(reference, optimizer, paths, transform, device)
    reference_seconds = time.perf_counter() - start
    keep_freed_memory()  # the reference trained with glibc's malloc as it ships; ours as our scripts set it

    seed_everything(args.seed)
    ours = our_model(state, device).train()
    optimizer = torch.optim.Adam(ours.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    scaler = torch.amp.GradScaler("cuda", enabled=train_dtype == torch.float16)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step, paths in enumerate(tqdm(batches, desc="our recipe", unit="step", leave=False)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(schedule, step + 1)
        our_train_step(ours, optimizer, scaler, paths, TILE, device, generator, train_dtype, args.crop, args.augment)
    our_seconds = time.perf_counter() - start

    means = {"reference": reference_scores(reference.eval(), test_paths, device),
             "ours": our_scores(ours.eval(), test_paths, device, eval_dtype)}
    gain = means["ours"]["PSNR"] - means["reference"]["PSNR"]
    table = markdown_table(
        ["recipe", "training images", "training s", "PSNR (dB)", "SSIM (windowed)", "MSE"],
        [["reference", str(steps * BATCH), f"{reference_seconds:.0f}", *fmt(means["reference"])],
         ["ours", str(steps * BATCH), f"{our_seconds:.0f}", *fmt(means["ours"])],
         ["ours - reference", "", "", f"{gain:+.2f}", f"{means['ours']['SSIM'] - means['reference']['SSIM']:+.4f}",
          f"{means['ours']['MSE'] - means['reference']['MSE']:+.5f}"]])
    verdict = (f"Target: ours at least 5 dB better in PSNR at about 5,000 training images: "
               f"{'met' if gain >= 5 else 'not met'} ({gain:+.2f} dB at {steps * BATCH} images, "
               f"{args.crop} px crops, on {device.type}).")
    wall = time.perf_counter() - started
    write_report(args.output or "benchmark_quality.md", "Benchmark: reconstruction quality against the reference",
                 ["\n".join(machine_lines(torch.get_num_threads())), "\n".join(recipes), table, verdict,
                  f"Wall time {wall:.0f} s; {load_note()} at the end."])


def reference_scores(model, paths, device):
    """As the reference evaluates: un-normalised tiles one at a time, Sigmoid output against the tile."""
    transform = reference_eval_transform(TILE)
    return mean_metrics(reference_reconstruct(model, path, transform, device)[2] for path in paths)


def our_scores(model, paths, device, amp_dtype):
    chunks = (paths[i:i + BATCH] for i in range(0, len(paths), BATCH))
    return mean_metrics(evaluation_engine.reconstruct(model, torch.stack([load_image(p, TILE) for p in chunk]),
                                                      device, amp_dtype)[2] for chunk in chunks)


def mean_metrics(batches):
    """Per-image means of MSE, PSNR and SSIM over metric dicts of any batch sizes."""
    values = {name: [] for name in METRIC_NAMES}
    for metrics in batches:
        for name in METRIC_NAMES:
            values[name].append(metrics[name].float().cpu())
    return {name: torch.cat(parts).mean().item() for name, parts in values.items()}


def fmt(values):
    return [f"{values['PSNR']:.2f}", f"{values['SSIM']:.4f}", f"{values['MSE']:.5f}"]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="markdown file for the results (default benchmark_results.md, "
                                         "or benchmark_quality.md with --quality)")
    parser.add_argument("--test_folder", default="input_images", help="held-out tiles (default input_images)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed_precision", default="auto", choices=PRECISIONS,
                        help="our precision, as Config.mixed_precision (default auto); the reference is always fp32")
    parser.add_argument("--quick", action="store_true", help="a few 64-pixel tiles: checks that everything runs")
    parser.add_argument("--quality", action="store_true", help="train both recipes and compare reconstructions")
    parser.add_argument("--images", type=int, help=f"quality: training images per recipe "
                                                   f"(default {QUALITY_DEFAULTS['images']})")
    parser.add_argument("--crop", type=int, help=f"quality: training crop side, pixels "
                                                 f"(default {QUALITY_DEFAULTS['crop']})")
    parser.add_argument("--train_folder",
                        help=f"quality: training tiles (default {QUALITY_DEFAULTS['train_folder']})")
    parser.add_argument("--lr", type=float,
                        help=f"quality: our peak learning rate, cosine-decayed (default {QUALITY_DEFAULTS['lr']:g})")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction,
                        help="quality: augment our training batches (default off, as the sample models)")
    args = parser.parse_args(argv)
    given = [f"--{key}" for key in QUALITY_DEFAULTS if getattr(args, key) is not None]
    if given and not args.quality:
        parser.error(f"{', '.join(given)} can only be used with --quality")
    if args.quality and args.quick:
        parser.error("--quick applies to the speed benchmark; shrink --quality with --images and --crop")
    for key, value in QUALITY_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def main():
    args = parse_args(sys.argv[1:])
    torch.set_num_threads(args.threads)
    if args.quality:
        quality(args)
    else:
        speed(args)


if __name__ == "__main__":
    run_main(main)
