"""The FAISS build this environment imports, and what is wrong with it when it is not the one asked for.

memforge runs on one of three FAISS distributions, each installed by an extra: ``faiss-cpu`` (``cpu``),
``faiss-gpu`` (``gpu-cu12``: CUDA 12, its runtime libraries from NVIDIA's wheels) and ``faiss-gpu-cuvs``
(``gpu-cu13``: CUDA 13 with NVIDIA cuVS). All of them install the one module ``faiss``, so two in one
environment overwrite each other's files (the last installed wins), and uninstalling either deletes files
the other needs: faiss-cpu installed after a GPU build (by an upgrade, or by another package that depends
on it) leaves the GPU distribution installed and a CPU build imported. That mix-up is found here and
named with its fix, instead of a GPU run quietly searching on the CPU.

Modules that use FAISS import it from here (``from memforge.pipelines.faiss_build import faiss``), so an
environment without FAISS, or with a GPU build whose CUDA libraries do not load, fails with the extra to
install rather than a bare ``ModuleNotFoundError``.
"""
from __future__ import annotations

import functools
import logging
from importlib import metadata

from memforge.storage.errors import MemforgeError
from memforge.storage.provenance import DISTRIBUTION

log = logging.getLogger("memforge")
EXTRAS = {"faiss-cpu": "cpu", "faiss-gpu": "gpu-cu12", "faiss-gpu-cuvs": "gpu-cu13"}  # distribution -> extra
CHOOSE = (f"pip install '{DISTRIBUTION}[cpu]', or on a GPU machine '{DISTRIBUTION}[gpu-cu12]' (CUDA 12) or "
          f"'{DISTRIBUTION}[gpu-cu13]' (CUDA 13); nvidia-smi's 'CUDA Version' says which")
# GPU FAISS selects at most this many results per query (k, and nprobe); indexes served by cuVS allow more.
GPU_MAX_K = 2048
CUVS_MAX_K = 16384


class FaissBuildError(MemforgeError):
    """No FAISS, a FAISS that does not load, or a CPU build shadowing an installed GPU build."""


@functools.cache
def providers() -> list[tuple[str, str]]:
    """(distribution, version) of every installed distribution that writes the module ``faiss``, read once per
    process (the scan of every installed distribution takes a few hundred ms)."""
    names = sorted(set(metadata.packages_distributions().get("faiss", [])))
    return [(name, metadata.version(name)) for name in names]


def _named(found: list[tuple[str, str]]) -> str:
    return " and ".join(f"{name} {version}" for name, version in found)


def is_gpu_distribution(name: str) -> bool:
    """Whether distribution ``name`` is a GPU build of FAISS (faiss-gpu, faiss-gpu-cuvs, faiss-gpu-cu12 …)."""
    return any(word in name.lower() for word in ("gpu", "cuda"))


def is_gpu_build(module) -> bool:
    """Whether the imported ``faiss`` module is a GPU build (it has GPU resources to copy indexes with)."""
    return hasattr(module, "StandardGpuResources")


def uses_cuvs(module) -> bool:
    """Whether GPU copies of indexes are served by NVIDIA cuVS (a cuVS build's default)."""
    return bool(getattr(module.GpuClonerOptions(), "use_cuvs", False)) if is_gpu_build(module) else False


def max_gpu_k(module) -> int:
    """The most results per query a GPU index of this build returns."""
    return CUVS_MAX_K if uses_cuvs(module) else GPU_MAX_K


def mix_up(found: list[tuple[str, str]], gpu_module: bool) -> str | None:
    """What is wrong when several FAISS distributions share the module (None when one is installed): the
    imported build and the fix. ``gpu_module``: whether the module that imports is a GPU build."""
    if len(found) < 2:
        return None
    gpu = [name for name, _ in found if is_gpu_distribution(name)]
    keep = gpu[0] if len(gpu) == 1 else None
    fix = (f"pip uninstall -y {' '.join(name for name, _ in found)} && pip install "
           + (f"'{DISTRIBUTION}[{EXTRAS[keep]}]'" if keep in EXTRAS else (keep or "<one of them>")))
    imported = "a GPU build" if gpu_module else "a CPU build"
    shadowed = (f": the GPU build of {', '.join(gpu)} was overwritten by a CPU build installed after it"
                if gpu and not gpu_module else "")
    return (f"{_named(found)} are installed together and write the same module 'faiss', which imports as "
            f"{imported}{shadowed}; uninstalling one breaks the other. Keep one: {fix}")


def require_gpu(module, key: str) -> None:
    """Refuse a GPU run (``key`` asked for one) that this environment's FAISS cannot serve, naming why."""
    found = providers()
    problem = mix_up(found, is_gpu_build(module))
    if not is_gpu_build(module):
        raise FaissBuildError(f"{key}: a GPU was asked for, but "
                              + (problem or f"the installed FAISS ({_named(found) or module.__version__}) is a "
                                            f"CPU build: {CHOOSE}"))
    if problem:
        warn_once(problem)


@functools.cache
def warn_once(message: str) -> None:
    """Log ``message`` once per process."""
    log.warning("%s", message)


def import_failure(exc: Exception, found: list[tuple[str, str]]) -> str:
    """Why ``import faiss`` failed with ``exc`` when ``found`` (``providers``) are installed, and the fix."""
    if not found:
        return f"FAISS is not installed: {CHOOSE}"
    problem = mix_up(found, gpu_module=False)
    return (f"{_named(found)} is installed but 'import faiss' fails ({str(exc).strip().splitlines()[-1]})"
            + (f"; {problem}" if problem else f"; reinstall it with its extra: {CHOOSE}"))


def _load():
    try:
        import faiss
    except (ImportError, RuntimeError, OSError) as exc:  # a GPU build raises RuntimeError for a missing CUDA wheel
        raise FaissBuildError(import_failure(exc, providers())) from None
    return faiss


faiss = _load()
