"""Part ``prepare``: ``memforge prepare`` of one large text file (a stream, no document separator), with every
core as a Beam worker and in one process, with the tiny bench model's tokenizer (trained before the timing)."""
from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

from memforge.bench.measure import Note, memforge_command, peak_tree_memory
from memforge.bench.workspace import Workspace
from memforge.storage.artifact import open_artifact

CORPUS_BYTES = 200_000_000  # the one train file; the test suite runs the part on a smaller one
SHARD_BYTES = 4_000_000  # corpus.shard_bytes: the file is read in ranges of about this size
VALIDATION_BYTES = 1_000_000

NOTES = {
    "prepare_corpus_mb": Note("size (MB) of the one train file: the standard library's .py files end to end, "
                              "repeated (plus a 1 MB validation file: its first MB)"),
    "prepare_shards": Note(f"work shards: the byte ranges the train file was cut into (corpus.shard_bytes "
                           f"{SHARD_BYTES:,}) and the validation file"),
    "prepare_train_tokens": Note("tokens of the train split"),
    "prepare_workers": Note("Beam worker processes of the parallel run: runtime.num_workers = the cores"),
    "prepare_parallel_s": Note("wall seconds of `memforge prepare` with every worker (start to published)"),
    "prepare_serial_s": Note("wall seconds of `memforge prepare` in one process (--direct_running_mode=in_memory)"),
    "prepare_speedup": Note("one-process seconds ÷ every-worker seconds", ("prepare_serial_s", "prepare_parallel_s")),
    "prepare_parallel_peak_rss_mb": Note("peak RSS (MiB) summed over the process tree (driver + workers), every "
                                         "worker"),
    "prepare_serial_peak_rss_mb": Note("peak RSS (MiB) of the one process"),
}


def write_corpus(path: Path, size: int) -> None:
    """``size`` bytes of UTF-8 text: the standard library's ``.py`` files in sorted order, end to end, repeated
    (the last cut at a line end); deterministic for one Python version, and offline."""
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        while True:
            for source in sources:
                try:
                    text = source.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                if "\0" in text:
                    continue
                size_left = size - written
                if len(text.encode()) >= size_left:
                    out.write(text[:text.rfind("\n", 0, size_left) + 1])
                    return
                out.write(text)
                written += len(text.encode())


def bench_prepare(ws: Workspace) -> dict:
    """Seconds and peak RSS of `memforge prepare` of one ``CORPUS_BYTES`` text file: every core, one process."""
    train, validation = ws.root / "prepare-train.txt", ws.root / "prepare-valid.txt"
    write_corpus(train, CORPUS_BYTES)
    with open(train, encoding="utf-8") as head:
        validation.write_text(head.read(VALIDATION_BYTES))
    workers = os.cpu_count() or 1
    figures = {"prepare_corpus_mb": round(train.stat().st_size / 1e6, 1), "prepare_workers": workers}
    for name, extra in (("parallel", []), ("serial", ["--", "--direct_running_mode=in_memory"])):
        config = ws.root / f"prepare-{name}.json"
        config.write_text(json.dumps({
            "artifacts_dir": str(ws.root / f"prepare-{name}"),
            "corpus": {"train": [str(train)], "validation": [str(validation)], "max_bytes": 2 * CORPUS_BYTES,
                       "shard_bytes": SHARD_BYTES},
            "encode": {"model": str(ws.model("tiny"))},
            "runtime": {"num_workers": workers},
        }))
        peak = peak_tree_memory(memforge_command("prepare", "--params", str(config), *extra))
        figures[f"prepare_{name}_s"] = round(peak.seconds, 1)
        figures[f"prepare_{name}_peak_rss_mb"] = round(peak.rss / 2**20, 1)
        tokens = open_artifact(str(ws.root / f"prepare-{name}" / "tokens"), "tokens").manifest
        figures["prepare_train_tokens"] = tokens["counts"]["train_tokens"]
        figures["prepare_shards"] = len(tokens["stats"]["splits"]["train"]["parts"])
    figures["prepare_speedup"] = round(figures["prepare_serial_s"] / figures["prepare_parallel_s"], 2)
    return {figure: figures[figure] for figure in NOTES}
