"""``memforge bench --only scale``: how each stage's time, memory and disk grow with the datastore.

Real datastores at ``SCALES`` x the bench's 1 MB of text: the first n MB of the standard library's
``.py`` files in sorted order (distinct real text; a smaller corpus is a prefix of a larger one), with the
same validation documents at every size (``SCALE_VALIDATION``: files that sort after the largest size's
text, so evaluate's time per validation row compares sizes on the same queries), each
built from scratch with the bench's tiny GPT-2 as the encoder, through the stages as users run them:
one ``memforge <stage>`` process each, default params otherwise (the ``auto`` index), with k 64 targets
at T 16 (``SCALE_TARGETS``: the figures' settings since the bench began) and ``SCALE_MEMORY_STEPS`` memory
steps. Per size and stage: wall seconds per row, peak RSS of the
stage's whole process tree, bytes on disk per row; per stage, the fitted exponent b of time ∝ N^b.
kNN-LM's cost beyond these sizes is measured by ``bench_knnlm_scale``. Writes ``scale.json`` and
``scale.png`` (log-log) into the output directory.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from memforge.bench import knnlm_scale
from memforge.bench.measure import Note, memforge_command, peak_tree_memory, tree_bytes
from memforge.storage import fs
from memforge.storage.artifact import open_artifact
from memforge.storage.params import Params, parse_params

SCALES = (1, 2, 4, 8)
SCALE_MEMORY_STEPS = 300
SCALE_TARGETS = {"k": 64, "temperature": 16.0}
SCALE_VALIDATION = ["{stdlib}/tomllib/*.py", "{stdlib}/zoneinfo/*.py"]  # ~61 KB; 8x's text ends at lib2to3/
MEMORY_KINDS = ("rss", "private", "pss")  # the peaks of a stage's process tree (``PeakMemory``)
STAGES = ("prepare", "encode", "index", "targets", "train-memory", "evaluate")
# what each stage's time, memory and disk are divided by, and which artifacts are its output
PER_ROW = {"prepare": "token", "encode": "row", "index": "datastore row", "targets": "row",
           "train-memory": "step", "evaluate": "validation row"}
OUTPUTS = {"prepare": ("tokens",), "encode": ("keys",), "index": ("index",), "targets": ("targets",),
           "train-memory": ("memory",), "evaluate": ("eval",)}
MEMORY_NAMES = {"rss": "RSS", "private": "private memory (RSS minus shared pages)",
                "pss": "PSS (shared pages split among the processes)"}
FIRST, LAST = SCALES[0], SCALES[-1]
SIZES_SHOWN = "/".join(f"{s}x" for s in SCALES)


def _stage_notes(stage: str) -> dict[str, Note]:
    """The notes of one stage's scale figures."""
    return {
        f"scale_{stage}_b": Note(f"b of `memforge {stage}` wall time ∝ N^b over {SIZES_SHOWN} (least squares, "
                                 "log-log)"),
        f"scale_{stage}_seconds_per_{LAST}x_vs_{FIRST}x": Note(
            f"{stage}'s seconds per {PER_ROW[stage]} at {LAST}x ÷ at {FIRST}x (1: linear in N)"),
        **{f"scale_{stage}_peak_{kind}_{LAST}x_vs_{FIRST}x": Note(f"{stage}'s peak {name} of its process tree at "
                                                                 f"{LAST}x ÷ at {FIRST}x")
           for kind, name in MEMORY_NAMES.items()},
    }


NOTES = {
    "scale_sizes_rows": Note(f"datastore rows at {SIZES_SHOWN} the bench's 1 MB of text (tiny model, default params)"),
    **{figure: note for stage in STAGES for figure, note in _stage_notes(stage).items()},
    **{f"scale_index_peak_{kind}_minus_codes_mb": Note(f"index stage's peak {name} minus its PQ codes and ids (MiB), "
                                                       f"at {SIZES_SHOWN}") for kind, name in MEMORY_NAMES.items()},
    **knnlm_scale.NOTES,
    "scale_peak_disk_gb": Note("the largest the bench workspace grew on disk (GiB)"),
    "scale_written": Note("the file with every size's figures (scale.png beside it: log-log plots)"),
}


def scale_params(ws, scale: int) -> Params:
    """The default params for a datastore of ``scale`` x the bench's text, encoded by the tiny model."""
    defaults = Params()
    return parse_params({
        "artifacts_dir": str(ws.root / f"scale-{scale}x"),
        "corpus": {**ws.corpus(scale), "validation": SCALE_VALIDATION},
        "encode": {**defaults.section("encode"), "model": str(ws.model("tiny"))},
        "targets": {**defaults.section("targets"), **SCALE_TARGETS},
        "memory": {**defaults.section("memory"), "max_steps": SCALE_MEMORY_STEPS,
                   "checkpoint_every": SCALE_MEMORY_STEPS},
    })


def _rows(params: Params, stage: str) -> int:
    """What the stage's figures are per: tokens, rows of both splits, datastore rows, steps or validation rows."""
    art = params.artifacts_dir
    if stage == "prepare":
        counts = open_artifact(fs.join(art, "tokens")).manifest["counts"]
        return counts["train_tokens"] + counts["validation_tokens"]
    if stage in ("encode", "targets"):
        output = OUTPUTS[stage][0]
        return sum(open_artifact(fs.join(art, output, s)).manifest["counts"]["rows"] for s in ("train", "validation"))
    if stage == "index":
        return open_artifact(fs.join(art, "index")).manifest["counts"]["rows"]
    if stage == "train-memory":
        return params.memory.max_steps
    return open_artifact(fs.join(art, "eval")).manifest["counts"]["rows"]


def _disk_bytes(params: Params, stage: str) -> int:
    """The stage's output artifacts' file sizes."""
    return sum(tree_bytes(Path(fs.join(params.artifacts_dir, name)), allocated=False) for name in OUTPUTS[stage])


def fit_exponent(sizes, values) -> float:
    """b of the least-squares fit log(value) = a + b·log(size)."""
    slope, _ = np.polyfit(np.log(np.asarray(sizes, float)), np.log(np.asarray(values, float)), 1)
    return round(float(slope), 3)


def run_sizes(ws, scales=SCALES) -> dict:
    """Build each size's datastore stage by stage (one process each); per stage and size: seconds, peak RSS,
    disk bytes, and the count they are per."""
    sizes: dict = {}
    for scale in scales:
        params = scale_params(ws, scale)
        config = ws.root / f"params-scale-{scale}x.json"
        config.write_text(json.dumps(params.model_dump(mode="json")))
        figures = {}
        for stage in STAGES:
            peak = peak_tree_memory(memforge_command(stage, "--params", str(config)))
            figures[stage] = {"seconds": round(peak.seconds, 2), "peak_rss_mb": round(peak.rss / 2**20, 1),
                              "peak_private_mb": round(peak.private / 2**20, 1),
                              "peak_pss_mb": round(peak.pss / 2**20, 1),
                              "disk_bytes": _disk_bytes(params, stage), "per": _rows(params, stage)}
        metrics = fs.read_json(fs.join(params.artifacts_dir, "eval", "metrics.json"))
        memory = open_artifact(fs.join(params.artifacts_dir, "memory")).manifest["stats"]
        index = open_artifact(fs.join(params.artifacts_dir, "index")).manifest["stats"]
        sizes[scale] = {
            "index_codes_mb": round(figures["index"]["per"] * (index["code_size"] + 8) / 2**20, 1),  # codes + ids
            "workspace_disk_gb": round(tree_bytes(ws.root) / 2**30, 2),
            "datastore_rows": figures["index"]["per"], "stages": figures,
            "index_factory": index["factory"],
            "memory_loop_seconds_per_step": round(params.memory.batch_size / memory["rows_per_second"], 5),
            "tokens_per_second": metrics["tokens_per_second"],
        }
    return sizes


def summarise(sizes: dict) -> dict:
    """Per stage: seconds and RSS per size, the fitted b of time ∝ N^b (N = datastore rows), and the largest
    size's seconds per row and peak RSS ÷ the smallest's; for evaluate, tokens/s of each model per size."""
    scales = sorted(sizes)
    first, last = scales[0], scales[-1]
    n_rows = [sizes[s]["datastore_rows"] for s in scales]
    table: dict = {"datastore_rows": dict(zip(scales, n_rows)),
                   "index_factory": {s: sizes[s]["index_factory"] for s in scales}}
    for stage in STAGES:
        per_row = [sizes[s]["stages"][stage]["seconds"] / sizes[s]["stages"][stage]["per"] for s in scales]
        peaks = {kind: [sizes[s]["stages"][stage][f"peak_{kind}_mb"] for s in scales] for kind in MEMORY_KINDS}
        disk = [sizes[s]["stages"][stage]["disk_bytes"] / sizes[s]["stages"][stage]["per"] for s in scales]
        table[stage] = {
            "per": PER_ROW[stage],
            "seconds": [sizes[s]["stages"][stage]["seconds"] for s in scales],
            "seconds_per": [float(f"{v:.4g}") for v in per_row],
            **{f"peak_{kind}_mb": values for kind, values in peaks.items()},
            "disk_bytes_per": [round(v, 1) for v in disk],
            "b_time": fit_exponent(n_rows, [sizes[s]["stages"][stage]["seconds"] for s in scales]),
            f"seconds_per_{last}x_vs_{first}x": round(per_row[-1] / per_row[0], 3),
            **{f"peak_{kind}_{last}x_vs_{first}x": round(values[-1] / values[0], 3) for kind, values in peaks.items()},
        }
    table["index_codes_mb"] = [sizes[s]["index_codes_mb"] for s in scales]
    for kind in MEMORY_KINDS:
        table[f"index_peak_{kind}_minus_codes_mb"] = [
            round(sizes[s]["stages"]["index"][f"peak_{kind}_mb"] - sizes[s]["index_codes_mb"], 1) for s in scales]
    table["memory_loop_seconds_per_step"] = [sizes[s]["memory_loop_seconds_per_step"] for s in scales]
    table["evaluate_tokens_per_second"] = {s: sizes[s]["tokens_per_second"] for s in scales}
    return table


def plot(table: dict, knnlm: dict, path: Path) -> None:
    """Log-log: seconds per row and peak RSS against datastore rows per stage; kNN-LM vs memory tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16.5, 4.5))
    n_rows = list(table["datastore_rows"].values())
    for stage in STAGES:
        axes[0].loglog(n_rows, table[stage]["seconds_per"], "o-", label=f"{stage} (per {table[stage]['per']})")
        line, = axes[1].loglog(n_rows, table[stage]["peak_rss_mb"], "o-", label=f"{stage} RSS")
        axes[1].loglog(n_rows, table[stage]["peak_private_mb"], "x--", color=line.get_color(), label=f"{stage} private")
        axes[1].loglog(n_rows, table[stage]["peak_pss_mb"], "+:", color=line.get_color(), label=f"{stage} PSS")
    axes[0].set(xlabel="datastore rows N", ylabel="wall seconds per unit", title="time per unit")
    axes[1].set(xlabel="datastore rows N", ylabel="MB, summed over the process tree",
                title="peak RSS (solid), private (dashed), PSS (dotted)")
    for config, series in knnlm["series"].items():
        sizes = [p["datastore_rows"] for p in series]
        for model, style in (("knnlm", "o-"), ("memory", "s--"), ("decoder", "^:")):
            axes[2].loglog(sizes, [p["tokens_per_second"][model] for p in series], style,
                           label=f"{model} ({config}: IVF4096, synthetic beyond 0.6M, small model)")
    real = table["evaluate_tokens_per_second"]
    for model, style in (("knnlm", "o-"), ("memory", "s--")):
        axes[2].loglog(n_rows, [real[s][model] for s in real], style, label=f"{model} (auto index, real, tiny model)")
    axes[2].set(xlabel="datastore rows N", ylabel="evaluate tokens/s", title="kNN-LM vs decoder + memory")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2 if ax is axes[1] else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_scale(ws) -> dict:
    """How time, memory and disk grow with N, and kNN-LM against the memory up to 33 M keys; only when asked for
    (``--only scale``: ~40 minutes). Writes ``scale.json`` and ``scale.png`` into ``ws.out_dir``; returns the
    headline figures flat."""
    sizes = run_sizes(ws)
    table = summarise(sizes)
    knnlm = knnlm_scale.knnlm_sweep(ws, scale_params(ws, SCALES[0]))
    out = Path(ws.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps({"sizes": sizes, "table": table, "knnlm": knnlm}, indent=1))
    plot(table, knnlm, out / "scale.png")
    flat = {"scale_sizes_rows": "/".join(str(n) for n in table["datastore_rows"].values())}
    for stage in STAGES:
        flat[f"scale_{stage}_b"] = table[stage]["b_time"]
        flat[f"scale_{stage}_seconds_per_{LAST}x_vs_{FIRST}x"] = table[stage][f"seconds_per_{LAST}x_vs_{FIRST}x"]
        for kind in MEMORY_KINDS:
            flat[f"scale_{stage}_peak_{kind}_{LAST}x_vs_{FIRST}x"] = table[stage][f"peak_{kind}_{LAST}x_vs_{FIRST}x"]
    for kind in MEMORY_KINDS:
        flat[f"scale_index_peak_{kind}_minus_codes_mb"] = "/".join(
            str(v) for v in table[f"index_peak_{kind}_minus_codes_mb"])
    flat.update(knnlm_scale.flat(knnlm))
    flat["scale_peak_disk_gb"] = max(knnlm["workspace_disk_gb"], *(sizes[s]["workspace_disk_gb"] for s in sizes))
    flat["scale_written"] = str(out / "scale.json")
    return flat

