"""What lets a training run stop and carry on: checkpoints, where a run resumes, the optimizer state.

Periodic checkpoints Model_AE_epoch_NNN.pth (the newest keep_checkpoints), Model_AE_interrupt.pth (an epoch
stopped part-way), Best_ and Final_ models. Training checkpoints carry the experiment's settings (a resume
never continues another experiment) and the loss log's rows (the log can always be rebuilt).
"""
import contextlib
import glob
import hashlib
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import torch

from core import checkpoint_io
from core import loss_log
from core.errors import UserError
from core.atomic import is_read_only

# The checkpoint names, the reference's where it has them: Model_AE_epoch_005.pth, Model_AE_interrupt.pth,
# Final_Model_AE_MSE.pth, Best_Model_AE_MSE.pth.
INTERRUPT_NAME = "Model_AE_interrupt.pth"
_EPOCH_PREFIX = "Model_AE_epoch_"
_EPOCH_FILE = re.compile(re.escape(_EPOCH_PREFIX) + r"(\d+)\.pth")


def epoch_name(epoch):
    """The periodic checkpoint of epoch."""
    return f"{_EPOCH_PREFIX}{epoch:03d}.pth"


def model_name(kind, loss):
    """The weights-only model kind ("Final" or "Best") of a run of loss (a losses.Loss)."""
    return f"{kind}_Model_AE_{loss.tag}.pth"


def periodic_checkpoints(folder):
    """[(epoch, path)] of the Model_AE_epoch_NNN.pth files in folder, oldest first."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(folder), _EPOCH_PREFIX + "*.pth")):
        match = _EPOCH_FILE.fullmatch(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(folder):
    """(epoch, path) of the newest Model_AE_epoch_NNN.pth in folder, or None."""
    found = periodic_checkpoints(folder)
    return found[-1] if found else None


def prune_checkpoints(folder, keep, newest_epoch):
    """Delete the periodic checkpoints before newest_epoch beyond the `keep` newest (0 keeps all); one made
    read-only (atomic.is_read_only) is kept, and not counted."""
    older = [path for epoch, path in periodic_checkpoints(folder) if epoch < newest_epoch and not is_read_only(path)]
    for path in older[:max(0, len(older) - (keep - 1))] if keep > 0 else []:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def move_aside(paths, say):
    """--resume=false: the previous run's checkpoints, models and loss log go into a previous_run_<time>
    folder inside the checkpoint folder, where no later run looks for something to resume."""
    names = {os.path.basename(p) for p in (paths.interrupt, paths.final, paths.best)}
    found = [os.path.join(paths.folder, name) for name in sorted(os.listdir(paths.folder))
             if name in names or _EPOCH_FILE.fullmatch(name)] if os.path.isdir(paths.folder) else []
    found += [p for p in (paths.log, paths.plot) if os.path.isfile(p)]
    if not found:
        return
    target = tempfile.mkdtemp(prefix=time.strftime("previous_run_%Y%m%d-%H%M%S_"), dir=paths.folder)
    os.chmod(target, os.stat(paths.folder).st_mode & 0o777)  # as shared as the checkpoint folder, not private
    for path in found:
        shutil.move(path, os.path.join(target, os.path.basename(path)))
    say(f"Starting over (resume=False): moved the previous run's {len(found)} file(s) to {target}; "
        "delete that folder once you no longer need it.")


class Refused(UserError):
    """A checkpoint that is intact but cannot continue this run (another experiment, another launch)."""


INFO_KEYS = ("tiles", "l1_loss_weight")  # stored settings that say what a run used without making it another experiment


def experiment(cfg, loss_name, model, tiles):
    """The settings that make a run this experiment and no other: a checkpoint with other values is refused.
    tiles (the count it trains and validates on) and l1_loss_weight are kept for the record, not compared."""
    crop = cfg.train_crop_size if 0 < cfg.train_crop_size < cfg.tile_size else 0
    layers = ";".join(f"{key}{tuple(value.shape)}" for key, value in model.state_dict().items())
    return {"loss": loss_name, "tile_size": cfg.tile_size, "train_crop_size": crop,
            "architecture": "AE_CRC-" + hashlib.sha1(layers.encode()).hexdigest()[:10],
            "folder_path_train": os.path.realpath(cfg.folder_path_train), "tiles": tiles,
            "l1_loss_weight": cfg.l1_loss_weight}


def check_experiment(state, source, settings, folder_key):
    saved = state.get("settings")
    if not isinstance(saved, dict):  # the reference code's Model_AE_epoch_NNN.pth carries no settings
        return
    # A key an older checkpoint lacks (folder_path_train) does not refuse it: that run stays resumable.
    compared = {key: value for key, value in settings.items() if key not in INFO_KEYS and key in saved}
    folder = compared.pop("folder_path_train", None)
    if folder is not None and saved["folder_path_train"] != folder:
        raise Refused(f"cannot resume from {source!r}: its run trained on {saved['folder_path_train']!r}, this one "
                      f"on {folder!r}; pass --resume=false to start over (the old run is moved aside), or set "
                      f"{folder_key} to another folder for this experiment")
    differ = [f"{key}={saved.get(key)!r} there, {value!r} now" for key, value in compared.items()
              if saved.get(key) != value]
    if differ:
        raise Refused(f"cannot resume from {source!r}: it belongs to another experiment ({'; '.join(differ)}); "
                      f"set {folder_key} to another folder, or pass --resume=false to start over (the old run is "
                      "moved aside)")


def adam(model, device, lr, weight_decay):
    """The training optimizer: Adam, fused into one kernel on the CPU and on CUDA GPUs (faster per step than
    the one-tensor-at-a-time loop; with fp16 it also takes the GradScaler's overflow flag on the device instead
    of waiting for it)."""
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay,
                            fused=device.type in ("cpu", "cuda") or None)


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict(state), keeping how this optimizer runs (fused or not), which
    load_state_dict would take from the checkpoint, the moments in the layout of their parameters, and each
    step count where fused Adam wants it."""
    running = [{key: group.get(key) for key in ("fused", "foreach")} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, running):
        group.update(kept)
        for param in group["params"]:
            entry = optimizer.state.get(param, {})
            for key, value in entry.items():
                # Moments saved in another memory layout (a channels_last run resumed where training is
                # contiguous): fused Adam pairs elements by position in memory, so they take the parameter's.
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    entry[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
            if group["fused"] and isinstance(entry.get("step"), torch.Tensor):
                entry["step"] = entry["step"].to(param.device, torch.float32)


def check_optimizer(optimizer_state, model, source):
    """A UserError unless optimizer_state is Adam's state for exactly this model's parameters."""
    params = list(model.parameters())
    try:
        count = sum(len(group["params"]) for group in optimizer_state["param_groups"])
        problem = f"{count} parameters, the model has {len(params)}" if count != len(params) else None
        for index, entry in optimizer_state["state"].items():
            moments, param = (entry["exp_avg"], entry["exp_avg_sq"]), params[index] if index >= 0 else None
            if problem is None and not all(isinstance(m, torch.Tensor) and m.is_floating_point()
                                           and m.shape == param.shape and bool(torch.isfinite(m).all())
                                           for m in moments):
                problem = f"the moments of parameter {index} are not finite tensors of its shape"
    except (TypeError, KeyError, IndexError, AttributeError):
        problem = "it is not Adam's state for this model"
    if problem:
        raise UserError(f"cannot resume from {source!r}: its optimizer state does not fit the model ({problem}); "
                        "pass --resume=false to start over")


def _int_field(state, key, source, low=0):
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"cannot resume from {source!r}: its {key!r} is {value!r}, not a whole number of at least "
                        f"{low}; pass --resume=false to start over")
    return value


@dataclass
class ResumeTarget:
    """What a checkpoint is loaded into (the model, its optimizer and gradient scaler), and the launch an
    interrupted epoch must be continued with (this process's rank, the processes, batch_size_train)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    rank: int
    world: int
    batch_size: int


@dataclass
class EpochPart:
    """This process's part of an epoch an interrupt stopped, as the interrupt checkpoint holds it: its
    augmentation generator's state, its loss sum and tile count so far, the steps every process had taken,
    the seconds the epoch had run and the tiles the run had seen."""
    aug_state: torch.Tensor
    loss_sum: float
    loss_count: int
    step: int
    seconds: float
    images_seen: int


@dataclass
class Resumed:
    """Where a run carries on: its first epoch, this process's part of an interrupted epoch (None: the epoch
    starts at its first step), the loss log's rows so far, the best validation score and the tiles seen.
    The defaults are a fresh run's."""
    start_epoch: int = 1
    partial: EpochPart | None = None
    history: list[dict] = field(default_factory=list)
    best_val: float = math.inf
    images_seen: int = 0


def _load(source, target, settings, folder_key):
    """The training checkpoint at source, its weights, optimizer and scaler state loaded into target."""
    state = checkpoint_io.load_weights(target.model, source)
    if not isinstance(state, dict) or "optimizer_state_dict" not in state or "epoch" not in state:
        raise UserError(f"cannot resume from {source!r}: it holds weights only, not a training checkpoint; "
                        "move it out of the checkpoint folder or pass --resume=false")
    check_experiment(state, source, settings, folder_key)
    _int_field(state, "epoch", source, low=1)
    check_optimizer(state["optimizer_state_dict"], target.model, source)
    try:
        load_optimizer_state(target.optimizer, state["optimizer_state_dict"])
        if target.scaler.is_enabled() and state.get("scaler_state_dict"):  # empty when saved in bf16 or fp32
            target.scaler.load_state_dict(state["scaler_state_dict"])
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise UserError(f"cannot resume from {source!r}: its optimizer or scaler state does not fit "
                        f"({type(err).__name__}: {str(err)[:120]}); pass --resume=false to start over")
    return state


def _rank_part(state, source, rank, world, batch_size):
    """This process's share of an interrupt checkpoint: (augmentation RNG state, loss sum, loss count)."""
    _int_field(state, "step", source)
    saved_world, saved_batch = state.get("world", 1), state.get("batch_size_train", batch_size)
    if (saved_world, saved_batch) != (world, batch_size):
        raise Refused(f"{source!r} stopped epoch {state['epoch']} part-way with batch_size_train={saved_batch} in "
                      f"{saved_world} process(es); this run has batch_size_train={batch_size} in {world}: resume it "
                      "with the same, or delete it to redo that epoch from the last periodic checkpoint")
    parts = (state.get("aug_rng_states"), state.get("rank_loss_sums"), state.get("rank_loss_counts"))
    if not all(isinstance(p, list) and len(p) == world for p in parts):
        raise UserError(f"cannot resume from {source!r}: its per-process state is incomplete; delete it "
                        "to redo that epoch from the last periodic checkpoint")
    return tuple(p[rank] for p in parts)


def _history(state, log, up_to_epoch):
    rows = state.get("history")
    if isinstance(rows, list) and all(isinstance(r, dict) and str(r.get("Epoch", "")).isdigit() for r in rows):
        return [dict(r) for r in rows if int(r["Epoch"]) <= up_to_epoch]
    return loss_log.read_history(log, up_to_epoch)  # the reference code's checkpoint: the log is all there is


def restore(paths, target, settings, folder_key, say):
    """Load what this run continues from into target (a ResumeTarget): the interrupt checkpoint if it is
    newer than the newest periodic one, else that periodic one. Returns where the run carries on (Resumed)."""
    periodic = latest_checkpoint(paths.folder)
    state = source = None
    if os.path.isfile(paths.interrupt):
        try:
            state, source = _load(paths.interrupt, target, settings, folder_key), paths.interrupt
        except Refused:
            raise
        except UserError as err:
            if periodic is None:
                raise
            say(f"warning: {paths.interrupt} cannot be used ({err}); resuming from {periodic[1]} instead, so the "
                "work after it is done again")
        if state is not None and periodic and periodic[0] >= state["epoch"]:
            state = None  # an older interruption that a later run already went past
    if state is not None:
        aug_state, loss_sum, loss_count = _rank_part(state, source, target.rank, target.world, target.batch_size)
        start, step = state["epoch"], state["step"]
        say(f"Resuming from {source} (epoch {start}, after step {step}); pass --resume=false to start over.")
        part = EpochPart(aug_state=aug_state, loss_sum=float(loss_sum), loss_count=int(loss_count), step=step,
                         seconds=float(state.get("seconds", 0.0)), images_seen=int(state["images_seen"]))
        history = _history(state, paths.log, start - 1)
    elif periodic:
        state, source = _load(periodic[1], target, settings, folder_key), periodic[1]
        start, part, history = state["epoch"] + 1, None, _history(state, paths.log, state["epoch"])
        say(f"Resuming from {source} (epoch {state['epoch']}); pass --resume=false to start over.")
    else:
        return Resumed()
    best = state.get("best_val_loss", math.inf)
    best = float(best) if isinstance(best, (int, float)) and not math.isnan(best) else math.inf
    return Resumed(start, part, history, best, _images_seen(part, history))


def _images_seen(part, history):
    """The tiles the run had trained on where it carries on: those of the interrupted epoch's checkpoint,
    else those of the last log row that counts them."""
    if part is not None:
        return part.images_seen
    seen = [row["Images_Seen"] for row in history if str(row.get("Images_Seen", "")).isdigit()]
    return int(seen[-1]) if seen else 0


def start_or_resume(cfg, ddp, paths, target, settings, folder_key, say):
    """Where the run carries on (Resumed): from the newest checkpoint, loaded into target (resume=True), or
    from the start, with the previous run moved aside (resume=False)."""
    if cfg.resume:
        return restore(paths, target, settings, folder_key, say)
    if ddp.main:
        move_aside(paths, say)
    ddp.barrier()
    return Resumed()


def _common(run, epoch):
    return {"epoch": epoch, "model_state_dict": run.raw_model.state_dict(),
            "optimizer_state_dict": run.optimizer.state_dict(), "scaler_state_dict": run.scaler.state_dict(),
            "best_val_loss": run.best_val, "settings": run.settings,
            "history": [row for row in run.history if int(row["Epoch"]) <= epoch]}


def periodic_state(run, epoch, average):
    """Model_AE_epoch_NNN.pth: the run after `epoch` (the reference's keys, and what resuming needs)."""
    return _common(run, epoch) | {"loss": average}


def interrupt_state(run, epoch, step, ranks, seconds):
    """Model_AE_interrupt.pth: the run after `step` steps of `epoch`, with every process's part of the epoch
    (ranks: [(augmentation RNG state, loss sum, loss count)] in rank order)."""
    state = _common(run, epoch - 1) | {"epoch": epoch}
    return state | {"step": step, "loss_sum": sum(r[1] for r in ranks), "loss_count": sum(r[2] for r in ranks),
                    "aug_rng_state": ranks[0][0], "aug_rng_states": [r[0] for r in ranks],
                    "rank_loss_sums": [r[1] for r in ranks], "rank_loss_counts": [r[2] for r in ranks],
                    "images_seen": run.images_seen, "seconds": seconds, "world": len(ranks),
                    "batch_size_train": run.cfg.batch_size_train}
