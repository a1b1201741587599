"""Facts a bench report states beside its figures: the machine, how busy it was, the code's commit and the
date."""
from __future__ import annotations

import datetime
import glob
import os
import platform
import sys

import psutil

from memforge.storage.provenance import DISTRIBUTION, code_version


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` where there is none)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """The GPUs' names: from torch.cuda when torch is already imported, else from the NVIDIA driver's /proc
    entries (nothing is imported for it)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    names = []
    for path in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):
        with open(path) as info:
            names += [line.split(":", 1)[1].strip() for line in info if line.startswith("Model:")]
    return names


def machine() -> str:
    """One line: CPU model and cores, memory total, GPUs (or none)."""
    logical, physical = psutil.cpu_count(), psutil.cpu_count(logical=False)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    memory = psutil.virtual_memory().total / 2**30
    gpus = ", ".join(gpu_names()) or "none"
    return (f"{cpu_model()}, {logical} logical cores ({physical} physical, {usable} usable by the bench), "
            f"{memory:.1f} GiB memory, GPU: {gpus}")


def load() -> str:
    """The system's load averages over the last 1, 5 and 15 minutes and the cores: the bench's own work counts,
    so a load well above what the bench ran means other work shared the machine and its times."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f} (1, 5, 15 min) on {psutil.cpu_count()} logical cores"


def commit() -> str:
    """The git commit of the code (short sha, "dirty" when tracked files have uncommitted changes), or a note
    that it is not a git checkout."""
    version = code_version(())
    if version["git_sha"] is None:
        return f"unknown (not a git checkout; {DISTRIBUTION} {version['package_version']})"
    return version["git_sha"][:7] + (" (dirty)" if version["git_dirty"] else "")


def utc_now() -> str:
    """The current UTC date and time, to the minute."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
