"""The evaluation loop shared by Evaluation_MSE.py and Evaluation_SSIM.py (through cli.evaluation_main).

For every tile under folder_path_test: reconstruct it, compute MSE, PSNR and SSIM, save a side-by-side
PNG, and at the end write one workbook. Metrics are those of the network's [0, 1] output, before it is
rounded to 8 bits for the PNG.
"""
import collections
import math
import os
import multiprocessing
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import openpyxl
import torch
from tqdm import tqdm

from core import inference
from core import losses, run_lock
from Dataset import SkipLog, start_batches
from core.errors import UserError
from core.inference import reconstruct
from core.atomic import check_target, check_writable
from core.names import printable
from core.report import METRIC_NAMES, comparison_names, save_comparisons, summarise, write_workbook
from core.devices import cpu_count, precision_name
from core.loaders import loader_start_method
from core.signals import ignore_interrupts, interrupts_blocked


def check_outputs(cfg, loss_name):
    """The output settings of loss_name, checked before any work; returns (folder of PNGs, workbook path)."""
    loss = losses.get(loss_name)
    out_key, workbook_key = loss.key("recon_output"), loss.key("reconstruction_metrics")
    out_dir, workbook_path = getattr(cfg, out_key), getattr(cfg, workbook_key)
    if not workbook_path.lower().endswith(".xlsx"):
        raise UserError(f"{workbook_key}={workbook_path!r} must end in .xlsx")
    if os.path.isdir(workbook_path):
        raise UserError(f"{workbook_key}={workbook_path!r} is a folder: give a file name "
                        "ending in .xlsx")
    check_target(workbook_path)
    check_writable(out_dir)
    check_writable(os.path.dirname(workbook_path))
    if os.path.isdir(cfg.folder_path_test) and os.path.samefile(out_dir, cfg.folder_path_test):
        raise UserError(f"{out_key}={out_dir!r} is the image folder itself: its comparison PNGs "
                        "would be mixed with the tiles; choose another folder (a subfolder of it is fine)")
    return out_dir, workbook_path


PREVIOUS_RUN_PREFIX = "previous_run_"


def earlier_comparisons(out_dir):
    """The comparison PNGs under out_dir, outside the previous_run_* folders that earlier runs moved aside."""
    found = []
    for top, dirs, files in os.walk(out_dir):
        dirs[:] = [d for d in dirs if not (top == out_dir and d.startswith(PREVIOUS_RUN_PREFIX))]
        found += [os.path.join(top, f) for f in files if f.endswith("_comparison.png")]
    return found


def evaluated_model(workbook_path):
    """The model an earlier workbook at workbook_path names in its Run sheet, or None."""
    try:
        book = openpyxl.load_workbook(workbook_path, read_only=True)
        try:
            return next((str(row[1]) for row in book["Run"].iter_rows(values_only=True) if row[0] == "Model"), None)
        finally:
            book.close()
    except Exception:  # missing, damaged or not this project's workbook: nothing to compare with
        return None


def keep_one_run(out_dir, out_paths, workbook_path, model_path, loss_name):
    """Before any PNG is written: the earlier run's comparison PNGs that this run will not rewrite move into
    out_dir/previous_run_<time>_<random>/ (the folder then always matches the workbook), and a line says
    when the PNGs and workbook of another model are about to be replaced."""
    earlier = earlier_comparisons(out_dir) if os.path.isdir(out_dir) else []
    rewritten = {os.path.normcase(os.path.abspath(p)) for p in out_paths}
    stale = [p for p in earlier if os.path.normcase(os.path.abspath(p)) not in rewritten]
    previous = evaluated_model(workbook_path) if os.path.isfile(workbook_path) else None
    if (earlier or previous) and previous is not None and os.path.abspath(previous) != os.path.abspath(model_path):
        print(f"Replacing the results of {printable(previous)} in {printable(out_dir)} and "
              f"{printable(workbook_path)} (give recon_output_{loss_name} and "
              f"reconstruction_metrics_{loss_name} other names to keep them).")
    if not stale:
        return
    target = tempfile.mkdtemp(prefix=time.strftime(f"{PREVIOUS_RUN_PREFIX}%Y%m%d-%H%M%S_"), dir=out_dir)
    os.chmod(target, os.stat(out_dir).st_mode & 0o777)  # as shared as the output folder, not private
    for path in stale:
        moved = os.path.join(target, os.path.relpath(path, out_dir))
        os.makedirs(os.path.dirname(moved), exist_ok=True)
        shutil.move(path, moved)
    print(f"Moved {len(stale)} comparison PNG(s) of an earlier run, for tiles this run does not evaluate, to "
          f"{printable(target)}; delete that folder once you no longer need it.")


def check_finite(metrics, paths, model_path):
    """UserError when the model gave NaN or infinite output for any tile of the batch."""
    broken = [path for i, path in enumerate(paths) if not all(math.isfinite(metrics[n][i]) for n in METRIC_NAMES)]
    if broken:
        raise UserError(f"the model gave NaN or infinite output for {len(broken)} tile(s), first "
                        f"{printable(broken[0])}: {model_path!r} is probably a diverged checkpoint "
                        "(or try --mixed_precision=off)")


def comparison_writers(device, loader_workers):
    """(the pool that draws and encodes the comparison PNGs, the parts each batch is split into, the batches
    whose PNGs may be in progress when the next batch goes through the model).
    Beside a forward pass on the CPU: threads (numpy and zlib release the GIL, and processes would take the
    network's cores), one batch, as work beside the forward pass stalls its threads. Beside a GPU: processes,
    one per CPU the loader workers leave, because drawing a comparison image holds the GIL, which would cap
    threads below the GPU's pace; two batches, so that the processes do not wait while the GPU works
    (figures in docs/benchmarks.md, "Why the code is as it is")."""
    if device.type == "cpu":
        size = max(2, min(8, cpu_count()))
        return ThreadPoolExecutor(max_workers=size), size, 1
    size = max(1, cpu_count() - loader_workers - 1)
    return ProcessPoolExecutor(max_workers=size, initializer=ignore_interrupts,
                               mp_context=multiprocessing.get_context(loader_start_method())), size, 2


def submit_comparisons(pool, parts, images, recon_u8, rows, labels, out_paths):
    """The batch's comparison PNGs, split into parts pool tasks; returns their futures. Interrupts wait while
    a process pool starts its processes (on the first batch), as for loader workers."""
    originals, recons = images.numpy(), recon_u8.numpy()
    with interrupts_blocked():
        return [pool.submit(save_comparisons, originals[part], recons[part], [rows[i] for i in part],
                            [labels[i] for i in part], [out_paths[i] for i in part])
                for part in map(list, np.array_split(np.arange(len(rows)), min(parts, len(rows))))]


def evaluate(cfg, loss_name):
    """Evaluate the model of loss_name (a name in losses.RECORDS) on folder_path_test; returns the metric rows.
    Its outputs are locked for the run (run_lock): a second evaluation writing them is refused."""
    inference.check_settings(cfg)
    out_dir, workbook_path = check_outputs(cfg, loss_name)
    record = losses.get(loss_name)
    with run_lock.hold(out_dir, record.key("recon_output"), folder=True), \
            run_lock.hold(workbook_path, record.key("reconstruction_metrics")):
        return evaluate_into(cfg, loss_name, out_dir, workbook_path)


def evaluate_into(cfg, loss_name, out_dir, workbook_path):
    """evaluate(), once its outputs are checked and locked."""
    model_path, folder = getattr(cfg, losses.get(loss_name).key("model_path")), cfg.folder_path_test
    run = inference.setup(cfg, folder, model_path, exclude=[out_dir])
    names = comparison_names(run.dataset.paths, folder)
    out_paths = {path: os.path.join(out_dir, name) for path, name in names.items()}
    for out_path in out_paths.values():
        check_target(out_path)
    keep_one_run(out_dir, out_paths.values(), workbook_path, model_path, loss_name)
    print(f"Evaluating {printable(model_path)} on {len(run.dataset)} files from {printable(folder)} on "
          f"{run.device} in {precision_name(run.amp_dtype)}.")

    rows, skips, pending = [], SkipLog(), collections.deque()
    skips.add_left_out(run.dataset.left_out)
    # leave=False: the finished bar is erased, so an error after the loop is the only line left on stderr.
    bar = tqdm(start_batches(run.loader), total=len(run.loader), desc="Evaluating", unit="batch",
               dynamic_ncols=True, leave=False)
    # A batch's PNGs are written by a pool (comparison_writers) while the next batches are read, and are
    # finished before the in_flight-th next batch goes through the model: memory holds at most in_flight
    # batches waiting for their PNGs, however many tiles the folder has.
    pool, parts, in_flight = comparison_writers(run.device, run.loader.num_workers)
    with pool:
        for images, paths, skipped in bar:
            skips.add(skipped)
            if not paths:
                continue
            while len(pending) >= in_flight:
                for future in pending.popleft():
                    future.result()
            _, recon, metrics = reconstruct(run.model, images, run.device, run.amp_dtype)
            recon_u8 = recon.mul(255).round_().to(torch.uint8).cpu()
            values = {name: metrics[name].cpu().tolist() for name in METRIC_NAMES}
            check_finite(values, paths, model_path)
            batch_rows = [{"Image Path": path, **{name: values[name][i] for name in METRIC_NAMES}}
                          for i, path in enumerate(paths)]
            rows += batch_rows
            pending.append(submit_comparisons(pool, parts, images, recon_u8, batch_rows,
                                              [os.path.relpath(path, folder) for path in paths],
                                              [out_paths[path] for path in paths]))
        for future in (future for batch in pending for future in batch):
            future.result()
    if not rows:
        raise UserError(f"none of the {len(run.dataset)} files in {folder!r} could be read as an image "
                        "(see the warnings above); nothing was written")
    write_workbook(workbook_path, rows, skips.skipped, model_path, folder, precision_name(run.amp_dtype))
    print(f"Evaluated {len(rows)} images; {skips.summary()}.")
    for name, (_, mean, std, _, _) in summarise(rows).items():
        print(f"  {name:<4} mean {mean:.5f}  std {math.nan if std is None else std:.5f}")
    print(f"Comparison PNGs in {printable(out_dir)}; metrics workbook {printable(workbook_path)}.")
    return rows
