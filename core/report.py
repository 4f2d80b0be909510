"""What evaluation writes: the side-by-side comparison PNGs (their names and pictures) and the metrics workbook."""
import functools
import hashlib
import os

import numpy as np
import openpyxl
from openpyxl.styles import Font
from PIL import Image, ImageDraw, ImageFont

from core.atomic import atomic_write
from core.names import printable
from core.png import write_png

METRIC_NAMES = ("MSE", "PSNR", "SSIM")
_MAX_NAME_BYTES = 200  # file systems allow 255; leave room for the suffix


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
    """Original | reconstruction side by side, metrics in the title, the file name below (PIL Image).
    original, reconstruction: uint8 3 x H x W tensors or arrays."""
    side = original.shape[-1]
    template, left = _template(side)
    canvas = template.copy()
    width = canvas.width
    draw = ImageDraw.Draw(canvas)
    title = f"MSE {metrics['MSE']:.5f}   PSNR {metrics['PSNR']:.2f} dB   SSIM {metrics['SSIM']:.4f}"
    font, small = _font(15), _font(12)
    draw.text((width / 2, 4), _fit(draw, title, font, width - 2 * _PAD), fill="black", font=font, anchor="ma")
    for i, tile in enumerate((original, reconstruction)):
        canvas.paste(Image.fromarray(np.asarray(tile).transpose(1, 2, 0)), (left + i * (side + _PAD), _TITLE_H))
    draw.text((width / 2, _TITLE_H + side + 6), _fit(draw, label, small, width - 2 * _PAD),
              fill="black", font=small, anchor="ma")
    return canvas


def save_comparison(original, reconstruction, metrics, label, out_path):
    """Write the comparison image of one tile to out_path (its folders are created)."""
    write_png(out_path, np.asarray(comparison_image(original, reconstruction, metrics, printable(label))), mark=True)


def save_comparisons(originals, reconstructions, rows, labels, out_paths):
    """save_comparison for each tile of a part of a batch (uint8 N x 3 x H x W arrays): one task of a
    thread or process pool."""
    for job in zip(originals, reconstructions, rows, labels, out_paths):
        save_comparison(*job)


def _text_cell(cell, value):
    """Store value as plain text: a name starting with '=' must never become a formula. A file name's bytes
    that are not UTF-8 and its control characters, which the workbook's XML cannot hold, are escaped as
    everywhere else (names.printable)."""
    cell.value = printable(value)
    cell.data_type = "s"


def _bold_headers(book):
    for sheet in book.worksheets:
        for cell in sheet[1]:
            cell.font = Font(bold=True)


def summarise(rows):
    """{metric: (count, mean, sample std or None for one image, min, max)} of the metric rows."""
    summary = {}
    for name in METRIC_NAMES:
        values = np.array([row[name] for row in rows], dtype=np.float64)
        std = float(values.std(ddof=1)) if len(values) > 1 else None
        summary[name] = (len(values), float(values.mean()), std, float(values.min()), float(values.max()))
    return summary


def write_workbook(path, rows, skipped, model_path, folder, precision="fp32"):
    """Written atomically, four sheets: Metrics (Image Path | MSE | PSNR | SSIM, one row per tile), Summary
    (Metric | Count | Mean | Std | Min | Max), Run (what was evaluated: model, folder, precision, counts)
    and Skipped (Path | Reason)."""
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
    for name, numbers in summarise(rows).items():
        summary.append([name, *numbers])

    run = book.create_sheet("Run")
    run.append(["Item", "Value"])
    for key, value in (("Model", model_path), ("Image folder", folder)):
        run.append([key, None])
        _text_cell(run.cell(row=run.max_row, column=2), str(value))
    for key, value in (("Precision", precision), ("Images evaluated", len(rows)), ("Files skipped", len(skipped))):
        run.append([key, value])
    run.column_dimensions["A"].width = 18
    run.column_dimensions["B"].width = 60

    skipped_sheet = book.create_sheet("Skipped")
    skipped_sheet.append(["Path", "Reason"])
    for file_path, reason in skipped.items():
        skipped_sheet.append([None, None])
        _text_cell(skipped_sheet.cell(row=skipped_sheet.max_row, column=1), file_path)
        _text_cell(skipped_sheet.cell(row=skipped_sheet.max_row, column=2), reason)
    _bold_headers(book)
    atomic_write(path, book.save)
