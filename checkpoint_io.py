"""Saving and loading checkpoints safely.

Saving is atomic (temporary file in the same folder, then rename), so a crash or kill at any moment
leaves the previous file intact. Loading uses weights_only=True, so a checkpoint can never run code,
and accepts our training checkpoints, bare state dicts, DataParallel/DDP ("module.") and
torch.compile ("_orig_mod.") prefixes, and float16 weights; anything else is one clear error.
"""
import os
import pickle
import tempfile

import torch

from cli import UserError

_PREFIXES = ("module.", "_orig_mod.")
_UMASK = os.umask(0)  # read once at import: os.umask can only be read by setting it, racing other threads
os.umask(_UMASK)


def atomic_write(path, write):
    """Call write(tmp_path), then move tmp_path onto path in one step."""
    if os.path.isdir(path):
        raise UserError(f"cannot write {path!r}: it is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes the file private (0600); results should be shareable
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


def _sentence(text):
    """The first sentence of an error text, for a one-line message."""
    return text.strip().splitlines()[0].split(". ")[0][:200] if text.strip() else ""


def load(path):
    """torch.load(weights_only=True) with one-line errors for missing, damaged or unsafe files."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path!r} is a folder, not a .pth file: check the model path in Config.py")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} not found: check the model path in Config.py")
    if os.path.getsize(path) == 0:
        raise UserError(f"checkpoint {path!r} is empty (0 bytes): re-copy or re-train it")
    try:
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
    model.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected}, strict=True)
    return obj
