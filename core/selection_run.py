"""Select_Tiles.py's run over slides: this process's share of the slides, resume, each slide's outputs
written safely, and the summary.

Per slide, below selection_folder (the features' subfolders mirrored):
    <slide>.csv              one row per tile: Tile, X, Y, Cluster, Distance_Group, Selected (+ QC columns)
    <slide>/cluster_<k>/     the selected tiles as PNGs (cut from the slide, or copied from the tile folder)
    <slide>_selection.png    the picture (core.selection_plot)
    <slide>_selection.json   what the outputs were made from; written last, so a slide with one is complete
"""
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import time

import numpy as np
import pandas as pd
from tqdm import tqdm

from core import selection, shares
from core.errors import UserError
from core.atomic import atomic_write, check_writable
from core.names import printable
from core.png import write_png
from core.selection_inputs import find_inputs
from core.selection_plot import selection_figure

SUMMARY_NAME = "selection_summary.csv"
SUMMARY_COLUMNS = ["Slide", "Tiles", "Clusters", "Selected", "QC_Excluded", "Seconds", "Status", "Reason"]
RECORD_VERSION = 1
THUMBNAIL_SIDE = 1600  # pixels of the thumbnail's longer side in the picture


def fingerprint(path, known=None):
    """Size, mtime and SHA-256 of a file. With known (an earlier fingerprint) of the same size and mtime, its
    SHA-256 is trusted rather than reading the file again."""
    info = os.stat(path)
    found = {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
    if known and all(known.get(key) == value for key, value in found.items()):
        return {**found, "sha256": known.get("sha256")}
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {**found, "sha256": digest.hexdigest()}


def output_paths(folder, key):
    base = os.path.join(folder, *key.split("/"))
    return {"csv": base + ".csv", "tiles": base, "picture": base + "_selection.png",
            "record": base + "_selection.json"}


def read_record(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def already_done(paths, source, settings):
    """Whether the slide's outputs are complete, from the same features file (same SHA-256) and settings."""
    record = read_record(paths["record"])
    if not record or record.get("status") != "done" or record.get("version") != RECORD_VERSION:
        return False
    if record.get("settings") != settings.record() or not all(map(os.path.exists, paths.values())):
        return False
    return fingerprint(source, record.get("features"))["sha256"] == record["features"].get("sha256")


def table(data, result):
    """The per-tile table of one slide, rows in canonical order."""
    columns = {"Tile": data.tiles}
    if data.x is not None:
        columns.update(X=data.x, Y=data.y)
    columns.update(Cluster=result.cluster, Distance_Group=result.group, Selected=result.selected)
    if data.qc_mse is not None:
        columns.update(QC_MSE=data.qc_mse)
        if data.qc_ssim is not None:
            columns.update(QC_SSIM=data.qc_ssim)
        columns.update(QC_Score=np.round(result.qc_score, 4), QC_Outlier=result.outlier)
    return pd.DataFrame(columns)


def write_csv(path, frame):
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False, lineterminator="\n", encoding="utf-8"))


def tile_file_name(path, data):
    """A copied tile's file name: its path below the folder holding all of the slide's tiles, with the
    folder separators made '__' (unique, and readable)."""
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in data.tile_paths])
    return os.path.relpath(os.path.abspath(path), root).replace(os.sep, "__")


def save_tiles(folder, data, result, slide):
    """Write the selected tiles under folder/cluster_<k>/: cut from the open slide, or copied."""
    for index in np.flatnonzero(result.selected):
        cluster_folder = os.path.join(folder, f"cluster_{result.cluster[index]}")
        os.makedirs(cluster_folder, exist_ok=True)
        if slide is not None:
            pixels = slide.read_region(int(data.x[index]), int(data.y[index]), data.side0, data.side0,
                                       data.tile_size, data.tile_size)
            write_png(os.path.join(cluster_folder, data.tiles[index] + ".png"), pixels)
        else:
            source = data.tile_paths[index]
            target = os.path.join(cluster_folder, tile_file_name(source, data))
            try:
                shutil.copyfile(source, target)
            except OSError as err:
                raise UserError(f"cannot copy tile {printable(source)} ({err.strerror}): "
                                "is the tile folder where Extract_Features.py read it?") from None


def replace_folder(target, fill):
    """Build a new target folder with fill(tmp_folder) beside it, then swap it in for the old one: an
    interrupted run leaves the previous tiles, never a mixture of two selections."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    temp = os.path.join(parent, f".{os.path.basename(target)}.{secrets.token_hex(4)}.tmp")
    old = temp + ".old"
    try:
        os.mkdir(temp)
        fill(temp)
        if os.path.isdir(target) and not os.path.islink(target):
            os.rename(target, old)
        os.rename(temp, target)
    finally:
        for leftover in (temp, old):
            shutil.rmtree(leftover, ignore_errors=True)


def open_source_slide(data):
    """The slide file named in the .h5 (None in CSV mode)."""
    if data.slide_path is None:
        return contextlib.nullcontext()
    from core import slides

    if not os.path.exists(data.slide_path):
        raise UserError(f"slide {printable(data.slide_path)} named in the feature file is not there: run "
                        "Select_Tiles.py from the folder Extract_Features.py ran in, or move the slide back")
    return slides.open_slide(data.slide_path, data.slide_mpp)


def process_slide(item, paths, settings, summary_fields):
    """Select from one slide and write its outputs; returns its summary row fields."""
    data = item.load()
    if not len(data.tiles):
        return {**summary_fields, "Tiles": 0, "Status": "no tiles", "Reason": "the feature file has no tiles"}
    if settings.qc > 0 and data.qc_mse is None:
        raise UserError(f"{item.source}: no qc_mse values for select_qc: extract the slide with tile_qc = True, "
                        "or set select_qc = 0")
    result = selection.select(data.features, settings, item.name, data.qc_mse)
    with open_source_slide(data) as slide:
        replace_folder(paths["tiles"], lambda folder: save_tiles(folder, data, result, slide))
        thumbnail = slide.thumbnail(THUMBNAIL_SIDE) if slide is not None else None
    figure = selection_figure(item.key, data, result, thumbnail)
    atomic_write(paths["picture"], lambda tmp: figure.savefig(tmp, format="png"), durable=False)
    write_csv(paths["csv"], table(data, result))
    return {**summary_fields, "Tiles": len(data.tiles), "Clusters": result.clusters,
            "Selected": int(result.selected.sum()), "QC_Excluded": int(result.outlier.sum()), "Status": "done"}


def run_slide(item, folder, settings):
    """One slide: skipped when already done, else selected; a problem with the slide fails it alone."""
    paths = output_paths(folder, item.key)
    row = {"Slide": item.key, "Tiles": "", "Clusters": "", "Selected": "", "QC_Excluded": "", "Reason": ""}
    if already_done(paths, item.source, settings):
        record = read_record(paths["record"])
        return {**record["summary"], "Status": "already done", "Reason": ""}
    start = time.perf_counter()
    known = read_record(paths["record"])
    try:
        row = process_slide(item, paths, settings, row)
    except UserError as err:
        row = {**row, "Status": "failed", "Reason": printable(str(err))}
    row["Seconds"] = round(time.perf_counter() - start, 2)
    record = {"version": RECORD_VERSION, "status": row["Status"], "settings": settings.record(),
              "features": fingerprint(item.source, (known or {}).get("features")), "summary": row}
    atomic_write(paths["record"], lambda tmp: write_text(tmp, json.dumps(record, indent=1)))
    return row


def write_text(path, text):
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text + "\n")


def write_summary(folder, items, rows):
    """selection_summary.csv over every slide: this run's rows, other tasks' slides from their records."""
    lines = []
    for item in items:
        if item.key in rows:
            lines.append(rows[item.key])
            continue
        record = read_record(output_paths(folder, item.key)["record"])
        lines.append(record["summary"] if record else {"Slide": item.key, "Status": "pending",
                                                       "Reason": "not run yet (another task's share)"})
    write_csv(os.path.join(folder, SUMMARY_NAME), pd.DataFrame(lines, columns=SUMMARY_COLUMNS))


def select_tiles(cfg):
    """Select_Tiles.py: this process's share of the slides, each selected and written, then the summary."""
    settings = selection.Settings.from_config(cfg)
    items = find_inputs(cfg.features_folder, cfg.features_output)
    if not items[0].source.lower().endswith(".h5") and settings.qc > 0:
        raise UserError(f"select_qc = {settings.qc} needs QC values, which only the slide mode's .h5 files hold "
                        f"({cfg.features_output!r} has none): set select_qc = 0")
    check_writable(cfg.selection_folder)
    index, count = shares.process_share()
    mine = items[index::count]
    share = f" (task {index + 1} of {count})" if count > 1 else ""
    print(f"Selecting tiles of {len(mine)} of {len(items)} slides{share} from "
          f"{printable(items[0].source if len(items) == 1 else cfg.features_folder)} into "
          f"{printable(cfg.selection_folder)}.")
    rows = {}
    for item in tqdm(mine, desc="Selecting", unit="slide", dynamic_ncols=True):
        rows[item.key] = run_slide(item, cfg.selection_folder, settings)
    write_summary(cfg.selection_folder, items, rows)
    counts = pd.Series([row["Status"] for row in rows.values()]).value_counts()
    print("Slides: " + (", ".join(f"{n} {status}" for status, n in counts.items()) or "none") +
          f". Summary: {printable(os.path.join(cfg.selection_folder, SUMMARY_NAME))}")
    failed = [row for row in rows.values() if row["Status"] == "failed"]
    for row in failed:
        print(f"  failed {printable(row['Slide'])}: {row['Reason']}")
    if failed:
        raise UserError(f"{len(failed)} of {len(rows)} slides failed (reasons above and in {SUMMARY_NAME}); "
                        "the others are complete, and a rerun redoes only the failed ones")
    return rows
