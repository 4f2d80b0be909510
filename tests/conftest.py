"""Shared fixtures: running the scripts as a user does, and making small image folders."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLE_TILES = REPO / "input_images"

# The test machines are small and shared: one thread per process keeps timings predictable.
torch.set_num_threads(1)


def script_env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    return env


def run_repo_script(script, *args, cwd, timeout=300):
    """python <repo>/script --key=value ... in cwd, no stdin -> CompletedProcess (text, captured)."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=script_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run_script():
    """run_script("Training_MSE.py", "--key=value", ..., cwd=folder) -> CompletedProcess (text, captured)."""
    return run_repo_script


def tile_array(seed, size):
    """A smooth, textured RGB uint8 image: coloured blobs plus fine noise, so SSIM and MSE are informative."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    noise = rng.normal(0, 12, (size, size, 3))
    return np.clip(np.asarray(coarse, dtype=np.float64) + noise, 0, 255).astype(np.uint8)


@pytest.fixture
def make_tiles():
    """make_tiles(folder, ["a.png", "sub/b.jpg", ...], size=64) writes generated tiles and returns their paths."""
    def make(folder, names, size=64):
        paths = []
        for index, name in enumerate(names):
            path = Path(folder) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(tile_array(index, size)).save(path, quality=95)  # quality: lossy formats only
            paths.append(path)
        return paths
    return make


@pytest.fixture(scope="session")
def sample_tiles():
    """The shipped held-out tiles as (path, H x W x 3 uint8 array), sorted by name."""
    paths = sorted(SAMPLE_TILES.glob("*.png"))
    assert len(paths) == 16, f"expected the 16 sample tiles in {SAMPLE_TILES}"
    return [(path, np.asarray(Image.open(path).convert("RGB"))) for path in paths]


@pytest.fixture(scope="session")
def model_file(tmp_path_factory):
    """A freshly initialised AutoEncoder's state dict saved as a .pth file (seed 0)."""
    from Auto_encoder import AutoEncoder
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pth"
    torch.save(AutoEncoder().state_dict(), path)
    return path
