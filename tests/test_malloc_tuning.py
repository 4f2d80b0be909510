"""The malloc switch Config.keep_freed_memory: what it does to a process, when "auto" turns it on, and that
the scripts' entry point (cli.run_main) applies it, with the command line's value."""
import subprocess
import sys

import pytest

from core import cli
from core import malloc_tuning
from conftest import REPO, script_env

# A block of argv[1] MB, touched, then freed: kept by the process with the setting, given back without it.
RSS_PROBE = ("import sys\n"
             "from core import malloc_tuning\n"
             "applied = malloc_tuning.keep_freed_memory()\n"
             "def rss():\n"
             "    with open('/proc/self/statm') as handle:\n"
             "        return int(handle.read().split()[1]) * 4096 / 2**20\n"
             "before = rss()\n"
             "block = bytearray(int(sys.argv[1]) * 2**20)\n"
             "del block\n"
             "print(applied, round(rss() - before))\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("block_mb", [20, 200])  # 200 MB: above the largest mmap threshold glibc accepts
def test_freed_memory_is_kept_unless_the_user_tuned_malloc(block_mb):
    def run(**env):
        environment = {k: v for k, v in script_env().items() if not k.startswith("MALLOC_")
                       and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
        result = subprocess.run([sys.executable, "-c", RSS_PROBE, str(block_mb)], cwd=REPO, env={**environment, **env},
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        applied, kept_mb = result.stdout.split()
        return applied == "True", int(kept_mb)

    applied, kept_mb = run()
    assert applied and kept_mb >= block_mb - 1
    for env in ({"MALLOC_TOP_PAD_": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}):
        applied, kept_mb = run(**env)
        assert not applied and kept_mb <= 1, env


@pytest.mark.parametrize("setting, cuda, applied", [
    (True, True, True), (True, False, True), (False, False, False), (False, True, False),
    ("auto", False, True), ("auto", True, False),
])
def test_auto_keeps_freed_memory_only_without_cuda(monkeypatch, setting, cuda, applied):
    calls = []
    monkeypatch.setattr(malloc_tuning, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(malloc_tuning.torch.cuda, "is_available", lambda: cuda)
    assert malloc_tuning.apply(setting) is applied
    assert malloc_tuning.apply(setting, cuda_available=cuda) is applied
    assert len(calls) == 2 * applied


@pytest.mark.parametrize("argv, expected", [([], "auto"), (["--keep_freed_memory=off"], False),
                                            (["--keep_freed_memory=ON"], True)])
def test_run_main_applies_the_switch_before_main(monkeypatch, argv, expected):
    events = []
    monkeypatch.setattr(malloc_tuning, "apply", lambda setting: events.append(("apply", setting)))
    cli.run_main(lambda cfg: events.append(("main", cfg.keep_freed_memory)), "tiles", argv=argv)
    assert events == [("apply", expected), ("main", expected)]


def test_run_main_without_a_script_leaves_malloc_alone(monkeypatch):
    """benchmark.py runs the reference with glibc's malloc as it ships, and applies the switch itself."""
    events = []
    monkeypatch.setattr(malloc_tuning, "apply", lambda setting: events.append("apply"))
    cli.run_main(lambda: events.append("main"))
    assert events == ["main"]
