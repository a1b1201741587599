"""Training on several processes: the ranks of a ``torch.distributed`` job, started by torch's elastic launcher.

A training stage runs as one process unless its section asks for more (``nproc_per_node`` > 1 or ``nnodes``
> 1): then ``launch`` starts the ranks through ``torch.distributed.launcher`` (what ``torchrun`` runs), with a
c10d rendezvous (on this host for one node, at ``rdzv_endpoint`` for several). A process started by an outside
``torchrun`` is a rank already (``inside_launcher``) and joins its job directly. Each rank joins the process
group (``join``): NCCL with one GPU per local rank, or gloo on CPUs with the cores shared out among the local
ranks (``OMP_NUM_THREADS`` when set, as ``torchrun`` sets it). A rank that fails stops the job; the error
names the rank, its host and what happened to it.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from memforge.pipelines import devices
from memforge.storage.errors import MemforgeError

SHUTDOWN_S = 5  # a failed job's other ranks get SIGTERM, then SIGKILL after this long
COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # a collective that waits longer than this names a hung rank
RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RankFailedError(MemforgeError):
    """A rank of a distributed training job failed (died, ran out of memory or raised)."""


@dataclass(frozen=True)
class Launch:
    """How many processes a training stage runs as (execution settings of its params section)."""

    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str | None = None

    @classmethod
    def of(cls, section) -> "Launch":
        return cls(section.nproc_per_node, section.nnodes, section.rdzv_endpoint)

    @property
    def distributed(self) -> bool:
        return self.nproc_per_node > 1 or self.nnodes > 1


@dataclass(frozen=True)
class World:
    """This process's place in its training job: rank, size, device, backend (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group (one process)

    @property
    def writer(self) -> bool:
        """Whether this rank writes checkpoints and the published model (rank 0)."""
        return self.rank == 0

    def all_sum(self, values: list, dtype: torch.dtype = torch.float64) -> list:
        """``values`` summed over the ranks, in order, as ``dtype`` (int64 sums wrap, as a checksum's do)."""
        if self.backend is None:
            return list(values)
        tensor = torch.tensor(values, dtype=dtype, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value``, on every rank."""
        if self.backend is None:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(tensor, 0)
        return int(tensor.item())

    def describe(self) -> dict:
        """What a manifest records: rank 0's device, every rank's (their count and kind), world size, backend."""
        kind = "cpu" if self.device.type == "cpu" else torch.cuda.get_device_name(self.device)
        return {"device": devices.describe(self.device), "devices": f"{self.size} x {kind}",
                "world_size": self.size, "backend": self.backend or "none"}


def data_parallel(module: torch.nn.Module, world: World) -> torch.nn.Module:
    """``module`` wrapped for data parallelism over ``world`` (gradients averaged over the ranks), or itself
    in one process."""
    if world.backend is None:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # the gradients live in the communication buckets: no copy in and out of them at every step
    return DistributedDataParallel(module, device_ids=[world.device] if world.device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


def inside_launcher() -> bool:
    """Whether this process is one rank of a job a launcher started (``torchrun`` or memforge's own)."""
    return all(name in os.environ for name in RANK_ENV) and int(os.environ["WORLD_SIZE"]) > 1


def _threads_per_rank(local_size: int) -> int:
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local_size)


def _stop_on_sigterm() -> None:
    """A SIGTERM (the launcher stopping a failed job's other ranks) unwinds like Ctrl-C, so a rank that holds
    the artifact's lease releases it."""
    def stop(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")
    signal.signal(signal.SIGTERM, stop)


def join(device_setting: str, key: str) -> World:
    """This process's ``World``: one process when no launcher started it, else a rank that joins its process
    group (NCCL on the GPU of its local rank, gloo on CPUs with its share of the cores)."""
    if not inside_launcher():
        device = devices.use(device_setting, key)
        if device.type == "cpu" and os.environ.get("OMP_NUM_THREADS", "").isdigit():
            torch.set_num_threads(_threads_per_rank(1))
        return World(device=device)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    resolved = devices.resolve(device_setting, key)
    if resolved == "cpu":
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(_threads_per_rank(local_size))
    else:
        device, backend = devices.claim(f"cuda:{local_rank % torch.cuda.device_count()}"), "nccl"
        torch.cuda.set_device(device)
    _stop_on_sigterm()
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT,
                                **({"device_id": device} if backend == "nccl" else {}))
    return World(rank, size, device, backend)


def leave(world: World) -> None:
    """Leave the process group (after the last collective)."""
    if world.backend is not None and dist.is_initialized():
        dist.destroy_process_group()


def run_id(stage: str, params: dict) -> str:
    """The rendezvous id of a stage's job: the same on every node given the same params."""
    return f"memforge-{stage}-" + hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def launch(entrypoint, args: tuple, plan: Launch, stage: str, params: dict) -> None:
    """Run ``entrypoint(*args)`` on ``plan.nproc_per_node`` ranks of this node (of ``plan.nnodes``) under torch's
    elastic launcher; raises ``RankFailedError`` naming the rank and host when one fails."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=plan.nnodes, max_nodes=plan.nnodes, nproc_per_node=plan.nproc_per_node,
        run_id=run_id(stage, params), rdzv_backend="c10d", rdzv_endpoint=plan.rdzv_endpoint or "127.0.0.1:0",
        max_restarts=0, monitor_interval=0.1, start_method="spawn", shutdown_timeout=SHUTDOWN_S,
        local_addr="127.0.0.1" if plan.nnodes == 1 else None)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    try:
        elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as exc:
        raise RankFailedError(_failure_message(stage, exc)) from None
    except SignalException as exc:  # the launcher stopped every rank first
        if exc.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise RankFailedError(f"{stage}: stopped by {exc.sigval.name}; nothing was published and the checkpoints "
                              "are kept: rerun to resume") from None
    finally:  # the launcher's own handlers (in the main thread) stop with it
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


def _failure_message(stage: str, exc) -> str:
    """Which rank failed first, on which host, and how (its exception's last line, or the signal)."""
    rank, failure = min(exc.failures.items(), key=lambda item: (item[1].timestamp, item[0]))  # ties: the lower rank
    host = socket.gethostname()
    if failure.exitcode < 0:
        name = signal.Signals(-failure.exitcode).name
        how = f"killed by {name}" + (" (the kernel's out-of-memory killer sends it too)" if name == "SIGKILL" else "")
    else:
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", "")
        lines = [line for line in str(message).strip().splitlines() if line.strip()]
        how = lines[-1] if lines else f"exit code {failure.exitcode}"
    others = len(exc.failures) - 1
    return (f"{stage}: rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) on {host} failed: {how}"
            + (f"; {others} other rank(s) stopped with it" if others else "")
            + "; nothing was published and the checkpoints are kept: rerun to resume")
