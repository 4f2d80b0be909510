"""The inputs of Select_Tiles.py: the per-slide .h5 feature files of Extract_Features.py's slide mode, or
the features CSV of its tile-folder mode split into slides, each read into rows in a canonical order."""
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.errors import UserError
from core.names import printable
from core.slides import parse_tile_name, tile_name

FEATURE_PREFIX = "Feature_"


@dataclass
class SlideInput:
    """One slide to select from. name: the slide's stem (it seeds the slide's random state); key: where its
    outputs go below selection_folder, without suffix (subfolders of the features mirrored); source: the
    features file; load: a function returning its SlideData."""
    name: str
    key: str
    source: str
    load: object


@dataclass
class SlideData:
    """A slide's rows in canonical order: tile names, features (N x D), level-0 X and Y (or None), each
    tile's QC values (or None), and where its pixels come from: the slide file and tile geometry (.h5), or
    one image file per tile (CSV). cell0: the level-0 side each tile is drawn with in the picture (the stride,
when tiles overlap)."""
    tiles: list
    features: np.ndarray
    x: np.ndarray = None
    y: np.ndarray = None
    qc_mse: np.ndarray = None
    qc_ssim: np.ndarray = None
    slide_path: str = None
    slide_mpp: float = 0.0
    side0: int = 0
    cell0: int = 0
    tile_size: int = 0
    tile_paths: list = field(default_factory=list)


def find_inputs(features_folder, features_csv):
    """The slides to select from, sorted by key: every .h5 below features_folder; when there is none, the
    slides of the features CSV; UserError when there is neither."""
    h5_files = sorted_h5(features_folder)
    if h5_files:
        return [h5_input(path, features_folder) for path in h5_files]
    if os.path.isfile(features_csv):
        return csv_inputs(features_csv)
    raise UserError(f"no .h5 feature files in {features_folder!r} and no features CSV {features_csv!r}: run "
                    "Extract_Features.py first, or set features_folder / features_output to where its files are")


def sorted_h5(folder):
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, name) for name in files if name.lower().endswith(".h5")]
    return sorted(found, key=lambda path: os.path.relpath(path, folder).split(os.sep))


def h5_input(path, folder):
    key = os.path.splitext(os.path.relpath(path, folder))[0].replace(os.sep, "/")
    return SlideInput(os.path.basename(key), key, path, lambda: load_h5(path))


def load_h5(path):
    """The SlideData of a slide mode .h5 file, rows sorted by y then x; UserError naming the file when it
    is incomplete or its datasets do not fit together."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            if not handle.attrs.get("complete", False):
                raise UserError(f"{path}: incomplete feature file (its extraction did not finish): "
                                "rerun Extract_Features.py for this slide")
            features = np.asarray(handle["features"], dtype=np.float32)
            coords = np.asarray(handle["coords"], dtype=np.int64)
            qc = {key: np.asarray(handle[key], dtype=np.float32) if key in handle else None
                  for key in ("qc_mse", "qc_ssim")}
            attrs = {key: handle.attrs[key] for key in ("slide_path", "tile_side_level0", "tile_size")}
            stride0 = int(handle.attrs.get("tile_stride_level0", attrs["tile_side_level0"]))
            mpp = float(handle.attrs.get("slide_mpp", 0.0))
    except (OSError, KeyError) as err:
        raise UserError(f"{path}: not a readable slide feature file ({err}): rerun Extract_Features.py "
                        "for this slide") from None
    check_shapes(path, features, coords, qc)
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    x, y = coords[order, 0], coords[order, 1]
    stem = os.path.splitext(os.path.basename(path))[0]
    return SlideData([tile_name(stem, a, b) for a, b in zip(x, y)], features[order], x, y,
                     *(None if qc[key] is None else qc[key][order] for key in ("qc_mse", "qc_ssim")),
                     slide_path=str(attrs["slide_path"]), slide_mpp=mpp,
                     side0=int(attrs["tile_side_level0"]), cell0=min(stride0, int(attrs["tile_side_level0"])),
                     tile_size=int(attrs["tile_size"]))


def check_shapes(path, features, coords, qc):
    n = len(features)
    problems = [] if features.ndim == 2 else [f"features has shape {features.shape}"]
    if coords.shape != (n, 2):
        problems.append(f"coords has shape {coords.shape} for {n} feature rows")
    problems += [f"{key} has {len(values)} values for {n} rows" for key, values in qc.items()
                 if values is not None and values.shape != (n,)]
    if not problems and n and not np.isfinite(features).all():
        problems.append("features hold NaN or infinite values")
    if not problems and len(np.unique(coords, axis=0)) != n:
        problems.append("some coords appear twice")
    if problems:
        raise UserError(f"{path}: {'; '.join(problems)}: rerun Extract_Features.py for this slide")


def csv_inputs(path):
    """The slides of a features CSV (Feature_1..Feature_D,File_Path), sorted by name."""
    try:
        table = pd.read_csv(path, dtype={"File_Path": str}, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise UserError(f"cannot read features CSV {path!r} ({err}): rerun Extract_Features.py") from None
    columns = [c for c in table.columns if c.startswith(FEATURE_PREFIX)]
    if "File_Path" not in table.columns or not columns or not len(table):
        raise UserError(f"{path!r} is not a features CSV with rows (columns Feature_1..Feature_N,File_Path): "
                        "rerun Extract_Features.py")
    if table["File_Path"].duplicated().any():
        raise UserError(f"{path!r} lists {printable(table['File_Path'][table['File_Path'].duplicated()].iloc[0])} "
                        "twice: rerun Extract_Features.py")
    slides = pd.Series(csv_slide_names(list(table["File_Path"])), index=table.index)
    return [SlideInput(name, name, path, lambda rows=rows: csv_slide(rows, columns))
            for name, rows in sorted(table.groupby(slides, sort=False), key=lambda item: item[0])]


def csv_slide_names(paths):
    """Each tile's slide: the <slide> of a name <slide>_x<X>_y<Y>, else its first-level folder below the
    folder that holds every tile (that folder's name for tiles directly in it)."""
    parents = [os.path.dirname(os.path.abspath(p)) for p in paths]
    root = os.path.commonpath(parents)
    names = []
    for path, parent in zip(paths, parents):
        relative = os.path.relpath(parent, root).split(os.sep)[0]
        names.append(named_tile(path)[0] or (relative if relative != "." else os.path.basename(root)))
    return names


def named_tile(path):
    """(slide, x, y) of a tile file named <slide>_x<X>_y<Y> (as Prepare_Tiles.py and the slide mode name
    them); (None, None, None) for any other name."""
    try:
        return parse_tile_name(os.path.basename(path))
    except ValueError:
        return None, None, None


def csv_slide(rows, columns):
    """The SlideData of one slide's rows of a features CSV, sorted by tile path."""
    rows = rows.sort_values("File_Path", kind="stable")
    paths = list(rows["File_Path"])
    features = rows[columns].to_numpy(dtype=np.float32)
    if not np.isfinite(features).all():
        raise UserError("the features CSV holds NaN or infinite values for this slide: rerun Extract_Features.py")
    named = [named_tile(p) for p in paths]
    x = y = None
    if all(slide for slide, _, _ in named):
        x, y = (np.array([place[axis] for place in named], dtype=np.int64) for axis in (1, 2))
    return SlideData([printable(p) for p in paths], features, x, y, tile_paths=paths)
