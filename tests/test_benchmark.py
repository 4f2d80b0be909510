"""benchmark.py runs end to end at tiny sizes and reports every section with a finite ratio. Its timings
are not checked: a shared test machine says nothing about speed."""
import math
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SAMPLE_TILES, script_env

SPEED_SECTIONS = ("1.", "1b.", "2.", "3a.", "3b.", "4.", "4b.", "5.")
NUMBER = r"\d+(\.\d+)?"


def run_benchmark(cwd, *args):
    # One thread: two would fight the other test processes for the same cores.
    return subprocess.run([sys.executable, str(REPO / "benchmark.py"), "--threads=1",
                           f"--test_folder={SAMPLE_TILES}", *map(str, args)],
                          cwd=cwd, env=script_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=240)


def table(text, header):
    """The rows (lists of cells) of the markdown table whose header line starts with header."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_quick_speed_benchmark_reports_every_section(tmp_path):
    out = tmp_path / "results" / "bench.md"
    result = run_benchmark(tmp_path, "--quick", f"--output={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert text in result.stdout  # the printed report is the written one
    assert "benchmark.py --threads=1" in text and " --quick " in text and "- CPU: " in text and "torch " in text
    assert "target" not in text.lower() and "met?" not in text
    rows = {row[0].split()[0]: row for row in table(text, "| section |")}
    assert set(SPEED_SECTIONS) <= set(rows), rows.keys()
    for section in SPEED_SECTIONS:
        ours, baseline, ratio = rows[section][1], rows[section][3], rows[section][4]
        assert re.fullmatch(NUMBER, ours) and re.fullmatch(NUMBER, baseline), rows[section]
        assert float(ours) > 0 and float(baseline) > 0 and re.fullmatch(NUMBER + "[x%]", ratio), rows[section]
    assert "training script by the wall clock" in rows["5."][0] and rows["5."][2] == "bare training step"
    assert "slide to features" in rows["4b."][0] and rows["4b."][2] == "encoder only"
    # The pipelines with the network replaced: evaluation and features, in 0, 1 and 2 loader processes.
    around = table(text, "| network replaced by a no-op |")
    assert sorted((row[0].split(",")[0], row[2]) for row in around) == sorted(
        (f"6. {job}", str(workers)) for job in ("evaluation", "feature extraction") for workers in (0, 1, 2))
    for row in around:
        assert math.isfinite(float(row[3])) and float(row[3]) > 0 and float(row[4]) > 0, row
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # temporary outputs cleaned up


def test_step_only_reports_the_training_step_rows(tmp_path):
    result = run_benchmark(tmp_path, "--quick", "--step_only")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row[0].split()[0]: row for row in table(result.stdout, "| section |")}
    assert sorted(rows) == ["1b.", "2.", "2b."], rows.keys()
    # Row 2's reference ran in a child process of its own (benchmarks/child.py), 2b's in the benchmark's.
    assert rows["2."][2] == "reference, own process, malloc as shipped" and rows["2b."][2] == "reference, our malloc"
    for row in (rows["2."], rows["2b."]):
        assert float(row[1]) > 0 and float(row[3]) > 0 and row[1] == rows["1b."][1], row
    assert "--step_only" in result.stdout and sorted(p.name for p in tmp_path.iterdir()) == []


def test_quality_benchmark_on_a_tiny_training_folder(tmp_path, make_tiles):
    make_tiles(tmp_path / "tiles", [f"t{i}.png" for i in range(4)], size=128)
    result = run_benchmark(tmp_path, "--quality", "--images=32", "--crop=64", "--batch=8", "--train_folder=tiles")
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert "- Reference:" in text and "- Ours:" in text and "cosine" in text  # the recipes are stated
    assert "over 4 steps" in text and "batch 8." in text  # ours: the same 32 images in batches of 8
    rows = {row[0]: row for row in table(text, "| recipe |")}
    for recipe in ("reference", "ours"):
        assert rows[recipe][1] == "32"
        for cell in rows[recipe][3:]:
            assert re.fullmatch(NUMBER, cell), rows[recipe]
    assert re.fullmatch("[+-]" + NUMBER, rows["ours - reference"][3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiles"]  # nothing written without --output


def test_bad_settings_are_one_line_errors(tmp_path):
    missing = run_benchmark(tmp_path, "--quality", "--train_folder=missing")
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "Prepare_Tiles.py" in missing.stderr, missing.stderr
    precision = run_benchmark(tmp_path, "--mixed_precision=fast")
    assert precision.returncode == 2
    assert precision.stderr.count("\n") == 1 and "mixed_precision" in precision.stderr, precision.stderr


def test_gpu_rows_without_a_gpu_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: --devices=cuda runs")
    result = run_benchmark(tmp_path, "--quick", "--devices=cuda")
    assert result.returncode == 2 and result.stderr.strip() == "error: --devices=cuda: torch sees no CUDA GPU here"
