"""The training loop shared by Training_MSE.py and Training_SSIM.py (through cli.training_main): train() sets
up the run (set_up: device, data, model, the checkpoint it continues from) as one TrainingRun, runs
train_one_epoch() per epoch and saves the Final model.

One process per GPU (started by runtime.spawn or torchrun); only rank 0 prints, logs and saves. Each
epoch's order and augmentations are seeded by (seed, epoch, rank): a resumed run continues exactly.
"""
import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from core import checkpoint_io
from core import loss_log
from core import losses, run_lock
from core import streams
from core import training_data
from core import training_state
from Auto_encoder import DOWNSAMPLING, AutoEncoder, activations_in_place, fits
from Dataset import ImageFolder, SkipLog
from core.augmentation import prepare_batch
from core.errors import UserError
from core.inference import reconstruct
from core.loaders import stop_loader_workers
from core.atomic import check_target, check_writable
from core.devices import TRAINING_LAYOUT, autocast, autocast_dtype, precision_name
from core.runtime import Distributed
from core.signals import Interrupts, interrupts_blocked

PLOT_EVERY_SECONDS = 60  # the loss curve is redrawn at most this often, and after the last epoch


def validate(cfg):
    """Checks across settings (cli.load_config has checked each setting on its own)."""
    if not fits(cfg.tile_size):
        raise UserError(f"tile_size={cfg.tile_size} must be a multiple of {DOWNSAMPLING} (for example 256)")
    if cfg.train_crop_size and (not fits(cfg.train_crop_size) or cfg.train_crop_size > cfg.tile_size):
        raise UserError(f"train_crop_size={cfg.train_crop_size} must be 0 or a multiple of {DOWNSAMPLING} "
                        f"no larger than tile_size={cfg.tile_size}")


def learning_rate(cfg, epoch):
    """Learning rate of a 1-based epoch."""
    if cfg.lr_schedule == "cosine" and cfg.num_epochs > 1:
        progress = (epoch - 1) / (cfg.num_epochs - 1)
        return cfg.learning_rate * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))
    return cfg.learning_rate


@torch.no_grad()
def validation_metrics(run, loader):
    """Mean MSE, PSNR and SSIM of the validation tiles (whole tiles, no augmentation), over all ranks."""
    model, device, ddp = run.raw_model, run.device, run.ddp
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    with interrupts_blocked():
        batches = run.data.kept(iter(loader))
    for images, _, _ in batches:
        if len(images):
            _, _, metrics = reconstruct(model, images, device, run.amp_dtype)
            sums += torch.stack([metrics["MSE"].sum(), metrics["PSNR"].sum(), metrics["SSIM"].sum(),
                                 torch.tensor(float(len(images)), device=device)]).double()
    ddp.sum(sums)
    model.train()
    if sums[3] == 0:
        return None
    return {"MSE": (sums[0] / sums[3]).item(), "PSNR": (sums[1] / sums[3]).item(), "SSIM": (sums[2] / sums[3]).item()}


def forward_loss(model, images, loss_fn, crop, augment, aug_gen, amp_dtype):
    """uint8 tiles already on the device -> the loss of their reconstruction, exactly as training computes it."""
    batch = prepare_batch(images, crop, augment, aug_gen)
    batch = batch.contiguous(memory_format=TRAINING_LAYOUT)
    with autocast(batch.device.type, amp_dtype):
        output = model(batch)
    return loss_fn(output, batch)


def optimizer_step(loss, optimizer, scaler):
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


class EpochLoss:
    """The epoch's loss sum and tile count, and the first step whose loss was not finite, kept on the
    device so that a training step never waits for the GPU; read at the periodic check."""
    NONE = 2**62

    def __init__(self, device, total=0.0, count=0):
        self.total = torch.tensor(float(total), dtype=torch.float64, device=device)
        self.count = count
        self.bad_step = torch.tensor(self.NONE, device=device)
        self.bad_value = torch.zeros((), device=device)

    def add(self, loss, tiles, step):
        loss = loss.detach().float()
        self.total += loss.double() * tiles
        self.count += tiles
        first = ~torch.isfinite(loss) & (self.bad_step == self.NONE)
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_value = torch.where(first, loss, self.bad_value)

    def check(self, ddp, epoch, folder):
        """The periodic check, every finite_check_interval steps and at the end of the epoch: the one place
        a training step waits for the GPU. Raises the divergence error if any process saw a bad loss."""
        if not ddp.sum((self.bad_step != self.NONE).float().reshape(1)).item():
            return
        step, value = min((s, v) for s, v in ddp.gather((self.bad_step.item(), self.bad_value.item())))
        raise UserError(f"the loss became {value} at epoch {epoch}, step {step}; training stopped and the last "
                        f"good checkpoint in {folder} is intact: lower learning_rate and rerun")


def check_weights(run, epoch):
    """No model with NaN or infinite weights is ever saved: a diverged run stops with the message instead."""
    values = [t.isfinite().all() for t in run.raw_model.state_dict().values() if t.is_floating_point()]
    if not bool(torch.stack(values).all()):
        raise UserError(f"the model's weights became non-finite at epoch {epoch}; training stopped and the last "
                        f"good checkpoint in {run.paths.folder} is intact: lower learning_rate and rerun")


@dataclass(frozen=True)
class RunPaths:
    """The files of a training run: its checkpoint folder, loss log and curve, interrupt checkpoint, and
    Final and Best models."""
    folder: str
    log: str
    plot: str
    interrupt: str
    final: str
    best: str


def run_paths(cfg, loss_name):
    """The files of a run of loss_name (a name in losses.RECORDS)."""
    loss = losses.get(loss_name)
    folder, log = getattr(cfg, loss.key("model_saved_location")), getattr(cfg, loss.key("training_loss_file"))
    return RunPaths(
        folder=folder, log=log, plot=os.path.splitext(log)[0] + ".png",
        interrupt=os.path.join(folder, training_state.INTERRUPT_NAME),
        final=os.path.join(folder, training_state.model_name("Final", loss)),
        best=os.path.join(folder, training_state.model_name("Best", loss)))


@dataclass
class TrainingRun:
    """Everything the epochs of a run share, built in one place (set_up). `data` and the fields after it
    change as the run trains: the loaders once the tile cache is complete, the part of an interrupted epoch
    (None once resumed), the log rows, the best validation score, the tiles seen and when the curve was drawn."""
    cfg: object  # the settings, as cli.load_config read them
    loss_name: str
    loss: losses.Loss
    paths: RunPaths
    ddp: Distributed
    device: torch.device
    say: Callable[..., None]  # prints on rank 0, nothing elsewhere
    interrupts: Interrupts
    raw_model: torch.nn.Module  # the AutoEncoder itself: what is saved and validated
    model: torch.nn.Module  # raw_model as training calls it (DistributedDataParallel, compiled)
    amp_dtype: torch.dtype | None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    settings: dict  # training_state.experiment: what a checkpoint must match to be resumed
    skips: SkipLog
    batch_size: int  # tiles per batch in this process
    start_epoch: int
    data: training_data.TrainingData
    partial: training_state.EpochPart | None  # this process's part of the interrupted epoch it resumes
    history: list[dict]  # the loss log's rows
    best_val: float
    images_seen: int
    plotted: float = -math.inf  # time.monotonic() of the last loss curve


MIN_BATCHES_PER_EPOCH = 4  # fewer batches than this per epoch, or fewer steps than MIN_STEPS in the run, is warned of
MIN_STEPS = 300


def warn_if_too_few(cfg, tiles, say):
    """One warning line when the training set is too small for the settings to train a useful model."""
    per_epoch = max(1, tiles // cfg.batch_size_train)
    steps = per_epoch * cfg.num_epochs
    if per_epoch >= MIN_BATCHES_PER_EPOCH and steps >= MIN_STEPS:
        return
    say(f"warning: {tiles} training tiles in batches of batch_size_train={cfg.batch_size_train} make {per_epoch} "
        f"step(s) per epoch and {steps} in num_epochs={cfg.num_epochs}, too few to train a useful model: cut more "
        "tiles (Prepare_Tiles.py with a smaller tile_stride, such as --tile_stride=32), lower batch_size_train "
        "(with a train_crop_size such as 64, each step is cheaper), or raise num_epochs")


def check_run(cfg, loss_name, paths, ddp):
    """The outputs and batch size, before any tile is read: a read-only Final model or log is refused now,
    not after the training."""
    if ddp.main:
        check_writable(os.path.dirname(paths.log))
        if os.path.isdir(paths.log):
            raise UserError(f"{losses.get(loss_name).key('training_loss_file')}={paths.log!r} is a folder: "
                            "give a .csv file name")
        for path in (paths.final, paths.best, paths.log, paths.plot):
            check_target(path)
    if cfg.batch_size_train % ddp.world or cfg.batch_size_train < 2 * ddp.world:
        raise UserError(f"batch_size_train={cfg.batch_size_train} must be divisible by the {ddp.world} training "
                        "process(es) and give each at least 2 tiles (BatchNorm needs two)")


def split_tiles(cfg, ddp):
    """The training tiles and their (training indices, validation indices)."""
    dataset = ImageFolder(cfg.folder_path_train, cfg.tile_size)
    train_idx, val_idx = training_data.split_indices(len(dataset), cfg.val_fraction, cfg.seed)
    if len(train_idx) < 2 * ddp.world:  # BatchNorm needs two tiles a batch in every process
        raise UserError(f"folder_path_train={cfg.folder_path_train!r} holds {len(dataset)} tile(s) and "
                        f"val_fraction={cfg.val_fraction} leaves {len(train_idx)} for training: BatchNorm needs at "
                        f"least 2 per training process ({2 * ddp.world} for {ddp.world}); add tiles or lower "
                        "val_fraction")
    return dataset, train_idx, val_idx


def new_model(cfg, ddp, amp_dtype, say):
    """The network of a fresh run, on this process's device: the same initial weights on every rank and in
    every fresh run (seeded), BatchNorm synchronised between GPUs if asked."""
    device = ddp.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # tiles of one size: cuDNN times its kernels once, then keeps the fastest
    torch.manual_seed(cfg.seed)
    raw_model = activations_in_place(AutoEncoder().to(device, memory_format=TRAINING_LAYOUT))
    if ddp.world > 1 and cfg.sync_batchnorm:
        if device.type == "cuda":
            raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
        else:  # DistributedDataParallel refuses SyncBatchNorm layers on the CPU
            say("sync_batchnorm ignored: PyTorch synchronises BatchNorm only between GPUs; "
                "each CPU process keeps its own statistics.")
    return raw_model


def set_up(cfg, loss_name, paths, ddp, interrupts):
    """Everything an epoch needs, as one TrainingRun: device, data, model, optimizer, and where it resumes."""
    say = streams.say if ddp.main else (lambda *parts: None)
    check_run(cfg, loss_name, paths, ddp)
    dataset, train_idx, val_idx = split_tiles(cfg, ddp)
    device, loss = ddp.device, losses.get(loss_name)
    amp_dtype = autocast_dtype(device, cfg.mixed_precision, training=True)
    raw_model = new_model(cfg, ddp, amp_dtype, say)
    optimizer = training_state.adam(raw_model, device, cfg.learning_rate, cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    settings = training_state.experiment(cfg, loss_name, raw_model, len(dataset))
    skips = SkipLog() if ddp.main else SkipLog.quiet()
    skips.add_left_out(dataset.left_out)
    target = training_state.ResumeTarget(raw_model, optimizer, scaler, ddp.rank, ddp.world, cfg.batch_size_train)
    resumed = training_state.start_or_resume(cfg, ddp, paths, target, settings, loss.key("model_saved_location"), say)
    model = ddp.wrap(raw_model, cfg.compile_model)
    batch_size = cfg.batch_size_train // ddp.world
    data = training_data.build_loaders(cfg, ddp, dataset, train_idx, val_idx, batch_size, device, say,
                                       fill_cache=resumed.start_epoch <= cfg.num_epochs)
    run = TrainingRun(
        cfg=cfg, loss_name=loss_name, loss=loss, paths=paths, ddp=ddp, device=device, say=say,
        interrupts=interrupts, raw_model=raw_model, model=model, amp_dtype=amp_dtype,
        loss_fn=losses.training_loss(loss_name, cfg.l1_loss_weight),
        optimizer=optimizer, scaler=scaler, settings=settings, skips=skips, batch_size=batch_size, data=data,
        start_epoch=resumed.start_epoch, partial=resumed.partial, history=resumed.history,
        best_val=resumed.best_val, images_seen=resumed.images_seen)
    if run.start_epoch <= cfg.num_epochs:
        warn_if_too_few(cfg, len(train_idx), say)
        say(f"Training on {len(train_idx)} tiles ({len(val_idx)} more for validation) from {cfg.folder_path_train} "
            f"on {device}{f' x {ddp.world} processes' if ddp.world > 1 else ''} in {precision_name(amp_dtype)}, "
            f"{run.loss.tag} loss, epochs {run.start_epoch}..{cfg.num_epochs}.")
    return run


@dataclass
class EpochProgress:
    """Where this process is in an epoch: its number, the steps taken (an interrupted epoch resumes after
    them), its loss so far, its augmentation generator, the seconds it ran before this run (when resumed)
    and when this run began its steps."""
    epoch: int
    step: int
    loss: EpochLoss
    aug_gen: torch.Generator
    seconds_before: float = 0.0
    started: float = field(default_factory=time.time)

    def seconds(self):
        """Seconds the epoch has run, over every run that trained a part of it."""
        return self.seconds_before + time.time() - self.started


def epoch_start(run, epoch):
    """The progress of epoch at its first step, or where an interrupted epoch stopped: this process's part
    of it, used up by this (a later epoch starts afresh)."""
    part, run.partial = run.partial, None
    aug_gen = torch.Generator().manual_seed(((run.cfg.seed * 100003 + epoch) * 64 + run.ddp.rank + 1) % 2**64)
    if part is None:
        return EpochProgress(epoch, 0, EpochLoss(run.device), aug_gen)
    aug_gen.set_state(part.aug_state)
    return EpochProgress(epoch, part.step, EpochLoss(run.device, part.loss_sum, part.loss_count), aug_gen,
                         part.seconds)


def set_learning_rate(run, epoch):
    """The epoch's learning rate (learning_rate), set in the optimizer; returns it."""
    lr = learning_rate(run.cfg, epoch)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    return lr


def epoch_bar(run, progress):
    """The epoch's batches behind its progress bar (shown by rank 0), their loader workers started while the
    stop signals wait (interrupts_blocked)."""
    with interrupts_blocked():
        batches = run.data.kept(iter(run.data.loader))
    return tqdm(batches, desc=f"Epoch {progress.epoch}/{run.cfg.num_epochs}", unit="batch", leave=False,
                dynamic_ncols=True, disable=not run.ddp.main, initial=progress.step,
                total=progress.step + len(run.data.loader))


def take_step(run, progress, images):
    """One optimisation step on a batch of tiles; False for a batch skipped as too short. Whether to stop on a
    signal, and to skip a batch shrunk by unreadable files below BatchNorm's two tiles, is decided by all
    processes together over the CPU, so no process is left waiting in a collective op."""
    stop, short = run.ddp.any(run.interrupts.signum is not None, len(images) < 2)
    if stop:
        raise run.interrupts.interrupt()
    if short:
        progress.step += 1  # consumed all the same: resuming skips batches by this count
        return False
    with run.interrupts.deferred():
        batch_loss = forward_loss(run.model, images.to(run.device, non_blocking=True), run.loss_fn,
                                  run.cfg.train_crop_size, run.cfg.augment, progress.aug_gen, run.amp_dtype)
        optimizer_step(batch_loss, run.optimizer, run.scaler)
        progress.step += 1
        progress.loss.add(batch_loss, len(images), progress.step)
        run.images_seen += len(images) * run.ddp.world
    return True


def show_loss(run, progress, bar):
    """After a step: the periodic check of its loss (every finite_check_interval steps), and the bar's running
    loss, at the check and on a CPU every step (where reading the loss waits for nothing)."""
    checked = progress.step % run.cfg.finite_check_interval == 0
    if checked:
        progress.loss.check(run.ddp, progress.epoch, run.paths.folder)
    if checked or run.device.type == "cpu":
        # refresh=False: the bar's next update shows it, instead of the bar being drawn twice a step
        loss = progress.loss
        bar.set_postfix(loss=f"{loss.total.item() / max(loss.count, 1):.5f}", refresh=False)


def train_one_epoch(run, epoch):
    """One pass over this process's share of the training tiles (the rest of it, when an interrupted epoch
    is resumed), then the epoch's validation, log row and checkpoints (wrap_up)."""
    progress = epoch_start(run, epoch)
    if run.data.cache is not None and run.data.cache.recorded:
        run.data = training_data.read_from_cache(run.data, run.cfg.num_workers, run.device, run.say, run.ddp.main)
    run.data.sampler.set_epoch(epoch, progress.step)
    lr = set_learning_rate(run, epoch)
    run.model.train()
    progress.started = time.time()  # the epoch's seconds leave out the cache's decoding
    bar = epoch_bar(run, progress)
    try:
        for images, _, skipped in bar:
            run.skips.add(skipped)
            if take_step(run, progress, images):
                show_loss(run, progress, bar)
        bar.close()
        progress.loss.check(run.ddp, epoch, run.paths.folder)
        # Wrapping up the epoch is covered too: an interruption here resumes at its last step.
        wrap_up(run, progress, lr)
    except KeyboardInterrupt as interrupt:
        bar.close()
        save_interrupt(run, progress)
        interrupt.reported = True  # its message is out: run_main adds no `interrupted` line
        raise


def wrap_up(run, progress, lr):
    """After the epoch's last step: its average loss and validation, the log row, Best model, periodic
    checkpoint and loss log (the checkpoint first: it holds the log's rows, so a failed log write loses nothing)."""
    cfg, ddp, paths, epoch, loss = run.cfg, run.ddp, run.paths, progress.epoch, progress.loss
    sums = ddp.sum(torch.stack([loss.total, torch.tensor(float(loss.count), dtype=torch.float64, device=run.device)]))
    if sums[1] == 0:
        raise UserError(f"no readable images in {cfg.folder_path_train!r} ({run.skips.summary()}): "
                        "check the folder holds image tiles")
    average = (sums[0] / sums[1]).item()
    check_weights(run, epoch)
    val = validation_metrics(run, run.data.val_loader) if run.data.val_loader else None
    val_note = f", Validation MSE {val['MSE']:.6f} PSNR {val['PSNR']:.2f} dB SSIM {val['SSIM']:.4f}" if val else ""
    run.say(f"Epoch {epoch}/{cfg.num_epochs}, Average Loss: {average:.6f}{val_note}")
    run.history.append({"Epoch": epoch, "Loss": f"{average:.6f}", "Learning_Rate": f"{lr:.4g}",
                        "Images_Seen": run.images_seen, "Seconds": f"{progress.seconds():.1f}",
                        **({f"Val_{k}": f"{v:.6f}" for k, v in val.items()} if val else {})})
    due = epoch % cfg.save_interval == 0 or epoch == cfg.num_epochs
    failure = None
    if ddp.main:
        score = run.loss.val_loss(val[run.loss.val_metric]) if val else None
        if val and score < run.best_val:
            checkpoint_io.save(run.raw_model.state_dict(), paths.best)
            run.best_val = score  # only once saved
        if due:
            checkpoint_io.save(training_state.periodic_state(run, epoch, average),
                               os.path.join(paths.folder, training_state.epoch_name(epoch)))
            training_state.prune_checkpoints(paths.folder, cfg.keep_checkpoints, epoch)
            if os.path.exists(paths.interrupt):
                os.remove(paths.interrupt)
        plot = epoch == cfg.num_epochs or time.monotonic() - run.plotted >= PLOT_EVERY_SECONDS
        failure = loss_log.write_log(run, plot)
        run.plotted = time.monotonic() if plot and failure is None else run.plotted
    if ddp.any(failure is not None)[0]:
        if not due:  # keep the finished epoch: the next run resumes after it
            save_interrupt(run, progress)
        if failure is None:
            sys.exit(2)  # rank 0 reports the error
        raise failure


def save_interrupt(run, progress):
    """Model_AE_interrupt.pth, written by rank 0 with every process's part of the epoch."""
    epoch, step, loss, seconds = progress.epoch, progress.step, progress.loss, progress.seconds()
    run.interrupts.stopping()
    loss.check(run.ddp, epoch, run.paths.folder)  # a run that diverged stops with its message, saving nothing
    check_weights(run, epoch)
    ranks = run.ddp.gather((progress.aug_gen.get_state(), loss.total.item(), loss.count))
    if run.ddp.main:
        checkpoint_io.save(training_state.interrupt_state(run, epoch, step, ranks, seconds), run.paths.interrupt)
        print(f"\nInterrupted at epoch {epoch}, step {step}: saved {run.paths.interrupt}; "
              "run the same command again to resume.", file=sys.stderr)
    run.ddp.barrier()


def finish(run):
    """The Final model, once every epoch is done (also when a run killed just before saving it is rerun)."""
    paths, epochs = run.paths, run.cfg.num_epochs
    if run.start_epoch > epochs:
        run.say(f"Nothing to do: already trained for {run.start_epoch - 1} of num_epochs={epochs} epochs.")
        if run.ddp.main and not os.path.isfile(paths.final):  # stopped before its end: finish the log and save
            failure = loss_log.write_log(run, plot=True)
            if failure:
                raise failure
            checkpoint_io.save(run.raw_model.state_dict(), paths.final)
            run.say(f"Saved {paths.final}.")
    elif run.ddp.main:
        checkpoint_io.save(run.raw_model.state_dict(), paths.final)
        best = f" and {paths.best}" if os.path.isfile(paths.best) else ""
        run.say(f"Saved {paths.final}{best}; loss log {paths.log}, curve {paths.plot}; {run.skips.summary()}.")
    run.ddp.barrier()


def train(cfg, loss_name):
    """Train an AutoEncoder with loss_name (a name in losses.RECORDS) as Config says; returns the loss log rows."""
    validate(cfg)
    paths = run_paths(cfg, loss_name)
    immediate = int(os.environ.get("WORLD_SIZE", "1")) == 1
    notice = (f"finishing the current step, then saving {paths.interrupt}; further signals are ignored"
              if int(os.environ.get("RANK", "0")) == 0 else None)
    with Interrupts(immediate, notice).installed() as interrupts, contextlib.ExitStack() as held:
        ddp, run = Distributed(cfg), None
        try:
            if ddp.main:  # one training at a time per checkpoint folder (run_lock)
                check_writable(paths.folder)
                held.enter_context(run_lock.hold(paths.folder, f"model_saved_location_{loss_name}", folder=True))
            run = set_up(cfg, loss_name, paths, ddp, interrupts)
            for epoch in range(run.start_epoch, cfg.num_epochs + 1):
                train_one_epoch(run, epoch)
            finish(run)
            return run.history
        finally:
            if run is not None:
                stop_loader_workers(run.data.loader, run.data.val_loader)
            ddp.close()
