"""Saving and loading checkpoints safely.

Saving is atomic (temporary file in the same folder, then rename), so a crash or kill at any moment
leaves the previous file intact. Loading uses weights_only=True, so a checkpoint can never run code,
and accepts our training checkpoints, bare state dicts, DataParallel/DDP ("module.") and
torch.compile ("_orig_mod.") prefixes, and float16 weights; anything else is one clear error.
"""
import os
import pickle
import tempfile
import zipfile

import torch

from cli import UserError

_PREFIXES = ("module.", "_orig_mod.")


def atomic_write(path, write):
    """Call write(tmp_path), then move tmp_path onto path in one step."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save(obj, path):
    """torch.save, atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load(path):
    """torch.load(weights_only=True) with one-line errors for missing, damaged or unsafe files."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} not found: check the model path in Config.py")
    if os.path.getsize(path) == 0:
        raise UserError(f"checkpoint {path!r} is empty (0 bytes): re-copy or re-train it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).splitlines()[0] if "weights_only" in str(err) or "Weights only" in str(err) else "damaged"
        raise UserError(f"checkpoint {path!r} refused: it holds objects other than weights ({reason[:200]}); "
                        "only load checkpoints from sources you trust, re-saved as plain state dicts")
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise UserError(f"checkpoint {path!r} is truncated or not a PyTorch checkpoint "
                        f"({str(err).splitlines()[0][:200] if str(err) else type(err).__name__})")


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


def load_weights(model, path):
    """Load a checkpoint's weights into model, all or nothing. Returns the loaded object."""
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
    model.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected}, strict=True)
    return obj
