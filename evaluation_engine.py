"""The evaluation loop shared by Evaluation_MSE.py and Evaluation_SSIM.py (and the notebook's helpers).

For every tile under folder_path_test: reconstruct it, compute MSE, PSNR and SSIM, save a side-by-side
PNG, and at the end write one workbook. Metrics are those of the network's [0, 1] output, before it is
rounded to 8 bits for the PNG.
"""
import functools
import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openpyxl
import torch
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from openpyxl.styles import Font
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import checkpoint_io
from Auto_encoder import DOWNSAMPLING, AutoEncoder, for_inference
from Dataset import ImageFolder, SkipLog, collate, write_png
from cli import UserError, check_writable, load_config, run_main
from runtime import autocast, autocast_dtype, cpu_count, precision_mode, precision_name, select_device, worker_count
from metrics import per_image

METRIC_NAMES = ("MSE", "PSNR", "SSIM")
_MAX_NAME_BYTES = 200  # file systems allow 255; leave room for the suffix


def load_model(path, device):
    """An AutoEncoder for inference with the weights of path (any checkpoint layout we accept): BatchNorm
    folded into the convolutions, activations in place (Auto_encoder.for_inference)."""
    model = AutoEncoder()
    checkpoint_io.load_weights(model, path)
    return for_inference(model).to(device, memory_format=torch.channels_last)


def check_settings(cfg):
    """The Config values every inference script (evaluation, features) relies on."""
    if cfg.tile_size < DOWNSAMPLING or cfg.tile_size % DOWNSAMPLING:
        raise UserError(f"tile_size={cfg.tile_size} must be a multiple of {DOWNSAMPLING} (for example 256)")
    if cfg.batch_size_test < 1:
        raise UserError(f"batch_size_test={cfg.batch_size_test} must be at least 1")
    precision_mode(cfg.mixed_precision)


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


def comparison_names(paths, folder):
    """Output path (relative to the output folder) of each input's comparison PNG: the input's subfolders
    are mirrored and the name is <stem>_comparison.png, with the extension added to the stem when two
    files of one folder share a stem, and a hash when the name would be too long or still not unique."""
    relative = [os.path.relpath(p, folder) for p in paths]
    stems = [os.path.splitext(r) for r in relative]
    counts = {}
    for stem, _ in stems:
        counts[stem] = counts.get(stem, 0) + 1
    names = {}
    for path, (stem, ext) in zip(paths, stems):
        if counts[stem] > 1:
            stem = f"{stem}_{ext.lstrip('.')}"
        directory, base = os.path.split(stem)
        # os.fsencode: a name that is not valid UTF-8 (bytes from another system) must not crash here.
        if len(os.fsencode(base)) > _MAX_NAME_BYTES:
            digest = hashlib.sha1(os.fsencode(base)).hexdigest()[:10]
            base = os.fsencode(base)[:_MAX_NAME_BYTES - 11].decode("utf-8", "ignore") + "_" + digest
        names[path] = os.path.join(directory, f"{base}_comparison.png")
    # Names can still clash (a.png and a.jpg beside a_png.bmp; A.png and a.png on a case-insensitive
    # disk): those get a hash of their input path, so no comparison PNG overwrites another.
    by_name = {}
    for path, name in names.items():
        by_name.setdefault(name.casefold(), []).append(path)
    for group in by_name.values():
        if len(group) > 1:
            for path in group:
                digest = hashlib.sha1(os.fsencode(os.path.relpath(path, folder))).hexdigest()[:8]
                names[path] = names[path][:-len("_comparison.png")] + f"_{digest}_comparison.png"
    return names


@functools.lru_cache(maxsize=None)  # loading the font file per image cost more than drawing
def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _fit(draw, text, font, width):
    """text, shortened in the middle with '...' until it fits width pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    keep = len(text)
    while keep > 4 and draw.textlength(text[:keep // 2] + "..." + text[-(keep // 2):], font=font) > width:
        keep -= 2
    return text[:keep // 2] + "..." + text[-(keep // 2):]


_PAD, _TITLE_H, _CAPTION_H = 10, 44, 24  # pixels around and above / below the tiles


@functools.lru_cache(maxsize=4)
def _template(side):
    """What a comparison image of side-pixel tiles has whatever the tile: the white canvas with the two
    headings, and the left edge of the first tile."""
    width = max(2 * side + 3 * _PAD, 440)
    canvas = Image.new("RGB", (width, _TITLE_H + side + _CAPTION_H + _PAD), "white")
    draw = ImageDraw.Draw(canvas)
    left = (width - 2 * side - _PAD) // 2
    for i, heading in enumerate(("Original", "Reconstruction")):
        draw.text((left + i * (side + _PAD) + side / 2, 26), heading, fill="dimgray", font=_font(12), anchor="ma")
    return canvas, left


def comparison_image(original, reconstruction, metrics, label):
    """Original | reconstruction side by side, metrics in the title, the file name below (PIL Image)."""
    side = original.shape[-1]
    template, left = _template(side)
    canvas = template.copy()
    width = canvas.width
    draw = ImageDraw.Draw(canvas)
    title = f"MSE {metrics['MSE']:.5f}   PSNR {metrics['PSNR']:.2f} dB   SSIM {metrics['SSIM']:.4f}"
    font, small = _font(15), _font(12)
    draw.text((width / 2, 4), _fit(draw, title, font, width - 2 * _PAD), fill="black", font=font, anchor="ma")
    for i, tile in enumerate((original, reconstruction)):
        canvas.paste(Image.fromarray(tile.permute(1, 2, 0).numpy()), (left + i * (side + _PAD), _TITLE_H))
    draw.text((width / 2, _TITLE_H + side + 6), _fit(draw, label, small, width - 2 * _PAD),
              fill="black", font=small, anchor="ma")
    return canvas


def save_comparison(original, reconstruction, metrics, label, out_path):
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    write_png(out_path, np.asarray(comparison_image(original, reconstruction, metrics, label)))


def _text_cell(cell, value):
    """Store value as plain text: a name starting with '=' must never become a formula. Bytes of a file
    name that are not UTF-8 become U+FFFD, since the workbook's XML cannot hold them."""
    value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    cell.value = ILLEGAL_CHARACTERS_RE.sub("?", value)
    cell.data_type = "s"


def write_workbook(path, rows, skipped, model_path, folder, precision="fp32"):
    """Metrics sheet (Image Path | MSE | PSNR | SSIM), Summary sheet and Skipped sheet, written atomically."""
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "Metrics"
    sheet.append(["Image Path", *METRIC_NAMES])
    for row in rows:
        sheet.append([None, *(row[m] for m in METRIC_NAMES)])
        _text_cell(sheet.cell(row=sheet.max_row, column=1), row["Image Path"])
    sheet.column_dimensions["A"].width = 60

    summary = book.create_sheet("Summary")
    summary.append(["Metric", "Count", "Mean", "Std", "Min", "Max"])
    for name in METRIC_NAMES:
        values = np.array([row[name] for row in rows], dtype=np.float64)
        std = float(values.std(ddof=1)) if len(values) > 1 else None
        summary.append([name, len(values), float(values.mean()), std, float(values.min()), float(values.max())])
    summary.append([])
    for key, value in (("Model", model_path), ("Image folder", folder)):
        summary.append([key, None])
        _text_cell(summary.cell(row=summary.max_row, column=2), str(value))
    summary.append(["Precision", precision])
    summary.append(["Images evaluated", len(rows)])
    summary.append(["Files skipped", len(skipped)])
    summary.column_dimensions["A"].width = 18

    skipped_sheet = book.create_sheet("Skipped")
    skipped_sheet.append(["Path", "Reason"])
    for file_path, reason in skipped.items():
        skipped_sheet.append([None, None])
        _text_cell(skipped_sheet.cell(row=skipped_sheet.max_row, column=1), file_path)
        _text_cell(skipped_sheet.cell(row=skipped_sheet.max_row, column=2), reason)
    for ws in book.worksheets:
        for cell in ws[1]:
            cell.font = Font(bold=True)
    checkpoint_io.atomic_write(path, book.save)


def evaluate(cfg, loss_name):
    """Evaluate the model of loss_name ('mse' or 'ssim') on folder_path_test; returns the metric rows."""
    model_path = getattr(cfg, f"model_path_{loss_name}")
    out_dir = getattr(cfg, f"recon_output_{loss_name}")
    workbook_path = getattr(cfg, f"reconstruction_metrics_{loss_name}")
    check_settings(cfg)
    if not workbook_path.lower().endswith(".xlsx"):
        raise UserError(f"reconstruction_metrics_{loss_name}={workbook_path!r} must end in .xlsx")
    if os.path.isdir(workbook_path):
        raise UserError(f"reconstruction_metrics_{loss_name}={workbook_path!r} is a folder: give a file name "
                        "ending in .xlsx")
    check_writable(out_dir)
    check_writable(os.path.dirname(workbook_path))
    dataset = ImageFolder(cfg.folder_path_test, cfg.tile_size)
    device = select_device(cfg.GPUs)
    amp_dtype = autocast_dtype(device, cfg.mixed_precision)
    model = load_model(model_path, device)
    names = comparison_names(dataset.paths, cfg.folder_path_test)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size_test,
                                         num_workers=worker_count(cfg.num_workers), collate_fn=collate,
                                         pin_memory=device.type == "cuda")
    print(f"Evaluating {model_path} on {len(dataset)} files from {cfg.folder_path_test} on {device} "
          f"in {precision_name(amp_dtype)}.")

    rows, skips, pending = [], SkipLog(), []
    # leave=False: the finished bar is erased, so an error after the loop is the only line left on stderr.
    bar = tqdm(loader, desc="Evaluating", unit="batch", dynamic_ncols=True, leave=False)
    # A batch's PNGs are written by threads (numpy and zlib release the GIL) while the next batch is read,
    # and are finished before that batch goes through the model: on a CPU, work beside the forward pass
    # stalls its threads (measured: the forward slowed by about three times the work added), and on a GPU
    # it keeps the images waiting for their PNG to one batch instead of the whole folder.
    with ThreadPoolExecutor(max_workers=max(2, min(8, cpu_count()))) as pool:
        for images, paths, skipped in bar:
            skips.add(skipped)
            if not paths:
                continue
            for future in pending:
                future.result()
            pending = []
            _, recon, metrics = reconstruct(model, images, device, amp_dtype)
            recon_u8 = recon.mul(255).round_().to(torch.uint8).cpu()
            values = {name: metrics[name].cpu().tolist() for name in METRIC_NAMES}
            for i, path in enumerate(paths):
                row = {"Image Path": path, **{name: values[name][i] for name in METRIC_NAMES}}
                rows.append(row)
                pending.append(pool.submit(save_comparison, images[i], recon_u8[i], row,
                                           os.path.relpath(path, cfg.folder_path_test),
                                           os.path.join(out_dir, names[path])))
        for future in pending:
            future.result()
    if not rows:
        raise UserError(f"none of the {len(dataset)} files in {cfg.folder_path_test!r} could be read as an image "
                        "(see the warnings above); nothing was written")
    write_workbook(workbook_path, rows, skips.skipped, model_path, cfg.folder_path_test,
                   precision_name(amp_dtype))
    print(f"Evaluated {len(rows)} images; {skips.summary()}.")
    for name in METRIC_NAMES:
        values = np.array([row[name] for row in rows])
        std = values.std(ddof=1) if len(values) > 1 else math.nan
        print(f"  {name:<4} mean {values.mean():.5f}  std {std:.5f}")
    print(f"Comparison PNGs in {out_dir}; metrics workbook {workbook_path}.")
    return rows


def main(loss_name):
    run_main(lambda: evaluate(load_config(), loss_name))
