"""benchmark.py runs end to end in its small modes and writes a complete table. Its timings are not
checked: a shared test machine says nothing about speed."""
import re
import subprocess
import sys

from conftest import REPO, SAMPLE_TILES, script_env

SPEED_SECTIONS = ("1.", "1b.", "2.", "3a.", "3b.", "4.")
NUMBER = r"[+-]?\d+(\.\d+)?"


def run_benchmark(cwd, *args):
    # One thread: two would fight the other test processes for the same cores.
    return subprocess.run([sys.executable, str(REPO / "benchmark.py"), "--threads=1",
                           f"--test_folder={SAMPLE_TILES}", *map(str, args)],
                          cwd=cwd, env=script_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=240)


def table_rows(text):
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| section")]


def test_quick_speed_benchmark_writes_every_section(tmp_path):
    out = tmp_path / "results" / "bench.md"
    result = run_benchmark(tmp_path, "--quick", f"--output={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "| section | reference (img/s) | ours (img/s) | ratio | target | met? |" in text
    assert "benchmark.py --threads=1" in text and "CPU:" in text and "torch " in text
    rows = {row[0].split()[0]: row for row in table_rows(text)}
    assert set(SPEED_SECTIONS) <= set(rows), rows.keys()
    for section in SPEED_SECTIONS:
        ratio = rows[section][3]
        assert re.fullmatch(NUMBER + "[x%]", ratio), f"section {section}: ratio {ratio!r}"
        assert rows[section][5] in ("yes", "no")
    assert text in result.stdout  # the printed table is the written one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # temporary outputs cleaned up


def test_quality_benchmark_on_a_tiny_training_folder(tmp_path, make_tiles):
    make_tiles(tmp_path / "tiles", [f"t{i}.png" for i in range(4)], size=128)
    out = tmp_path / "quality.md"
    result = run_benchmark(tmp_path, "--quality", "--images=32", "--crop=64", "--train_folder=tiles",
                           f"--output={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "- Reference:" in text and "- Ours:" in text and "cosine" in text  # the recipes are stated
    rows = {row[0]: row for row in table_rows(text)}
    for recipe in ("reference", "ours"):
        assert rows[recipe][1] == "32"
        for cell in rows[recipe][3:]:
            assert re.fullmatch(NUMBER, cell), rows[recipe]
    assert re.fullmatch(NUMBER, rows["ours - reference"][3])
    assert "Target: ours at least 5 dB better" in text


def test_quality_benchmark_without_training_tiles_is_one_line_error(tmp_path):
    result = run_benchmark(tmp_path, "--quality", "--train_folder=missing")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Prepare_Tiles.py" in result.stderr, result.stderr

