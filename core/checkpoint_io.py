"""Saving and loading checkpoints safely.

Saving is atomic (atomic.atomic_write), so a crash, a kill or a full disk at any moment leaves the
previous file intact. Loading uses weights_only=True, so a checkpoint can never run code,
and accepts our training checkpoints, bare state dicts, DataParallel/DDP ("module.") and
torch.compile ("_orig_mod.") prefixes, and float16 weights; anything else (sparse, integer, complex, meta
or non-finite weights, keys that are not text included) is one clear error. Before torch reads a checkpoint
its archive is verified (verify_archive): every record's CRC-32, and no record larger than the file or
than a checkpoint of the model can hold, since torch itself checks neither.
"""
import os
import pickle
import stat
import warnings
import zipfile
import zlib

import torch

from core.errors import UserError
from core.atomic import atomic_write
from core.names import printable

_PREFIXES = ("module.", "_orig_mod.")
# A training checkpoint holds the weights and Adam's two moments; bound what a checkpoint of a model may
# declare by that many copies in float64, plus room for the run's history and random states.
CHECKPOINT_COPIES = 4
SLACK_BYTES = 64 << 20


def save(obj, path):
    """torch.save, atomically (atomic.atomic_write)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _sentence(text):
    """The first sentence of an error text, for a one-line message."""
    return text.strip().splitlines()[0].split(". ")[0][:200] if text.strip() else ""


def _open(path):
    """path opened for reading; a file the user may not read is a permission problem, not a damaged file."""
    try:
        return open(path, "rb")
    except PermissionError:
        raise UserError(f"checkpoint {path!r} cannot be read (permission denied): fix its permissions "
                        "(chmod u+r) or copy it to a file you may read") from None


def _read_through(archive, info):
    with archive.open(info) as record:
        while record.read(1 << 20):  # zipfile compares the record's CRC-32 once its last byte is read
            pass


def verify_archive(handle, path, limit_bytes=None):
    """UserError unless the zip archive of a checkpoint (torch's format since 1.6) is whole: no record
    claims more bytes than the file holds or, with limit_bytes, more than limit_bytes in all (checked before
    any record is read), and every record matches its CRC-32. A file that is no zip archive (torch's legacy
    format) is left to torch.load."""
    size = os.fstat(handle.fileno()).st_size
    try:
        archive = zipfile.ZipFile(handle)
    except zipfile.BadZipFile:
        return
    with archive:
        infos = archive.infolist()
        for info in infos:
            if info.header_offset + info.compress_size > size or info.compress_size > size:
                raise UserError(f"checkpoint {path!r} is damaged: its record {info.filename} claims "
                                f"{info.compress_size} bytes, more than the whole file ({size}): "
                                "re-copy or re-train it")
        declared = sum(info.file_size for info in infos)
        if limit_bytes is not None and declared > limit_bytes:
            raise UserError(f"checkpoint {path!r} declares {declared / 1e6:.0f} MB of data, more than any checkpoint "
                            f"of this model holds ({limit_bytes / 1e6:.0f} MB at most): is it a model of this project?")
        for info in infos:
            try:
                _read_through(archive, info)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
                raise UserError(f"checkpoint {path!r} is damaged ({_sentence(str(err))}): its bytes changed after "
                                "it was written; re-copy or re-train it") from None


def load(path, limit_bytes=None):
    """torch.load(weights_only=True) with one-line errors for missing, unreadable, damaged or unsafe files;
    the archive is verified first (verify_archive, with limit_bytes)."""
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
    with _open(path) as handle:
        verify_archive(handle, path, limit_bytes)
        handle.seek(0)
        return _torch_load(handle, path)


def _torch_load(handle, path):
    """torch.load of an open checkpoint, its failures as one-line errors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns of odd content (sparse tensors); our checks report it
            return torch.load(handle, map_location="cpu", weights_only=True)
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
    odd = next((key for key in obj if not isinstance(key, str)), None)
    if odd is not None:
        raise UserError(f"checkpoint {path!r} holds a weight whose name is not text ({type(odd).__name__} "
                        f"{printable(repr(odd))[:60]}): is it a model of this project?")
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
        if value.is_meta:
            raise UserError(f"checkpoint {path!r} holds tensor {key} on the 'meta' device, which has no values: "
                            "it was saved from a model never filled with weights; use a trained checkpoint")
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
    expected = model.state_dict()
    obj = load(path, limit_bytes=CHECKPOINT_COPIES * sum(t.numel() * 8 for t in expected.values()) + SLACK_BYTES)
    state = extract_state_dict(obj, path)
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
