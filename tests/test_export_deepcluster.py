"""tools/export_deepcluster.py: every checkpoint layout this project writes becomes the bare float32 state dict
DeepCluster++ loads strictly as Encoders/AE_CRC.pth, with the source's encoder features."""
import pytest
import torch

from Auto_encoder import AutoEncoder
from core import checkpoint_io
from tests.conftest import REPO


def trained_like(seed):
    """An AutoEncoder whose BatchNorm statistics are not the initial ones, as after training."""
    torch.manual_seed(seed)
    model = AutoEncoder()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.num_batches_tracked.fill_(37)
    return model


def layouts(model):
    """{name: object torch.save writes} for each checkpoint layout of this project."""
    state = model.state_dict()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    periodic = {"epoch": 5, "model_state_dict": state, "optimizer_state_dict": optimizer.state_dict(),
                "scaler_state_dict": {}, "best_val_loss": 0.1, "settings": {"tile_size": 256}, "history": [],
                "loss": 0.2}
    return {
        "Model_AE_epoch_005.pth": periodic,
        "Model_AE_interrupt.pth": periodic | {"step": 3, "loss_sum": 1.0, "loss_count": 4, "world": 1},
        "Final_Model_AE_SSIM.pth": state,
        "Best_Model_AE_SSIM.pth": state,
        "ddp.pth": {f"module.{key}": value for key, value in state.items()},
        "ddp_periodic.pth": periodic | {"model_state_dict": {f"module.{k}": v for k, v in state.items()}},
        "half.pth": {key: value.half() if value.is_floating_point() else value for key, value in state.items()},
    }


def features(model, images):
    with torch.no_grad():
        return model.eval().embed(images)


@pytest.mark.parametrize("name", list(layouts(AutoEncoder())))
def test_every_layout_exports_to_a_strict_fp32_state_dict(tmp_path, name):
    from tools.export_deepcluster import export_deepcluster
    source = tmp_path / name
    torch.save(layouts(trained_like(1))[name], source)
    out = tmp_path / "Encoders" / "AE_CRC.pth"
    export_deepcluster(str(source), str(out))
    state = torch.load(out, weights_only=True)
    assert list(state) == list(AutoEncoder().state_dict())
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    exported = AutoEncoder()
    exported.load_state_dict(state, strict=True)
    expected = AutoEncoder()
    checkpoint_io.load_weights(expected, source)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(features(exported, images), features(expected, images))
    if name != "half.pth":  # the float32 sources: the very weights the training had
        assert torch.equal(features(exported, images), features(trained_like(1), images))


def test_script_on_the_shipped_half_precision_model(tmp_path, run_script):
    source = REPO / "sample_models" / "model_auto_encoder_reconstruction_ssim.pth"
    result = run_script("tools/export_deepcluster.py", source, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote Encoders/AE_CRC.pth" in result.stdout
    exported = AutoEncoder()
    exported.load_state_dict(torch.load(tmp_path / "Encoders" / "AE_CRC.pth", weights_only=True), strict=True)
    expected = AutoEncoder()
    checkpoint_io.load_weights(expected, source)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(features(exported, images), features(expected, images))


def test_a_file_that_is_no_model_is_one_error_line(tmp_path, run_script):
    torch.save({"epoch": 3}, tmp_path / "nothing.pth")
    result = run_script("tools/export_deepcluster.py", "nothing.pth", "out.pth", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: checkpoint 'nothing.pth' holds no model weights")
    assert not (tmp_path / "out.pth").exists()
