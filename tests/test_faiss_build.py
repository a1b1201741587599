"""FAISS builds and GPUs, on a machine without either: one FAISS distribution per extra, a missing or
broken FAISS named with the extras, a CPU build imported over an installed GPU build refused with the fix,
GPU copies placed by free memory, and searches above GPU FAISS's k limit kept on the host's index."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from memforge.pipelines import faiss_build, faiss_gpu, faiss_index, sharded_index, targets
from memforge.pipelines.faiss_build import FaissBuildError, faiss
from memforge.storage.errors import MemforgeError

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(faiss_build.is_gpu_build(faiss), reason="checks a CPU build's behaviour")]
ROOT = Path(__file__).resolve().parent.parent
GIB = 2 ** 30


@pytest.fixture
def gpu_machine(monkeypatch):
    """torch sees two GPUs (the FAISS installed here is the CPU build)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    faiss_build.warn_once.cache_clear()


def installed_beside(tmp_path, name: str, version: str) -> dict:
    """The environment of a Python that also finds distribution ``name`` owning the module ``faiss``, as a FAISS
    wheel installed beside faiss-cpu does (its RECORD lists the same files)."""
    info = tmp_path / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"faiss/__init__.py,,\nfaiss/_swigfaiss.abi3.so,,\n{info.name}/METADATA,,\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}


ON_A_GPU_MACHINE = ("import torch; torch.cuda.is_available = lambda: True; torch.cuda.device_count = lambda: 2\n"
                    "from memforge.pipelines import faiss_build, faiss_gpu\n")


def test_each_faiss_extra_installs_one_build_and_memforge_itself_none():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert not [r for r in project["dependencies"] if r.startswith("faiss")]  # the extra chooses the build
    for distribution, extra in faiss_build.EXTRAS.items():
        assert [r.split(">")[0] for r in extras[extra]] == [distribution], extra
    assert any(r.endswith("[cpu,dask,s3,hf,docs,eval]") for r in extras["test"])
    assert faiss_build.providers() == [("faiss-cpu", faiss.__version__)]


def test_auto_on_a_gpu_machine_with_the_cpu_build_runs_on_the_cpu_and_says_so_once(gpu_machine, caplog):
    with caplog.at_level(logging.WARNING, logger="memforge"):
        assert faiss_gpu.faiss_gpu("auto") is None
        assert faiss_gpu.faiss_gpu("auto") is None
        assert faiss_gpu.faiss_gpu("cpu") is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "index.device: auto" in lines[0] and "CPU build" in lines[0], lines
    assert "memforge-mlp[gpu-cu13]" in lines[0]


def test_cuda_with_the_cpu_build_is_refused_naming_the_key_and_the_gpu_extras(gpu_machine):
    with pytest.raises(FaissBuildError, match=r"index.device: a GPU was asked for, but the installed FAISS "
                                              r"\(faiss-cpu [\d.]+\) is a CPU build.*\[gpu-cu12\].*\[gpu-cu13\]"):
        faiss_gpu.faiss_gpu("cuda:1")


def test_a_cpu_build_imported_over_an_installed_gpu_build_is_refused_with_the_fix(tmp_path):
    script = ON_A_GPU_MACHINE + (
        "print([name for name, _ in faiss_build.providers()])\n"
        "for setting in ('auto', 'cuda', 'cpu'):  # auto too: an installed GPU build says a GPU run was meant\n"
        "    try:\n"
        "        print(setting, faiss_gpu.faiss_gpu(setting))\n"
        "    except faiss_build.FaissBuildError as exc:\n"
        "        print(setting, 'refused:', exc)\n")
    done = subprocess.run([sys.executable, "-c", script], env=installed_beside(tmp_path, "faiss-gpu", "1.15.1"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found, auto, cuda, cpu = done.stdout.splitlines()
    assert found == "['faiss-cpu', 'faiss-gpu']"
    for line, setting in ((auto, "auto"), (cuda, "cuda")):
        assert re.fullmatch(
            rf"{setting} refused: index.device: a GPU was asked for, but faiss-cpu [\d.]+ and faiss-gpu 1.15.1 are "
            r"installed together .* imports as a CPU build: the GPU build of faiss-gpu was overwritten .*"
            r"pip uninstall -y faiss-cpu faiss-gpu && pip install 'memforge-mlp\[gpu-cu12\]'", line), line
    assert cpu == "cpu None"


def test_two_builds_whose_gpu_one_imports_are_named_as_a_warning():
    found = [("faiss-cpu", "1.15.1"), ("faiss-gpu-cuvs", "1.15.1")]
    problem = faiss_build.mix_up(found, gpu_module=True)
    assert "imports as a GPU build" in problem and "overwritten" not in problem
    assert "pip uninstall -y faiss-cpu faiss-gpu-cuvs && pip install 'memforge-mlp[gpu-cu13]'" in problem
    assert faiss_build.mix_up(found[:1], gpu_module=False) is None


def test_a_faiss_that_does_not_import_stops_every_command_naming_the_extras():
    blocked = "import sys; sys.modules['faiss'] = None; from memforge.flows.cli import main; sys.exit(main(['ls']))"
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("memforge: error: faiss-cpu ") and "'import faiss' fails" in done.stderr
    assert "memforge-mlp[cpu]" in done.stderr and "Traceback" not in done.stderr
    missing = faiss_build.import_failure(ModuleNotFoundError("No module named 'faiss'"), [])
    assert missing.startswith("FAISS is not installed: pip install 'memforge-mlp[cpu]'")
    cuda_wheel = RuntimeError("faiss-gpu installed but nvidia-cuda-runtime-cu12 is missing")
    assert "nvidia-cuda-runtime-cu12 is missing" in faiss_build.import_failure(cuda_wheel, [("faiss-gpu", "1.15.1")])


def test_an_index_is_copied_to_each_gpu_when_it_fits_else_sharded_else_refused():
    keys = np.random.default_rng(0).standard_normal((2000, 32)).astype(np.float32)
    index = faiss.index_factory(32, "IVF16,PQ8x4")
    index.train(keys)
    index.add(keys)
    needed = faiss_gpu.gpu_bytes(index)
    assert needed == 2000 * (4 + 8) + 16 * 32 * 4  # codes and ids, and the coarse centroids
    spare = faiss_gpu.SCRATCH_BYTES
    assert faiss_gpu.placement(needed, [needed + spare] * 2) == "replicate"
    assert faiss_gpu.placement(40 * GIB, [22.5 * GIB, 30 * GIB]) == "shard"
    with pytest.raises(MemforgeError, match=r"index.device: the index needs 40.0 GiB.*the GPU's free 30.0 GiB"):
        faiss_gpu.placement(40 * GIB, [30 * GIB])
    with pytest.raises(MemforgeError, match=r"more than each GPU's free 12.0 GiB even sharded over 2 GPUs"):
        faiss_gpu.placement(40 * GIB, [12 * GIB, 30 * GIB])


class HostCopy:
    """Stands in for a GPU copy (there is no GPU here): the same index searched on the host, counted."""

    def __init__(self, index):
        self.index, self.calls = faiss.clone_index(index), []

    def search(self, queries, k):
        self.calls.append(k)
        return self.index.search(queries, k)


def test_searches_above_the_gpu_k_limit_run_on_the_host_index(tmp_path, monkeypatch, caplog):
    keys = np.random.default_rng(1).standard_normal((3000, 16)).astype(np.float32)
    index = faiss.IndexIDMap2(faiss.IndexFlatL2(16))
    index.add_with_ids(keys, np.arange(3000))
    faiss_index.write(index, str(tmp_path / faiss_index.shard_file("00000")))
    copies = []
    monkeypatch.setattr(faiss_gpu, "to_gpu", lambda searcher, gpu: copies.append(HostCopy(searcher)) or copies[-1])
    faiss_build.warn_once.cache_clear()
    searcher = sharded_index.ShardedIndex(str(tmp_path), "", ["00000"], nprobe=1, merged=False, gpu=0)
    assert searcher.max_gpu_k == faiss_build.GPU_MAX_K  # the CPU build serves no index through cuVS
    queries = keys[:5]
    within = searcher.search(queries, faiss_build.GPU_MAX_K)
    with caplog.at_level(logging.WARNING, logger="memforge"):
        above = searcher.search(queries, faiss_build.GPU_MAX_K + 1)
        searcher.search(queries, faiss_build.GPU_MAX_K + 2)
    assert copies[0].calls == [faiss_build.GPU_MAX_K]  # only the search within the limit reached the copy
    np.testing.assert_array_equal(above[1][:, :faiss_build.GPU_MAX_K], within[1])
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "searches for more than 2048 results per query" in lines[0], lines


def test_the_manifest_says_where_each_search_ran():
    train_at_2048 = targets.searched_per_query(2048, 0, 10 ** 6, self_query=True)
    assert train_at_2048 == 2049 and targets.searched_per_query(2048, 0, 10 ** 6, self_query=False) == 2048
    assert targets.searched_per_query(1024, 2, 1000, self_query=True) == 1000  # never more than the datastore
    assert faiss_gpu.search_device(None, 4096) == "cpu"
    assert faiss_gpu.search_device("all", 2048) == "gpu all"
    assert faiss_gpu.search_device(0, train_at_2048) == "cpu (2049 results per query, more than the 2048 GPU FAISS " \
                                                       "selects)"


def test_the_gpu_faiss_bench_part_says_why_it_has_no_figures_here(tmp_path):
    from memforge.bench import run

    figures = run.run(["gpu_faiss"], workdir=str(tmp_path), out_dir=str(tmp_path / "out"))["gpu_faiss"].figures
    assert set(figures) == {"faiss_gpu"} and set(figures) <= set(run.NOTES["gpu_faiss"])
    assert figures["faiss_gpu"].startswith(f"not available: FAISS {faiss.__version__} is a CPU build (pip install")
