"""``memforge evaluate``: perplexity and speed of (a) the decoder, (b) kNN-LM, the decoder interpolated with a
live kNN search over the index, and (c) the decoder + MLP memory.

All three score the same rows with the same contexts: the windows that ``encode`` used for the validation
key store (so row i predicts token i+1), on the validation split and, when the token store has one, on the
test split. Each is one timed pass over the scored splits in one run: (a) the decoder alone, (b) the decoder
with the query representation captured on the way, a FAISS search (k, nprobe, exact re-ranking when the index
has exact keys) and p = λ·p_kNN + (1−λ)·p_dec with p_kNN = softmax(−d/T) summed per token, (c) the decoder with
the memory's input captured, the memory, and p = λ·p_mem + (1−λ)·p_dec.

kNN-LM's (λ, T) and the memory's (λ, τ), τ a temperature on its logits, are chosen on dev, each for itself,
from ``evaluate.lambda_grid``, ``evaluate.temperature_grid`` and ``evaluate.memory_temperature_grid``; every
reported perplexity is on test at those values (the memory alone at τ 1, its own output). Dev and test are
the validation and test splits, or parts of the validation split when there is no test split (``dev_test``).
Output ``<artifacts_dir>/eval``: ``metrics.json`` (DVC metrics; its ``protocol`` says which rows were dev
and test), ``report.md`` (the papers' table: valid and test perplexity per model with the chosen values),
``token_log_probs.parquet`` (per row: its number in its split, target, side (dev/test), log p of the decoder,
kNN-LM, decoder + memory, p_kNN alone and the memory alone, and ``nearest_distance``: the squared L2
distance of the row's nearest neighbour in the datastore, to see where kNN-LM and the memory part),
``lambda.json`` and ``loss.json`` (DVC plots data) and their PNGs.

When ``evaluate.lm_eval_tasks`` names lm-evaluation-harness tasks, both the decoder alone and the decoder +
memory at the memory's dev-chosen (λ, τ) (``compose.compose``: the model ``export`` publishes) are scored on them
(``training.harness``), side by side under ``lm_eval`` in ``metrics.json`` and in ``report.md``.
"""
from __future__ import annotations

import inspect
import logging
import tempfile
import time
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from memforge.pipelines import devices, faiss_gpu, sharded_index
from memforge.pipelines.datastore_rows import DatastoreRows
from memforge.pipelines.encoder import RepresentationCapture, load_encoder
from memforge.pipelines.faiss_build import faiss
from memforge.pipelines.stage import Published
from memforge.pipelines.tokenizer import load_tokenizer
from memforge.pipelines.windows import window_batches, windows_for_rows
from memforge.storage import fs
from memforge.storage.shards import load_plan
from memforge.storage.stores import PartOffsets, TokenStore
from memforge.training import harness
from memforge.training.compose import compose
from memforge.training.dev_test import Sides, sides_with_test_split, validation_sides
from memforge.training.lm_eval import log_probs_at, perplexity
from memforge.training.mlp_memory import MLPMemory
from memforge.training.token_stream import TokenStream

log = logging.getLogger("memforge")
WITH_MEMORY = "decoder+memory"  # the model the memory is for, named so in metrics and columns
PASS_NAMES = {"decoder": "decoder", "knnlm": "knnlm", "memory": WITH_MEMORY}  # timed pass -> its model's name


class Scorer:
    """One pass over the validation windows: per row, the target's log-probability under the
    decoder and the representations captured on the way (query, memory input)."""

    def __init__(self, decoder, stream: TokenStream, n_rows: int, block_size: int, stride: int, batch_size: int):
        self.decoder, self.n_rows, self.batch_size = decoder, n_rows, batch_size
        self.device = next(decoder.parameters()).device
        self.windows = windows_for_rows(0, n_rows, stream.n_tokens, block_size, stride)
        self.tokens = stream.slice(0, stream.n_tokens)
        # HF causal LMs that take ``logits_to_keep`` apply the LM head to the scored positions only
        # (a window scores its last ``stride`` tokens: half the head's work and memory traffic)
        self.trims_logits = "logits_to_keep" in inspect.signature(decoder.forward).parameters

    @torch.inference_mode()
    def run(self, captures: list[RepresentationCapture], on_batch) -> np.ndarray:
        """log p_dec(target) for every row; ``on_batch(rows, targets, logp_dec_rows, captured)`` may
        replace each batch's log-probabilities (kNN-LM, memory)."""
        out = np.empty(self.n_rows, np.float64)
        for batch in window_batches(self.windows, self.batch_size):
            ids = torch.from_numpy(np.stack([self.tokens[w.begin:w.end] for w in batch]))
            rows, positions, members = [], [], []
            for b, w in enumerate(batch):
                span = np.arange(w.first - 1, w.stop - 1)  # datastore rows == positions of the context
                rows.append(span)
                positions.append(span - w.begin)
                members.append(np.full(len(span), b))
            rows, positions, members = (np.concatenate(a) for a in (rows, positions, members))
            keep = {"logits_to_keep": ids.shape[1] - int(positions.min())} if self.trims_logits else {}
            logits = self.decoder(input_ids=ids.to(self.device), use_cache=False, **keep).logits
            targets = torch.from_numpy(self.tokens[rows + 1])
            scored = logits[members, positions - (ids.shape[1] - logits.shape[1])]
            logp_dec = log_probs_at(scored, targets.to(self.device)).cpu().numpy()
            captured = [c.value[members, positions].float() for c in captures]
            out[rows] = on_batch(rows, targets.numpy(), logp_dec, captured) if on_batch else logp_dec
        return out


def _mix(logp_dec: np.ndarray, logp_other: np.ndarray, lam: float) -> np.ndarray:
    """log(λ·p_other + (1−λ)·p_dec), computed from log-probabilities (no underflow of tiny p)."""
    with np.errstate(divide="ignore"):
        return np.logaddexp(np.log(lam) + logp_other, np.log1p(-lam) + logp_dec)


class Scored(NamedTuple):
    """Per validation row: log p of the decoder, p_kNN per temperature, log p of the memory per memory
    temperature and at τ 1; each pass's seconds; and the squared L2 distance of each row's nearest
    neighbour in the datastore."""
    logp_dec: np.ndarray
    p_knn: np.ndarray
    logp_mem: np.ndarray
    logp_mem_alone: np.ndarray
    timings: dict
    nearest: np.ndarray


def score_three_ways(scorer: Scorer, searcher, rows_store: DatastoreRows, memory: MLPMemory, k: int,
                     temperatures: np.ndarray, query_at: tuple, memory_at: tuple, precision: str,
                     only: tuple[str, ...] = ("decoder", "knnlm", "memory"),
                     memory_temperatures: np.ndarray = np.ones(1)) -> Scored:
    """The three timed passes over the scorer's rows (or those named in ``only``): the decoder; kNN-LM (the
    query representation ``query_at`` = (representation, layer) captured, ``searcher.search`` for k
    candidates, re-ranked by exact distance when ``rows_store`` has keys, p_kNN at each temperature); the
    memory (its input ``memory_at`` captured; log p at each of ``memory_temperatures`` and at τ 1). Each
    pass's time counts its first temperature: the others only serve the choice."""
    decoder, device = scorer.decoder, scorer.device
    exact = rows_store.keys is not None
    p_knn = np.zeros((len(temperatures), scorer.n_rows))
    logp_mem = np.zeros((len(memory_temperatures), scorer.n_rows))
    at_one = np.flatnonzero(memory_temperatures == 1.0)  # the grid's τ 1 row is the memory alone
    logp_mem_alone = logp_mem[at_one[0]] if len(at_one) else np.zeros(scorer.n_rows)
    nearest = np.full(scorer.n_rows, np.inf, dtype=np.float32)
    untimed = {"knnlm": 0.0, "memory": 0.0}

    def knn_probs(rows, targets, logp_dec, captured):
        query = np.ascontiguousarray(captured[0].cpu().numpy(), dtype=np.float32)
        dists, ids, values = rows_store.neighbours(query, *searcher.search(query, k), exact, ordered=False)
        found, hits = values >= 0, values == targets[:, None]
        scaled = np.where(found, -dists.astype(np.float64), -np.inf)
        for t, temperature in enumerate(temperatures):
            started = time.perf_counter()
            logits = scaled / temperature
            weights = np.exp(logits - logits.max(axis=1, keepdims=True))
            p_knn[t, rows] = (weights * hits).sum(1) / weights.sum(1)
            if t:
                untimed["knnlm"] += time.perf_counter() - started
        started = time.perf_counter()
        nearest[rows] = dists.min(axis=1)  # a diagnostic, not part of kNN-LM: untimed
        untimed["knnlm"] += time.perf_counter() - started
        return logp_dec  # mixed once T and λ are chosen

    def memory_probs(rows, targets, logp_dec, captured):
        logits, targets = memory(captured[0]), torch.from_numpy(targets).to(device)
        for t, temperature in enumerate(memory_temperatures):
            started = time.perf_counter()
            logp_mem[t, rows] = log_probs_at(logits / float(temperature), targets).cpu().numpy()
            if t:
                untimed["memory"] += time.perf_counter() - started
        if not len(at_one):
            started = time.perf_counter()
            logp_mem_alone[rows] = log_probs_at(logits, targets).cpu().numpy()  # its own output: untimed
            untimed["memory"] += time.perf_counter() - started
        return logp_dec

    timings, logp_dec = {}, None
    passes = {  # each pass's hooks are registered when it starts and removed when it ends
        "decoder": lambda: ([], None),
        "knnlm": lambda: ([RepresentationCapture(decoder, *query_at, stop=False)], knn_probs),
        "memory": lambda: ([RepresentationCapture(decoder, *memory_at, stop=False)], memory_probs),
    }
    for name in (name for name in passes if name in only):
        captures, on_batch = passes[name]()
        started = time.perf_counter()
        with devices.autocast(device, precision):
            scored = scorer.run(captures, on_batch)
        timings[name] = time.perf_counter() - started - untimed.get(name, 0.0)
        if name == "decoder":
            logp_dec = scored
        for capture in captures:
            capture.handle.remove()
    return Scored(logp_dec, p_knn, logp_mem, logp_mem_alone, timings, nearest)


def evaluate(params, decoder_path: str, inputs: dict, uri: str, device: torch.device,
             task_manager=None, search_gpu: str | int | None = None) -> Published:
    """Score the validation (and test) split three ways on ``device`` (autocast to ``evaluate.precision``; the
    kNN search on FAISS's CPU, or with ``search_gpu`` on GPU copies of the index: ``faiss_gpu``), choose each
    model's λ (and kNN-LM's T) on dev, report on test, score the lm-eval tasks with the decoder and decoder +
    memory when ``task_manager`` (``harness.task_manager``) is given, and write metrics, per-token log-probs and
    plots into ``uri``."""
    config = params.evaluate
    tokens, queries, index = inputs["tokens"], inputs["keys/validation"], inputs["index"]
    memory_artifact = inputs["memory"]
    stats = queries.manifest["stats"]
    decoder = load_encoder(decoder_path, params.runtime.trust_remote_code).to(device)
    with tempfile.TemporaryDirectory() as scratch:
        memory = MLPMemory.from_pretrained(fs.local_dir(memory_artifact.path("model"), scratch)).to(device).eval()
    memory_params = memory_artifact.manifest["params"]
    searcher = sharded_index.ShardedIndex(index.uri, index.fingerprint, [s.name for s in load_plan(index.uri).shards],
                                          config.nprobe, index.manifest["stats"]["merge"] == "ondisk", search_gpu)
    rows_store = DatastoreRows(index.uri, index.fingerprint)
    exact = rows_store.keys is not None
    scorers, sides, docs = _scorers_and_sides(decoder, tokens, queries, config)
    n_rows = sum(scorer.n_rows for scorer in scorers)
    is_dev = sides.is_dev
    k = min(config.k, index.manifest["counts"]["rows"])
    temperatures = np.asarray(config.temperature_grid, dtype=np.float64)
    memory_temperatures = np.asarray(config.memory_temperature_grid, dtype=np.float64)
    if params.index.threads:
        faiss.omp_set_num_threads(params.index.threads)
    scored = [score_three_ways(scorer, searcher, rows_store, memory, k, temperatures,
                               (stats["representation"], stats["layer"]),
                               (memory_params["representation"], memory_params["input_layer"]), config.precision,
                               memory_temperatures=memory_temperatures) for scorer in scorers]
    logp_dec, p_knn, logp_mem, logp_mem_alone, nearest = (np.concatenate([getattr(s, field) for s in scored], axis=-1)
                                                          for field in ("logp_dec", "p_knn", "logp_mem",
                                                                        "logp_mem_alone", "nearest"))
    timings = {name: sum(s.timings[name] for s in scored) for name in scored[0].timings}
    with np.errstate(divide="ignore"):
        logp_knn = np.log(p_knn)
    choice = choose_on_dev(logp_dec, logp_knn, logp_mem, is_dev, config.lambda_grid, temperatures,
                           memory_temperatures)
    log_probs = {"decoder": logp_dec, "knnlm": choice.knnlm, WITH_MEMORY: choice.memory,
                 "memory_alone": logp_mem_alone}
    metrics = _metrics(log_probs, is_dev, choice, timings, n_rows, k, config, exact)
    metrics["warnings"] = grid_edge_warnings(choice, config)
    for warning in metrics["warnings"]:
        log.warning("evaluate: %s", warning)
    metrics["protocol"] = sides.describe(docs)
    if sides.dev_split == sides.test_split:  # the validation split divided: how
        metrics["protocol"].update(dev_fraction=config.dev_fraction, split_seed=config.split_seed)
    metrics["keys"] = {"representation": stats["representation"], "layer": stats["layer"]}
    metrics["memory_input"] = {"representation": memory_params["representation"],
                               "layer": memory_params["input_layer"]}
    if task_manager is not None:
        metrics["lm_eval"] = _lm_eval(params, decoder_path, decoder, memory, choice, metrics["memory_input"],
                                      task_manager)
    sweep = [{"lambda": lam, **{f"{name}_{side}": round(perplexity(mixed[mask]), 4)
                                for name, mixed in (("knnlm", _mix(logp_dec, choice.logp_knn, lam)),
                                                    (WITH_MEMORY, _mix(logp_dec, choice.logp_mem, lam)))
                                for side, mask in (("dev", is_dev), ("test", ~is_dev))}}
             for lam in config.lambda_grid]
    columns = {**log_probs, "knn": choice.logp_knn, "nearest_distance": nearest}
    _write_outputs(uri, metrics, sweep, columns, is_dev, scorers, inputs)
    test = metrics["perplexity"]
    log.info("evaluate (test side): perplexity decoder %.3f, kNN-LM %.3f (λ %g, T %g), decoder+memory %.3f "
             "(λ %g, τ %g), memory alone %.3f; metrics in %s", test["decoder"], test["knnlm"], choice.knn_lambda,
             choice.temperature, test[WITH_MEMORY], choice.memory_lambda, choice.memory_temperature,
             test["memory_alone"],
             fs.join(uri, "metrics.json"))
    return Published(counts={"rows": n_rows}, stats={**metrics, "device": devices.describe(device),
                                                     "search_device": faiss_gpu.search_device(search_gpu, k),
                                                     "precision": config.precision})


def _lm_eval(params, decoder_path: str, decoder, memory: MLPMemory, choice: Choice, memory_input: dict,
             task_manager) -> dict:
    """The lm-eval tasks scored with the decoder alone, then with decoder + memory at the chosen (λ, τ)."""
    config = params.evaluate
    tokenizer = load_tokenizer(decoder_path, params.runtime.trust_remote_code)

    def score(model) -> dict:
        return harness.score(model, tokenizer, task_manager, config.lm_eval_tasks, config.lm_eval_limit,
                             config.batch_size, config.precision)

    scores = {"decoder": score(decoder)}
    scores[WITH_MEMORY] = score(compose(decoder, memory, choice.memory_lambda, choice.memory_temperature,
                                        memory_input["representation"], memory_input["layer"]))
    return harness.side_by_side(scores)


def _scorers_and_sides(decoder, tokens, queries, config) -> tuple[list[Scorer], Sides, np.ndarray | None]:
    """One scorer per scored split (validation, and test when the token store has one) with the same windows
    as the validation keys, the dev/test protocol, and the validation rows' documents when they decide it."""
    stats = queries.manifest["stats"]
    scorers = [Scorer(decoder, TokenStream(tokens, "validation"), queries.manifest["counts"]["rows"],
                      stats["block_size"], stats["stride"], config.batch_size)]
    test_tokens = tokens.manifest["stats"]["splits"].get("test", {}).get("tokens", 0)
    if test_tokens:
        scorers.append(Scorer(decoder, TokenStream(tokens, "test"), test_tokens - 1, stats["block_size"],
                              stats["stride"], config.batch_size))
        return scorers, sides_with_test_split(scorers[0].n_rows, scorers[1].n_rows), None
    docs = _row_documents(tokens, scorers[0].n_rows)
    return scorers, validation_sides(docs, config.dev_fraction, config.split_seed), docs


def _row_documents(tokens, n_rows: int) -> np.ndarray:
    """The document of each validation row: that of the token it predicts (row i predicts token i + 1)."""
    offsets = PartOffsets.from_json(tokens.manifest["stats"]["splits"]["validation"]["parts"])
    return TokenStore(tokens.uri, "validation").read_rows(offsets, 1, n_rows + 1, column="doc")


class Choice(NamedTuple):
    """What dev chose: kNN-LM's (λ, T), the memory's (λ, τ), and the mixed log-probabilities at those values."""
    knn_lambda: float
    temperature: float
    memory_lambda: float
    memory_temperature: float
    logp_knn: np.ndarray   # log p_kNN at the chosen T
    logp_mem: np.ndarray   # log p of the memory at the chosen τ
    knnlm: np.ndarray      # log of the kNN-LM mixture at the chosen (λ, T)
    memory: np.ndarray     # log of the decoder + memory mixture at the chosen (λ, τ)
    knn_dev_by_temperature: dict
    memory_dev_by_temperature: dict


def choose_on_dev(logp_dec: np.ndarray, logp_knn: np.ndarray, logp_mem: np.ndarray, is_dev: np.ndarray,
                  lambdas: list[float], temperatures: np.ndarray,
                  memory_temperatures: np.ndarray = np.ones(1)) -> Choice:
    """Each model's (λ, temperature) with the lowest dev perplexity, the first of the grids on a tie;
    ``logp_knn`` / ``logp_mem``: [temperature, row] log-probabilities."""
    def best_lambda(logp_other: np.ndarray) -> tuple[float, float]:
        scores = [perplexity(_mix(logp_dec[is_dev], logp_other[is_dev], lam)) for lam in lambdas]
        best = int(np.argmin(scores))
        return lambdas[best], scores[best]

    def best_pair(logp_other: np.ndarray, grid: np.ndarray) -> tuple[float, int, dict]:
        per_temperature = [best_lambda(logp_other[t]) for t in range(len(grid))]
        t = int(np.argmin([score for _, score in per_temperature]))
        scores = {float(temperature): round(score, 4) for temperature, (_, score) in zip(grid, per_temperature)}
        return per_temperature[t][0], t, scores

    knn_lambda, t, knn_scores = best_pair(logp_knn, temperatures)
    memory_lambda, m, memory_scores = best_pair(logp_mem, memory_temperatures)
    return Choice(knn_lambda, float(temperatures[t]), memory_lambda, float(memory_temperatures[m]),
                  logp_knn[t], logp_mem[m], _mix(logp_dec, logp_knn[t], knn_lambda),
                  _mix(logp_dec, logp_mem[m], memory_lambda), knn_scores, memory_scores)


def _metrics(log_probs: dict, is_dev: np.ndarray, choice: Choice, timings: dict, n_rows: int, k: int, config,
             exact: bool) -> dict:
    """Test perplexities at the dev-chosen values (and the dev ones), the gain recovered, speeds, choices."""
    test = {name: perplexity(values[~is_dev]) for name, values in log_probs.items()}
    dev = {name: perplexity(values[is_dev]) for name, values in log_probs.items()}
    gain = test["decoder"] - test["knnlm"]
    return {
        "perplexity": {name: round(value, 4) for name, value in test.items()},
        "dev_perplexity": {name: round(value, 4) for name, value in dev.items()},
        "memory_gain_recovered": round((test["decoder"] - test[WITH_MEMORY]) / gain, 4) if gain else None,
        "knn_lambda": choice.knn_lambda, "temperature": choice.temperature, "memory_lambda": choice.memory_lambda,
        "memory_temperature": choice.memory_temperature,
        "knnlm_dev_perplexity_by_temperature": choice.knn_dev_by_temperature,
        "memory_dev_perplexity_by_temperature": choice.memory_dev_by_temperature,
        "tokens_per_second": {PASS_NAMES[name]: round(n_rows / seconds, 1) for name, seconds in timings.items()},
        "rows": n_rows, "dev_rows": int(is_dev.sum()), "test_rows": int((~is_dev).sum()),
        "k": k, "nprobe": config.nprobe, "exact_distances": exact,
    }


def grid_edge_warnings(choice: Choice, config) -> list[str]:
    """A warning for each dev choice at an end of its grid that is not a natural bound (λ 0 or 1): the best
    value may lie beyond it, so widen that grid."""
    choices = (("kNN-LM's λ", choice.knn_lambda, config.lambda_grid, "evaluate.lambda_grid"),
               ("the memory's λ", choice.memory_lambda, config.lambda_grid, "evaluate.lambda_grid"),
               ("kNN-LM's T", choice.temperature, config.temperature_grid, "evaluate.temperature_grid"),
               ("the memory's τ", choice.memory_temperature, config.memory_temperature_grid,
                "evaluate.memory_temperature_grid"))
    warnings = []
    for what, value, grid, key in choices:
        if len(grid) < 2:
            continue  # a fixed value, not a choice
        for end, bound, side in ((max(grid), 1.0, "top"), (min(grid), 0.0, "bottom")):
            if value == end and not (key == "evaluate.lambda_grid" and value == bound):
                warnings.append(f"{what} {value:g} is at the {side} of {key} ({min(grid):g} to {max(grid):g}): "
                                f"the best value may lie beyond it; widen {key}")
    return warnings


def _write_outputs(uri: str, metrics: dict, sweep: list[dict], log_probs: dict, is_dev: np.ndarray,
                   scorers: list[Scorer], inputs: dict) -> None:
    from memforge.training import paper_table, plots

    fs.write_json_atomic(fs.join(uri, "metrics.json"), metrics)
    fs.write_json_atomic(fs.join(uri, "lambda.json"), sweep)
    fs.write_bytes_atomic(fs.join(uri, paper_table.FILE), paper_table.render(metrics).encode())
    rows = [np.arange(scorer.n_rows) for scorer in scorers]  # each scored split's own row numbers
    targets = np.concatenate([scorer.tokens[r + 1] for scorer, r in zip(scorers, rows)]).astype(np.int32)
    table = pa.table({"row": np.concatenate(rows), "target": targets,
                      "split": pa.array(np.where(is_dev, "dev", "test")).dictionary_encode(),
                      **{name: values for name, values in log_probs.items()}})
    with fs.atomic_writer(fs.join(uri, "token_log_probs.parquet")) as handle:
        pq.write_table(table, handle)
    curves = {}
    for name, role in (("decoder", "decoder"), ("memory", "memory")):
        if role not in inputs:
            continue
        curve_uri = inputs[role].path("loss.json")
        if fs.exists(curve_uri):
            curves[name] = fs.read_json(curve_uri)
    fs.write_json_atomic(fs.join(uri, "loss.json"), [{"model": name, **point}
                                                     for name, curve in curves.items() for point in curve])
    plots.write(uri, sweep, metrics, curves)
