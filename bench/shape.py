"""Part ``shape``: what the targets' keep rule costs and buys. On the demo (``params.yaml``'s defaults: k 1024,
the default T), tokens, decoder, keys and index are built once; then for each rule targets, train-memory and
evaluate run, and the part reports the distribution store's size, the tokens and mass each row keeps, the
stages' times and the memory's dev perplexity."""
from __future__ import annotations

import time

import numpy as np

from memforge.bench.measure import Note, store_bytes
from memforge.bench.workspace import Workspace
from memforge.storage import fs
from memforge.storage.params import Params, parse_params

# The rules compared: the top 32 plus the remainder bucket, and floors at 1e-4 (floor4) and 1e-8 (floor8, the reference)
RULES = {"width32": {"width": 32, "min_prob": None, "mass": None},
         "floor4": {"width": None, "min_prob": 1e-4, "mass": None},
         "floor8": {"width": None, "min_prob": 1e-8, "mass": None}}
LABELS = {"width32": "the top 32 tokens and the remainder bucket", "floor4": "every token with p ≥ 1e-4",
          "floor8": "every token with p ≥ 1e-8 (the reference's rule)"}
BUILT_ONCE = ("prepare", "train-decoder", "encode", "index")


def _rule_notes(rule: str) -> dict[str, Note]:
    label = LABELS[rule]
    return {
        f"{rule}_bytes_per_row": Note(f"{label}: train distribution store bytes on disk ÷ train rows"),
        f"{rule}_kept_tokens_median": Note(f"{label}: median tokens a train row keeps"),
        f"{rule}_kept_tokens_max": Note(f"{label}: most tokens a train row keeps (the store's padded width is the "
                                        "rule's cap)"),
        f"{rule}_kept_mass_median": Note(f"{label}: median probability mass a train row keeps (the rest reaches the "
                                         "memory as one remainder bucket)"),
        f"{rule}_targets_s": Note(f"{label}: seconds of the whole targets stage (both splits)"),
        f"{rule}_train_memory_s": Note(f"{label}: seconds of the whole train-memory stage"),
        f"{rule}_memory_alone_dev_perplexity": Note(f"{label}: dev perplexity of the memory alone (evaluate)"),
        f"{rule}_memory_dev_perplexity": Note(f"{label}: dev perplexity of decoder + memory at the λ and τ evaluate "
                                              "chose on dev"),
    }


NOTES = {
    "shape_train_rows": Note("train rows of the demo's datastore (the rows each rule's targets hold)"),
    "shape_k": Note("neighbours per row (targets.k)"),
    "shape_temperature": Note("targets.temperature of every rule"),
    "shape_memory_steps": Note("train-memory optimizer steps (memory.max_steps) of every rule"),
    "decoder_dev_perplexity": Note("dev perplexity of the decoder alone (the same for every rule)"),
    **{figure: note for rule in RULES for figure, note in _rule_notes(rule).items()},
}


def with_section(params: Params, section: str, keys: dict) -> Params:
    """``params`` with ``keys`` laid over ``section``, validated as a params file is."""
    values = params.model_dump(mode="json")
    return parse_params({**values, section: {**values[section], **keys}})


def kept(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens kept, mass kept) of every row of a distribution store, read chunk by chunk."""
    from memforge.storage.stores import DistributionStore

    store = DistributionStore.open(uri)
    chunk = store.rows.array("tokens").chunks[0]
    counts, masses = [], []
    for start in range(0, store.rows.n_rows, chunk):
        counts.append((store.tokens(start, start + chunk) >= 0).sum(axis=1))
        masses.append(1.0 - store.truncated(start, start + chunk).astype(np.float64))
    return np.concatenate(counts), np.concatenate(masses)


def bench_shape(ws: Workspace) -> dict:
    """``measure_rules`` on the demo: the package's default params (which ``params.yaml`` keeps), built in the
    bench workspace."""
    return measure_rules(Params().model_copy(update={"artifacts_dir": str(ws.root / "shape-artifacts")}))


def measure_rules(params: Params) -> dict:
    """For each of ``RULES``: the distribution store's bytes per row, the median tokens and mass a row keeps,
    the targets and train-memory seconds, and the memory's dev perplexity (alone and with the decoder), over
    the same tokens, decoder, keys and index (built once, or up to date already in ``params.artifacts_dir``:
    the tests measure a tiny chain so)."""
    from memforge.flows.stages import run_stage

    for stage in BUILT_ONCE:
        run_stage(stage, params)
    train = fs.join(params.artifacts_dir, "targets", "train")
    figures: dict = {}
    for rule, keys in RULES.items():
        ruled = with_section(params, "targets", keys)
        started = time.perf_counter()
        run_stage("targets", ruled, rebuild=True)
        targets_s = time.perf_counter() - started
        started = time.perf_counter()
        run_stage("train-memory", ruled, rebuild=True)
        memory_s = time.perf_counter() - started
        evaluated = run_stage("evaluate", ruled, rebuild=True)
        dev = fs.read_json(fs.join(evaluated, "metrics.json"))["dev_perplexity"]
        counts, masses = kept(train)
        figures.update({
            "shape_train_rows": len(counts), "shape_k": params.targets.k,
            "shape_temperature": params.targets.temperature, "shape_memory_steps": params.memory.max_steps,
            "decoder_dev_perplexity": dev["decoder"],
            f"{rule}_bytes_per_row": round(store_bytes(fs.join(train, "distributions.zarr")) / len(counts), 1),
            f"{rule}_kept_tokens_median": float(np.median(counts)), f"{rule}_kept_tokens_max": int(counts.max()),
            f"{rule}_kept_mass_median": round(float(np.median(masses)), 4),
            f"{rule}_targets_s": round(targets_s, 1), f"{rule}_train_memory_s": round(memory_s, 1),
            f"{rule}_memory_alone_dev_perplexity": dev["memory_alone"],
            f"{rule}_memory_dev_perplexity": dev["decoder+memory"],
        })
    return figures
