"""devices.py and runtime.py: which GPU each process takes (CUDA mocked: four GPUs), the built-in launcher,
and stdout that goes away while training runs."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from core import cli
from core.devices import select_device
from core import runtime
from core.errors import UserError
from conftest import REPO, script_env


@pytest.fixture
def four_gpus(monkeypatch):
    """A machine with four CUDA GPUs, as far as devices can tell; returns the ids passed to set_device."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for key in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    return chosen


def started_as(monkeypatch, local_rank, processes):
    """The environment torchrun --nproc_per_node=processes (or runtime.spawn) gives the process local_rank."""
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", str(processes))


@pytest.mark.parametrize("gpus", ["0", "0,1,2,3"])
def test_torchrun_gives_each_process_its_own_gpu(four_gpus, monkeypatch, gpus):
    """Config.py untouched (GPUs = "0") and torchrun --nproc_per_node=4: ranks 0..3 on cuda:0..3, not all on 0."""
    devices = []
    for local_rank in range(4):
        started_as(monkeypatch, local_rank, 4)
        devices.append(select_device(gpus))
    assert devices == [torch.device("cuda", i) for i in range(4)]
    assert four_gpus == [0, 1, 2, 3]


def test_listed_gpus_are_taken_in_their_order(four_gpus, monkeypatch):
    devices = []
    for local_rank in range(2):
        started_as(monkeypatch, local_rank, 2)
        devices.append(select_device("3,1"))
    assert devices == [torch.device("cuda", 3), torch.device("cuda", 1)]


def test_one_process_takes_the_listed_gpu(four_gpus):
    assert select_device("2") == torch.device("cuda", 2) and four_gpus == [2]


@pytest.mark.parametrize("gpus, processes, words", [
    ("0,1", 4, ["GPUs='0,1' lists 2 GPU(s)", "4 training processes", "--nproc_per_node=4"]),
    ("2", 2, ["GPUs='2' lists 1 GPU(s)", "2 training processes"]),
    ("0,0", 1, ["GPUs='0,0'", "once"]),
])
def test_gpus_contradicting_the_launch_is_one_line_naming_both(four_gpus, monkeypatch, gpus, processes, words):
    started_as(monkeypatch, 0, processes)
    with pytest.raises(UserError) as error:
        select_device(gpus)
    assert all(word in str(error.value) for word in words) and "\n" not in str(error.value)
    assert four_gpus == []


def test_local_rank_beyond_the_visible_gpus(four_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    started_as(monkeypatch, 5, 8)
    with pytest.raises(UserError, match=r"LOCAL_RANK=5: GPU 5 does not exist.*4 GPU\(s\) "
                                        r"\(CUDA_VISIBLE_DEVICES='4,5,6,7'\)"):
        select_device("0")


def test_builtin_launcher_starts_one_process_per_listed_gpu(four_gpus, monkeypatch):
    started = []
    monkeypatch.setattr(runtime, "spawn", lambda processes, target, args: started.append(processes) or [0] * processes)
    cli.launch_training("mse", ["--GPUs=0,1,2,3"])
    assert started == [4]
    devices = []
    for local_rank in range(4):  # the environment runtime.spawn gives each of them
        started_as(monkeypatch, local_rank, 4)
        devices.append(select_device("0,1,2,3"))
    assert devices == [torch.device("cuda", i) for i in range(4)]


# runtime.spawn's processes report their environment, then wait for a signal, as training does.
SPAWNING = """
import json, os, signal, sys, time
from core import runtime
from core.cli import run_main

def child(folder):
    got = []
    signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])  # spawn() starts them blocked
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")
    path = os.path.join(folder, os.environ["RANK"] + ".json")
    with open(path + ".tmp", "w") as handle:
        json.dump({key: os.environ[key] for key in keys}, handle)
    os.replace(path + ".tmp", path)
    while not got:
        time.sleep(0.05)
    sys.exit(128 + got[0])

if __name__ == "__main__":
    run_main(lambda: runtime.spawn(2, child, (sys.argv[1],)))
"""


def test_spawn_sets_each_process_up_and_passes_a_signal_on(tmp_path):
    """A SIGTERM to the launching process alone (kill PID) reaches both processes; it then exits 143."""
    script = tmp_path / "spawning.py"
    script.write_text(SPAWNING)
    process = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdin=subprocess.DEVNULL, text=True,
                               env=dict(script_env(), PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"{rank}.json").exists() for rank in (0, 1)):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip() == "interrupted"
    for rank in (0, 1):
        env = json.loads((tmp_path / f"{rank}.json").read_text())
        assert env == {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1"}


def test_stdout_whose_reader_left_is_not_an_error(tmp_path):
    code = ("from core import streams\n"
            "streams.keep_going_without_stdout()\n"
            "print('first', flush=True)\n"
            "for i in range(20000):\n"
            "    print('more output', i)\n"
            "streams.say('still here')\n"
            "open(r'%s', 'w').write('finished')\n" % (tmp_path / "done"))
    reader = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=script_env())
    assert reader.stdout.readline() == b"first\n"
    reader.stdout.close()  # as `| head -1` does
    stderr = reader.stderr.read().decode()
    assert reader.wait(timeout=60) == 0, stderr
    assert stderr == "" and (tmp_path / "done").read_text() == "finished"


FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$CALLS"
case "$*" in *Evaluation_MSE.py*) exit 3 ;; esac
exit 0
"""


def test_gpu_check_script_runs_every_step_and_reports_the_failed_one(tmp_path):
    """tools/gpu_check.sh runs where a GPU is; here with a stand-in python that records each command and
    fails Evaluation_MSE.py: every step still runs, and the failed one is named in the summary and exit status."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    env = {**script_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(tmp_path / "calls")}
    result = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), str(tmp_path / "check.log")],
                            capture_output=True, text=True, env=env, timeout=60)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert result.returncode == 1, result.stdout + result.stderr
    for loss in ("MSE", "SSIM"):
        assert any(f"Training_{loss}.py" in call and "--num_epochs=2" in call for call in calls)
        assert any(f"Training_{loss}.py" in call and "--num_epochs=3" in call for call in calls)
    assert any("Extract_Features.py" in call for call in calls) and any("benchmark.py" in call for call in calls)
    log = (tmp_path / "check.log").read_text()
    assert "=== Evaluation_MSE.py (the model just trained): exit 3" in log
    assert "gpu_check: 1 step(s) failed" in log and "Evaluation_MSE.py (the model just trained) (exit 3)" in log


WORKER_THREADS_AFTER_MAIN_LEFT = """
import sys, threading
from core import signals
signals.ignore_interrupts(0)
def report_as_the_resource_sharer_does(error):
    try:
        raise error
    except BaseException:
        sys.excepthook(*sys.exc_info())  # multiprocessing.resource_sharer's serving thread does this
def fail(error):
    raise error
for target in (report_as_the_resource_sharer_does, fail):
    thread = threading.Thread(target=target, args=(BrokenPipeError(32, "Broken pipe"),))
    thread.start()
    thread.join()
thread = threading.Thread(target=fail, args=(ValueError("a real bug"),))
thread.start()
thread.join()
raise ValueError("a real bug in the main thread")
"""


def test_a_loader_worker_stays_quiet_when_the_main_process_has_gone(tmp_path):
    """Interrupted mid-batch, the main process leaves while a worker's thread still passes it a tensor's
    file descriptor: that broken pipe is no traceback for the user, whichever hook reports it. Other errors
    still are."""
    result = subprocess.run([sys.executable, "-c", WORKER_THREADS_AFTER_MAIN_LEFT], cwd=REPO, env=script_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "BrokenPipeError" not in result.stderr, result.stderr
    assert result.stderr.count("ValueError: a real bug") == 2, result.stderr
