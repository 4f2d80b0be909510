"""The CUDA paths, run when a GPU is present (tools/gpu_check.sh runs this file): training steps in bf16 and
in fp16 with a GradScaler, resuming across precisions, no wait for the GPU inside a training step,
evaluation and features on the GPU, and the GPU each launched process takes."""
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import Extract_Features
from core import evaluation_engine
from core import devices
from core import losses
from core import training_engine
from core import training_state
from Auto_encoder import AutoEncoder
from core.errors import UserError
from core.cli import load_config
from conftest import SAMPLE_TILES, tile_array

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda", 0)
HAS_BF16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def uint8_tiles(count, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


def step_parts(amp_dtype):
    torch.manual_seed(0)
    model = AutoEncoder().to(CUDA, memory_format=torch.channels_last).train()
    optimizer = training_state.adam(model, CUDA, 1e-4, 1e-5)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    return model, optimizer, scaler


@pytest.mark.parametrize("amp_dtype", [
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not HAS_BF16, reason="no bf16")), torch.float16],
    ids=["bf16", "fp16"])
def test_two_training_steps(amp_dtype):
    model, optimizer, scaler = step_parts(amp_dtype)
    before = model.encoder[0].weight.detach().clone()
    images = uint8_tiles(8).to(CUDA)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(2):
        loss = training_engine.forward_loss(model, images, losses.LOSSES["mse"], 32, True, generator,
                                            amp_dtype)
        training_engine.optimizer_step(loss, optimizer, scaler)
        losses.append(loss.item())
    assert all(math.isfinite(value) and 0 < value < 1 for value in losses)
    assert not torch.equal(before, model.encoder[0].weight)
    if amp_dtype == torch.float16:
        assert scaler.is_enabled() and scaler.get_scale() > 0


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16 if HAS_BF16 else None, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("loss_name", ["mse", "ssim"])
def test_no_wait_for_the_gpu_inside_a_training_step(loss_name, amp_dtype):
    """bf16 (or fp32 without bf16) and fp16 with its GradScaler, augmentation and crop on: a step never
    synchronises with the host (fused Adam takes the scaler's overflow flag on the device)."""
    model, optimizer, scaler = step_parts(amp_dtype)
    images = uint8_tiles(8).pin_memory().to(CUDA, non_blocking=True)
    generator = torch.Generator().manual_seed(1)
    tracker = training_engine.EpochLoss(CUDA)

    def step(number):
        loss = training_engine.forward_loss(model, images, losses.LOSSES[loss_name], 32, True, generator,
                                            amp_dtype)
        training_engine.optimizer_step(loss, optimizer, scaler)
        tracker.add(loss, len(images), number)

    step(1)  # the first step sets things up once (cuDNN, the allocator, the optimizer's state)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(2)
        step(3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert tracker.count == 24 and math.isfinite(tracker.total.item())


def make_tiles(folder, count=8, size=64):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(tile_array(index, size)).save(folder / f"tile_{index}.png")
    return folder


def gpu_settings(tiles, out, epochs, *extra):
    return [f"--folder_path_train={tiles}", "--tile_size=64", "--train_crop_size=32", "--batch_size_train=4",
            f"--num_epochs={epochs}", "--save_interval=1", "--num_workers=2", "--GPUs=0", "--val_fraction=0.25",
            f"--model_saved_location_mse={out / 'checkpoints'}", f"--training_loss_file_mse={out / 'loss.csv'}",
            *extra]


@pytest.mark.parametrize("first, then", [("bf16", "fp16"), ("fp16", "bf16"), ("fp16", "off")])
def test_resume_in_another_precision(tmp_path, capsys, first, then):
    if "bf16" in (first, then) and not HAS_BF16:
        pytest.skip("no bf16 on this GPU")
    tiles = make_tiles(tmp_path / "tiles")
    training_engine.train(load_config(gpu_settings(tiles, tmp_path, 1, f"--mixed_precision={first}")), "mse")
    assert torch.backends.cudnn.benchmark
    history = training_engine.train(load_config(gpu_settings(tiles, tmp_path, 2, f"--mixed_precision={then}")), "mse")
    out = capsys.readouterr().out
    assert "Resuming from" in out and f"in {'fp32' if then == 'off' else then}" in out
    assert [row["Epoch"] for row in history] == [1, 2]
    final = torch.load(tmp_path / "checkpoints" / "Final_Model_AE_MSE.pth", weights_only=True)
    assert all(torch.isfinite(value).all() for value in final.values() if value.is_floating_point())


@pytest.fixture(scope="module")
def sample_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("samples")
    for path in sorted(SAMPLE_TILES.glob("*.png"))[:6]:
        shutil.copy(path, folder / path.name)
    return folder


def inference_settings(folder, out, device):
    return [f"--folder_path_test={folder}", f"--folder_path_features={folder}", f"--GPUs={device}",
            "--mixed_precision=off", "--num_workers=2", "--batch_size_test=4",
            f"--recon_output_mse={out / 'recon'}", f"--reconstruction_metrics_mse={out / 'metrics.xlsx'}",
            f"--features_output={out / 'features' / 'features.csv'}"]


def test_evaluation_on_the_gpu_matches_the_cpu(sample_folder, tmp_path):
    rows = {device: evaluation_engine.evaluate(
        load_config(inference_settings(sample_folder, tmp_path / device, device)), "mse") for device in ("0", "cpu")}
    assert [row["Image Path"] for row in rows["0"]] == [row["Image Path"] for row in rows["cpu"]]
    for gpu, cpu in zip(rows["0"], rows["cpu"]):
        assert gpu["PSNR"] == pytest.approx(cpu["PSNR"], abs=0.01)
        assert gpu["SSIM"] == pytest.approx(cpu["SSIM"], abs=1e-4)
    assert len(list((tmp_path / "0" / "recon").glob("*.png"))) == len(rows["0"])


def test_features_on_the_gpu_match_the_cpu(sample_folder, tmp_path):
    results = {device: Extract_Features.extract_features(load_config(inference_settings(sample_folder,
                                                                                       tmp_path / device, device)))
               for device in ("0", "cpu")}
    (gpu, gpu_paths), (cpu, cpu_paths) = results["0"], results["cpu"]
    assert gpu_paths == cpu_paths and gpu.shape == (6, 512)
    assert np.allclose(gpu, cpu, rtol=1e-3, atol=1e-4)


def test_local_rank_chooses_the_gpu(monkeypatch):
    count = torch.cuda.device_count()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(count))
    monkeypatch.setenv("LOCAL_RANK", str(count - 1))
    assert devices.select_device("0") == torch.device("cuda", count - 1)
    assert torch.cuda.current_device() == count - 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(count + 1))
    monkeypatch.setenv("LOCAL_RANK", str(count))
    with pytest.raises(UserError, match=f"GPU {count} does not exist"):
        devices.select_device("0")
    torch.cuda.set_device(0)


def test_cached_tiles_move_to_the_gpu_and_give_the_same_batches_without_a_wait(tmp_path):
    from core import tile_cache
    from Dataset import ImageFolder
    dataset = ImageFolder(make_tiles(tmp_path / "tiles", count=10), 64)
    cached = tile_cache.start_cache(dataset, True, say=lambda line: None).dataset(workers=0, progress=False)
    host = list(tile_cache.CachedBatches(cached, range(10), 4))
    lines = []
    on_gpu = tile_cache.place(cached, CUDA, lines.append)
    assert on_gpu.images.is_cuda and "moved to cuda:0" in lines[0], lines
    batches = iter(tile_cache.CachedBatches(on_gpu, range(10), 4))
    next(batches)  # the first gather sets things up once (the pinned-memory pool)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rest = list(batches)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for (images, paths, skipped), (gathered, gathered_paths, gathered_skipped) in zip(host[1:], rest):
        assert gathered.is_cuda and torch.equal(images, gathered.cpu())
        assert paths == gathered_paths and skipped == gathered_skipped
