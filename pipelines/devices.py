"""Where torch work runs and in which numeric format.

A ``device`` setting (``auto | cpu | cuda | cuda:N``) is an execution choice: it is resolved before any
work (a missing GPU is an error naming the key) and recorded in the manifest, never fingerprinted. A
``precision`` setting (``fp32 | bf16 | fp16``) is content: bf16/fp16 run the forward passes under
torch autocast, which changes the numbers.

Worker processes that were given an unindexed ``cuda`` each claim a GPU of their own: the first one
whose lock file (``$TMPDIR/memforge-gpus/gpu-N.lock``, ``flock``-ed for the life of the process) no
other process holds, so the workers of a local Beam runner spread over the host's GPUs instead of
piling onto ``cuda:0``; when there are more workers than GPUs, they share them in turn. On a cluster
runner, start one worker per GPU (e.g. Dask workers with ``CUDA_VISIBLE_DEVICES`` set per worker):
each then sees one GPU and claims it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile

import torch

from memforge.storage.errors import MemforgeError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_claimed: dict[str, object] = {}  # this process's GPU claim: the held lock file and the device it names


class DeviceError(MemforgeError):
    """A device setting names a device this machine does not have."""


def resolve(setting: str, key: str) -> str:
    """``setting`` checked against this machine: ``cpu``, ``cuda`` (any GPU: a worker claims one) or ``cuda:N``.

    ``auto`` is ``cuda`` when torch sees a GPU, else ``cpu``. Raises ``DeviceError`` naming ``key`` when
    the GPU it names is not there.
    """
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if setting == "auto":
        return "cuda" if count else "cpu"
    if setting == "cpu":
        return "cpu"
    if not count:
        raise DeviceError(f"{key}: {setting} asked for, but torch {torch.__version__} sees no CUDA device on this "
                          f"machine; set {key}: auto or cpu")
    index = int(setting.split(":")[1]) if ":" in setting else None
    if index is not None and index >= count:
        raise DeviceError(f"{key}: {setting} asked for, but this machine has {count} CUDA device(s) (cuda:0.."
                          f"cuda:{count - 1})")
    return setting


def use(setting: str, key: str) -> torch.device:
    """The device of a stage that runs in this process: ``setting`` resolved (naming ``key`` when its GPU is
    missing), then claimed."""
    return claim(resolve(setting, key))


def claim(resolved: str) -> torch.device:
    """The torch device for this process: ``cpu``, ``cuda:N`` as named, or for ``cuda`` a GPU claimed
    for this process (see the module doc); the same answer on every call in a process."""
    if resolved == "cpu":
        return torch.device("cpu")
    # fp32 means IEEE fp32 on a GPU too: TF32 matmuls (about 10 mantissa bits) would change the numbers
    # with the device, and the device is not part of an artifact's identity.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if resolved != "cuda":
        return torch.device(resolved)
    if "device" not in _claimed:
        _claimed["device"] = torch.device("cuda", claim_gpu(torch.cuda.device_count()))
    return _claimed["device"]


def claim_gpu(count: int, lock_dir: str | None = None) -> int:
    """Index of the first of ``count`` GPUs whose lock no other process holds (this process then holds
    it until it exits); when all are held, the GPU of this process's turn (pid modulo ``count``)."""
    lock_dir = lock_dir or os.path.join(tempfile.gettempdir(), "memforge-gpus")
    os.makedirs(lock_dir, exist_ok=True)
    for index in range(count):
        handle = open(os.path.join(lock_dir, f"gpu-{index}.lock"), "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _claimed.setdefault("locks", []).append(handle)  # held open: the lock lasts as long as the process
        return index
    return os.getpid() % count


def describe(device: torch.device) -> str:
    """What a manifest records: ``cpu`` or ``cuda:N (<GPU name>)``."""
    if device.type != "cuda":
        return device.type
    return f"{device} ({torch.cuda.get_device_name(device)})"


def autocast(device: torch.device, precision: str):
    """Autocast to ``precision`` on ``device`` for bf16/fp16; a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 training (a disabled scaler otherwise); its state travels in checkpoints."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
