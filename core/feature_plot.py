"""The PCA picture of a folder's encoder features (Extract_Features.py's <features>_pca.png): the first two
principal components, one colour per first-level subfolder."""
import os

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from core.names import printable

TOP_FOLDER_LABEL = "(top folder)"
MAX_LEGEND_GROUPS = 20  # beyond this the colours repeat and a legend would hide the plot


def pca_2d(features):
    """(N x 2 scores on the first two principal axes, share of the variance each explains), as numpy arrays.

    The axes are the eigenvectors of the 512 x 512 scatter matrix of the centred features, the same axes
    as the SVD of the centred features. Memory: the centred features in float64 (N x 512) and that matrix."""
    centred = torch.from_numpy(np.asarray(features, dtype=np.float64))
    centred = centred - centred.mean(dim=0)
    # eigh of the scatter matrix is faster than an SVD of the centred data and holds no N x 512 U. torch's,
    # not numpy's: numpy's OpenBLAS threads spin against the loader processes (docs/benchmarks.md).
    eigenvalues, vectors = torch.linalg.eigh(centred.T @ centred)
    eigenvalues = eigenvalues.flip(0).clamp(min=0).numpy()  # largest first; rounding can leave tiny negatives
    axes = vectors.flip(1)[:, :2].T.numpy().copy()
    # An axis's sign is arbitrary; fixing it keeps the plot the same across machines and library versions.
    signs = np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])
    axes *= np.where(signs == 0, 1.0, signs)[:, None]
    total = eigenvalues.sum()
    explained = eigenvalues[:2] / total if total > 0 else np.zeros(2)
    return centred.numpy() @ axes.T, explained


def subfolder_labels(paths, folder):
    """The first-level subfolder of folder that holds each path (TOP_FOLDER_LABEL for files directly in it)."""
    labels = []
    for path in paths:
        parts = os.path.relpath(path, folder).split(os.sep)
        labels.append(printable(parts[0]) if len(parts) > 1 else TOP_FOLDER_LABEL)
    return labels


def pca_figure(features, labels, folder):
    """The PCA plot. Folder names are shown as they are: never read as mathtext ($...$, backslashes), and a
    name starting with '_' keeps its legend entry (given explicitly, as matplotlib hides such labels)."""
    scores, explained = pca_2d(features)
    groups = list(dict.fromkeys(labels))
    label_array = np.array(labels, dtype=object)
    palette = colormaps["tab10" if len(groups) <= 10 else "tab20"]
    figure = Figure(figsize=(8, 6.5), dpi=120)
    axes = figure.add_subplot()
    size = float(np.clip(4000 / len(labels), 3, 40))
    handles, names = [], []
    for i, group in enumerate(groups):
        chosen = label_array == group
        handles.append(axes.scatter(scores[chosen, 0], scores[chosen, 1], s=size, alpha=0.75, linewidths=0,
                                    color=palette(i % palette.N)))
        names.append(f"{group} ({int(chosen.sum())})")
    axes.set_xlabel(f"PC 1 ({explained[0] * 100:.1f}% of variance)")
    axes.set_ylabel(f"PC 2 ({explained[1] * 100:.1f}% of variance)")
    title = f"Encoder features of {len(labels)} tiles in {printable(folder)}"
    if len(groups) <= MAX_LEGEND_GROUPS:
        legend = axes.legend(handles, names, title="Subfolder", fontsize="small", markerscale=max(1.0, 30 / size),
                             loc="best")
        for text in legend.get_texts():
            text.set_parse_math(False)
    else:
        title += f"\n{len(groups)} subfolders (too many for a legend; colours repeat)"
    axes.set_title(title, fontsize="medium", parse_math=False)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure
