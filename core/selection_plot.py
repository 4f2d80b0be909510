"""The picture of one slide's selection: where its tiles lie (on the slide's thumbnail), coloured by
cluster, the selected ones outlined, the ones the quality check left out crossed; beside it the tiles'
first two principal components in the same colours."""
import numpy as np
from matplotlib import colormaps
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from core.names import printable

LEFT_OUT = "#d62728"
SELECTED_EDGE = "black"


def cluster_colours(clusters):
    """RGBA per cluster label (-1, left out, is grey); 10 distinct colours, or 20 (in lighter and darker
    pairs) that repeat beyond 20 clusters."""
    palette = colormaps["tab10" if clusters.max(initial=0) < 10 else "tab20"]
    colours = np.array([palette(int(label) % palette.N) for label in np.maximum(clusters, 0)])
    colours[clusters < 0] = (0.6, 0.6, 0.6, 1.0)
    return colours


def draw_map(axes, data, result, colours, thumbnail):
    """Tiles at their level-0 positions, over the thumbnail (an (image, scale) pair) when there is one;
    overlapping tiles are drawn as the cells of their stride, so that each stays visible."""
    scale = 1.0
    if thumbnail is not None:
        image, scale = thumbnail
        axes.imshow(image, interpolation="bilinear")
    x, y = data.x * scale, data.y * scale
    if data.cell0:
        side = data.cell0 * scale
        tiles = [Rectangle((a, b), side, side) for a, b in zip(x, y)]
        axes.add_collection(PatchCollection(tiles, facecolors=colours, alpha=0.45, linewidths=0))
        outlined = [Rectangle((a, b), side, side) for a, b in zip(x[result.selected], y[result.selected])]
        axes.add_collection(PatchCollection(outlined, facecolors="none", edgecolors=SELECTED_EDGE, linewidths=1.2))
        x, y = x + side / 2, y + side / 2
    else:
        axes.scatter(x, y, c=colours, s=12, marker="s", linewidths=0)
        axes.scatter(x[result.selected], y[result.selected], s=12, marker="s", facecolors="none",
                     edgecolors=SELECTED_EDGE, linewidths=0.8)
    axes.scatter(x[result.outlier], y[result.outlier], marker="x", color=LEFT_OUT, s=40, linewidths=1.5)
    if thumbnail is None:
        margin = 0.05 * max(np.ptp(x), np.ptp(y), 1)
        axes.set_xlim(x.min() - margin, x.max() + margin)
        axes.set_ylim(y.max() + margin, y.min() - margin)
    axes.set_aspect("equal")
    axes.set_axis_off()


def draw_scatter(axes, result, colours):
    pcs = result.pca2
    axes.scatter(pcs[:, 0], pcs[:, 1], c=colours, s=10, linewidths=0, alpha=0.8)
    chosen = result.selected
    axes.scatter(pcs[chosen, 0], pcs[chosen, 1], s=22, facecolors="none", edgecolors=SELECTED_EDGE,
                 linewidths=0.8, label=f"selected ({int(chosen.sum())})")
    if result.outlier.any():
        axes.scatter(pcs[result.outlier, 0], pcs[result.outlier, 1], marker="x", color=LEFT_OUT, s=18,
                     linewidths=1, label=f"left out by QC ({int(result.outlier.sum())})")
    axes.set_xlabel("PC 1")
    axes.set_ylabel("PC 2")
    axes.legend(fontsize="small", loc="best")
    axes.grid(alpha=0.3)


def selection_figure(name, data, result, thumbnail=None):
    """A matplotlib Figure (no pyplot state) of the selection; name is shown as text, never as mathtext."""
    colours = cluster_colours(result.cluster)
    has_map = data.x is not None
    figure = Figure(figsize=(14 if has_map else 7, 6.5), dpi=110)
    panels = figure.subplots(1, 2 if has_map else 1, squeeze=False)[0]
    if has_map:
        draw_map(panels[0], data, result, colours, thumbnail)
    draw_scatter(panels[-1], result, colours)
    title = (f"{printable(name)}: {len(data.tiles)} tiles, {result.clusters} clusters, "
             f"{int(result.selected.sum())} selected (outlined)")
    if result.outlier.any():
        title += f", {int(result.outlier.sum())} left out by QC (red x)"
    figure.suptitle(title, fontsize="medium", parse_math=False)
    figure.tight_layout()
    return figure
