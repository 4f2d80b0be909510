"""Faults of the machine and of the process's own streams, made on the fly: memory running out (in the forward
pass, while decoding, 16-bit transparent tiles), stdout and stderr closed or on a full device, shared memory
and open files running out with loader processes, and SIGTERM, SIGHUP or repeated Ctrl-C. Never a traceback,
a hang, or a good tile blamed; outputs are finished or the run stops with one line."""
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import openpyxl
import pytest
from PIL import Image

from conftest import REPO, script_env, tile_array

TILE = 32


def tiles(folder, count, size=TILE):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(tile_array(i % 4, size)).save(folder / f"t{i:03d}.png")
    return folder


def eval_args(model, workers, tile_size=TILE, batch=4):
    return ["--folder_path_test=tiles", f"--model_path_mse={model}", "--recon_output_mse=out",
            "--reconstruction_metrics_mse=out/metrics.xlsx", f"--tile_size={tile_size}", f"--batch_size_test={batch}",
            f"--num_workers={workers}", "--GPUs=cpu"]


def train_args(workers, tile_size=TILE, batch=4, epochs=1):
    return ["--folder_path_train=tiles", "--model_saved_location_mse=ck", "--training_loss_file_mse=ck/log.csv",
            f"--tile_size={tile_size}", f"--batch_size_train={batch}", f"--num_epochs={epochs}", "--GPUs=cpu",
            "--val_fraction=0.1", f"--num_workers={workers}", "--cache_tiles=false"]


def workbook_rows(path):
    return openpyxl.load_workbook(path, read_only=True)["Metrics"].max_row - 1


def start(command, cwd, preexec=None, **streams):
    """The command in its own process group, as a shell starts it; SIGINT and SIGHUP at their defaults, as in a
    terminal (the suite itself may run under nohup, which ignores SIGHUP)."""
    def child():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        if preexec:
            preexec()
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **streams}
    return subprocess.Popen(command, cwd=cwd, env=script_env(), stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=child, **streams)


def finish(process, timeout=150):
    """(exit code, stdout, stderr) of process; killed with its group, and the test failed, if it hangs."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"hung; stderr: {os.fsdecode(err or b'')[-2000:]}")
    return process.returncode, os.fsdecode(out or b""), os.fsdecode(err or b"")


def script(name):
    return [sys.executable, str(REPO / name)]


# ---- memory ---------------------------------------------------------------------------------------------------

def limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


@pytest.mark.parametrize("name, args", [("Evaluation_MSE.py", "eval"), ("Training_MSE.py", "train")])
def test_out_of_memory_in_the_network_is_one_line_saying_what_to_lower(tmp_path, model_file, name, args):
    """Tiles of 2048 px in batches of 8 need more than the 6 GB address space allowed: before, a
    DefaultCPUAllocator traceback, exit 1."""
    tiles(tmp_path / "tiles", 10)
    argv = eval_args(model_file, 0, 2048, 8) if args == "eval" else train_args(0, 2048, 8)
    code, out, err = finish(start(script(name) + argv, tmp_path, limit_memory))
    last = err.rsplit("\r", 1)[-1].strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err
    assert last.startswith("error: out of memory (") and "DefaultCPUAllocator" in last, err
    assert ("batch_size_test (now 8)" if args == "eval" else "batch_size_train (now 8)") in last
    assert "tile_size (now 2048)" in last and "num_workers (now 0)" in last
    assert "warning: skipped" not in out


# The script run as usual, but every image decode, in the loader processes too, fails for want of memory.
DECODE_OUT_OF_MEMORY = """
import os, runpy, sys
from PIL import ImageFile
def no_memory(self, *args):
    raise MemoryError()
ImageFile.ImageFile.load = no_memory
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_memory_running_out_while_decoding_is_not_a_damaged_tile(tmp_path, model_file, workers):
    """Before, every good tile was reported skipped ('MemoryError') and the run ended 'none could be read'."""
    tiles(tmp_path / "tiles", 6)
    command = [sys.executable, "-c", DECODE_OUT_OF_MEMORY, str(REPO / "Evaluation_MSE.py"),
               *eval_args(model_file, workers)]
    code, out, err = finish(start(command, tmp_path))
    assert code == 2 and "Traceback" not in err, err
    assert err.rsplit("\r", 1)[-1].strip().splitlines()[-1].startswith("error: out of memory ("), err
    assert "warning: skipped" not in out and "could be read" not in err


def png16(path, channels, side):
    """A 16-bit PNG of side x side, written by hand (Pillow writes none with alpha): channels 2 = grey + alpha
    (LA), 4 = RGBA; half transparent."""
    pixels = np.full((side, side, channels), 30000, dtype=">u2")
    pixels[..., -1] = 32768
    rows = np.concatenate([np.zeros((side, 1), np.uint8), pixels.reshape(side, -1).view(np.uint8)], axis=1)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 16, {2: 4, 4: 6}[channels], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 1))
                     + chunk(b"IEND", b""))
    return path


PEAK_OF_ONE_DECODE = """
import sys
sys.path.insert(0, sys.argv[1])
import Dataset
def peak():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
Dataset.load_image(sys.argv[2], 32)  # the decoders and allocators loaded
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # the peak resident size starts again from the present one
before = peak()
Dataset.load_image(sys.argv[3], 32)
print(peak() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures the peak through Linux's /proc")
def test_transparent_16_bit_tiles_decode_in_about_the_memory_of_rgb_ones(tmp_path):
    """Before, RGBA and LA went through three more copies of the image (convert, a white image, the composite,
    the RGB result): five times the peak of an RGB tile of the same size."""
    side = 2048
    small = tmp_path / "small.png"
    Image.new("RGBA", (8, 8), (1, 2, 3, 100)).save(small)
    Image.new("RGB", (side, side), (200, 100, 50)).save(tmp_path / "rgb.png")
    peaks = {}
    for name, path in [("rgb", tmp_path / "rgb.png"), ("rgba16", png16(tmp_path / "rgba16.png", 4, side)),
                       ("la16", png16(tmp_path / "la16.png", 2, side))]:
        done = subprocess.run([sys.executable, "-c", PEAK_OF_ONE_DECODE, str(REPO), str(small), str(path)],
                              capture_output=True, text=True, env=script_env(), timeout=120)
        assert done.returncode == 0, done.stderr
        peaks[name] = int(done.stdout)  # KiB
    assert peaks["rgb"] > side * side * 3 // 1024, peaks  # the measurement sees at least the decoded image
    # Now the decoded image and the white one it is pasted on: twice an RGB tile's (five times before).
    assert peaks["rgba16"] < 2.5 * peaks["rgb"] and peaks["la16"] < 2.5 * peaks["rgb"], peaks


# ---- the process's own output streams ------------------------------------------------------------------------

def closing(*fds):
    def close():
        for fd in fds:
            os.close(fd)
    return close


STREAM_CASES = {
    "stdout on a full device": (dict(stdout="/dev/full"), None),
    "stderr on a full device": (dict(stderr="/dev/full"), None),
    "stdout and stderr closed": ({}, (1, 2)),
}


@pytest.mark.parametrize("case", list(STREAM_CASES))
def test_evaluation_finishes_its_workbook_whatever_its_streams_are(tmp_path, model_file, case):
    """Before: a traceback and no workbook (full stdout, closed stdout), or a hang with loader workers (stderr
    closed or full: tqdm's failed write left the workers running, which ignore the exit's SIGTERM)."""
    tiles(tmp_path / "tiles", 8)
    paths, fds = STREAM_CASES[case]
    files = {key: open(path, "wb") for key, path in paths.items()}
    try:
        process = start(script("Evaluation_MSE.py") + eval_args(model_file, 2), tmp_path,
                        closing(*fds) if fds else None, **files)
        code, _, _ = finish(process)
    finally:
        for handle in files.values():
            handle.close()
    assert code == 0
    assert workbook_rows(tmp_path / "out" / "metrics.xlsx") == 8
    assert len(list((tmp_path / "out").glob("*_comparison.png"))) == 8


def test_training_finishes_with_stdout_full_and_stderr_closed(tmp_path):
    """Before: OSError (No space left on device) at the first message, exit 1, no model."""
    tiles(tmp_path / "tiles", 10)
    with open("/dev/full", "wb") as full:
        code, _, _ = finish(start(script("Training_MSE.py") + train_args(2), tmp_path, closing(2), stdout=full))
    assert code == 0
    assert (tmp_path / "ck" / "Final_Model_AE_MSE.pth").is_file() and (tmp_path / "ck" / "log.csv").is_file()


# ---- shared memory and open files ------------------------------------------------------------------------------

# The script run as usual, but shared memory cannot be had in the loader processes: the error torch gives in a
# container whose /dev/shm is full.
NO_SHARED_MEMORY = """
import os, runpy, sys
import torch
def no_shm(*args, **kwargs):
    raise RuntimeError("unable to allocate shared memory(shm) for file </torch_1_1>: No space left on device (28)")
def in_loader_processes():
    for name in ("_share_fd_cpu_", "_share_filename_cpu_"):
        setattr(torch.UntypedStorage, name, no_shm)
    for name in ("_new_shared_fd_cpu", "_new_shared_filename_cpu"):
        setattr(torch.UntypedStorage, name, classmethod(no_shm))
os.register_at_fork(after_in_child=in_loader_processes)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_shared_memory_running_out_is_one_line_not_a_hang(tmp_path, model_file):
    """Before: the worker's error was printed by its queue thread and the evaluation waited forever."""
    tiles(tmp_path / "tiles", 8)
    command = [sys.executable, "-c", NO_SHARED_MEMORY, str(REPO / "Evaluation_MSE.py"), *eval_args(model_file, 2)]
    code, _, err = finish(start(command, tmp_path), timeout=120)
    last = err.rsplit("\r", 1)[-1].strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err
    assert last.startswith("error: the loader processes ran out of shared memory (") and "--shm-size" in last, err


def test_a_low_open_file_limit_uses_fewer_loader_processes_not_a_hang(tmp_path, model_file):
    """ulimit -n 16 with two loader processes. Before: 'Too many open files' in a worker's queue thread, and the
    evaluation waited forever."""
    tiles(tmp_path / "tiles", 8)
    code, out, err = finish(start(script("Evaluation_MSE.py") + eval_args(model_file, 2), tmp_path,
                                  lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))), timeout=120)
    assert code == 0, err
    warnings = [line for line in out.splitlines() if line.startswith("warning: the open-file limit")]
    assert len(warnings) == 1 and "using 0" in warnings[0] and "ulimit -n" in warnings[0], out
    assert workbook_rows(tmp_path / "out" / "metrics.xlsx") == 8


# ---- signals ---------------------------------------------------------------------------------------------------

def signal_when(process, ready, signum, times=1):
    """Send signum (times, 50 ms apart) to process's group once ready() holds (the run is under way)."""
    deadline = time.monotonic() + 120
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    for _ in range(times):
        os.killpg(process.pid, signum)
        time.sleep(0.05)


@pytest.mark.parametrize("signum, times", [(signal.SIGTERM, 1), (signal.SIGHUP, 1), (signal.SIGINT, 5)],
                         ids=["SIGTERM", "SIGHUP", "Ctrl-C five times"])
def test_evaluation_stopped_by_a_signal_says_interrupted(tmp_path, model_file, signum, times):
    """SIGTERM or SIGHUP to the process group with loader workers; before, killed without a word (-15, -1).
    Ctrl-C pressed repeatedly: no KeyboardInterrupt traceback while it stops."""
    tiles(tmp_path / "tiles", 300)
    process = start(script("Evaluation_MSE.py") + eval_args(model_file, 2, batch=1), tmp_path)
    signal_when(process, lambda: len(list((tmp_path / "out").glob("*.png"))) >= 3, signum, times)
    code, _, err = finish(process)
    assert code == 128 + signum, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.rsplit("\r", 1)[-1] == "interrupted\n", err
    assert not (tmp_path / "out" / "metrics.xlsx").exists()


@pytest.mark.parametrize("bar_shown", [False, True], ids=["as the loader starts", "with the progress bar shown"])
def test_feature_extraction_stopped_by_sigterm_says_interrupted(tmp_path, model_file, bar_shown):
    """The interrupt's line is the last one on stderr, whether the progress bar was on screen or not yet."""
    tiles(tmp_path / "tiles", 400)
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as stderr:
        process = start(script("Extract_Features.py") + [
            "--folder_path_features=tiles", f"--model_path_ssim={model_file}", "--features_output=f/features.csv",
            f"--tile_size={TILE}", "--batch_size_test=1", "--num_workers=2", "--GPUs=cpu"], tmp_path,
            stderr=stderr)
    first = process.stdout.readline()  # "Extracting encoder features ...": the loader starts next
    counted = re.compile(rb"\| *[1-9][0-9]*/400 ")  # the bar has counted tiles
    signal_when(process, (lambda: counted.search(log.read_bytes())) if bar_shown else (lambda: True), signal.SIGTERM)
    code, _, _ = finish(process)
    err = log.read_bytes().decode()  # not read_text: its universal newlines would turn the bar's \r into \n
    assert first.startswith(b"Extracting"), first
    assert code == 143 and "Traceback" not in err, err
    assert not bar_shown or counted.search(err.encode()), err
    assert err.rsplit("\r", 1)[-1] == "interrupted\n", err
    assert not (tmp_path / "f" / "features.csv").exists()


def test_training_stopped_by_sighup_saves_its_interrupt_checkpoint(tmp_path):
    """The terminal closed or the ssh session dropped. Before, killed at once (-1), the epoch lost."""
    tiles(tmp_path / "tiles", 40)
    process = start(script("Training_MSE.py") + train_args(2, batch=2, epochs=3), tmp_path)
    first = process.stdout.readline()
    while first and not first.startswith(b"Training on"):
        first = process.stdout.readline()
    time.sleep(1.0)
    signal_when(process, lambda: True, signal.SIGHUP)
    code, _, err = finish(process)
    assert code == 129, err
    assert (tmp_path / "ck" / "Model_AE_interrupt.pth").is_file(), err
    # Training says where it saved the run, as for SIGINT and SIGTERM, and no 'interrupted' line follows.
    assert err.rstrip().endswith("run the same command again to resume."), err
