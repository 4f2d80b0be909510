"""Saving and loading checkpoints safely.

Saving is atomic (atomic.atomic_write), so a crash, a kill or a full disk at any moment leaves the
previous file intact. Loading uses weights_only=True, so a checkpoint can never run code,
and accepts our training checkpoints, bare state dicts, DataParallel/DDP ("module.") and
torch.compile ("_orig_mod.") prefixes, and float16 weights; anything else (sparse, integer, complex or
non-finite weights included) is one clear error.
"""
import os
import pickle
import stat
import warnings

import torch

from core.errors import UserError
from core.atomic import atomic_write

_PREFIXES = ("module.", "_orig_mod.")


def save(obj, path):
    """torch.save, atomically (atomic.atomic_write)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _sentence(text):
    """The first sentence of an error text, for a one-line message."""
    return text.strip().splitlines()[0].split(". ")[0][:200] if text.strip() else ""


def load(path):
    """torch.load(weights_only=True) with one-line errors for missing, damaged or unsafe files."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path!r} is a folder, not a .pth file: check the model path in Config.py")
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path!r} not found: check the model path in Config.py")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise UserError(f"checkpoint {path!r} is not a regular file (a pipe or a device): "
                        "check the model path in Config.py")
    if os.path.getsize(path) == 0:
        raise UserError(f"checkpoint {path!r} is empty (0 bytes): re-copy or re-train it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns of odd content (sparse tensors); our checks report it
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's text is a paragraph with terminal colour codes; its "WeightsUnpickler error" line names
        # what the file wanted to build (such as "GLOBAL builtins.open").
        text = str(err)
        marker = "WeightsUnpickler error: "
        detail = _sentence(text[text.index(marker) + len(marker):].split(" was not an allowed")[0]
                           if marker in text else text)
        if detail.startswith("Unsupported operand"):  # bytes that are no pickle opcode: a damaged file
            raise UserError(f"checkpoint {path!r} is truncated or not a PyTorch checkpoint ({detail}): "
                            "re-copy or re-train it")
        raise UserError(f"checkpoint {path!r} refused: it holds objects other than weights, which could run "
                        f"code when loaded ({detail}); only load checkpoints from sources you trust, "
                        "re-saved as plain state dicts")
    except Exception as err:  # a damaged file fails in many ways (zip reader, pickle opcodes, KeyError ...)
        raise UserError(f"checkpoint {path!r} is truncated or not a PyTorch checkpoint "
                        f"({type(err).__name__}: {_sentence(str(err))}): re-copy or re-train it")


def extract_state_dict(obj, path):
    """The model weights inside whatever layout the checkpoint has, with wrapper prefixes removed."""
    if isinstance(obj, dict):
        for key in ("model_state_dict", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path!r} holds no model weights (expected a state dict or a dict "
                        "with 'model_state_dict')")
    cleaned = {}
    for key, value in obj.items():
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def check_values(state, expected, path):
    """UserError unless every tensor of state is dense, of the kind (floating point or integer) of the
    model's tensor of that name, and finite: anything else would be converted silently, or give NaN metrics."""
    for key, value in state.items():
        kind = ("a sparse" if value.layout != torch.strided else "a quantized" if value.is_quantized
                else "a complex" if value.is_complex()
                else "an integer" if expected[key].is_floating_point() and not value.is_floating_point()
                else "a floating-point" if not expected[key].is_floating_point() and value.is_floating_point()
                else None)
        if kind:
            raise UserError(f"checkpoint {path!r} holds {kind} tensor {key} ({value.dtype}) where the AutoEncoder "
                            f"has a dense {expected[key].dtype} one: re-save it as a plain state dict of this model")
    broken = [key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:
        raise UserError(f"checkpoint {path!r} holds NaN or infinite weights ({len(broken)} tensors, first "
                        f"{broken[0]}): the training that wrote it diverged; use an earlier checkpoint")


def load_weights(model, path):
    """Load a checkpoint's weights into model, all or nothing. Returns the loaded object."""
    path = os.fspath(path)
    obj = load(path)
    state = extract_state_dict(obj, path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if extra:
        problems.append(f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
    if wrong:
        problems.append(f"wrong shape {', '.join(wrong[:2])}{' ...' if len(wrong) > 2 else ''}")
    if problems:
        raise UserError(f"checkpoint {path!r} does not fit the AutoEncoder ({'; '.join(problems)}): "
                        "is it a model of this project?")
    check_values(state, expected, path)
    model.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected}, strict=True)
    return obj
