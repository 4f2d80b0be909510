"""Timing several works side by side with torch.utils.benchmark, and running the engines quietly."""
import contextlib
import io
import statistics
import sys


def side_by_side(works, rounds, min_run_time):
    """Median seconds per call of each work, {name: (callable, torch threads)} -> {name: seconds}.

    The works take turns, round after round (each round a blocked_autorange, whose first call is an
    untimed warm-up), so that load from other processes on the machine falls on all of them alike and
    their ratios stay meaningful on a busy machine."""
    # Imported here: torch.utils.benchmark imports cpp_extension, which warns on a machine with a CUDA
    # toolkit but no GPU; a run that stops at a bad setting should print its one error line only.
    from torch.utils.benchmark import Timer
    timers = {name: Timer("work()", globals={"work": work}, num_threads=threads)
              for name, (work, threads) in works.items()}
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

