"""Hostile checkpoints, round three, built on the fly: bytes changed after saving (a zip CRC mismatch, which
torch itself loads without a word), records claiming more bytes than the file, more data than a model of
this project holds, weight names that are not text, tensors on the 'meta' device, and a file the user may
not read. Each is refused in one line before torch reads it, or before a wrong number comes out."""
import builtins
import os
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

from Auto_encoder import AutoEncoder
from core import checkpoint_io
from core.errors import UserError
from conftest import REPO, script_env


@pytest.fixture
def state(tmp_path):
    torch.manual_seed(0)
    return AutoEncoder().state_dict()


def saved(tmp_path, obj, name="model.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def largest_record(path):
    """(offset of its data in the file, length) of the largest record of a torch zip archive."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda item: item.file_size)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
    return info.header_offset + 30 + name_length + extra_length, info.file_size


def refused(path, model=None):
    with pytest.raises(UserError) as info:
        checkpoint_io.load_weights(model or AutoEncoder(), path)
    message = str(info.value)
    assert "\n" not in message and repr(str(path)) in message
    return message


def test_zeroed_bytes_in_a_weight_record_are_found_by_the_crc(tmp_path, state):
    path = saved(tmp_path, state)
    start, length = largest_record(path)
    assert length > 1 << 17
    with open(path, "r+b") as handle:
        handle.seek(start + length // 2)
        handle.write(bytes(64 << 10))
    torch.load(path, map_location="cpu", weights_only=True)  # torch reads it as if nothing happened
    message = refused(path)
    assert "is damaged" in message and "CRC" in message and "re-copy or re-train" in message


def test_a_record_claiming_more_bytes_than_the_file_is_refused_before_it_is_read(tmp_path, state):
    path = saved(tmp_path, state)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda item: item.file_size)
    entry = data.index(b"PK\x01\x02")  # the first entry of the central directory
    while True:  # the central directory entry of that record: its sizes at offsets 20 and 24
        name_length = struct.unpack("<H", data[entry + 28:entry + 30])[0]
        if data[entry + 46:entry + 46 + name_length].decode() == info.filename:
            break
        extra, comment = struct.unpack("<HH", data[entry + 30:entry + 34])
        entry += 46 + name_length + extra + comment
    data[entry + 20:entry + 28] = struct.pack("<II", 1 << 30, 1 << 30)
    path.write_bytes(bytes(data))
    message = refused(path)
    assert "claims 1073741824 bytes, more than the whole file" in message


def test_more_data_than_a_checkpoint_of_the_model_holds_is_refused_before_torch_reads_it(tmp_path, state,
                                                                                        monkeypatch):
    path = saved(tmp_path, {**state, "extra": torch.zeros(1 << 20)})
    monkeypatch.setattr(checkpoint_io, "CHECKPOINT_COPIES", 0)
    monkeypatch.setattr(checkpoint_io, "SLACK_BYTES", 1 << 20)
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("torch.load was reached"))
    assert "MB of data, more than any checkpoint of this model holds" in refused(path)


def test_a_small_file_declaring_a_huge_storage_does_not_fill_the_memory(tmp_path):
    """The pickle says 2**28 floats where the file holds four: refused in one line, under a memory limit
    that reading them would exceed."""
    small = saved(tmp_path, {"w": torch.zeros(4)}, "small.pth")
    huge = tmp_path / "huge.pth"
    with zipfile.ZipFile(small) as source, zipfile.ZipFile(huge, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("data.pkl"):
                at = data.index(b"K\x04", data.index(b"cpu"))  # the storage's element count, 4
                data = data[:at] + b"J" + (1 << 28).to_bytes(4, "little") + data[at + 2:]
            target.writestr(info, data)
    # The limit: what the process maps once torch is imported, plus 512 MB (half what the storage would take).
    code = ("import resource, sys; from core import checkpoint_io; from core.cli import run_main; "
            "size = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024; "
            "resource.setrlimit(resource.RLIMIT_AS, (size + (512 << 20), size + (512 << 20))); "
            "run_main(lambda: checkpoint_io.load(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, str(huge)], cwd=REPO, env=script_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint") and "MemoryError" not in lines[0]


def test_weight_names_that_are_not_text_are_refused(tmp_path, state):
    keys = list(state)
    odd = {**{key: state[key] for key in keys[1:]}, 7: state[keys[0]]}
    assert "whose name is not text (int 7)" in refused(saved(tmp_path, odd))


def test_tensors_on_the_meta_device_are_refused(tmp_path):
    with torch.device("meta"):
        meta = AutoEncoder().state_dict()
    message = refused(saved(tmp_path, meta))
    assert "on the 'meta' device" in message and "use a trained checkpoint" in message


def test_a_checkpoint_the_user_may_not_read_is_a_permission_problem(tmp_path, state, monkeypatch):
    path = saved(tmp_path, state)
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", guarded)
    message = refused(path)
    assert "cannot be read (permission denied)" in message and "truncated" not in message


def test_a_checkpoint_without_read_permission_on_disk(tmp_path, state):
    if os.geteuid() == 0:
        pytest.skip("root reads a file whatever its mode; the monkeypatched test above covers this case")
    path = saved(tmp_path, state)
    path.chmod(0)
    try:
        assert "cannot be read (permission denied)" in refused(path)
    finally:
        path.chmod(0o644)


def test_an_intact_checkpoint_still_loads(tmp_path, state):
    path = saved(tmp_path, {"model_state_dict": state, "epoch": 3})
    model = AutoEncoder()
    assert checkpoint_io.load_weights(model, path)["epoch"] == 3
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())
