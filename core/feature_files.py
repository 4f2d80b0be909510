"""The features CSV that DeepCluster++ and spreadsheets read: Feature_1..Feature_512,File_Path, one row a
tile. Written by both modes of Extract_Features.py."""
import csv

FEATURE_DIM = 512
FEATURE_COLUMNS = [f"Feature_{i}" for i in range(1, FEATURE_DIM + 1)]
FLOAT_FORMAT = "%.9g"  # nine significant digits read back to the identical float32


def write_csv(path, features, names):
    """features (N x 512) and the tile names as the CSV. The 512 numbers go out with one %-format per row,
    faster than DataFrame.to_csv; the name goes through the csv module's quoting."""
    row_format = ",".join([FLOAT_FORMAT] * FEATURE_DIM)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(FEATURE_COLUMNS + ["File_Path"])
        for row, name in zip(features, names):
            handle.write(row_format % tuple(row.tolist()) + ",")
            writer.writerow([name])
