"""The benchmark's report: markdown tables, the machine it ran on, the file it is written to."""
import os
import platform
import shlex
import sys

import torch
import torchvision


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def cpu_name():
    """The CPU's model name as lscpu gives it (from /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_lines():
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    command = " ".join(shlex.quote(arg) for arg in ["python", *sys.argv])
    return [f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
            f"- GPU: {gpu}",
            f"- torch {torch.__version__}, torchvision {torchvision.__version__}, Python {platform.python_version()}",
            f"- Command: `{command}`"]


def load_average():
    """Other processes on the CPU skew every number; the load average says whether they were there."""
    return f"load average (1 min) {os.getloadavg()[0]:.2f}"


def report(path, title, sections):
    """Print the report; also write it to path (markdown) unless path is None."""
    text = f"# {title}\n\n" + "\n\n".join(sections) + "\n"
    print("\n" + text)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(text)
        print(f"Written to {path}")
