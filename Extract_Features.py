"""Encoder features for DeepCluster++: one 512-d vector per tile, the global average of the autoencoder's
512 x H/32 x W/32 latent map (only the encoder runs).

    python Extract_Features.py --folder_path_features=my_tiles --model_path_ssim=checkpoints/SSIM/Final_Model_AE_SSIM.pth

The model is model_path_ssim (any checkpoint layout the evaluation scripts accept; pass an MSE model there
to describe tiles with it). Tiles are found recursively and decoded exactly as for training, in sorted
order. With features_output = features/features.csv it writes, all five replaced together or not at all:

    features/features.csv          Feature_1,...,Feature_512,File_Path - one row per readable tile
    features/features.npy          the same numbers as float32 N x 512, for fast loading
    features/features_paths.txt    the tile paths, one per line, in the same order
    features/features_pca.png      the first two principal components, coloured by first-level subfolder
    features/features_skipped.csv  Path,Reason of each unreadable file (only when there are any)

With folder_path_slides set, it reads whole slides instead (core/slide_features.py, docs/slide_features.md):
one <slide>.h5 of features and tile coordinates per slide under features_folder.

The files are UTF-8. A file name's bytes that are not UTF-8, and its control characters (a newline in a
name), are written as Python-style escapes (\\xe9, \\n; names.printable), so every path is one line.
"""
import csv
import os
import time

import numpy as np
from tqdm import tqdm

from core import feature_files, inference
from core.feature_plot import pca_figure, subfolder_labels
from core import run_lock
from Dataset import SkipLog, start_batches
from core.errors import UserError
from core.cli import run_main
from core.inference import run_model
from core.atomic import check_target, check_writable, replace_together
from core.names import printable
from core.png import PNG_MARK
from core.devices import precision_name

from core.feature_files import FEATURE_COLUMNS, FEATURE_DIM, FLOAT_FORMAT  # noqa: F401 (the layout, for readers)


def output_paths(csv_path):
    """Every output file, derived from features_output (which must end in .csv)."""
    if not csv_path.lower().endswith(".csv"):
        raise UserError(f"features_output={csv_path!r} must end in .csv (for example features/features.csv)")
    stem = csv_path[:-4]
    return {"csv": csv_path, "npy": stem + ".npy", "paths": stem + "_paths.txt",
            "pca": stem + "_pca.png", "skipped": stem + "_skipped.csv"}


def embed_batch(model, images, device, amp_dtype=None):
    """uint8 N x 3 x H x W tiles -> float32 N x 512 features on the CPU."""
    return run_model(model.embed, images, device, amp_dtype)[1].cpu().numpy()


def write_outputs(outputs, features, paths, skipped, folder):
    """Replace the feature files of outputs (output_paths) together: all are written, the PCA plot drawn,
    before any is renamed into place, so a failure leaves the previous set whole."""
    names = [printable(path) for path in paths]

    def write_csv(tmp):
        feature_files.write_csv(tmp, features, names)

    def write_npy(tmp):
        with open(tmp, "wb") as handle:  # np.save would append .npy to a bare temporary name
            np.save(handle, features)

    def write_paths(tmp):
        with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            handle.writelines(name + "\n" for name in names)

    def write_skipped(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["Path", "Reason"])
            writer.writerows((printable(path), printable(reason)) for path, reason in skipped.items())

    figure = pca_figure(features, subfolder_labels(paths, folder), folder)
    writes = {outputs["csv"]: write_csv, outputs["npy"]: write_npy, outputs["paths"]: write_paths,
              outputs["pca"]: lambda tmp: figure.savefig(tmp, format="png", metadata=PNG_MARK)}
    if skipped:
        writes[outputs["skipped"]] = write_skipped
    # A list left by an earlier run would blame files that now read fine.
    replace_together(writes, remove=() if skipped else (outputs["skipped"],))


def extract_features(cfg):
    """Describe every tile under folder_path_features; returns (features float32 N x 512, paths)."""
    folder, model_path = cfg.folder_path_features, cfg.model_path_ssim
    outputs = output_paths(cfg.features_output)
    inference.check_settings(cfg)
    for path in outputs.values():
        check_target(path)
    check_writable(os.path.dirname(outputs["csv"]))
    run = inference.setup(cfg, folder, model_path, exclude=list(outputs.values()))
    print(f"Extracting encoder features with {printable(model_path)} from {len(run.dataset)} files in "
          f"{printable(folder)} on {run.device} in {precision_name(run.amp_dtype)}.")

    chunks, paths, skips = [], [], SkipLog()
    skips.add_left_out(run.dataset.left_out)
    start = time.perf_counter()
    # leave=False: the bar is erased when it ends, so that an interrupt's or error's line is the last one left.
    with tqdm(total=len(run.dataset), desc="Extracting", unit="tile", dynamic_ncols=True, leave=False) as progress:
        for images, batch_paths, skipped in start_batches(run.loader):
            skips.add(skipped)
            if batch_paths:
                chunks.append(embed_batch(run.model, images, run.device, run.amp_dtype))
                paths.extend(batch_paths)
            progress.update(len(batch_paths) + len(skipped))
    seconds = time.perf_counter() - start
    if not paths:
        raise UserError(f"none of the {len(run.dataset)} files in {folder!r} could be read as an image "
                        "(see the warnings above); nothing was written")
    features = np.concatenate(chunks)
    broken = int((~np.isfinite(features).all(axis=1)).sum())
    if broken:
        raise UserError(f"the model gave NaN or infinite features for {broken} of {len(paths)} tiles: "
                        f"{model_path!r} is probably a diverged checkpoint; nothing was written")
    write_outputs(outputs, features, paths, skips.skipped, folder)

    print(f"Extracted {len(paths)} feature vectors of {features.shape[1]} values; {skips.summary()}; "
          f"{len(paths) / max(seconds, 1e-9):.1f} images/s.")
    for path, reason in skips.skipped.items():
        print(f"  skipped {printable(path)}: {printable(reason)}")
    print(f"Features CSV (DeepCluster++ input): {printable(outputs['csv'])}")
    print(f"Same features as float32 array: {printable(outputs['npy'])} "
          f"(tile paths in order: {printable(outputs['paths'])})")
    print(f"PCA plot: {printable(outputs['pca'])}")
    if skips.skipped:
        print(f"Skipped files: {printable(outputs['skipped'])}")
    return features, paths


def extract(cfg):
    """The slide mode when folder_path_slides is set, else the tile-folder mode."""
    if cfg.folder_path_slides:
        from core.slide_features import extract_slide_features  # its slide libraries load only when used
        return extract_slide_features(cfg)  # its processes share the folder: each slide's files are its own
    # One extraction at a time per output (run_lock): a second one writing the same files is refused.
    return run_lock.call_locked(extract_features, cfg, cfg.features_output, "features_output")


def main():
    run_main(extract, "features")


if __name__ == "__main__":
    main()
