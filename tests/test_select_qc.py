"""The quality check measured as tools/qc_auroc.py measures it: artefact tiles (blurred, pen, folded) made
from tissue tiles of the shipped sample slide, their reconstruction error under the shipped SSIM model, and
the AUROC of each score. Only what holds for any model is asserted; the AUROCs are printed (pytest -s)."""
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, script_env

sys.path.insert(0, str(REPO / "tools"))
import qc_auroc  # noqa: E402  (tools/ is not a package)

SLIDE = REPO / "sample_slides" / "cmu_small_region.svs"
MODEL = REPO / "sample_models" / "model_auto_encoder_reconstruction_ssim.pth"
CLEAN_TILES = 6


@pytest.fixture(scope="module")
def clean_tiles():
    return qc_auroc.slide_tiles(str(SLIDE))[:CLEAN_TILES]


def high_frequency(tile):
    return np.abs(np.diff(tile.astype(np.float64), axis=1)).mean()


def test_artefacts_are_what_they_say(clean_tiles):
    made = qc_auroc.artefacts(clean_tiles, seed=0)
    for clean, blurred, pen, folded in zip(*(made[k] for k in ("clean", "blurred", "pen", "folded"))):
        assert high_frequency(blurred) < 0.5 * high_frequency(clean)
        inked = (np.abs(pen.astype(int) - clean.astype(int)).sum(axis=2) > 0)
        assert 0.03 < inked.mean() < 0.25  # a stroke, not a wash over the tile
        changed = (folded != clean).any(axis=2)
        assert 0.1 < changed.mean() < 0.35 and folded[changed].mean() < 0.6 * clean[changed].mean()


def test_scores_and_auroc_per_artefact(clean_tiles):
    frame = qc_auroc.score_table(clean_tiles, str(MODEL))
    assert set(frame.columns) == {"Kind", "Tile", "QC_MSE", "QC_SSIM", "QC_Score"}
    assert (frame.groupby("Kind").size() == CLEAN_TILES).all() and frame[["QC_MSE", "QC_SSIM"]].notna().all().all()
    table = qc_auroc.auroc_table(frame)
    print("\n" + table.to_string(index=False, float_format="%.3f"))
    assert list(table["Artefact"]) == ["blurred", "pen", "folded"]
    assert table[["AUROC_MSE", "AUROC_1-SSIM", "AUROC_QC"]].stack().between(0, 1).all()
    clean = frame["Kind"] == "clean"
    assert abs(np.median(frame.loc[clean, "QC_Score"])) < 1e-9  # referenced to the clean tiles


def test_tool_runs_as_a_user_runs_it(tmp_path):
    (tmp_path / "tiles").mkdir()
    for path in sorted((REPO / "input_images").glob("*.png"))[:2]:
        shutil.copy(path, tmp_path / "tiles" / path.name)
    result = subprocess.run([sys.executable, str(REPO / "tools" / "qc_auroc.py"), "tiles",
                             str(MODEL), str(tmp_path / "scores.csv")], cwd=tmp_path, env=script_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "AUROC_QC" in result.stdout and (tmp_path / "scores.csv").stat().st_size > 0
