"""Select_Tiles.py: DeepCluster++'s selection (cluster count, equal-frequency distance groups, sampled
counts, QC exclusion) and its promises: the same CSVs whatever the order of rows, files or slides, resume,
disjoint shares of slides, and the script run as a user runs it on .h5 files and on a features CSV."""
import math
import os
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO, script_env
from core import selection
from core.cli import load_config, run_main
from core.errors import UserError
from core.selection import Settings
from core.selection_run import select_tiles
from slides import make_20x

SIDE0, TILE = 128, 32  # level-0 side of a tile on the 1024 px test slide; side of the PNGs cut
DEFAULT = Settings(pca_dims=256, clusters=0, distance_groups=5, fraction=0.2, qc=0.0, seed=0)
ODD_NAME = "odd_$\\frac{$"  # mathtext that matplotlib cannot parse: names must be shown as plain text


def blob_features(n, seed, centres=4):
    """n x 512 float32 features around a few centres, so that k-means has structure to find."""
    rng = np.random.default_rng(seed)
    middles = rng.normal(0, 3, (centres, 512))
    return (middles[rng.integers(centres, size=n)] + rng.normal(0, 1, (n, 512))).astype(np.float32)


def grid_coords():
    ys, xs = np.meshgrid(np.arange(0, 1024, SIDE0), np.arange(0, 1024, SIDE0), indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)


def write_h5(path, slide_path, features, coords, qc=None, order=None, complete=True):
    """A slide mode feature file; order: the row order to store (a permutation of the rows)."""
    order = np.arange(len(features)) if order is None else order
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("features", data=features[order])
        handle.create_dataset("coords", data=coords[order])
        if qc is not None:
            handle.create_dataset("qc_mse", data=qc[0][order])
            handle.create_dataset("qc_ssim", data=qc[1][order])
        attrs = {"slide_path": str(slide_path), "slide_mpp": 0.499, "target_mpp": 0.499, "tile_size": TILE,
                 "tile_side_level0": SIDE0, "tile_stride": TILE, "tile_stride_level0": SIDE0,
                 "tissue_fraction": 0.0, "model_path": "m.pth", "model_sha256": "0" * 64}
        handle.attrs.update(attrs)
        handle.attrs["complete"] = complete


def qc_values(n, seed):
    rng = np.random.default_rng(seed)
    mse = np.exp(rng.normal(np.log(0.006), 0.2, n)).astype(np.float32)
    mse[:3] = [0.2, 0.15, 0.0004]  # two far above the slide's typical error, one far below
    return mse, np.clip(1 - 30 * mse, 0, 1).astype(np.float32)


def run_select(cwd, *args, env=None):
    """The script as a user runs it (a new process)."""
    return subprocess.run([sys.executable, str(REPO / "Select_Tiles.py"), *args], cwd=cwd,
                          env={**script_env(), **(env or {})}, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def select_here(monkeypatch, capsys):
    """select_here(cwd, "--key=value", ..., env={...}) -> (exit code, stdout, stderr) of Select_Tiles.py's
    main run in this process (the imports are paid once), in cwd with env added."""
    def run(cwd, *args, env=None):
        monkeypatch.chdir(cwd)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        code = 0
        try:
            run_main(select_tiles, "select", argv=list(args))
        except SystemExit as stop:
            code = stop.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return make_20x(tmp_path_factory.mktemp("slide"))


def make_features_folder(root, slide, names, shuffle_seed=None):
    """root/features with one .h5 per name (slide subfolders allowed), each with its own features; with
    shuffle_seed the rows are stored permuted and the files written in reverse order."""
    coords = grid_coords()
    listed = list(enumerate(names))
    for index, name in (reversed(listed) if shuffle_seed is not None else listed):
        features = blob_features(len(coords), seed=index)
        qc = qc_values(len(coords), seed=index)
        order = np.random.default_rng(shuffle_seed).permutation(len(coords)) if shuffle_seed is not None else None
        write_h5(root / "features" / f"{name}.h5", slide, features, coords, qc, order)
    return root / "features"


def outputs(folder):
    """{relative path: bytes} of every file below folder, the summary's timing column left out."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix != ".json" and path.name != "selection_summary.csv":
            found[str(path.relative_to(folder))] = path.read_bytes()
    return found


# --- the selection itself ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n, clusters, expected", [(50, 0, 8), (300, 0, 18), (50, 3, 3)])
def test_cluster_count(n, clusters, expected):
    settings = Settings(256, clusters, 5, 0.2, 0.0, 0)
    result = selection.select(blob_features(n, seed=1, centres=30), settings, "slide")
    assert result.clusters == expected == len(np.unique(result.cluster))
    assert expected == (clusters or math.ceil(math.sqrt(n)))


def test_distance_groups_are_equal_frequency_and_ordered():
    labels = np.repeat([0, 1], [13, 7])
    distance = np.random.default_rng(0).random(20)
    groups = selection.distance_groups(labels, distance, 5)
    for label, size in ((0, 13), (1, 7)):
        members = labels == label
        sizes = np.bincount(groups[members], minlength=5)
        assert sizes.sum() == size and sizes.max() - sizes.min() <= 1
        ranked = groups[members][np.argsort(distance[members])]
        assert (np.diff(ranked) >= 0).all()  # nearer tiles never in a farther group


def test_sampled_counts_fraction_at_least_one():
    result = selection.select(blob_features(400, seed=2), Settings(256, 0, 5, 0.3, 0.0, 0), "slide")
    for label in range(result.clusters):
        for group in np.unique(result.group[result.cluster == label]):
            members = (result.cluster == label) & (result.group == group)
            assert result.selected[members].sum() == max(1, int(members.sum() * 0.3))


def test_qc_leaves_out_exactly_the_outliers():
    features = blob_features(64, seed=3)
    mse, _ = qc_values(64, seed=3)
    result = selection.select(features, Settings(256, 0, 5, 0.2, 3.0, 0), "slide", mse)
    expected = np.abs(selection.robust_z(np.log(mse))) > 3.0
    assert expected[:3].all() and 3 <= expected.sum() < 10
    np.testing.assert_array_equal(result.outlier, expected)
    assert (result.cluster[expected] == -1).all() and not result.selected[expected].any()
    assert (result.cluster[~expected] >= 0).all()
    off = selection.select(features, DEFAULT, "slide", mse)
    assert not off.outlier.any()


def test_slide_seed_depends_on_name_and_seed_only():
    assert selection.slide_seed(0, "a") == selection.slide_seed(0, "a")
    assert len({selection.slide_seed(0, "a"), selection.slide_seed(0, "b"), selection.slide_seed(1, "a")}) == 3


# --- the script on .h5 files ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def first_run(tmp_path_factory, slide):
    root = tmp_path_factory.mktemp("select")
    make_features_folder(root, slide, ["s1", "sub/s2", ODD_NAME])
    result = run_select(root, "--select_qc=3")
    return root, result


def test_script_writes_every_output(first_run):
    root, result = first_run
    assert result.returncode == 0, result.stderr
    out = root / "selected_tiles"
    table = pd.read_csv(out / "sub" / "s2.csv")
    assert list(table.columns) == ["Tile", "X", "Y", "Cluster", "Distance_Group", "Selected",
                                   "QC_MSE", "QC_SSIM", "QC_Score", "QC_Outlier"]
    assert len(table) == 64 and table["Tile"].iloc[0] == "s2_x000000_y000000"
    assert table["QC_Outlier"].sum() >= 3 and (table.loc[table["QC_Outlier"], "Cluster"] == -1).all()
    pngs = sorted((out / "sub" / "s2").rglob("*.png"))
    chosen = table[table["Selected"]]
    assert sorted(p.stem for p in pngs) == sorted(chosen["Tile"])
    for path in pngs:
        row = chosen[chosen["Tile"] == path.stem].iloc[0]
        assert path.parent.name == f"cluster_{row['Cluster']}"
        assert Image.open(path).size == (TILE, TILE)
    assert (out / "sub" / "s2_selection.png").stat().st_size > 10_000
    assert (out / f"{ODD_NAME}_selection.png").is_file()
    summary = pd.read_csv(out / "selection_summary.csv", keep_default_na=False)
    assert list(summary["Slide"]) == [ODD_NAME, "s1", "sub/s2"]
    assert set(summary["Status"]) == {"done"}
    s2 = summary[summary["Slide"] == "sub/s2"].iloc[0]
    assert (s2["Tiles"], s2["Selected"], s2["QC_Excluded"]) == (64, len(chosen), table["QC_Outlier"].sum())
    assert s2["Clusters"] == math.ceil(math.sqrt(64 - s2["QC_Excluded"]))


def test_same_csvs_whatever_the_order_of_rows_files_and_slides(first_run, tmp_path, slide, select_here):
    root, _ = first_run
    make_features_folder(tmp_path, slide, ["s1", "sub/s2", ODD_NAME], shuffle_seed=5)
    write_h5(tmp_path / "features" / "a_first.h5", slide, blob_features(64, 9), grid_coords(),
             qc_values(64, 9))  # one more slide, ahead of the others in the list
    code, _, err = select_here(tmp_path, "--select_qc=3")
    assert code == 0, err
    again = outputs(tmp_path / "selected_tiles")
    before = outputs(root / "selected_tiles")
    assert {k: v for k, v in again.items() if not k.startswith("a_first")} == before


def test_rerun_is_already_done_and_rewrites_nothing(first_run, select_here):
    root, _ = first_run
    out = root / "selected_tiles"
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != "selection_summary.csv"}
    code, printed, err = select_here(root, "--select_qc=3")
    assert code == 0, err
    assert "3 already done" in printed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != "selection_summary.csv"} == stamps
    summary = pd.read_csv(out / "selection_summary.csv")
    assert set(summary["Status"]) == {"already done"}


def test_other_settings_redo_the_slides(tmp_path, slide, select_here):
    make_features_folder(tmp_path, slide, ["s1"])
    assert select_here(tmp_path)[0] == 0
    first = pd.read_csv(tmp_path / "selected_tiles" / "s1.csv")
    code, printed, err = select_here(tmp_path, "--select_distance_groups=1")
    assert code == 0 and "1 done" in printed, err
    second = pd.read_csv(tmp_path / "selected_tiles" / "s1.csv")
    assert second["Selected"].sum() < first["Selected"].sum()
    assert len(list((tmp_path / "selected_tiles" / "s1").rglob("*.png"))) == second["Selected"].sum()


def test_processes_share_the_slides_disjointly(tmp_path, slide, select_here):
    make_features_folder(tmp_path, slide, ["a", "b", "c"])
    done = []
    for rank in (0, 1):
        code, _, err = select_here(tmp_path, env={"RANK": str(rank), "WORLD_SIZE": "2"})
        assert code == 0, err
        done.append({p.stem for p in (tmp_path / "selected_tiles").glob("*.csv")} - {"selection_summary"} -
                    set().union(*done))
    assert done == [{"a", "c"}, {"b"}]
    summary = pd.read_csv(tmp_path / "selected_tiles" / "selection_summary.csv")
    assert list(summary["Status"]) == ["done"] * 3


def test_bad_feature_file_fails_alone(tmp_path, slide, select_here):
    make_features_folder(tmp_path, slide, ["good"])
    write_h5(tmp_path / "features" / "half.h5", slide, blob_features(64, 1), grid_coords(), complete=False)
    code, _, err = select_here(tmp_path)
    assert code == 2
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: 1 of 2")
    summary = pd.read_csv(tmp_path / "selected_tiles" / "selection_summary.csv").set_index("Slide")
    assert summary.loc["good", "Status"] == "done" and summary.loc["half", "Status"] == "failed"
    assert "half.h5" in summary.loc["half", "Reason"] and "incomplete" in summary.loc["half", "Reason"]


# --- the script on a features CSV (tile-folder mode) ------------------------------------------------------

def test_features_csv_mode(tmp_path, select_here):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    paths = []
    for slide_name in ("alpha", "beta"):
        for i in range(20):
            path = tiles / f"{slide_name}_x{i * 256:06d}_y{(i % 3) * 256:06d}.png"
            Image.fromarray(np.full((8, 8, 3), i * 10, np.uint8)).save(path)
            paths.append(os.path.join("tiles", path.name))
    features = blob_features(len(paths), seed=4)
    frame = pd.DataFrame(features, columns=[f"Feature_{i}" for i in range(1, 513)])
    frame["File_Path"] = paths
    (tmp_path / "features").mkdir()
    frame.sample(frac=1, random_state=0).to_csv(tmp_path / "features" / "features.csv", index=False)
    result = run_select(tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "selected_tiles"
    table = pd.read_csv(out / "alpha.csv")
    assert list(table.columns) == ["Tile", "X", "Y", "Cluster", "Distance_Group", "Selected"]
    assert list(table["Tile"]) == sorted(p for p in paths if "alpha" in p)
    for path in (out / "alpha").rglob("*.png"):
        assert path.read_bytes() == (tiles / path.name).read_bytes()
    assert len(list((out / "alpha").rglob("*.png"))) == table["Selected"].sum() > 0
    summary = pd.read_csv(out / "selection_summary.csv")
    assert list(summary["Slide"]) == ["alpha", "beta"] and list(summary["Tiles"]) == [20, 20]
    code, _, err = select_here(tmp_path, "--select_qc=3")
    assert code == 2 and err.startswith("error: select_qc") and len(err.strip().splitlines()) == 1


def test_help_lists_the_selection_settings(capsys):
    with pytest.raises(SystemExit) as stop:
        load_config(["--help"], "select")
    assert stop.value.code == 0
    shown = capsys.readouterr().out
    for key in ("features_folder", "selection_folder", "select_pca_dims", "select_clusters",
                "select_distance_groups", "select_fraction", "select_qc", "seed", "features_output"):
        assert f"--{key}=" in shown
    with pytest.raises(UserError, match="select_fraction"):
        load_config(["--select_fraction=0"], "select")
