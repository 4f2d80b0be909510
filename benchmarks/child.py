"""The reference's training step timed in a process of its own, as the reference runs: glibc's malloc as
it ships (benchmark.py tunes malloc in its own process, as our scripts do, and the setting is
process-wide). benchmark.py starts it through measure.InChild and asks for one round at a time.

    python -m benchmarks.child SPEC      SPEC: JSON of state, paths, tile, threads, seed, device
    then, on stdin, one line per round (its min_run_time in seconds); on stdout, "times <JSON list>"
"""
import json
import sys

import torch


def main():
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    # Imported here: torch.utils.benchmark imports cpp_extension, which warns on stderr where CUDA is absent.
    from torch.utils.benchmark import Timer
    from benchmarks import reference
    device = torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    model = reference.network(torch.load(spec["state"], weights_only=True), device).train()
    optim = reference.optimizer(model)
    transform = reference.train_transform(spec["tile"])
    timer = Timer("work()", num_threads=spec["threads"], globals={
        "work": lambda: reference.train_step(model, optim, spec["paths"], transform, device)})
    print("ready", flush=True)
    for line in sys.stdin:
        print("times", json.dumps(timer.blocked_autorange(min_run_time=float(line)).times), flush=True)


if __name__ == "__main__":
    main()
