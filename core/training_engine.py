"""The training loop shared by Training_MSE.py and Training_SSIM.py: train() sets up (device, data, model,
the checkpoint it continues from), runs train_one_epoch() per epoch and saves the Final model.

One process per GPU (started by runtime.spawn or torchrun); only rank 0 prints, logs and saves. Each
epoch's order and augmentations are seeded by (seed, epoch, rank): a resumed run continues exactly.
"""
import contextlib
import math
import os
import sys
import time
import types

import torch
from tqdm import tqdm

from core import checkpoint_io
from core import loss_log
from core import losses, run_lock
from core import runtime
from core import training_data
from core import training_state
from Auto_encoder import DOWNSAMPLING, AutoEncoder, fits
from Dataset import ImageFolder, SkipLog
from core.augmentation import prepare_batch
from core.errors import UserError
from core.cli import load_config, run_main
from core.inference import reconstruct
from core.losses import LOSSES
from core.atomic import check_target, check_writable
from core.runtime import Distributed, autocast, autocast_dtype, precision_name

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
    with runtime.interrupts_blocked():
        batches = training_data.kept(run, iter(loader))
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
    batch = batch.contiguous(memory_format=runtime.training_layout(batch.device, amp_dtype))
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


def run_paths(cfg, loss_name):
    """The files of a run of loss_name (a name in losses.RECORDS)."""
    loss = losses.get(loss_name)
    folder, log = getattr(cfg, loss.key("model_saved_location")), getattr(cfg, loss.key("training_loss_file"))
    return types.SimpleNamespace(
        folder=folder, log=log, plot=os.path.splitext(log)[0] + ".png",
        interrupt=os.path.join(folder, training_state.INTERRUPT_NAME),
        final=os.path.join(folder, training_state.model_name("Final", loss)),
        best=os.path.join(folder, training_state.model_name("Best", loss)))


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


def set_up(cfg, loss_name, paths, ddp, interrupts):
    """Everything an epoch needs, as one namespace: device, data, model, optimizer, and where it resumes."""
    say = runtime.say if ddp.main else (lambda *parts: None)
    if ddp.main:
        check_writable(os.path.dirname(paths.log))
        if os.path.isdir(paths.log):
            raise UserError(f"{losses.get(loss_name).key('training_loss_file')}={paths.log!r} is a folder: "
                            "give a .csv file name")
        for path in (paths.final, paths.best, paths.log, paths.plot):
            check_target(path)  # a read-only Final model or log is refused now, not after the training
    if cfg.batch_size_train % ddp.world or cfg.batch_size_train < 2 * ddp.world:
        raise UserError(f"batch_size_train={cfg.batch_size_train} must be divisible by the {ddp.world} training "
                        "process(es) and give each at least 2 tiles (BatchNorm needs two)")
    dataset = ImageFolder(cfg.folder_path_train, cfg.tile_size)
    train_idx, val_idx = training_data.split_indices(len(dataset), cfg.val_fraction, cfg.seed)
    if len(train_idx) < 2 * ddp.world:  # BatchNorm needs two tiles a batch in every process
        raise UserError(f"folder_path_train={cfg.folder_path_train!r} holds {len(dataset)} tile(s) and "
                        f"val_fraction={cfg.val_fraction} leaves {len(train_idx)} for training: BatchNorm needs at "
                        f"least 2 per training process ({2 * ddp.world} for {ddp.world}); add tiles or lower "
                        "val_fraction")
    device = ddp.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # tiles of one size: cuDNN times its kernels once, then keeps the fastest
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and in every fresh run
    amp_dtype = autocast_dtype(device, cfg.mixed_precision, training=True)
    raw_model = AutoEncoder().to(device, memory_format=runtime.training_layout(device, amp_dtype))
    if ddp.world > 1 and cfg.sync_batchnorm:
        if device.type == "cuda":
            raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
        else:  # DistributedDataParallel refuses SyncBatchNorm layers on the CPU
            say("sync_batchnorm ignored: PyTorch synchronises BatchNorm only between GPUs; "
                "each CPU process keeps its own statistics.")
    run = types.SimpleNamespace(
        cfg=cfg, loss_name=loss_name, loss=losses.get(loss_name), paths=paths, ddp=ddp, device=device, say=say, interrupts=interrupts,
        raw_model=raw_model, amp_dtype=amp_dtype, loss_fn=LOSSES[loss_name],
        optimizer=training_state.adam(raw_model, device, cfg.learning_rate, cfg.weight_decay),
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        settings=training_state.experiment(cfg, loss_name, raw_model, len(dataset)),
        skips=SkipLog() if ddp.main else SkipLog.quiet(),
        plotted=-math.inf, batch_size=cfg.batch_size_train // ddp.world)
    run.skips.add_left_out(dataset.left_out)
    training_state.start_or_resume(run)
    run.model = ddp.wrap(raw_model, cfg.compile_model)
    training_data.build_loaders(run, dataset, train_idx, val_idx)
    if run.start_epoch <= cfg.num_epochs:
        warn_if_too_few(cfg, len(train_idx), say)
        say(f"Training on {len(train_idx)} tiles ({len(val_idx)} more for validation) from {cfg.folder_path_train} "
            f"on {device}{f' x {ddp.world} processes' if ddp.world > 1 else ''} in {precision_name(amp_dtype)}, "
            f"{run.loss.tag} loss, epochs {run.start_epoch}..{cfg.num_epochs}.")
    return run


def train_one_epoch(run, epoch):
    """One pass over this process's share of the training tiles (the rest of it, when an interrupted epoch
    is resumed), then the epoch's validation, log row and checkpoints (wrap_up)."""
    cfg, ddp, device, part = run.cfg, run.ddp, run.device, run.partial
    aug_gen = torch.Generator().manual_seed(((cfg.seed * 100003 + epoch) * 64 + ddp.rank + 1) % 2**64)
    loss, step, seconds_before = EpochLoss(device), 0, 0.0
    if part is not None:  # resuming an interrupted epoch: this process's part of it
        aug_gen.set_state(part.aug_state)
        loss, step, seconds_before, run.partial = EpochLoss(device, part.loss_sum, part.loss_count), part.step, \
            part.seconds, None
    if run.cache is not None and run.cache.recorded:
        training_data.read_from_cache(run)
    run.sampler.set_epoch(epoch, step)
    lr = learning_rate(cfg, epoch)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.model.train()
    started = time.time()
    with runtime.interrupts_blocked():
        batches = training_data.kept(run, iter(run.loader))
    bar = tqdm(batches, desc=f"Epoch {epoch}/{cfg.num_epochs}", unit="batch", leave=False, dynamic_ncols=True,
               disable=not ddp.main, initial=step, total=step + len(run.loader))
    try:
        for images, _, skipped in bar:
            run.skips.add(skipped)
            # Taken together over the CPU, so no process is left waiting in a collective op: stop on a signal,
            # and skip a batch shrunk by unreadable files below BatchNorm's two tiles.
            stop, short = ddp.any(run.interrupts.signum is not None, len(images) < 2)
            if stop:
                raise run.interrupts.interrupt()
            if short:
                step += 1  # consumed all the same: resuming skips batches by this count
                continue
            with run.interrupts.deferred():
                batch_loss = forward_loss(run.model, images.to(device, non_blocking=True), run.loss_fn,
                                          cfg.train_crop_size, cfg.augment, aug_gen, run.amp_dtype)
                optimizer_step(batch_loss, run.optimizer, run.scaler)
                step += 1
                loss.add(batch_loss, len(images), step)
                run.images_seen += len(images) * ddp.world
            checked = step % cfg.finite_check_interval == 0
            if checked:
                loss.check(ddp, epoch, run.paths.folder)
            if checked or device.type == "cpu":  # on a CPU reading the loss waits for nothing: every step
                # refresh=False: the bar's next update shows it, instead of the bar being drawn twice a step
                bar.set_postfix(loss=f"{loss.total.item() / max(loss.count, 1):.5f}", refresh=False)
        bar.close()
        loss.check(ddp, epoch, run.paths.folder)
        # Wrapping up the epoch is covered too: an interruption here resumes at its last step.
        wrap_up(run, epoch, loss, lr, lambda: seconds_before + time.time() - started, step, aug_gen)
    except KeyboardInterrupt as interrupt:
        bar.close()
        save_interrupt(run, epoch, step, loss, aug_gen, seconds_before + time.time() - started)
        interrupt.reported = True  # its message is out: run_main adds no `interrupted` line
        raise


def wrap_up(run, epoch, loss, lr, seconds, step, aug_gen):
    """After the epoch's last step: its average loss and validation, the log row, Best model, periodic
    checkpoint and loss log (the checkpoint first: it holds the log's rows, so a failed log write loses nothing)."""
    cfg, ddp, paths = run.cfg, run.ddp, run.paths
    sums = ddp.sum(torch.stack([loss.total, torch.tensor(float(loss.count), dtype=torch.float64, device=run.device)]))
    if sums[1] == 0:
        raise UserError(f"no readable images in {cfg.folder_path_train!r} ({run.skips.summary()}): "
                        "check the folder holds image tiles")
    average = (sums[0] / sums[1]).item()
    check_weights(run, epoch)
    val = validation_metrics(run, run.val_loader) if run.val_loader else None
    val_note = f", Validation MSE {val['MSE']:.6f} PSNR {val['PSNR']:.2f} dB SSIM {val['SSIM']:.4f}" if val else ""
    run.say(f"Epoch {epoch}/{cfg.num_epochs}, Average Loss: {average:.6f}{val_note}")
    run.history.append({"Epoch": epoch, "Loss": f"{average:.6f}", "Learning_Rate": f"{lr:.4g}",
                        "Images_Seen": run.images_seen, "Seconds": f"{seconds():.1f}",
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
            save_interrupt(run, epoch, step, loss, aug_gen, seconds())
        if failure is None:
            sys.exit(2)  # rank 0 reports the error
        raise failure


def save_interrupt(run, epoch, step, loss, aug_gen, seconds):
    """Model_AE_interrupt.pth, written by rank 0 with every process's part of the epoch."""
    run.interrupts.stopping()
    loss.check(run.ddp, epoch, run.paths.folder)  # a run that diverged stops with its message, saving nothing
    check_weights(run, epoch)
    ranks = run.ddp.gather((aug_gen.get_state(), loss.total.item(), loss.count))
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
    with training_state.Interrupts(immediate, notice).installed() as interrupts, contextlib.ExitStack() as held:
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
                runtime.stop_loader_workers(run.loader, run.val_loader)
            ddp.close()


def _worker(loss_name, argv):
    """Entry point of one process started by runtime.spawn: as main(), but an interrupt only sets the exit
    code (the launching process reports it)."""
    runtime.keep_going_without_stdout()

    def quietly_interrupted(cfg):
        try:
            train(cfg, loss_name)
        except KeyboardInterrupt as interrupt:
            sys.exit(128 + getattr(interrupt, "signum", 2))
    run_main(quietly_interrupted, "training", loss_name, argv)


def launch(loss_name, argv, processes=None):
    """Train in this process, or start one process per listed GPU (runtime.spawn). processes overrides the
    count (tests use 2 CPU processes)."""
    cfg = load_config(argv, "training", loss_name)
    if "WORLD_SIZE" in os.environ:  # started by torchrun
        return train(cfg, loss_name)
    if processes is None:
        processes = len(runtime.gpu_ids(cfg.GPUs)) if torch.cuda.is_available() else 1
    if processes <= 1:
        return train(cfg, loss_name)
    runtime.say(f"Starting {processes} training processes (DistributedDataParallel).")
    if any(runtime.spawn(processes, _worker, (loss_name, argv))):
        raise UserError("a training process failed (its message is above); fix it and run the same command "
                        "again to resume")


def main(loss_name):
    runtime.keep_going_without_stdout()
    run_main(lambda cfg: launch(loss_name, sys.argv[1:]), "training", loss_name)
