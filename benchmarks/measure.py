"""Timing several works side by side with torch.utils.benchmark, and running the engines quietly."""
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def side_by_side(works, rounds, min_run_time):
    """Median seconds per call of each work, {name: (callable, torch threads) or InChild} -> {name: seconds}.

    The works take turns, round after round (each round a blocked_autorange, whose first call is an
    untimed warm-up), so that load from other processes on the machine falls on all of them alike and
    their ratios stay meaningful on a busy machine."""
    # Imported here: torch.utils.benchmark imports cpp_extension, which warns on a machine with a CUDA
    # toolkit but no GPU; a run that stops at a bad setting should print its one error line only.
    from torch.utils.benchmark import Timer
    timers = {name: work if isinstance(work, InChild) else Timer("work()", globals={"work": work[0]},
                                                                 num_threads=work[1])
              for name, work in works.items()}
    times = {name: [] for name in works}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name] += timer.blocked_autorange(min_run_time=min_run_time).times
    return {name: statistics.median(values) for name, values in times.items()}


def quietly(work):
    """work() with the engines' prints and progress bars held back; shown only when it fails."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            return work()
    except BaseException:
        print(buffer.getvalue(), file=sys.stderr)
        raise


class InChild:
    """A work timed in a child process (benchmarks/child.py: the reference's training step with glibc's
    malloc as it ships), taking its turns in side_by_side's rounds like a work of this process. A context
    manager: the child ends with the with block."""

    def __init__(self, spec):
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.child", json.dumps(spec)], cwd=REPO,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._answer("ready")

    def _answer(self, word):
        for line in self.process.stdout:
            if line.startswith(word):
                return line[len(word):].strip()
        raise RuntimeError(f"benchmarks/child.py stopped (exit code {self.process.wait()}); its error is above")

    def blocked_autorange(self, min_run_time):
        self.process.stdin.write(f"{min_run_time}\n")
        self.process.stdin.flush()
        return types.SimpleNamespace(times=json.loads(self._answer("times")))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.stdin.close()
        self.process.wait()
