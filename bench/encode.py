"""Parts ``encode`` (the encode stage's rows/s against a bare forward loop) and ``encode_rss`` (its peak memory
as the corpus grows)."""
from __future__ import annotations

import json
import time

from memforge.bench.measure import Note, memforge_command, peak_tree_memory
from memforge.bench.workspace import BLOCK, MODELS, STRIDE, Workspace
from memforge.storage import fs
from memforge.storage.artifact import open_artifact
from memforge.storage.params import Params

# encode_vs_bare corpus per model: large enough that Beam's fixed cost (~8-10 s to start two worker
# processes that import torch and transformers, and to shut them down) is amortised.
RATIO_SCALES = {"tiny": 24, "small": 12}
RSS_SCALES = (1, 4)


def _model_notes(name: str) -> dict[str, Note]:
    """The notes of the encode part's figures for one model."""
    stage, bare = f"encode_{name}_stage_rows_per_s", f"encode_{name}_bare_rows_per_s"
    hooked, shape = f"encode_{name}_bare_hooked_rows_per_s", MODELS[name]
    return {
        f"encode_{name}_rows": Note(f"datastore rows (both splits) of {RATIO_SCALES[name]} MB of text, encoded by "
                                    f"the {name} GPT-2 ({shape['n_layer']} layers, d {shape['n_embd']})"),
        stage: Note("rows/s of the whole encode stage (Beam, stores, markers, checksums), wall time"),
        bare: Note("rows/s of a bare forward loop over the same windows, batch size and thread count"),
        hooked: Note("rows/s of the bare loop with the stage's capture hook, which stops the forward pass at the "
                     "key's layer"),
        f"encode_vs_bare_{name}": Note("stage rows/s ÷ bare forward-loop rows/s", (stage, bare)),
        f"encode_vs_bare_hooked_{name}": Note("stage rows/s ÷ bare hooked-loop rows/s: the pipeline's own overhead",
                                              (stage, hooked)),
    }


NOTES = {figure: note for name in MODELS for figure, note in _model_notes(name).items()}
RSS_NOTES = {
    **{f"encode_peak_rss_mb_{scale}x": Note(f"peak RSS (MiB) of `memforge encode` (driver + Beam workers) on "
                                            f"{scale} MB of text, tiny model") for scale in RSS_SCALES},
    "encode_rss_4x_vs_1x": Note("peak RSS at 4x the corpus ÷ at 1x: flat when memory does not grow with the data",
                                ("encode_peak_rss_mb_4x", "encode_peak_rss_mb_1x")),
}


def _bare_encode_rows_per_second(params: Params, hooked: bool = False) -> tuple[float, int]:
    """Datastore rows/s of a bare forward loop over the same windows, batch size and thread count.

    ``hooked``: with the stage's own representation capture (which stops the forward pass once
    the key is captured), isolating the pipeline's overhead from that saving.
    """
    import numpy as np
    import torch

    from memforge.pipelines.encoder import RepresentationCapture, load_encoder
    from memforge.pipelines.windows import windows_for_rows
    from memforge.storage.paths import SPLITS, artifact_uri
    from memforge.storage.stores import PartOffsets, TokenStore

    tokens = open_artifact(artifact_uri(params.artifacts_dir, "tokens"), "tokens")
    model = load_encoder(params.encode.model)
    torch.set_num_threads(params.runtime.num_workers * params.runtime.threads_per_worker)
    batches, rows = [], 0
    for split in SPLITS:
        offsets = PartOffsets.from_json(tokens.manifest["stats"]["splits"][split]["parts"])
        stream = TokenStore.open(tokens.uri, split).read_rows(offsets, 0, offsets.total_rows).astype(np.int64)
        windows = windows_for_rows(0, offsets.total_rows - 1, offsets.total_rows, BLOCK, STRIDE)
        rows += offsets.total_rows - 1
        by_length: dict[int, list] = {}
        for w in windows:
            by_length.setdefault(w.end - w.begin, []).append(torch.from_numpy(stream[w.begin:w.end]))
        for group in by_length.values():
            batches += [torch.stack(group[i:i + params.encode.batch_size])
                        for i in range(0, len(group), params.encode.batch_size)]
    capture = RepresentationCapture(model, params.encode.representation, params.encode.layer) if hooked else None
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            if capture is None:
                model.base_model(input_ids=batch, use_cache=False)
            else:
                capture(model, batch)
    return rows / (time.perf_counter() - started), rows


def bench_encode(ws: Workspace) -> dict:
    """encode_vs_bare: stage rows/s (wall time of the whole stage) / bare forward-loop rows/s;
    encode_vs_bare_hooked: the same against a bare loop that also stops at the captured layer."""
    from memforge.flows.stages import run_stage

    figures = {}
    for name in MODELS:
        params = ws.params(RATIO_SCALES[name], name)
        started = time.perf_counter()
        run_stage("encode", params, rebuild=True)
        seconds = time.perf_counter() - started
        rows = sum(open_artifact(fs.join(params.artifacts_dir, "keys", s)).manifest["counts"]["rows"]
                   for s in ("train", "validation"))
        bare, bare_rows = _bare_encode_rows_per_second(params)
        hooked, _ = _bare_encode_rows_per_second(params, hooked=True)
        assert bare_rows == rows
        figures[f"encode_{name}_rows"] = rows
        figures[f"encode_{name}_stage_rows_per_s"] = round(rows / seconds, 1)
        figures[f"encode_{name}_bare_rows_per_s"] = round(bare, 1)
        figures[f"encode_{name}_bare_hooked_rows_per_s"] = round(hooked, 1)
        figures[f"encode_vs_bare_{name}"] = round(rows / seconds / bare, 3)
        figures[f"encode_vs_bare_hooked_{name}"] = round(rows / seconds / hooked, 3)
    return figures


def bench_encode_rss(ws: Workspace) -> dict:
    """Peak RSS (driver + Beam workers) of `memforge encode` at 1x and 4x the corpus, tiny model."""
    figures = {}
    for scale in RSS_SCALES:
        params = ws.params(scale, "tiny")
        config = ws.root / f"params-{scale}x.json"
        config.write_text(json.dumps(params.model_dump(mode="json")))
        peak = peak_tree_memory(memforge_command("encode", "--params", str(config), "--rebuild")).rss
        figures[f"encode_peak_rss_mb_{scale}x"] = round(peak / 2**20, 1)
    figures["encode_rss_4x_vs_1x"] = round(figures["encode_peak_rss_mb_4x"] / figures["encode_peak_rss_mb_1x"], 3)
    return figures
