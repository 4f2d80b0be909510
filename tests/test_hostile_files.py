"""Hostile input files and file names, built on the fly: what is not a regular file, larger than any tile,
damaged image data, another file type under an image name, names with newlines, escape sequences or bytes
that are not UTF-8, outputs inside the input folder, and Ctrl-C with loader workers. Every script finishes
(or stops with one line), skips what it cannot read with one warning, and shows every name escaped."""
import io
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import openpyxl
import pandas as pd
import pytest
from PIL import Image

import Extract_Features
from core import evaluation_engine
from core.errors import UserError
from core.cli import load_config
from conftest import REPO, script_env, tile_array

TILE = 32
SPARSE_BYTES = 30 << 30  # 30 GB that take no disk space


def limit_memory():
    """Run in the child before it starts: a script that tried to read a huge file or /dev/zero whole gets a
    MemoryError instead of exhausting a shared machine. SIGINT is restored to its default, as in a terminal,
    even when the test runner was started with it ignored (in the background, under nohup)."""
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(script, *args, cwd, env=(), timeout=180):
    done = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd,
                          env={**script_env(), **dict(env)}, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=timeout, preexec_fn=limit_memory)
    done.stdout, done.stderr = (os.fsdecode(stream) for stream in (done.stdout, done.stderr))
    return done


def eval_args(folder, model, out, workers=0):
    return [f"--folder_path_test={folder}", f"--model_path_mse={model}", f"--recon_output_mse={out}",
            f"--reconstruction_metrics_mse={out}/metrics.xlsx", f"--tile_size={TILE}", "--batch_size_test=4",
            f"--num_workers={workers}", "--GPUs=cpu"]


def warnings_of(stdout):
    return [line for line in stdout.splitlines() if line.startswith("warning: skipped ")]


def png_of(seed, size=TILE):
    """An 8-bit RGB PNG of size x size: the common tile."""
    buffer = io.BytesIO()
    Image.fromarray(tile_array(seed, size)).save(buffer, "PNG")
    return buffer.getvalue()


def corrupt_pngs(seed):
    """{name: bytes} of three PNGs of tile size whose image data is damaged, each in another way."""
    data = png_of(seed)
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8:start - 4])[0]
    flipped = bytearray(data)
    flipped[start + length // 2] ^= 0x10  # one bit of the compressed rows
    bad_crc = bytearray(data)
    bad_crc[start + length] ^= 0x01
    rows = bytearray(zlib.decompress(data[start:start + length]))
    rows[(TILE * 3 + 1) * 5] = 7  # row 5's filter type: PNG has five (0 to 4)
    body = zlib.compress(bytes(rows))
    chunk = struct.pack(">I", len(body)) + b"IDAT" + body + struct.pack(">I", zlib.crc32(b"IDAT" + body))
    bad_filter = data[:start - 8] + chunk + data[start + length + 4:]
    return {"flipped_bit.png": bytes(flipped), "bad_crc.png": bytes(bad_crc), "bad_filter.png": bad_filter}


def fake_ghostscript(folder):
    """A `gs` on PATH that leaves a marker when run and fails, as a broken Ghostscript would."""
    folder.mkdir()
    marker = folder / "gs_ran"
    (folder / "gs").write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
    (folder / "gs").chmod(0o755)
    return marker


def test_evaluation_skips_what_is_no_tile_without_reading_it(tmp_path, model_file):
    folder = tmp_path / "tiles"
    folder.mkdir()
    for i in range(3):
        (folder / f"good{i}.png").write_bytes(png_of(i))
    for name, data in corrupt_pngs(9).items():
        (folder / name).write_bytes(data)
    os.mkfifo(folder / "pipe.png")  # reading it would wait for a writer forever
    os.symlink("/dev/zero", folder / "zero_device.png")  # endless
    with open(folder / "sparse.png", "wb") as handle:
        handle.truncate(SPARSE_BYTES)
    (folder / "postscript.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nshowpage\n")
    marker = fake_ghostscript(tmp_path / "bin")

    result = run("Evaluation_MSE.py", *eval_args("tiles", model_file, "out"), cwd=tmp_path,
                 env={"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not marker.exists(), "an external program ran on a file named .png"
    reasons = {line.split(": ", 1)[0].rsplit(os.sep, 1)[-1]: line.split(": ", 1)[1]
               for line in (w[len("warning: skipped "):] for w in warnings_of(result.stdout))}
    assert sorted(reasons) == sorted(["flipped_bit.png", "bad_filter.png", "pipe.png", "zero_device.png",
                                      "sparse.png", "postscript.png"]), result.stdout
    assert "named pipe" in reasons["pipe.png"] and "device" in reasons["zero_device.png"]
    assert "larger than any tile" in reasons["sparse.png"]
    rows = pd.read_excel(tmp_path / "out" / "metrics.xlsx", sheet_name="Metrics")
    # A bad CRC alone leaves the pixels readable: Pillow decodes them, as a viewer does.
    assert sorted(os.path.basename(p) for p in rows["Image Path"]) == ["bad_crc.png", "good0.png", "good1.png",
                                                                        "good2.png"]


def test_quick_start_runs_clean_of_deprecation_warnings(tmp_path, model_file):
    (tmp_path / "tiles").mkdir()
    for i in range(2):
        (tmp_path / "tiles" / f"t{i}.png").write_bytes(png_of(i))
    result = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", str(REPO / "Evaluation_MSE.py"),
                             *eval_args("tiles", model_file, "out")], cwd=tmp_path, env=script_env(),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Deprecat" not in result.stdout + result.stderr, result.stderr
    assert not warnings_of(result.stdout)


def hostile_names(folder):
    """Good tiles whose names hold a newline, a tab, a terminal escape sequence and bytes that are not
    UTF-8 (a subfolder copied from an old system), and one unreadable file with an escape sequence."""
    names = ["plain.png", "new\nline.png", "tab\tname.png", "esc\x1b[31mred.png",
             os.path.join(os.fsdecode(b"caf\xe9"), "t.png"), os.path.join("sub", "a,\"b\".png")]
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(png_of(i))
    (folder / "bad\x1b[2J.png").write_bytes(b"not a picture")
    return names


def test_names_of_any_bytes_reach_every_output_escaped(tmp_path, model_file):
    folder = tmp_path / "tiles"
    folder.mkdir()
    names = hostile_names(folder)
    escaped = {os.path.join("tiles", name): os.path.join("tiles", name).encode("utf-8", "surrogateescape")
               .decode("utf-8", "backslashreplace").replace("\n", "\\n").replace("\t", "\\t")
               .replace("\x1b", "\\x1b") for name in names}

    evaluation = run("Evaluation_MSE.py", *eval_args("tiles", model_file, "out"), cwd=tmp_path)
    features = run("Extract_Features.py", "--folder_path_features=tiles", f"--model_path_ssim={model_file}",
                   "--features_output=features/features.csv", f"--tile_size={TILE}", "--num_workers=0",
                   "--GPUs=cpu", cwd=tmp_path)
    for result in (evaluation, features):
        assert result.returncode == 0, result.stdout + result.stderr
        assert "\x1b" not in result.stdout + result.stderr.replace("\x1b[A", "")  # tqdm's own cursor-up only
        assert warnings_of(result.stdout) == [f"warning: skipped {os.path.join('tiles', 'bad')}\\x1b[2J.png: "
                                              "not a readable image (empty, truncated or another file type)"]

    book = openpyxl.load_workbook(tmp_path / "out" / "metrics.xlsx")
    assert sorted(row[0].value for row in book["Metrics"].iter_rows(min_row=2)) == sorted(escaped.values())
    assert len(list((tmp_path / "out").rglob("*_comparison.png"))) == len(names)

    csv_bytes = (tmp_path / "features" / "features.csv").read_bytes()
    csv_bytes.decode("utf-8")  # valid UTF-8, strictly
    table = pd.read_csv(tmp_path / "features" / "features.csv")
    lines = (tmp_path / "features" / "features_paths.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(lines) == len(table) == len(np.load(tmp_path / "features" / "features.npy")) == len(names)
    assert lines == list(table["File_Path"]) and sorted(lines) == sorted(escaped.values())
    with Image.open(tmp_path / "features" / "features_pca.png") as plot:
        plot.verify()


def test_outputs_inside_the_input_folder_are_not_read_back(tmp_path, model_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("tiles", "more_tiles"):
        (tmp_path / name).mkdir()
        for i in range(3):
            (tmp_path / name / f"t{i}.png").write_bytes(png_of(i))
    evaluation = load_config(eval_args("tiles", model_file, "tiles/recon"))
    features = load_config(["--folder_path_features=more_tiles", f"--model_path_ssim={model_file}",
                            "--features_output=more_tiles/features.csv", f"--tile_size={TILE}", "--num_workers=0",
                            "--GPUs=cpu"])
    for _ in range(2):  # the second run finds the first run's outputs inside the folder
        assert len(evaluation_engine.evaluate(evaluation, "mse")) == 3
        assert len(Extract_Features.extract_features(features)[1]) == 3
    assert len(pd.read_excel(tmp_path / "tiles" / "recon" / "metrics.xlsx", sheet_name="Metrics")) == 3

    with pytest.raises(UserError, match="is the image folder itself"):
        evaluation_engine.evaluate(load_config(eval_args("tiles", model_file, "tiles")), "mse")


# Runs a script as its command line would, with one addition: the first process forked from it (a loader
# worker) sends Ctrl-C to the whole process group at once, as a user's Ctrl-C while the workers start does.
CTRL_C_AT_WORKER_START = """
import os, runpy, signal, sys
marker, sys.argv = sys.argv[1], sys.argv[2:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
def interrupt():
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.killpg(0, signal.SIGINT)
os.register_at_fork(after_in_child=interrupt)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("when", ["while the workers start", "while they run"])
def test_ctrl_c_with_loader_workers_is_one_line(tmp_path, model_file, when):
    folder = tmp_path / "tiles"
    folder.mkdir()
    data = png_of(0)
    for i in range(200):
        (folder / f"t{i:03d}.png").write_bytes(data)
    args = eval_args("tiles", model_file, "out", workers=2)
    args[args.index("--batch_size_test=4")] = "--batch_size_test=1"
    marker = tmp_path / ("interrupted" if when == "while the workers start" else "never")
    # Its own process group, as a shell gives a command: Ctrl-C signals the whole group, workers included.
    process = subprocess.Popen([sys.executable, "-c", CTRL_C_AT_WORKER_START, str(marker),
                                str(REPO / "Evaluation_MSE.py"), *args], cwd=tmp_path, env=script_env(),
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True, preexec_fn=limit_memory)
    if when == "while they run":
        marker.touch()
    try:
        deadline = time.monotonic() + 120
        while when == "while they run" and len(list((tmp_path / "out").glob("*.png"))) < 3 \
                and time.monotonic() < deadline:
            time.sleep(0.1)  # the workers are running once the first PNGs appear
        if when == "while they run":
            os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    stderr = os.fsdecode(stderr)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert stderr.rsplit("\r", 1)[-1] == "interrupted\n", stderr
    assert not list((tmp_path / "out").glob("*.tmp")) and not (tmp_path / "out" / "metrics.xlsx").exists()
