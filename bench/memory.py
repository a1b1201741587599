"""Part ``memory``: evaluate's tokens/s of decoder + memory against the decoder alone and kNN-LM, on the demo's
artifacts."""
from __future__ import annotations

import statistics

from memforge.bench.measure import Note
from memforge.bench.workspace import Workspace
from memforge.storage import fs
from memforge.storage.errors import MemforgeError
from memforge.storage.params import Params, load_params

# The artifacts evaluate reads: the demo's, linked into the bench workspace so its eval is the bench's own.
EVALUATE_INPUTS = ("tokens", "decoder", "keys", "index", "memory")
MEMORY_RUNS = 5  # tokens/s per model: the median over this many evaluate runs
MODELS = {"decoder": "the decoder alone", "knnlm": "kNN-LM (decoder + datastore search)",
          "memory": "decoder + memory"}
IN_METRICS = {"decoder": "decoder", "knnlm": "knnlm", "memory": "decoder+memory"}  # each model's name in metrics.json

NOTES = {
    "memory_bench_tokens": Note("validation tokens each evaluate run scores (the demo's, `memforge run`)"),
    "memory_bench_knn_k": Note("neighbours kNN-LM retrieves per token"),
    "memory_bench_runs": Note("evaluate runs; each tokens/s is their median"),
    **{f"{name}_tokens_per_s": Note(f"tokens/s of {what}, one process") for name, what in MODELS.items()},
    **{f"{name}_perplexity": Note(f"test perplexity of {what} (λ chosen on the dev half of validation)")
       for name, what in MODELS.items()},
    "memory_vs_decoder": Note("decoder + memory tokens/s ÷ decoder tokens/s", ("memory_tokens_per_s",
                                                                               "decoder_tokens_per_s")),
    "memory_vs_knnlm": Note("decoder + memory tokens/s ÷ kNN-LM tokens/s", ("memory_tokens_per_s",
                                                                           "knnlm_tokens_per_s")),
    "decoder_vs_knnlm": Note("decoder tokens/s ÷ kNN-LM tokens/s: memory_vs_knnlm if the memory cost nothing",
                             ("decoder_tokens_per_s", "knnlm_tokens_per_s")),
}


def demo_artifacts(params: Params) -> str:
    """The demo's artifacts directory (``params.artifacts_dir``); refuses, naming what is missing, unless
    ``memforge run`` has built every artifact the memory part reads."""
    demo = fs.normalize(params.artifacts_dir)
    missing = [name for name in ("tokens", "decoder", "keys/validation", "index", "memory")
               if not fs.exists(fs.join(demo, name, "_manifest.json"))]
    if missing:
        raise MemforgeError(f"bench memory: {demo} lacks the demo's {', '.join(missing)}: run `memforge run` first")
    return demo


def bench_memory(ws: Workspace) -> dict:
    """memory_vs_decoder, memory_vs_knnlm: tokens/s of decoder + memory ÷ decoder alone and ÷ kNN-LM over
    the same validation tokens in one process, each the median of ``MEMORY_RUNS`` ``evaluate`` runs over
    the demo's artifacts (``artifacts_dir`` of ./params.yaml, built by ``memforge run``)."""
    from memforge.flows.stages import run_stage

    params = load_params()
    demo = demo_artifacts(params)
    linked = ws.root / "demo-artifacts"
    linked.mkdir()
    for name in EVALUATE_INPUTS:
        (linked / name).symlink_to(fs.join(demo, name), target_is_directory=True)
    runs = []
    for _ in range(MEMORY_RUNS):  # one evaluate pass over the demo's validation split is only ~0.5-4 s
        evaluated = run_stage("evaluate", params.model_copy(update={"artifacts_dir": str(linked)}), rebuild=True)
        runs.append(fs.read_json(fs.join(evaluated, "metrics.json")))
    metrics = runs[0]
    speed = {name: statistics.median(run["tokens_per_second"][IN_METRICS[name]] for run in runs) for name in MODELS}
    perplexity = metrics["perplexity"]
    return {
        "memory_bench_tokens": metrics["rows"], "memory_bench_knn_k": metrics["k"], "memory_bench_runs": MEMORY_RUNS,
        **{f"{name}_tokens_per_s": speed[name] for name in MODELS},
        **{f"{name}_perplexity": perplexity[IN_METRICS[name]] for name in MODELS},
        "memory_vs_decoder": round(speed["memory"] / speed["decoder"], 3),
        "memory_vs_knnlm": round(speed["memory"] / speed["knnlm"], 3),
        # the bound on memory_vs_knnlm: what it would be if the memory cost nothing on top of the decoder
        "decoder_vs_knnlm": round(speed["decoder"] / speed["knnlm"], 3),
    }
