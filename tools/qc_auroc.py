"""How well the reconstruction-error quality check tells artefact tiles from clean tissue.

    python tools/qc_auroc.py [TILES] [MODEL.pth] [OUT.csv]
    python tools/qc_auroc.py sample_slides/cmu_small_region.svs

Takes the clean tiles of TILES (default input_images): a folder of tiles, or a slide, cut into the 256 px
tiles at 0.5 um/px, without overlap, that are at least half tissue (as the slide mode cuts them). Makes three artefact copies of each with numpy
(blurred: Gaussian blur; pen: a thick coloured stroke; folded: a darkened, more saturated band),
reconstructs all of them with MODEL (default the shipped SSIM model) on the CPU, and prints, per artefact
kind, the AUROC of each score separating the artefact tiles from the clean ones: the reconstruction MSE,
1 - SSIM, and the quality check's own score, |robust z| of log MSE, referenced to the clean tiles. Per-tile values go
to OUT (default qc_auroc.csv).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402  (after the path set-up above)
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from core import selection, slides  # noqa: E402
from core.cli import run_main  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.inference import load_model, reconstruct  # noqa: E402
from Dataset import ImageFolder, load_image  # noqa: E402

DEFAULT_MODEL = "sample_models/model_auto_encoder_reconstruction_ssim.pth"
BLUR_SIGMA = 3.0  # pixels at 256 px: a badly focused scan
PEN_WIDTH = 14
PEN_COLOURS = ((30, 60, 170), (20, 120, 60), (20, 20, 20))  # blue, green, black marker ink
FOLD_DARKENING = 0.45


def gaussian_blur(tile, sigma=BLUR_SIGMA):
    """A separable Gaussian blur of an H x W x 3 uint8 tile, edges repeated."""
    radius = int(3 * sigma)
    kernel = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    image = tile.astype(np.float64)
    for axis in (0, 1):
        padded = np.pad(image, [(radius, radius) if a == axis else (0, 0) for a in range(3)], mode="edge")
        image = np.apply_along_axis(lambda line: np.convolve(line, kernel, mode="valid"), axis, padded)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def pen_mark(tile, rng):
    """A thick ink stroke: a random sine curve across the tile, drawn in a marker colour at 85 % opacity."""
    height, width, _ = tile.shape
    rows, cols = np.mgrid[0:height, 0:width]
    phase, amplitude, centre = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.3) * height, rng.uniform(0.3, 0.7)
    curve = centre * height + amplitude * np.sin(2 * np.pi * cols / width + phase)
    stroke = np.abs(rows - curve) < PEN_WIDTH / 2
    colour = np.array(PEN_COLOURS[rng.integers(len(PEN_COLOURS))], dtype=np.float64)
    out = tile.astype(np.float64)
    out[stroke] = 0.15 * out[stroke] + 0.85 * colour
    return out.astype(np.uint8)


def fold(tile, rng):
    """A tissue fold: a diagonal band a fifth of the tile wide, darkened and more saturated (doubled tissue)."""
    height, width, _ = tile.shape
    rows, cols = np.mgrid[0:height, 0:width]
    angle = rng.uniform(0, np.pi)
    offset = (cols - width / 2) * np.cos(angle) + (rows - height / 2) * np.sin(angle) - rng.uniform(-0.2, 0.2) * width
    band = np.abs(offset) < width / 10
    out = tile.astype(np.float64)
    mean = out[band].mean(axis=1, keepdims=True)
    out[band] = (mean + 1.3 * (out[band] - mean)) * FOLD_DARKENING
    return np.clip(out, 0, 255).astype(np.uint8)


def artefacts(tiles, seed=0):
    """{kind: list of tiles} for clean and each artefact kind, every kind made from every clean tile."""
    rng = np.random.default_rng(seed)
    return {"clean": tiles, "blurred": [gaussian_blur(t) for t in tiles],
            "pen": [pen_mark(t, rng) for t in tiles], "folded": [fold(t, rng) for t in tiles]}


def reconstruction_errors(model, tiles, batch=8):
    """(MSE, SSIM) of each tile's reconstruction, on the CPU in fp32."""
    mse, ssim = [], []
    for start in range(0, len(tiles), batch):
        images = torch.from_numpy(np.stack(tiles[start:start + batch])).permute(0, 3, 1, 2).contiguous()
        metrics = reconstruct(model, images, torch.device("cpu"))[2]
        mse += metrics["MSE"].tolist()
        ssim += metrics["SSIM"].tolist()
    return np.array(mse), np.array(ssim)


def score_table(tiles, model_path, tile_size=256, seed=0):
    """One row per tile and kind: Kind, Tile, QC_MSE, QC_SSIM, QC_Score (clean_referenced_score)."""
    model = load_model(model_path, torch.device("cpu"))
    rows = []
    for kind, images in artefacts(tiles, seed).items():
        mse, ssim = reconstruction_errors(model, images)
        rows += [{"Kind": kind, "Tile": i, "QC_MSE": m, "QC_SSIM": s} for i, (m, s) in enumerate(zip(mse, ssim))]
    frame = pd.DataFrame(rows)
    frame["QC_Score"] = clean_referenced_score(frame)
    return frame


def clean_referenced_score(frame):
    """selection.qc_score with the median and spread of the clean tiles: the score on a slide where
    artefacts are rare, so that they do not move the slide's median."""
    logs = np.log(np.maximum(frame["QC_MSE"].to_numpy(dtype=np.float64), selection.MIN_MSE))
    clean = logs[(frame["Kind"] == "clean").to_numpy()]
    median = np.median(clean)
    return (logs - median) / (selection.MAD_TO_SD * np.median(np.abs(clean - median)))


def auroc_table(frame):
    """AUROC of MSE, 1 - SSIM and the quality check's |QC_Score|, artefact (positive) against clean, per
    artefact kind."""
    clean = frame[frame["Kind"] == "clean"]
    rows = []
    for kind in [k for k in frame["Kind"].unique() if k != "clean"]:
        pool = pd.concat([clean, frame[frame["Kind"] == kind]])
        truth = (pool["Kind"] == kind).to_numpy()
        rows.append({"Artefact": kind, "Tiles": int(truth.sum()), "Clean": len(clean),
                     "AUROC_MSE": roc_auc_score(truth, pool["QC_MSE"]),
                     "AUROC_1-SSIM": roc_auc_score(truth, 1 - pool["QC_SSIM"]),
                     "AUROC_QC": roc_auc_score(truth, pool["QC_Score"].abs())})
    return pd.DataFrame(rows)


def slide_tiles(path, tile_size=256, target_mpp=0.5, tissue_fraction=0.5):
    """The tissue tiles of a slide, cut as the slide mode cuts them."""
    with slides.open_slide(path) as slide:
        grid = slides.tile_grid(slide, tile_size, tile_size, target_mpp, tissue_fraction)
        return [slide.read_region(int(x), int(y), grid.side0, grid.side0, tile_size, tile_size)
                for x, y in grid.coords]


def load_tiles(folder, tile_size=256):
    """Clean tiles as H x W x 3 uint8 arrays: a slide's tissue tiles, or the images in a folder."""
    if os.path.isfile(folder) and folder.lower().endswith(slides.SLIDE_SUFFIXES):
        return slide_tiles(folder, tile_size)
    paths = ImageFolder(folder, tile_size).paths
    if not paths:
        raise UserError(f"no tiles in {folder!r}: give a folder of clean tissue tiles")
    return [load_image(path, tile_size).permute(1, 2, 0).numpy() for path in paths]


def main():
    args = sys.argv[1:]
    if len(args) > 3:
        raise UserError("usage: python tools/qc_auroc.py [TILES] [MODEL.pth] [OUT.csv]")
    folder, model_path, out = (args + [None] * 3)[:3]
    frame = score_table(load_tiles(folder or "input_images"), model_path or DEFAULT_MODEL)
    frame.to_csv(out or "qc_auroc.csv", index=False)
    print(auroc_table(frame).to_string(index=False, float_format="%.3f"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_main(main)
