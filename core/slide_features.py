"""The slide mode of Extract_Features.py: whole slides in, one features file per slide out.

    python Extract_Features.py --folder_path_slides=slides/ --features_folder=features

For each slide under folder_path_slides (one file, a folder searched recursively, or a .txt list), its tissue
tiles (core.slides.tile_grid at target_mpp) are read straight from the slide by loader workers, a row of
tiles per read, and described by the encoder in batches of batch_size_test, as the tile-folder mode
describes tile files. Written beside each other under features_folder, the slide's subfolders mirrored:

    <slide>.h5         features (N x 512), coords (N x 2, level-0 x, y), qc_mse/qc_ssim with tile_qc,
                       the settings and model as attributes, `complete` last (written under a temporary
                       name and renamed: a file that exists is whole)
    <slide>_tiles.png  a thumbnail with the tissue outline and the kept tiles
    <slide>.csv        with features_csv: Feature_1..Feature_512,File_Path, the path naming the tile
    slides_summary.csv Slide,Status,Tiles,Seconds,Reason: one row per slide of the run

A slide whose .h5 is complete and was made with the same model file and settings is not read again, so
the same command finishes an interrupted run. Several processes (torchrun, a SLURM job array, or both)
each take a disjoint share of the sorted slide list; each writes its rows to a part file and every process
rewrites the summary from all parts.
"""
import contextlib
import csv
import functools
import hashlib
import os
import time
import types

import h5py
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from core import feature_files, inference, shares
from core.errors import UserError
from core.inference import run_model
from core.metrics import per_image
from core.atomic import atomic_write, check_writable, replace_together, write_bytes
from core.names import printable
from core.png import png_bytes
from core.devices import autocast, autocast_dtype, precision_name, select_device
from core.loaders import loader, worker_count
from core.slides import SlideError, find_slides, open_slide, tile_grid, tile_name, tissue_mask
from core.signals import Interrupts
from Dataset import start_batches

SUMMARY_NAME = "slides_summary.csv"
SUMMARY_COLUMNS = ["Slide", "Status", "Tiles", "Seconds", "Reason"]
DEEPCLUSTER_TILE = 256  # DeepCluster++ resizes every tile to this side before its encoder
BLOCK_TILES = 8  # neighbouring tiles of one grid row read in one read_region: each slide tile decoded once
THUMBNAIL_SIDE = 1024  # the picture's longer side, unless the tissue mask's thumbnail is small enough to reuse
MAX_PICTURE_SIDE = 2048
OUTLINE_RGB, TILE_RGB = (0, 170, 0), (30, 60, 230)


# ---------------------------------------------------------------------------------------------------
# Which slides this process does, and where their files go
# ---------------------------------------------------------------------------------------------------
def slide_list(cfg):
    """The sorted slides of folder_path_slides, less anything inside features_folder (its thumbnails)."""
    outputs = os.path.realpath(cfg.features_folder) + os.sep
    slides = [path for path in find_slides(cfg.folder_path_slides)
              if not os.path.realpath(path).startswith(outputs)]
    if not slides:
        raise UserError(f"no slides found in {cfg.folder_path_slides!r}: point folder_path_slides at a slide, a "
                        "folder of slides or a .txt list of slide paths")
    return slides


def mirrored_folder(path, root):
    """The slide's folder relative to root; a slide outside root keeps its whole path (no '..')."""
    rel = os.path.relpath(os.path.dirname(os.path.abspath(path)), os.path.abspath(root))
    if rel == os.curdir:
        return ""
    if rel.startswith(os.pardir):
        return os.path.splitdrive(os.path.dirname(os.path.abspath(path)))[1].lstrip(os.sep)
    return rel


def output_names(slides, cfg):
    """{slide: (folder, stem)} of every slide's outputs. Two slides of one stem in one folder (a.svs and
    a.tif) keep their suffixes, so that no two slides share a file."""
    path = cfg.folder_path_slides
    root = path if os.path.isdir(path) else os.path.dirname(path)
    places = {s: (os.path.join(cfg.features_folder, mirrored_folder(s, root)),
                  os.path.splitext(os.path.basename(s))[0]) for s in slides}
    taken = {}
    for place in places.values():
        taken[place] = taken.get(place, 0) + 1
    return {s: (folder, os.path.basename(s) if taken[folder, stem] > 1 else stem)
            for s, (folder, stem) in places.items()}


def slide_outputs(folder, stem):
    base = os.path.join(folder, stem)
    return types.SimpleNamespace(h5=base + ".h5", png=base + "_tiles.png", csv=base + ".csv", stem=stem)


# ---------------------------------------------------------------------------------------------------
# Reading tiles
# ---------------------------------------------------------------------------------------------------
def row_blocks(coords, stride0, limit):
    """(first index, count) of runs of at most limit neighbouring tiles (stride0 apart) in one grid row."""
    blocks, start = [], 0
    for i in range(1, len(coords) + 1):
        if (i == len(coords) or i - start == limit or coords[i, 1] != coords[start, 1]
                or coords[i, 0] - coords[i - 1, 0] != stride0):
            blocks.append((start, i - start))
            start = i
    return blocks


class TileBlocks(torch.utils.data.Dataset):
    """Row blocks of a slide's tiles as (first index, uint8 k x 3 x T x T) or (first index, error text).
    Each loader process opens its own slide handle on first use."""

    def __init__(self, path, slide_mpp, grid, tile_size):
        self.path, self.slide_mpp, self.tile_size = path, slide_mpp, tile_size
        self.coords, self.side0 = grid.coords, grid.side0
        exact = (grid.stride0 * tile_size) % grid.side0 == 0  # tiles cut from a block land on whole pixels
        self.step = grid.stride0 * tile_size // grid.side0
        self.blocks = row_blocks(grid.coords, grid.stride0, BLOCK_TILES if exact else 1)
        self.slide = None

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, index):
        start, count = self.blocks[index]
        try:
            return start, self.read(start, count)
        except Exception as err:  # a damaged region fails the slide in the main process, not the worker
            return start, printable(str(err) or type(err).__name__)

    def read(self, start, count):
        if self.slide is None:
            self.slide = open_slide(self.path, self.slide_mpp)
        x, y = (int(v) for v in self.coords[start])
        size = self.tile_size
        width = (count - 1) * self.step + size
        width0 = int(self.coords[start + count - 1, 0]) - x + self.side0
        region = self.slide.read_region(x, y, width0, self.side0, width, size)
        tiles = np.stack([region[:, i * self.step:i * self.step + size] for i in range(count)])
        return torch.from_numpy(tiles.transpose(0, 3, 1, 2).copy())

    def close(self):
        if self.slide is not None:
            self.slide.close()


def tile_batches(dataset, batch_size, workers, device):
    """The slide's tiles in grid order, batch_size at a time (the last batch shorter), as uint8 tensors."""
    blocks = loader(dataset, None, min(workers, len(dataset)), device, collate_fn=None)
    pending, held = [], 0
    for start, tiles in start_batches(blocks):
        if isinstance(tiles, str):
            raise SlideError(f"{dataset.path}: tile at {tuple(int(v) for v in dataset.coords[start])} "
                             f"cannot be read ({tiles})")
        pending.append(tiles)
        held += len(tiles)
        while held >= batch_size:
            joined = torch.cat(pending)
            yield joined[:batch_size]
            pending, held = [joined[batch_size:]], held - batch_size
    if held:
        yield torch.cat(pending)


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------
def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def encode_batch(model, images, device, amp_dtype, qc):
    """uint8 tiles -> (float32 N x 512 features, None or (MSE, SSIM) of each tile's reconstruction). The
    features are model.embed's, as the tile-folder mode computes them; the decoder runs only for qc."""
    if not qc:
        return run_model(model.embed, images, device, amp_dtype)[1].cpu().numpy(), None
    x, latent = run_model(model.encode, images, device, amp_dtype)
    with torch.inference_mode(), autocast(device.type, amp_dtype):
        recon = model.decoder(latent).float().clamp_(0, 1)
        metrics = per_image(recon, x)
    return latent.mean(dim=(2, 3)).cpu().numpy(), (metrics["MSE"].cpu().numpy(), metrics["SSIM"].cpu().numpy())


def describe_tiles(path, grid, cfg, model, show):
    """(features N x 512, qc_mse N, qc_ssim N) of the tiles of grid, read from the slide at path; the qc
    values are None without tile_qc."""
    dataset = TileBlocks(path, cfg.slide_mpp, grid, cfg.tile_size)
    features, mse, ssim = [], [], []
    try:
        with tqdm(total=len(grid.coords), desc="  tiles", unit="tile", leave=False, position=1,
                  dynamic_ncols=True, disable=not show) as progress:
            for images in tile_batches(dataset, cfg.batch_size_test, model.workers, model.device):
                batch, qc = encode_batch(model.net, images, model.device, model.amp_dtype, cfg.tile_qc)
                features.append(batch)
                if qc:
                    mse.append(qc[0])
                    ssim.append(qc[1])
                progress.update(len(batch))
    finally:
        dataset.close()
    join = lambda parts: np.concatenate(parts).astype(np.float32) if parts else None
    return join(features), join(mse), join(ssim)


# ---------------------------------------------------------------------------------------------------
# A slide's files
# ---------------------------------------------------------------------------------------------------
def expected_attributes(cfg, model):
    """The attributes an existing .h5 must have to count as done by this run."""
    return {"target_mpp": cfg.target_mpp, "tile_size": cfg.tile_size, "tile_stride": cfg.tile_stride,
            "tissue_fraction": cfg.tissue_fraction, "background_gray": cfg.background_gray,
            "slide_mpp_setting": cfg.slide_mpp, "model_sha256": model.sha256, "tile_qc": cfg.tile_qc}


def finished_tiles(path, expected):
    """The tile count of a complete .h5 at path made with the expected attributes; None otherwise."""
    try:
        with h5py.File(path, "r") as handle:
            attrs = handle.attrs
            if not attrs.get("complete", False) or any(k not in attrs or attrs[k] != v for k, v in expected.items()):
                return None
            return int(handle["features"].shape[0])
    except Exception:  # missing, truncated by a kill, or not an HDF5 file: made again
        return None


def remove_stale_temporaries(target):
    """Temporary files of target left by a process killed while writing it (atomic._new_file's names).
    Only this process writes this slide's files, so none of them is another process's write in progress."""
    folder, name = os.path.split(target)
    with contextlib.suppress(OSError):
        for entry in os.listdir(folder or "."):
            if entry.startswith(f".{name}.") and entry.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, entry))


def write_h5(tmp, features, coords, qc, attributes):
    with h5py.File(tmp, "w") as handle:
        handle.create_dataset("features", data=features.reshape(-1, 512).astype(np.float32))
        handle.create_dataset("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
        if qc is not None:
            handle.create_dataset("qc_mse", data=qc[0].astype(np.float32))
            handle.create_dataset("qc_ssim", data=qc[1].astype(np.float32))
        for key, value in attributes.items():
            handle.attrs[key] = value
        handle.attrs["complete"] = True  # last: a reader that sees it sees every dataset above


def tiles_picture(slide, grid):
    """The slide's thumbnail with the tissue mask's outline and every kept tile's square drawn on it, at the
    mask's resolution when that is small enough (the thumbnail tissue_mask read is then reused)."""
    mask_side = max(grid.mask.array.shape)
    thumb, scale = slide.thumbnail(mask_side if mask_side <= MAX_PICTURE_SIDE else THUMBNAIL_SIDE)
    image = Image.fromarray(np.ascontiguousarray(thumb[..., :3]))
    mask = Image.fromarray(np.asarray(grid.mask.array, dtype=np.uint8) * 255).resize(image.size, Image.NEAREST)
    outline = np.asarray(mask) > np.asarray(mask.filter(ImageFilter.MinFilter(3)))
    pixels = np.array(image)
    pixels[outline] = OUTLINE_RGB
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    side = grid.side0 * scale
    for x, y in grid.coords.tolist():
        draw.rectangle([x * scale, y * scale, x * scale + side, y * scale + side], outline=TILE_RGB)
    return np.asarray(image)


def write_slide_files(out, slide, grid, described, cfg, model):
    """The picture, the CSV (features_csv) and the .h5, renamed into place together, the .h5 last."""
    features, mse, ssim = described
    features = np.zeros((0, 512), np.float32) if features is None else features
    attributes = {"slide_path": printable(slide.path), "slide_mpp": float(slide.mpp),
                  "tile_side_level0": int(grid.side0), "tile_stride_level0": int(grid.stride0),
                  "model_path": printable(cfg.model_path_ssim), **expected_attributes(cfg, model)}
    picture = png_bytes(tiles_picture(slide, grid))
    writes = {out.png: lambda tmp: write_bytes(tmp, picture)}
    if cfg.features_csv:
        names = [tile_name(out.stem, x, y) for x, y in grid.coords.tolist()]
        writes[out.csv] = lambda tmp: feature_files.write_csv(tmp, features, names)
    qc = (mse, ssim) if cfg.tile_qc else None
    if qc and mse is None:
        qc = (np.zeros(0, np.float32), np.zeros(0, np.float32))
    writes[out.h5] = lambda tmp: write_h5(tmp, features, grid.coords, qc, attributes)
    replace_together(writes)


def csv_from_h5(out):
    """features_csv asked for a slide done earlier without it: the CSV from its .h5, the slide not read."""
    with h5py.File(out.h5, "r") as handle:
        features, coords = handle["features"][()], handle["coords"][()]
    names = [tile_name(out.stem, x, y) for x, y in coords.tolist()]
    atomic_write(out.csv, lambda tmp: feature_files.write_csv(tmp, features, names))


# ---------------------------------------------------------------------------------------------------
# One slide, and the run
# ---------------------------------------------------------------------------------------------------
def row(path, status, tiles, seconds, reason=""):
    reason = str(reason)
    reason = reason[len(path) + 2:] if reason.startswith(f"{path}: ") else reason  # the row names the slide
    return {"Slide": printable(path), "Status": status, "Tiles": tiles, "Seconds": f"{seconds:.2f}",
            "Reason": printable(reason)}


def one_slide(path, out, cfg, model, show):
    """Describe one slide; its summary row. A slide that cannot be used is a row, never an exception."""
    start = time.perf_counter()
    done = finished_tiles(out.h5, expected_attributes(cfg, model))
    if done is not None:
        if cfg.features_csv and not os.path.isfile(out.csv):
            csv_from_h5(out)
        return row(path, "already done", done, 0.0)
    for target in (out.h5, out.png, out.csv):
        remove_stale_temporaries(target)
    try:
        slide = open_slide(path, cfg.slide_mpp)
    except SlideError as err:
        return row(path, "skipped", 0, time.perf_counter() - start, str(err))
    # A one-level slide is decoded whole for a thumbnail: the tissue mask's is kept for the picture.
    slide.thumbnail = functools.lru_cache(maxsize=1)(slide.thumbnail)
    try:
        with slide:
            mask = tissue_mask(slide, cfg.background_gray)  # the mask Prepare_Tiles.py cuts training tiles by
            grid = tile_grid(slide, cfg.tile_size, cfg.tile_stride, cfg.target_mpp, cfg.tissue_fraction, mask)
            described = describe_tiles(path, grid, cfg, model, show) if len(grid.coords) else (None, None, None)
            write_slide_files(out, slide, grid, described, cfg, model)
    except UserError as err:
        if not isinstance(err, SlideError):
            raise  # a full disk or an unwritable folder stops the run: every later slide would fail too
        return row(path, "failed", 0, time.perf_counter() - start, str(err))
    except Exception as err:  # the slide libraries meet damaged files with many exception types
        return row(path, "failed", 0, time.perf_counter() - start, f"{type(err).__name__}: {err}")
    reason = "" if len(grid.coords) else f"no tissue tiles at tissue_fraction={cfg.tissue_fraction}"
    return row(path, "done", len(grid.coords), time.perf_counter() - start, reason)


class Summary:
    """This process's rows in its part file; slides_summary.csv is rewritten from every part of the run
    (the parts of the same number of processes), under a lock, after each slide."""

    def __init__(self, folder, index, count, slides):
        self.folder, self.count = folder, count
        self.path = os.path.join(folder, SUMMARY_NAME)
        self.part = os.path.join(folder, f"slides_summary.part{index}of{count}.csv")
        self.order = {printable(path): i for i, path in enumerate(slides)}
        self.rows = []
        self.save()

    def add(self, entry):
        self.rows.append(entry)
        self.save()

    def save(self):
        atomic_write(self.part, lambda tmp: self._write(tmp, self.rows))
        with self._locked():
            rows = {}
            for name in sorted(os.listdir(self.folder)):
                if name.startswith("slides_summary.part") and name.endswith(f"of{self.count}.csv"):
                    rows.update(self._read(os.path.join(self.folder, name)))
            merged = sorted((r for s, r in rows.items() if s in self.order), key=lambda r: self.order[r["Slide"]])
            atomic_write(self.path, lambda tmp: self._write(tmp, merged))

    @contextlib.contextmanager
    def _locked(self):
        import fcntl  # the part files of processes that end together must not be merged from stale copies
        with open(os.path.join(self.folder, ".slides_summary.lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    @staticmethod
    def _read(path):
        with contextlib.suppress(OSError), open(path, newline="", encoding="utf-8") as handle:
            return {entry["Slide"]: entry for entry in csv.DictReader(handle)}
        return {}

    @staticmethod
    def _write(tmp, rows):
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, SUMMARY_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)


def load_encoder(cfg):
    device = select_device(cfg.GPUs)
    return types.SimpleNamespace(device=device, amp_dtype=autocast_dtype(device, cfg.mixed_precision),
                                 net=inference.load_model(cfg.model_path_ssim, device),
                                 sha256=file_sha256(cfg.model_path_ssim), workers=worker_count(cfg.num_workers))


def check_slide_settings(cfg):
    inference.check_settings(cfg)
    if cfg.tile_size != DEEPCLUSTER_TILE:
        print(f"warning: tile_size={cfg.tile_size}: DeepCluster++ resizes every tile to {DEEPCLUSTER_TILE} px, so "
              f"its own features of these tiles would differ from these", flush=True)


def extract_slide_features(cfg):
    """Describe this process's share of the slides of folder_path_slides; returns the summary rows of its
    share. UserError (exit 2) after the last slide when any slide was skipped or failed."""
    check_slide_settings(cfg)
    slides = slide_list(cfg)
    index, count = shares.process_share()
    mine = slides[index::count]
    names = output_names(slides, cfg)
    check_writable(cfg.features_folder)
    model = load_encoder(cfg)
    show = int(os.environ.get("RANK", 0)) == 0
    share = f" (process {index + 1} of {count}: {len(mine)} of them)" if count > 1 else ""
    print(f"Describing {len(slides)} slides{share} with {printable(cfg.model_path_ssim)} on {model.device} in "
          f"{precision_name(model.amp_dtype)}, {cfg.tile_size}-px tiles at {cfg.target_mpp} mpp.", flush=True)
    summary = Summary(cfg.features_folder, index, count, slides)
    with Interrupts(immediate=True).installed():
        for path in tqdm(mine, desc="Slides", unit="slide", position=0, dynamic_ncols=True, disable=not show):
            entry = one_slide(path, slide_outputs(*names[path]), cfg, model, show)
            if entry["Status"] in ("skipped", "failed") or entry["Reason"]:
                tqdm.write(f"warning: {entry['Slide']}: {entry['Status']}: {entry['Reason']}")
            summary.add(entry)
    return finish(summary, mine)


def finish(summary, mine):
    counts = {status: sum(r["Status"] == status for r in summary.rows)
              for status in ("done", "already done", "skipped", "failed")}
    print(", ".join(f"{n} {status}" for status, n in counts.items()) + f"; summary: {printable(summary.path)}")
    bad = counts["skipped"] + counts["failed"]
    if bad:
        raise UserError(f"{bad} of {len(mine)} slides could not be described (skipped or failed): their reasons "
                        f"are in {summary.path}")
    return summary.rows
