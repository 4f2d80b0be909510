"""Checkpoints that are malicious, damaged, of another model, or saved in another layout: loading is all
or nothing, never runs code, and a bad file is one line on stderr naming it."""
import builtins
import io

import pytest
import torch
from PIL import Image
from torch import nn

from core import checkpoint_io
from Auto_encoder import AutoEncoder
from core.errors import UserError
from conftest import tile_array
from test_bad_inputs import TILE, error_line, eval_args, run


class RunsCode:
    """Pickles as a call of open(marker, "w"): loading it unsafely creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def fp16_exact_state(seed):
    """A state dict with random weights and BatchNorm statistics whose float values survive a round trip
    through float16, so every layout, float16 included, must give bit-identical outputs."""
    torch.manual_seed(seed)
    model = AutoEncoder()
    state = model.state_dict()
    for key, value in state.items():
        if value.is_floating_point():
            noise = torch.rand_like(value) + 0.5 if key.endswith("running_var") else torch.randn_like(value) * 0.05
            state[key] = noise.half().float()
    return state


@pytest.fixture(scope="module")
def state():
    return fp16_exact_state(1)


def outputs(model):
    torch.manual_seed(2)
    with torch.no_grad():
        return model.eval()(torch.rand(2, 3, TILE, TILE))


def snapshot(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def layouts(state):
    prefixed = {f"module.{k}": v for k, v in state.items()}
    model = AutoEncoder()
    optimizer = torch.optim.Adam(model.parameters())
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()  # so the optimizer state holds tensors, as a real training checkpoint does
    return {
        "bare state dict": state,
        "DataParallel/DDP": prefixed,
        "torch.compile": {f"_orig_mod.{k}": v for k, v in state.items()},
        "training dict": {"epoch": 3, "model_state_dict": state, "optimizer_state_dict": optimizer.state_dict(),
                          "loss": 0.01},
        "training dict from DDP": {"epoch": 3, "model_state_dict": prefixed, "loss": 0.01},
        "float16": {k: v.half() if v.is_floating_point() else v for k, v in state.items()},
    }


def test_every_accepted_layout_gives_the_same_outputs(tmp_path, state):
    reference = AutoEncoder()
    reference.load_state_dict(state)
    expected = outputs(reference)
    for name, obj in layouts(state).items():
        path = tmp_path / "model.pth"
        torch.save(obj, path)
        model = AutoEncoder()
        checkpoint_io.load_weights(model, path)
        assert all(v.dtype == reference.state_dict()[k].dtype for k, v in model.state_dict().items()), name
        assert torch.equal(outputs(model), expected), name


def test_legacy_serialization_loads(tmp_path, state):
    torch.save(state, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    model = AutoEncoder()
    checkpoint_io.load_weights(model, tmp_path / "old.pth")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def mismatches(state):
    missing = {k: v for k, v in state.items() if k != "decoder.15.bias"}
    wrong_shape = dict(state)
    wrong_shape["decoder.15.weight"] = torch.zeros(3, 32, 5, 5)  # a late key: a naive load copies all before it
    return {
        "other architecture": (nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(4, 4)).state_dict(),
                               ["missing encoder.0.weight", "unexpected 0.weight"]),
        "missing key": (missing, ["missing decoder.15.bias"]),
        "extra key": ({**state, "head.weight": torch.zeros(2)}, ["unexpected head.weight"]),
        "wrong shape": (wrong_shape, ["wrong shape decoder.15.weight (3, 32, 5, 5) vs (3, 32, 3, 3)"]),
    }


@pytest.mark.parametrize("case", ["other architecture", "missing key", "extra key", "wrong shape", "sparse",
                                  "integer", "complex", "NaN", "Inf", "float step counter"])
def test_mismatch_names_the_keys_and_leaves_the_model_untouched(tmp_path, state, case):
    obj, expected_words = {**mismatches(state), **hostile_weights(state)}[case]
    path = tmp_path / "other.pth"
    torch.save(obj, path)
    model = AutoEncoder()
    before = snapshot(model)
    with pytest.raises(UserError) as caught:
        checkpoint_io.load_weights(model, path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    for words in expected_words:
        assert words in message, message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "partial load"


def damaged_files(tmp_path, state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    files = {"empty": b"", "truncated": data[:len(data) // 2], "header only": data[:100],
             "not a checkpoint": b"hello world\n" * 10, "a PNG renamed": b"\x89PNG\r\n\x1a\n" + bytes(200)}
    for name, content in files.items():
        (tmp_path / f"{name}.pth").write_bytes(content)
    return {name: tmp_path / f"{name}.pth" for name in files}


def test_damaged_files_are_one_line_errors(tmp_path, state):
    for name, path in damaged_files(tmp_path, state).items():
        with pytest.raises(UserError) as caught:
            checkpoint_io.load_weights(AutoEncoder(), path)
        assert "\n" not in str(caught.value) and str(path) in str(caught.value), name
        assert ("empty" if name == "empty" else "truncated or not a PyTorch checkpoint") in str(caught.value), name
    with pytest.raises(UserError, match="is a folder"):
        checkpoint_io.load(str(tmp_path))


def test_checkpoint_that_would_run_code_is_refused_in_process(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"model_state_dict": RunsCode(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="refused") as caught:
        checkpoint_io.load_weights(AutoEncoder(), tmp_path / "evil.pth")
    assert "builtins.open" in str(caught.value) or "io.open" in str(caught.value)
    assert not marker.exists()


@pytest.fixture(scope="module")
def one_tile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("one_tile")
    Image.fromarray(tile_array(0, TILE)).save(folder / "a.png")
    return folder


def test_evaluation_refuses_a_checkpoint_that_would_run_code(tmp_path, one_tile):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    torch.save({"epoch": 1, "model_state_dict": RunsCode(marker)}, evil)
    line = error_line(run("Evaluation_MSE.py", *eval_args(one_tile, evil, tmp_path / "out"), cwd=tmp_path))
    assert str(evil) in line and "refused" in line
    assert not marker.exists()
    # The file is a live payload: an unsafe load would have run it.
    torch.load(evil, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("case", ["truncated", "empty", "wrong shape"])
def test_evaluation_with_a_bad_checkpoint_is_one_error(tmp_path, one_tile, state, case):
    if case == "wrong shape":
        path = tmp_path / "other.pth"
        torch.save(mismatches(state)[case][0], path)
    else:
        path = damaged_files(tmp_path, state)[case]
    result = run("Evaluation_MSE.py", *eval_args(one_tile, path, tmp_path / "out"), cwd=tmp_path)
    line = error_line(result)
    assert str(path) in line
    assert not (tmp_path / "out" / "metrics.xlsx").exists()


def hostile_weights(state):
    """Checkpoints of the right keys and shapes whose tensors are no usable weights; words of their errors."""
    key = "encoder.0.weight"
    return {
        "sparse": ({**state, key: state[key].to_sparse()}, ["sparse"]),
        "integer": ({**state, key: state[key].mul(100).to(torch.int32)}, ["integer"]),
        "complex": ({**state, key: state[key].to(torch.complex64)}, ["complex"]),
        "NaN": ({**state, key: state[key].clone().index_fill_(0, torch.tensor([3]), float("nan"))},
                ["NaN or infinite"]),
        "Inf": ({**state, "decoder.15.bias": torch.full((3,), float("inf"))}, ["NaN or infinite"]),
        "float step counter": ({**state, "encoder.1.num_batches_tracked": torch.tensor(1.5)}, ["floating-point"]),
    }


def test_evaluation_with_a_diverged_model_is_one_error(tmp_path, one_tile, state):
    path = tmp_path / "diverged.pth"
    torch.save(hostile_weights(state)["NaN"][0], path)
    result = run("Evaluation_MSE.py", *eval_args(one_tile, path, tmp_path / "out"), cwd=tmp_path)
    line = error_line(result)
    assert str(path) in line and "NaN or infinite weights" in line and "diverged" in line
    assert not (tmp_path / "out" / "metrics.xlsx").exists()


def test_evaluation_stops_when_the_output_is_not_finite(tmp_path, one_tile, monkeypatch):
    """Finite weights can still give NaN (an overflow in half precision): no workbook of NaN means."""
    from core import evaluation_engine
    from core.cli import load_config
    from core.inference import reconstruct

    def overflowing(*args):
        originals, reconstructions, metrics = reconstruct(*args)
        return originals, reconstructions, {name: value * float("nan") for name, value in metrics.items()}

    monkeypatch.setattr(evaluation_engine, "reconstruct", overflowing)
    torch.save(AutoEncoder().state_dict(), tmp_path / "model.pth")
    cfg = load_config(eval_args(one_tile, tmp_path / "model.pth", tmp_path / "out"))
    with pytest.raises(UserError, match="NaN or infinite output for 1 tile"):
        evaluation_engine.evaluate(cfg, "mse")
    assert not (tmp_path / "out" / "metrics.xlsx").exists()
