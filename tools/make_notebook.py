"""Build Visualize_Reconstruction.ipynb from the cell sources below, and optionally execute it.

    python tools/make_notebook.py --execute                          # the committed notebook
    python tools/make_notebook.py --execute --model_path=/tmp/m.pth  # a trial on another checkpoint

The notebook is generated so that its code is reviewed here as plain Python, and so that every rebuild
gives the same cell ids and metadata: a diff of the .ipynb then shows only real changes. With --execute
it is run top to bottom in the repository root, as a user would run it, and saved with its outputs;
if a cell fails, nothing is written.
"""
import argparse
import os
import re
import sys

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "Visualize_Reconstruction.ipynb")
DEFAULT_MODEL_PATH = "sample_models/model_auto_encoder_reconstruction_ssim.pth"
CELL_TIMEOUT_S = 600

TITLE = """\
# Visualize autoencoder reconstructions

Load a trained autoencoder, reconstruct a few tiles and look at them: the originals in the top row, the
reconstructions below, with MSE, SSIM and PSNR under each reconstruction.

The tiles are read, resized and scaled exactly as training and `Evaluation_*.py` read them (the
project's `Dataset`, `inference` and `metrics` modules), so the numbers here are the numbers of
the evaluation workbook. Run the notebook from the repository root; edit only the next cell."""

SETTINGS = """\
model_path = "{model_path}"  # or the _mse model, or any checkpoint from training (checkpoints/SSIM/Model_AE_epoch_NNN.pth)
image_folder = "input_images"  # tiles to reconstruct, searched recursively
max_images = 8                 # how many tiles to show
tile_size = 256                # every tile is resized to this (a multiple of 32); use the size the model was trained on"""

METRICS_EXPLAINED = """\
## What the numbers mean

All three are computed on the images as the network sees them: RGB with values in [0, 1], the
reconstruction taken as the network outputs it, before rounding to 8 bits. They are computed per image
by `metrics.per_image`, the same function `Evaluation_MSE.py` and `Evaluation_SSIM.py` use.

- **MSE** (mean squared error): the average over all pixels and channels of (reconstruction - original)^2.
  0 is perfect; 0.001 means a typical error of about 0.03, or 8 of 255 grey levels.
- **PSNR** (peak signal-to-noise ratio) = 10 log10(1 / MSE), in dB: the MSE on a log scale, higher is better.
  Every 10 dB is a 10 times smaller MSE; a perfect reconstruction is reported as 100 dB.
- **SSIM** (structural similarity, Wang et al. 2004) compares local brightness, contrast and structure
  in an 11 x 11 Gaussian window (sigma 1.5) slid over the image, and averages over all windows and
  channels. 1 means identical; it drops when texture and edges are blurred, which MSE barely punishes.
  The SSIM model was trained to maximise exactly this number (loss 1 - SSIM), the MSE model to minimise MSE."""

LOAD = """\
%matplotlib inline
import os

import matplotlib.pyplot as plt

from Dataset import SkipLog
from core.cli import load_config
from core.inference import reconstruct, setup
from core.runtime import precision_name

# Reconstructing a whole folder is a job for Evaluation_*.py; beyond this many tiles the notebook only
# reconstructs the tiles it shows.
FOLDER_AVERAGE_LIMIT = 256

if not os.path.isfile(model_path):
    raise FileNotFoundError(f"model_path {model_path!r} not found in {os.getcwd()}: set model_path in the first code cell")
# Device (GPUs) and precision (mixed_precision) from Config.py, set up as the Evaluation scripts do.
run = setup(load_config([f"--tile_size={tile_size}", "--num_workers=0"]), image_folder, model_path, batch_size=max_images)
whole_folder = len(run.dataset) <= FOLDER_AVERAGE_LIMIT
print(f"Model {model_path} on {run.device} in {precision_name(run.amp_dtype)}; {len(run.dataset)} image files in {image_folder}.")

skips = SkipLog()
shown = []  # (path, original, reconstruction, {metric: value}) of the tiles drawn below
folder_metrics = {"MSE": [], "SSIM": [], "PSNR": []}
for images, paths, skipped in run.loader:
    skips.add(skipped)
    if not paths:
        continue
    originals, reconstructions, metrics = reconstruct(run.model, images, run.device, run.amp_dtype)
    values = {name: metrics[name].cpu().tolist() for name in folder_metrics}
    for name in folder_metrics:
        folder_metrics[name] += values[name]
    for i, path in enumerate(paths[:max_images - len(shown)]):
        shown.append((path, originals[i].cpu(), reconstructions[i].cpu(),
                      {name: values[name][i] for name in folder_metrics}))
    if len(shown) == max_images and not whole_folder:
        break
if not shown:
    raise RuntimeError(f"none of the files in {image_folder!r} could be read as an image (see the warnings above)")
print(f"Reconstructed {len(folder_metrics['MSE'])} tiles; {skips.summary()}.")"""

FIGURE = """\
def short(name, keep=24):
    # Tile names tend to share a prefix and differ in their coordinates at the end.
    return name if len(name) <= keep else "..." + name[-(keep - 3):]


fig, axes = plt.subplots(2, len(shown), figsize=(1.9 * len(shown), 4.6), dpi=72, squeeze=False)
for column, (path, original, reconstruction, values) in enumerate(shown):
    for row, image in enumerate((original, reconstruction)):
        ax = axes[row, column]
        ax.imshow(image.permute(1, 2, 0).numpy())  # float [0, 1]: the very pixels the metrics compare
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, column].set_title(short(os.path.relpath(path, image_folder)), fontsize=7)
    axes[1, column].set_xlabel(f"MSE {values['MSE']:.5f}\\nSSIM {values['SSIM']:.4f}\\nPSNR {values['PSNR']:.2f} dB",
                               fontsize=8)
axes[0, 0].set_ylabel("Original")
axes[1, 0].set_ylabel("Reconstruction")
fig.suptitle(os.path.basename(model_path), fontsize=9)
fig.tight_layout()
plt.show()"""

AVERAGES_EXPLAINED = """\
## Averages

The mean of each metric over the tiles shown above and, for a folder of at most `FOLDER_AVERAGE_LIMIT`
tiles, over every readable tile of the folder. For larger folders, and for the per-tile workbook, run
`python Evaluation_SSIM.py` (or `Evaluation_MSE.py`)."""

AVERAGES = """\
def report(label, columns):
    count = len(columns["MSE"])
    means = {name: sum(values) / count for name, values in columns.items()}
    print(f"Average over {label}: MSE {means['MSE']:.5f}  SSIM {means['SSIM']:.4f}  PSNR {means['PSNR']:.2f} dB")


report(f"the {len(shown)} images shown", {name: [values[name] for *_, values in shown] for name in folder_metrics})
if whole_folder:
    report(f"all {len(folder_metrics['MSE'])} images in {image_folder}", folder_metrics)
else:
    print(f"{len(run.dataset)} files in {image_folder}: more than {FOLDER_AVERAGE_LIMIT}, so no folder average here; "
          "Evaluation_SSIM.py / Evaluation_MSE.py compute it.")"""


def build(model_path=DEFAULT_MODEL_PATH):
    cells = [
        ("title", nbformat.v4.new_markdown_cell, TITLE),
        ("settings", nbformat.v4.new_code_cell, SETTINGS.format(model_path=model_path)),
        ("metrics-explained", nbformat.v4.new_markdown_cell, METRICS_EXPLAINED),
        ("reconstruct", nbformat.v4.new_code_cell, LOAD),
        ("figure", nbformat.v4.new_code_cell, FIGURE),
        ("averages-explained", nbformat.v4.new_markdown_cell, AVERAGES_EXPLAINED),
        ("averages", nbformat.v4.new_code_cell, AVERAGES),
    ]
    nb = nbformat.v4.new_notebook()
    nb.cells = [make(source, id=cell_id) for cell_id, make, source in cells]
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    }
    return nb


def execute(nb):
    """Run nb in the repository root, in place, as a user's 'Run all' would."""
    NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": ROOT}}).execute()
    # The kernel's language_info carries its exact Python version: keep the metadata stable across machines.
    nb.metadata["language_info"] = {"name": "python"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--execute", action="store_true", help="run the notebook and save it with its outputs")
    parser.add_argument("--model_path", default=DEFAULT_MODEL_PATH,
                        help="checkpoint written into the settings cell, relative to the repository root "
                             f"(default {DEFAULT_MODEL_PATH})")
    args = parser.parse_args()
    nb = build(args.model_path)
    if args.execute:
        try:
            execute(nb)
        except CellExecutionError as err:
            # The kernel's traceback is coloured for a browser; a terminal or log wants plain text.
            plain = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
            sys.exit(f"the notebook failed, {NOTEBOOK} left unchanged:\n{plain}")
    nbformat.validate(nb)
    nbformat.write(nb, NOTEBOOK)
    print(f"wrote {NOTEBOOK} ({os.path.getsize(NOTEBOOK) / 1e6:.2f} MB, "
          f"{'executed' if args.execute else 'not executed'}, model_path={args.model_path})")


if __name__ == "__main__":
    main()
