"""FAISS on CUDA GPUs: which GPUs ``index.device`` names, and GPU copies of an index that fit them.

A copy of the whole index goes to each GPU (queries are split between the copies) when it fits every
GPU's free memory; otherwise the inverted lists are sharded across the GPUs under one coarse quantizer
(each query goes to every GPU and the results are merged). An index that does not fit even sharded is
refused, naming its size and the GPUs' free memory.

On the GPU, IVF-PQ distance lookup tables are float16 (FAISS's GPU IVF-PQ needs that for codes of 56
bytes or more, and it is the reference scripts' setting); exact (Flat) and IVF-Flat copies keep float32
vectors. Precomputed tables stay off: they take nlist × M × 256 × 2 bytes of GPU memory (4.3 GB at
nlist 131072, M 64).
"""
from __future__ import annotations

import logging

import numpy as np

from memforge.pipelines import faiss_build, faiss_index
from memforge.pipelines.faiss_build import FaissBuildError, faiss
from memforge.storage.errors import MemforgeError

log = logging.getLogger("memforge")
GIB = 2 ** 30
SCRATCH_BYTES = 2 * GIB  # per GPU beside the index: FAISS's temporary memory (up to 1.5 GiB) and the query batches
KEY = "index.device"


def faiss_gpu(setting: str, key: str = KEY) -> str | int | None:
    """Where FAISS runs for ``setting``: None (the CPU), a GPU number, or ``"all"`` (every GPU it sees).

    The GPUs are those the FAISS build sees (torch may be a CPU build). ``auto`` and ``cuda`` take every GPU,
    ``cuda:N`` that one. ``auto`` runs on the CPU with the faiss-cpu build (saying so in one log line when
    torch sees a GPU) and with a GPU build on a machine without GPUs. Refused, naming ``key``: a GPU asked for
    with the faiss-cpu build or with a CPU build imported over an installed GPU build (``faiss_build``), a GPU
    build that sees no GPU where one was asked for or torch sees one (a driver older than its CUDA), and a
    ``cuda:N`` it does not see.
    """
    if setting == "cpu":
        return None
    if not faiss_build.is_gpu_build(faiss):
        gpu_installed = any(faiss_build.is_gpu_distribution(name) for name, _ in faiss_build.providers())
        if setting == "auto" and not gpu_installed:
            if _torch_gpus():
                faiss_build.warn_once(f"{key}: auto, and torch sees a GPU, but FAISS {faiss.__version__} is a CPU "
                                      f"build: FAISS runs on the CPU ({faiss_build.CHOOSE})")
            return None
        if not gpu_installed and not _torch_gpus():
            raise FaissBuildError(f"{key}: {setting} asked for, but this machine shows no CUDA device (torch sees "
                                  f"none) and FAISS {faiss.__version__} is a CPU build; set {key}: auto or cpu")
        faiss_build.require_gpu(faiss, key)  # raises: a CPU build
    count = faiss.get_num_gpus()
    if not count:
        if setting == "auto" and not _torch_gpus():
            return None
        raise FaissBuildError(f"{key}: {setting}: this FAISS GPU build sees no GPU ({_torch_gpus()} seen by torch): "
                              f"none on this machine, or a driver older than its CUDA version (nvidia-smi's "
                              f"'CUDA Version'); {faiss_build.CHOOSE}")
    faiss_build.require_gpu(faiss, key)  # a GPU build: logs a mix-up with another FAISS once
    if ":" not in setting:
        return "all"
    number = int(setting.split(":")[1])
    if number >= count:
        raise FaissBuildError(f"{key}: {setting} asked for, but FAISS sees {count} GPU(s) (cuda:0..cuda:{count - 1})")
    return number


def _torch_gpus() -> int:
    """CUDA devices torch sees (0 with a CPU build of torch)."""
    import torch  # only here: workers that merely read indexes do not import it

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def describe(gpu: str | int | None) -> str:
    """What a manifest records for ``gpu``: ``cpu``, ``gpu N`` or ``gpu all``."""
    return "cpu" if gpu is None else f"gpu {gpu}"


def search_device(gpu: str | int | None, k: int) -> str:
    """Where searches for ``k`` results per query run: ``describe(gpu)``, or the CPU above GPU FAISS's limit."""
    limit = faiss_build.max_gpu_k(faiss)
    if gpu is not None and k > limit:
        return f"cpu ({k} results per query, more than the {limit} GPU FAISS selects)"
    return describe(gpu)


def gpu_bytes(index) -> int:
    """GPU memory a copy of ``index`` takes: its codes and ids (or float32 vectors) and the coarse centroids."""
    ivf = faiss_index.ivf_of(index)
    if ivf is None:
        return index.ntotal * index.d * 4
    return ivf.ntotal * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4


def placement(needed: int, free: list[int]) -> str:
    """``replicate`` when a copy of ``needed`` bytes fits every GPU's ``free`` bytes, else ``shard`` when a
    1/len(free) share does; refused (naming the sizes) when neither fits."""
    if needed + SCRATCH_BYTES <= min(free):
        return "replicate"
    if len(free) > 1 and needed / len(free) + SCRATCH_BYTES <= min(free):
        return "shard"
    raise MemforgeError(f"{KEY}: the index needs {needed / GIB:.1f} GiB on the GPU (+{SCRATCH_BYTES / GIB:.0f} GiB "
                        f"of scratch), more than {'each' if len(free) > 1 else 'the'} GPU's free "
                        f"{min(free) / GIB:.1f} GiB{f' even sharded over {len(free)} GPUs' if len(free) > 1 else ''}; "
                        f"search it on the CPU ({KEY}: cpu) or with more GPUs")


def free_bytes(devices: list[int]) -> list[int] | None:
    """Free memory of each of ``devices`` (CUDA's count, through torch), or None when torch sees no GPU."""
    if not _torch_gpus():
        return None
    import torch

    return [torch.cuda.mem_get_info(device)[0] for device in devices]


def options(index, many: bool):
    """Cloner options for ``index``: float16 lookup tables for IVF-PQ only, 64-bit ids."""
    chosen = faiss.GpuMultipleClonerOptions() if many else faiss.GpuClonerOptions()
    ivf = faiss_index.ivf_of(index)
    chosen.useFloat16 = ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ)
    return chosen


def to_gpu(index, gpu: str | int):
    """A GPU copy of ``index`` on GPU ``gpu``, or for ``"all"`` replicated or sharded (``placement``) over
    every GPU. A FAISS refusal (a PQ size or nprobe the GPU kernels lack) is an error naming ``index.device``."""
    devices = list(range(faiss.get_num_gpus())) if gpu == "all" else [gpu]
    free = free_bytes(devices)
    if free is None:
        faiss_build.warn_once(f"{KEY}: torch sees no GPU, so the GPUs' free memory is unknown: the index is copied "
                              "whole to each GPU")
    layout = "replicate" if free is None else placement(gpu_bytes(index), free)
    try:
        if len(devices) == 1:
            resources = faiss.StandardGpuResources()
            copy = faiss.index_cpu_to_gpu(resources, devices[0], index, options(index, many=False))
            copy.resources = resources  # kept alive with the copy
            return copy
        chosen = options(index, many=True)
        chosen.shard = layout == "shard"
        chosen.common_ivf_quantizer = chosen.shard and faiss_index.ivf_of(index) is not None
        log.info("%s: the index is %s over %d GPUs", KEY, "sharded" if chosen.shard else "replicated", len(devices))
        return faiss.index_cpu_to_all_gpus(index, co=chosen)
    except RuntimeError as exc:
        raise MemforgeError(f"{KEY}: FAISS cannot copy this index to the GPU: {str(exc).strip().splitlines()[-1]} "
                            "(GPU IVF-PQ takes 1-4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64 or 96 sub-quantizers "
                            "of 1-4, 6, 8, 10, 12, 16, 20, 24, 28 or 32 dimensions; cuVS builds take others); "
                            f"use another index.factory or {KEY}: cpu") from None


def add_on_gpu(index, gpu: str | int, turn: int, vectors: np.ndarray, ids: np.ndarray):
    """``index`` (an IVF index) with ``vectors`` added on a GPU (``gpu``, or for ``"all"`` the GPU of
    ``turn``), copied back to host memory: the GPU assigns the lists and encodes."""
    device = gpu if isinstance(gpu, int) else turn % faiss.get_num_gpus()
    copy = to_gpu(index, device)
    copy.add_with_ids(vectors, ids)
    return faiss.index_gpu_to_cpu(copy)
