"""The training loop shared by Training_MSE.py and Training_SSIM.py.

One process per GPU under DistributedDataParallel when several GPUs are listed (started here through
PyTorch's elastic launcher, or by torchrun), one process otherwise. Only rank 0 prints, logs and saves.
Every epoch's order and augmentations are seeded by (seed, epoch), so a resumed run continues exactly
where an uninterrupted one would be.
"""
import contextlib
import csv
import glob
import io
import math
import os
import re
import signal
import sys
import time
import uuid

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint_io
from Auto_encoder import DOWNSAMPLING, AutoEncoder
from Dataset import ImageFolder, SkipLog, collate
from augmentation import prepare_batch
from cli import (UserError, autocast, autocast_dtype, gpu_ids, load_config, precision_mode,
                 precision_name, run_main, select_device, worker_count)
from inference import reconstruct
from metrics import LOSSES
from outputs import check_writable

CSV_COLUMNS = ["Epoch", "Loss", "Val_MSE", "Val_PSNR", "Val_SSIM", "Learning_Rate", "Images_Seen", "Seconds"]
INTERRUPT_NAME = "Model_AE_interrupt.pth"
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
    precision_mode(cfg.mixed_precision)
    if not 0 <= cfg.val_fraction < 1:
        raise UserError(f"val_fraction={cfg.val_fraction} must be in [0, 1)")


def learning_rate(cfg, epoch):
    """Learning rate of a 1-based epoch."""
    if cfg.lr_schedule == "cosine" and cfg.num_epochs > 1:
        progress = (epoch - 1) / (cfg.num_epochs - 1)
        return cfg.learning_rate * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))
    return cfg.learning_rate


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
    epochs = [int(r["Epoch"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [float(r["Loss"]) for r in rows], marker="o", markersize=3, label="training")
    validated = [(e, r) for e, r in zip(epochs, rows) if r.get("Val_MSE") not in (None, "")]
    if validated:
        key = "Val_MSE" if loss_name == "mse" else "Val_SSIM"
        values = [float(r[key]) if loss_name == "mse" else 1 - float(r[key]) for _, r in validated]
        ax.plot([e for e, _ in validated], values, marker="s", markersize=3, label="validation")
        ax.legend()
    ax.set_xlabel("Epoch")
    ax.set_ylabel("MSE loss" if loss_name == "mse" else "1 - SSIM")
    ax.set_title(f"Training loss ({loss_name.upper()})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)

    def write(tmp):
        with open(tmp, "wb") as handle:
            handle.write(buffer.getvalue())
    checkpoint_io.atomic_write(png_path, write)


class Distributed:
    """Rank, world size and the collective ops; a single process is rank 0 of 1."""

    def __init__(self, cfg):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = select_device(cfg.GPUs, self.local_rank)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self):
        return self.rank == 0

    def sum(self, tensor):
        """Sum of a tensor over all processes (the tensor itself in one process)."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class EpochSampler(torch.utils.data.Sampler):
    """This process's share of a seeded per-epoch shuffle, optionally skipping batches already done
    (resuming an interrupted epoch)."""

    def __init__(self, indices, seed, rank, world, batch_size):
        self.indices, self.seed, self.rank, self.world, self.batch_size = list(indices), seed, rank, world, batch_size
        self.epoch, self.skip_batches = 1, 0
        self.per_rank = len(self.indices) // world

    def set_epoch(self, epoch, skip_batches=0):
        self.epoch, self.skip_batches = epoch, skip_batches

    def order(self):
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        permuted = [self.indices[i] for i in torch.randperm(len(self.indices), generator=generator).tolist()]
        return permuted[self.rank:self.per_rank * self.world:self.world]

    def __iter__(self):
        return iter(self.order()[self.skip_batches * self.batch_size:])

    def __len__(self):
        return max(0, self.per_rank - self.skip_batches * self.batch_size)


def split_indices(count, val_fraction, seed):
    """(training indices, validation indices): a fixed random share of the tiles, chosen by seed."""
    n_val = int(round(count * val_fraction))
    if val_fraction > 0 and n_val == 0 and count >= 2:
        n_val = 1
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


@torch.no_grad()
def validation_metrics(model, loader, device, ddp, amp_dtype):
    """Mean MSE, PSNR and SSIM of the validation tiles (whole tiles, no augmentation), over all ranks."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for images, _, _ in loader:
        if len(images):
            _, _, metrics = reconstruct(model, images, device, amp_dtype)
            sums += torch.stack([metrics["MSE"].sum(), metrics["PSNR"].sum(), metrics["SSIM"].sum(),
                                 torch.tensor(float(len(images)), device=device)]).double()
    ddp.sum(sums)
    model.train()
    if sums[3] == 0:
        return None
    return {"MSE": (sums[0] / sums[3]).item(), "PSNR": (sums[1] / sums[3]).item(), "SSIM": (sums[2] / sums[3]).item()}


class Interrupts:
    """Ctrl-C and a job scheduler's SIGTERM both stop training with an interrupt checkpoint. Inside
    deferred() (one optimisation step) the first signal waits for the step to finish, so the checkpoint
    never holds a half-applied step (BatchNorm statistics of an aborted forward pass, augmentation drawn
    for a batch never trained on) and the resumed run matches an uninterrupted one; a second signal stops
    at once."""

    def __init__(self):
        self.deferring = self.pending = False

    def _handle(self, signum, frame):
        if self.deferring and not self.pending:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self):
        signals = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
        previous = {s: signal.signal(s, self._handle) for s in signals}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


def forward_loss(model, images, loss_fn, crop, augment, aug_gen, amp_dtype):
    """uint8 tiles already on the device -> the loss of their reconstruction, exactly as training computes it."""
    batch = prepare_batch(images, crop, augment, aug_gen).contiguous(memory_format=torch.channels_last)
    with autocast(batch.device.type, amp_dtype):
        output = model(batch)
    return loss_fn(output, batch)


def optimizer_step(loss, optimizer, scaler):
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def train(cfg, loss_name):
    """Train an AutoEncoder with loss_name ('mse' or 'ssim') as Config says; returns the loss log rows."""
    validate(cfg)
    ckpt_dir = getattr(cfg, f"model_saved_location_{loss_name}")
    csv_path = getattr(cfg, f"training_loss_file_{loss_name}")
    plot_path = os.path.splitext(csv_path)[0] + ".png"
    final_path = os.path.join(ckpt_dir, f"Final_Model_AE_{loss_name.upper()}.pth")
    best_path = os.path.join(ckpt_dir, f"Best_Model_AE_{loss_name.upper()}.pth")
    interrupt_path = os.path.join(ckpt_dir, INTERRUPT_NAME)
    ddp = Distributed(cfg)
    device, say = ddp.device, (print if ddp.main else (lambda *a, **k: None))
    if ddp.main:
        check_writable(ckpt_dir)
        check_writable(os.path.dirname(csv_path))
        if os.path.isdir(csv_path):
            raise UserError(f"training_loss_file_{loss_name}={csv_path!r} is a folder: give a .csv file name")
    if cfg.batch_size_train % ddp.world or cfg.batch_size_train < 2 * ddp.world:
        raise UserError(f"batch_size_train={cfg.batch_size_train} must be divisible by the {ddp.world} training "
                        "process(es) and give each at least 2 tiles (BatchNorm needs two)")
    batch_size = cfg.batch_size_train // ddp.world

    dataset = ImageFolder(cfg.folder_path_train, cfg.tile_size)
    train_idx, val_idx = split_indices(len(dataset), cfg.val_fraction, cfg.seed)
    if len(train_idx) < ddp.world:
        raise UserError(f"{cfg.folder_path_train!r} holds {len(train_idx)} training tiles, fewer than the "
                        f"{ddp.world} training processes")
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and in every fresh run
    raw_model = AutoEncoder().to(device, memory_format=torch.channels_last)
    if ddp.world > 1 and cfg.sync_batchnorm:
        if device.type == "cuda":
            raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
        else:  # DistributedDataParallel refuses SyncBatchNorm layers on the CPU
            say("sync_batchnorm ignored: PyTorch synchronises BatchNorm only between GPUs; "
                "each CPU process keeps its own statistics.")
    optimizer = torch.optim.Adam(raw_model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    amp_dtype = autocast_dtype(device, cfg.mixed_precision, training=True)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    loss_fn = LOSSES[loss_name]

    start_epoch, skip_batches, history, best_val, partial = 1, 0, [], math.inf, None
    periodic = latest_checkpoint(ckpt_dir)
    interrupted = checkpoint_io.load(interrupt_path) if os.path.isfile(interrupt_path) else None
    if interrupted is not None and periodic and periodic[0] >= interrupted["epoch"]:
        interrupted = None  # an older interruption that a later run already went past
    source = interrupt_path if interrupted is not None else periodic[1] if periodic else None
    if source and cfg.resume:
        state = interrupted if interrupted is not None else checkpoint_io.load(source)
        if not isinstance(state, dict) or "optimizer_state_dict" not in state or "epoch" not in state:
            raise UserError(f"cannot resume from {source!r}: it holds weights only, not a training checkpoint; "
                            "move it out of the checkpoint folder or pass --resume=false")
        checkpoint_io.load_weights(raw_model, source)
        optimizer.load_state_dict(state["optimizer_state_dict"])
        if "scaler_state_dict" in state:
            scaler.load_state_dict(state["scaler_state_dict"])
        best_val = state.get("best_val_loss", math.inf)
        if interrupted is not None:
            start_epoch, skip_batches, partial = state["epoch"], state["step"], state
            history = read_history(csv_path, start_epoch - 1)
            say(f"Resuming from {source} (epoch {start_epoch}, after step {skip_batches}); "
                "pass --resume=false to start over.")
        else:
            start_epoch, history = state["epoch"] + 1, read_history(csv_path, state["epoch"])
            say(f"Resuming from {source} (epoch {state['epoch']}); pass --resume=false to start over.")
    elif source:
        say(f"Starting fresh (resume=False): checkpoints in {ckpt_dir} and {csv_path} will be overwritten.")
    if start_epoch > cfg.num_epochs:
        say(f"Nothing to do: already trained for {start_epoch - 1} of num_epochs={cfg.num_epochs} epochs.")
        if ddp.main and not os.path.isfile(final_path):  # killed between the last checkpoint and the final save
            checkpoint_io.save(raw_model.state_dict(), final_path)
            say(f"Saved {final_path}.")
        ddp.close()
        return history

    model = raw_model
    if ddp.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile_model:
        model = torch.compile(model)
    sampler = EpochSampler(train_idx, cfg.seed, ddp.rank, ddp.world, batch_size)
    workers = worker_count(cfg.num_workers)
    loader_args = dict(num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
                       persistent_workers=workers > 0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                         drop_last=sampler.per_rank > batch_size, **loader_args)
    val_loader = None
    if val_idx:
        val_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, val_idx[ddp.rank::ddp.world]),
                                                 batch_size=batch_size, **loader_args)
    skips = SkipLog() if ddp.main else SkipLog.quiet()
    images_seen = int(history[-1]["Images_Seen"]) if history and history[-1].get("Images_Seen") else 0
    say(f"Training on {len(train_idx)} tiles ({len(val_idx)} more for validation) from {cfg.folder_path_train} "
        f"on {device}{f' x {ddp.world} processes' if ddp.world > 1 else ''} in {precision_name(amp_dtype)}, "
        f"{loss_name.upper()} loss, "
        f"epochs {start_epoch}..{cfg.num_epochs}.")

    def snapshot(epoch, step, total, seen, aug_gen, seconds):
        return {"epoch": epoch, "step": step, "model_state_dict": raw_model.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(), "scaler_state_dict": scaler.state_dict(),
                "best_val_loss": best_val, "loss_sum": total, "loss_count": seen,
                "aug_rng_state": aug_gen.get_state(), "images_seen": images_seen, "seconds": seconds}

    epoch = start_epoch
    interrupts = Interrupts()
    with interrupts.installed():
        for epoch in range(start_epoch, cfg.num_epochs + 1):
            aug_gen = torch.Generator().manual_seed((cfg.seed * 100003 + epoch) * 64 + ddp.rank + 1)
            total = torch.zeros((), dtype=torch.float64, device=device)
            seen, step, seconds_before = 0, 0, 0.0
            if partial is not None:
                aug_gen.set_state(partial["aug_rng_state"])
                total += partial["loss_sum"]
                seen, step, seconds_before = partial["loss_count"], partial["step"], partial["seconds"]
                images_seen = partial["images_seen"]
            sampler.set_epoch(epoch, step)
            partial = None
            lr = learning_rate(cfg, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            started = time.time()
            bar = tqdm(loader, desc=f"Epoch {epoch}/{cfg.num_epochs}", unit="batch", leave=False,
                       dynamic_ncols=True, disable=not ddp.main, initial=step, total=step + len(loader))
            try:
                for images, _, skipped in bar:
                    skips.add(skipped)
                    # A batch shrunk by unreadable files below BatchNorm's two tiles is skipped, by every
                    # rank at once so none waits in a collective.
                    too_small = ddp.sum(torch.tensor([float(len(images) < 2)], device=device))
                    if too_small.item() > 0:
                        step += 1  # consumed all the same: resuming skips batches by this count
                        continue
                    with interrupts.deferred():
                        images = images.to(device, non_blocking=True)
                        loss = forward_loss(model, images, loss_fn, cfg.train_crop_size, cfg.augment, aug_gen,
                                            amp_dtype)
                        # Every rank sees the same verdict, so none is left waiting in a collective.
                        finite = ddp.sum(torch.isfinite(loss.detach()).to(torch.float32).reshape(1))
                        if finite.item() < ddp.world:
                            raise UserError(f"the loss became {loss.item()} at epoch {epoch}, step {step + 1}; "
                                            f"training stopped and the last good checkpoint in {ckpt_dir} is "
                                            "intact: lower learning_rate and rerun")
                        optimizer_step(loss, optimizer, scaler)
                        total += loss.detach().double() * len(images)
                        seen += len(images)
                        step += 1
                        images_seen += len(images) * ddp.world
                    if seen and (step % 5 == 0 or step == bar.total):
                        bar.set_postfix(loss=f"{total.item() / seen:.5f}")
                # Wrapping up the epoch is covered too: an interruption here resumes at its last step.
                bar.close()
                sums = ddp.sum(torch.stack([total, torch.tensor(float(seen), dtype=torch.float64, device=device)]))
                if sums[1] == 0:
                    raise UserError(f"no readable images in {cfg.folder_path_train!r} ({skips.summary()}): "
                                    "check the folder holds image tiles")
                average = (sums[0] / sums[1]).item()
                val = (validation_metrics(raw_model, val_loader, device, ddp, amp_dtype)
                       if val_loader is not None else None)
                if not ddp.main:
                    continue
                val_note = (f", Validation MSE {val['MSE']:.6f} PSNR {val['PSNR']:.2f} dB SSIM {val['SSIM']:.4f}"
                            if val else "")
                print(f"Epoch {epoch}/{cfg.num_epochs}, Average Loss: {average:.6f}{val_note}", flush=True)
                history.append({"Epoch": epoch, "Loss": f"{average:.6f}", "Learning_Rate": f"{lr:.4g}",
                                "Images_Seen": images_seen, "Seconds": f"{seconds_before + time.time() - started:.1f}",
                                **({f"Val_{k}": f"{v:.6f}" for k, v in val.items()} if val else {})})
                if val:
                    val_loss = val["MSE"] if loss_name == "mse" else 1 - val["SSIM"]
                    if val_loss < best_val:
                        checkpoint_io.save(raw_model.state_dict(), best_path)
                        best_val = val_loss  # only once saved: an interrupted save is redone on resume
                write_history(csv_path, history)
                plot_history(plot_path, history, loss_name)
                if epoch % cfg.save_interval == 0 or epoch == cfg.num_epochs:
                    state = snapshot(epoch, 0, 0.0, 0, aug_gen, 0.0)
                    keep = ("epoch", "model_state_dict", "optimizer_state_dict", "scaler_state_dict", "best_val_loss")
                    checkpoint_io.save({k: state[k] for k in keep} | {"loss": average},
                                       os.path.join(ckpt_dir, f"Model_AE_epoch_{epoch:03d}.pth"))
                    if os.path.exists(interrupt_path):
                        os.remove(interrupt_path)
            except KeyboardInterrupt:
                bar.close()
                if ddp.main:
                    checkpoint_io.save(snapshot(epoch, step, total.item(), seen, aug_gen,
                                                seconds_before + time.time() - started), interrupt_path)
                    print(f"\nInterrupted at epoch {epoch}, step {step}: saved {interrupt_path}; "
                          "run the same command again to resume.", file=sys.stderr)
                raise
    if ddp.main:
        checkpoint_io.save(raw_model.state_dict(), final_path)
        print(f"Saved {final_path}{' and ' + best_path if val_loader is not None else ''}; "
              f"loss log {csv_path}, curve {plot_path}; {skips.summary()}.")
    ddp.barrier()
    ddp.close()
    return history


def _worker(loss_name, argv):
    """Entry point of one process started by the elastic launcher."""
    run_main(lambda cfg: train(cfg, loss_name), "training", loss_name, argv)


def launch(loss_name, argv, processes=None):
    """Train in this process, or start one process per listed GPU through PyTorch's elastic launcher
    (the machinery behind torchrun). processes overrides the count (tests use 2 CPU processes)."""
    cfg = load_config(argv, "training", loss_name)
    if "WORLD_SIZE" in os.environ:  # already started by torchrun
        return train(cfg, loss_name)
    if processes is None:
        processes = len(gpu_ids(cfg.GPUs)) if torch.cuda.is_available() else 1
    if processes <= 1:
        return train(cfg, loss_name)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.5)
    print(f"Starting {processes} training processes (DistributedDataParallel).")
    try:
        elastic_launch(config, _worker)(loss_name, argv)
    except ChildFailedError:
        raise UserError("a training process failed (its message is above); fix it and run the same command "
                        "again to resume")


def main(loss_name):
    run_main(lambda cfg: launch(loss_name, sys.argv[1:]), "training", loss_name)
