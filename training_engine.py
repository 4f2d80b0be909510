"""The training loop shared by Training_MSE.py and Training_SSIM.py."""
import csv
import glob
import io
import math
import os
import re
import time

import torch
from tqdm import tqdm

import checkpoint_io
from Auto_encoder import DOWNSAMPLING, AutoEncoder
from Dataset import ImageFolder, SkipLog, collate
from augmentation import prepare_batch
from cli import UserError, check_writable, load_config, run_main, select_device
from metrics import LOSSES

CSV_COLUMNS = ["Epoch", "Loss", "Learning_Rate", "Seconds"]
_EPOCH_FILE = re.compile(r"Model_AE_epoch_(\d+)\.pth$")


def validate(cfg):
    for key in ("tile_size", "num_epochs", "batch_size_train", "save_interval"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{key}={getattr(cfg, key)} must be at least 1")
    if cfg.tile_size % DOWNSAMPLING:
        raise UserError(f"tile_size={cfg.tile_size} must be a multiple of {DOWNSAMPLING} (for example 256)")
    if cfg.train_crop_size and (cfg.train_crop_size % DOWNSAMPLING or cfg.train_crop_size > cfg.tile_size):
        raise UserError(f"train_crop_size={cfg.train_crop_size} must be 0 or a multiple of {DOWNSAMPLING} "
                        f"no larger than tile_size={cfg.tile_size}")
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise UserError(f"lr_schedule={cfg.lr_schedule!r}: use 'constant' or 'cosine'")


def learning_rate(cfg, epoch):
    """Learning rate of a 1-based epoch."""
    if cfg.lr_schedule == "cosine" and cfg.num_epochs > 1:
        progress = (epoch - 1) / (cfg.num_epochs - 1)
        return cfg.learning_rate * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))
    return cfg.learning_rate


def autocast_dtype(device):
    """bf16 where the GPU supports it, else fp16 (with a GradScaler); None means fp32 (CPU)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def latest_checkpoint(folder):
    """(epoch, path) of the newest Model_AE_epoch_NNN.pth in folder, or None."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(folder), "Model_AE_epoch_*.pth")):
        match = _EPOCH_FILE.search(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return max(found) if found else None


def read_history(csv_path, up_to_epoch):
    """Rows of an earlier run's loss log, for epochs 1..up_to_epoch."""
    if not os.path.isfile(csv_path):
        return []
    with open(csv_path, newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("Epoch", "").isdigit()
                and int(row["Epoch"]) <= up_to_epoch]


def write_history(csv_path, rows):
    def write(tmp):
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    checkpoint_io.atomic_write(csv_path, write)


def plot_history(png_path, rows, loss_name):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([int(r["Epoch"]) for r in rows], [float(r["Loss"]) for r in rows], marker="o", markersize=3)
    ax.set_xlabel("Epoch")
    ax.set_ylabel(f"{loss_name.upper()} loss" if loss_name == "mse" else "1 - SSIM")
    ax.set_title(f"Training loss ({loss_name.upper()})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    checkpoint_io.atomic_write(png_path, lambda tmp: open(tmp, "wb").write(buffer.getvalue()))


def train(cfg, loss_name):
    """Train an AutoEncoder with loss_name ('mse' or 'ssim') as Config says; returns the loss log rows."""
    validate(cfg)
    ckpt_dir = getattr(cfg, f"model_saved_location_{loss_name}")
    csv_path = getattr(cfg, f"training_loss_file_{loss_name}")
    plot_path = os.path.splitext(csv_path)[0] + ".png"
    final_path = os.path.join(ckpt_dir, f"Final_Model_AE_{loss_name.upper()}.pth")
    check_writable(ckpt_dir)
    check_writable(os.path.dirname(csv_path))

    device = select_device(cfg.GPUs)
    dataset = ImageFolder(cfg.folder_path_train, cfg.tile_size)
    model = AutoEncoder().to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    amp_dtype = autocast_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    loss_fn = LOSSES[loss_name]

    start_epoch, history = 1, []
    previous = latest_checkpoint(ckpt_dir)
    if previous and cfg.resume:
        epoch, path = previous
        state = checkpoint_io.load(path)
        checkpoint_io.load_weights(model, path)
        optimizer.load_state_dict(state["optimizer_state_dict"])
        if "scaler_state_dict" in state:
            scaler.load_state_dict(state["scaler_state_dict"])
        start_epoch, history = epoch + 1, read_history(csv_path, epoch)
        print(f"Resuming from {path} (epoch {epoch}); pass --resume=false to start over.")
    elif previous:
        print(f"Starting fresh (resume=False): checkpoints in {ckpt_dir} and {csv_path} will be overwritten.")
    if start_epoch > cfg.num_epochs:
        print(f"Nothing to do: already trained for {start_epoch - 1} of num_epochs={cfg.num_epochs} epochs.")
        return history

    sampler_gen = torch.Generator()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size_train, shuffle=True, generator=sampler_gen,
        num_workers=cfg.num_workers, collate_fn=collate, pin_memory=device.type == "cuda",
        persistent_workers=cfg.num_workers > 0, drop_last=len(dataset) > cfg.batch_size_train)
    skips = SkipLog()
    crop = cfg.train_crop_size
    print(f"Training on {len(dataset)} tiles from {cfg.folder_path_train} on {device}, "
          f"{loss_name.upper()} loss, epochs {start_epoch}..{cfg.num_epochs}.")

    for epoch in range(start_epoch, cfg.num_epochs + 1):
        # Seeding per epoch makes the order and the augmentations of epoch N the same whether or not
        # the run was resumed.
        sampler_gen.manual_seed(cfg.seed * 100003 + epoch)
        aug_gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch + 50000)
        lr = learning_rate(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        started = time.time()
        total, seen = torch.zeros((), device=device), 0
        bar = tqdm(loader, desc=f"Epoch {epoch}/{cfg.num_epochs}", unit="batch", leave=False, dynamic_ncols=True)
        for step, (images, _, skipped) in enumerate(bar, start=1):
            skips.add(skipped)
            if len(images) == 0:  # every file of this batch was unreadable
                continue
            images = images.to(device, non_blocking=True)
            batch = prepare_batch(images, crop, cfg.augment, aug_gen).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                output = model(batch)
            loss = loss_fn(output, batch)
            if not torch.isfinite(loss):
                raise UserError(f"the loss became {loss.item()} at epoch {epoch}, step {step}; training stopped "
                                f"and the last good checkpoint in {ckpt_dir} is intact: lower learning_rate and rerun")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.detach() * len(images)
            seen += len(images)
            if step % 5 == 0 or step == len(loader):
                bar.set_postfix(loss=f"{total.item() / seen:.5f}")
        bar.close()
        if seen == 0:
            raise UserError(f"no readable images in {cfg.folder_path_train!r} ({skips.summary()}): "
                            "check the folder holds image tiles")
        average = total.item() / seen
        print(f"Epoch {epoch}/{cfg.num_epochs}, Average Loss: {average:.6f}", flush=True)
        history.append({"Epoch": epoch, "Loss": f"{average:.6f}", "Learning_Rate": f"{lr:.3g}",
                        "Seconds": f"{time.time() - started:.1f}"})
        write_history(csv_path, history)
        plot_history(plot_path, history, loss_name)
        if epoch % cfg.save_interval == 0 or epoch == cfg.num_epochs:
            checkpoint_io.save({"epoch": epoch, "model_state_dict": model.state_dict(),
                                "optimizer_state_dict": optimizer.state_dict(),
                                "scaler_state_dict": scaler.state_dict(), "loss": average},
                               os.path.join(ckpt_dir, f"Model_AE_epoch_{epoch:03d}.pth"))
    checkpoint_io.save(model.state_dict(), final_path)
    print(f"Saved {final_path}; loss log {csv_path}, curve {plot_path}; {skips.summary()}.")
    return history


def main(loss_name):
    run_main(lambda: train(load_config(), loss_name))
