"""Representative tiles of each slide from its encoder features, chosen as DeepCluster++ chooses them
(scaling, PCA, k-means, distance groups, a sampled fraction of each), reproducibly for a given seed.

    python Select_Tiles.py --features_folder=features --selection_folder=selected_tiles

Reads the per-slide .h5 files of Extract_Features.py's slide mode below features_folder, or, when there are
none, the features CSV features_output (slides told apart by tile name or first-level folder). Writes, per
slide, <slide>.csv, the selected tiles in <slide>/cluster_<k>/, a picture <slide>_selection.png, and
selection_summary.csv; how and why: docs/selection.md.
"""
from core.cli import run_main
from core.selection_run import select_tiles


def main():
    run_main(select_tiles, "select")


if __name__ == "__main__":
    main()
