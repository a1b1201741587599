"""Part ``generate``: tokens/s of ``generate()`` for the decoder alone, decoder + memory and kNN-LM, at batch 1 and
batch 16 (``memforge bench --only generate``).

Greedy generation adds ``NEW_TOKENS`` tokens (exactly: ``min_new_tokens`` too) to prompts of ``PROMPT_TOKENS``
tokens, consecutive slices of the validation split, in one process on the CPU with ``THREADS`` torch and FAISS
thread(s): on a machine that other work shares, more threads than free cores make every step wait for a
descheduled thread (10-20x slower per token here at 2 threads under a load of 5), which would measure the
machine, not the models. The models:

- the decoder: the bench's ``small`` GPT-2 (4 layers, d 128: the demo decoder's shape, random weights), with
  its KV cache;
- decoder + memory: the ``MemoryLMForCausalLM`` that ``export`` publishes (``training.compose.compose``), the
  memory freshly initialised in the default shape (``memory.*`` params, seeded: speed does not depend on its
  weights), at fixed λ ``LAMBDA`` and τ ``MEMORY_TEMPERATURE``;
- kNN-LM: the decoder with ``training.knnlm_generation.KNNLMLogitsProcessor``, one FAISS search per step, over
  a synthetic datastore of ``DATASTORE_KEYS`` keys built as the scale bench's kNN-LM sweep builds it
  (``knnlm_scale.SyntheticDatastore``: the small model's real keys, then noisy copies; the reference index,
  searched at nprobe 32 for k 1024 with exact re-ranking), at fixed λ ``LAMBDA`` and T ``KNN_TEMPERATURE``.

Each tokens/s is the median of ``RUNS`` runs per model and batch, the models taking turns in rotated order
(``measure.round_orders``) after one untimed warm-up each.
"""
from __future__ import annotations

import contextlib
import statistics
import tempfile
import time

import numpy as np
import torch
from transformers import LogitsProcessorList

from memforge.bench import knnlm_scale
from memforge.bench.measure import Note, round_orders
from memforge.bench.workspace import Workspace
from memforge.pipelines.faiss_build import faiss
from memforge.storage import fs
from memforge.storage.artifact import Artifact, open_artifact
from memforge.storage.params import Params

BATCHES = (1, 16)
PROMPT_TOKENS = 64
NEW_TOKENS = 128
RUNS = 6  # a multiple of the 3 models: each takes every place in the order equally often
THREADS = 1
DATASTORE_KEYS = 1 << 22  # 4.19 M
LAMBDA, MEMORY_TEMPERATURE, KNN_TEMPERATURE = 0.25, 1.0, 1.0
MODELS = {"decoder": "the decoder alone (the bench's small GPT-2)",
          "memory": f"decoder + memory (MemoryLMForCausalLM; a fresh seeded memory of the default shape; λ {LAMBDA}, "
                    f"τ {MEMORY_TEMPERATURE})",
          "knnlm": f"kNN-LM (the decoder with a datastore search per step, λ {LAMBDA}, T {KNN_TEMPERATURE})"}


def _batch_notes(batch: int) -> dict[str, Note]:
    prefix = f"generate_b{batch}"
    return {
        **{f"{prefix}_{name}_tokens_per_s": Note(f"batch {batch}: new tokens/s of greedy generate() with {what}, "
                                                 "the prompts' forward pass included")
           for name, what in MODELS.items()},
        f"{prefix}_memory_vs_decoder": Note(f"batch {batch}: decoder + memory tokens/s ÷ decoder tokens/s",
                                            (f"{prefix}_memory_tokens_per_s", f"{prefix}_decoder_tokens_per_s")),
        f"{prefix}_memory_vs_knnlm": Note(f"batch {batch}: decoder + memory tokens/s ÷ kNN-LM tokens/s",
                                          (f"{prefix}_memory_tokens_per_s", f"{prefix}_knnlm_tokens_per_s")),
        f"{prefix}_decoder_vs_knnlm": Note(f"batch {batch}: decoder tokens/s ÷ kNN-LM tokens/s: memory_vs_knnlm if "
                                           "the memory cost nothing",
                                           (f"{prefix}_decoder_tokens_per_s", f"{prefix}_knnlm_tokens_per_s")),
        f"{prefix}_knnlm_tokens_per_s_smaller": Note(f"batch {batch}: kNN-LM's tokens/s over the smaller datastore "
                                                     "(generate_smaller_keys keys)"),
        f"{prefix}_keys_for_10x": Note(f"batch {batch}, extrapolated: datastore keys at which decoder + memory would "
                                       "reach 10x kNN-LM's tokens/s, kNN-LM's seconds per token fitted as a + c·N "
                                       "through its two sizes (its IVF lists, of fixed nlist, grow with N); null when "
                                       "kNN-LM got no slower with N"),
    }


NOTES = {
    "generate_datastore_keys": Note("keys of kNN-LM's datastore: the small model's real keys, then noisy copies (as "
                                    "the scale bench's kNN-LM sweep)"),
    "generate_smaller_keys": Note("keys of the smaller datastore kNN-LM is also timed over (the same one before it "
                                  "grew), for the extrapolation"),
    "generate_index": Note("kNN-LM's index and search (the reference kNN-LM configuration)"),
    "generate_knn_k": Note("neighbours kNN-LM retrieves per generated token"),
    "generate_prompt_tokens": Note("tokens of each prompt (consecutive slices of the validation split)"),
    "generate_new_tokens": Note("tokens greedy generate() adds to each prompt (exactly: min_new_tokens too), with the "
                                f"KV cache, one process on the CPU, {THREADS} torch and FAISS thread(s)"),
    "generate_runs": Note("timed runs per model and batch, the models in rotated order after one warm-up each; "
                          "each tokens/s is their median"),
    **{figure: note for batch in BATCHES for figure, note in _batch_notes(batch).items()},
}


def validation_prompts(tokens: Artifact, count: int, length: int) -> np.ndarray:
    """``count`` prompts [count, length] (int64): consecutive slices from the start of the validation split."""
    from memforge.training.token_stream import TokenStream

    return TokenStream(tokens, "validation").slice(0, count * length).reshape(count, length)


@contextlib.contextmanager
def threads(count: int):
    """torch's and FAISS's thread counts set to ``count`` inside, restored after."""
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(count)
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


def greedy_seconds(model, prompts: torch.Tensor, new_tokens: int, processors: list | None = None) -> float:
    """Seconds of one greedy ``model.generate()`` that adds exactly ``new_tokens`` to each of ``prompts``
    (``processors``: extra logits processors)."""
    eos = model.generation_config.eos_token_id
    started = time.perf_counter()
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=eos,
                         logits_processor=LogitsProcessorList(processors or []))
    seconds = time.perf_counter() - started
    if out.shape[1] != prompts.shape[1] + new_tokens:
        raise RuntimeError(f"generate added {out.shape[1] - prompts.shape[1]} tokens, not {new_tokens}")
    return seconds


def knnlm_seconds(decoder, searcher, rows, query_at: tuple[str, int], k: int, prompts: torch.Tensor,
                  new_tokens: int) -> float:
    """Seconds of one greedy generate() of kNN-LM: ``decoder`` with a search of ``searcher`` for ``k`` neighbours
    of the query ``query_at`` at every step (``rows``: their next tokens and exact distances); the hook goes after."""
    from memforge.training.knnlm_generation import KNNLMLogitsProcessor

    with KNNLMLogitsProcessor(decoder, searcher, rows, query_at, k, LAMBDA, KNN_TEMPERATURE) as processor:
        return greedy_seconds(decoder, prompts, new_tokens, [processor])


def tokens_per_s(batch: int, new_tokens: int, seconds: list[float]) -> float:
    """New tokens/s of a batch from the median of its runs' seconds."""
    return round(batch * new_tokens / statistics.median(seconds), 1)


def measure_generation(decoder, memory, searcher, rows, prompts: np.ndarray, query_at: tuple[str, int],
                       memory_at: tuple[str, int], k: int, new_tokens: int = NEW_TOKENS, runs: int = RUNS) -> dict:
    """The per-batch figures of ``NOTES``: greedy generate()'s tokens/s from the first ``batch`` of ``prompts`` for
    ``decoder``, decoder + ``memory`` (composed, the memory reading ``memory_at``) and kNN-LM (``searcher`` and
    ``rows``, the query ``query_at``, ``k`` neighbours); each the median of ``runs`` runs, on ``THREADS``
    thread(s)."""
    from memforge.training.compose import compose

    with_memory = compose(decoder, memory, LAMBDA, MEMORY_TEMPERATURE, *memory_at)
    models = {"decoder": lambda ids, tokens: greedy_seconds(decoder, ids, tokens),
              "memory": lambda ids, tokens: greedy_seconds(with_memory, ids, tokens),
              "knnlm": lambda ids, tokens: knnlm_seconds(decoder, searcher, rows, query_at, k, ids, tokens)}
    names = list(models)
    figures = {"generate_knn_k": k, "generate_prompt_tokens": prompts.shape[1], "generate_new_tokens": new_tokens,
               "generate_runs": runs}
    seconds = {(batch, name): [] for batch in BATCHES for name in names}
    with threads(THREADS):
        for generate in models.values():  # untimed: the first call's one-time costs
            generate(torch.from_numpy(prompts[:1]), 2)
        for batch in BATCHES:
            ids = torch.from_numpy(prompts[:batch])
            for order in round_orders(len(names), runs):
                for i in order:
                    seconds[batch, names[i]].append(models[names[i]](ids, new_tokens))
    for batch in BATCHES:
        speed = {name: tokens_per_s(batch, new_tokens, seconds[batch, name]) for name in names}
        prefix = f"generate_b{batch}"
        figures.update({f"{prefix}_{name}_tokens_per_s": speed[name] for name in names})
        figures.update({f"{prefix}_memory_vs_decoder": round(speed["memory"] / speed["decoder"], 3),
                        f"{prefix}_memory_vs_knnlm": round(speed["memory"] / speed["knnlm"], 3),
                        f"{prefix}_decoder_vs_knnlm": round(speed["decoder"] / speed["knnlm"], 3)})
    return figures


def knnlm_tokens_per_s(decoder, searcher, rows, prompts: np.ndarray, query_at: tuple[str, int], k: int,
                       new_tokens: int = NEW_TOKENS, runs: int = RUNS) -> dict[int, float]:
    """kNN-LM's greedy generate() tokens/s at each of ``BATCHES`` (median of ``runs``, on ``THREADS`` thread(s))."""
    with threads(THREADS):
        return {batch: tokens_per_s(batch, new_tokens, [
            knnlm_seconds(decoder, searcher, rows, query_at, k, torch.from_numpy(prompts[:batch]), new_tokens)
            for _ in range(runs)]) for batch in BATCHES}


def keys_for_ratio(ratio: float, memory_speed: float, points: list[tuple[int, float]]) -> int | None:
    """The datastore size N at which ``memory_speed`` ÷ kNN-LM's tokens/s reaches ``ratio``, kNN-LM's seconds per
    token fitted as a + c·N through ``points`` (N, tokens/s); None when kNN-LM does not slow with N."""
    (n1, speed1), (n2, speed2) = points
    slope = (1 / speed2 - 1 / speed1) / (n2 - n1)
    if slope <= 0:
        return None
    return max(n2, round((ratio / memory_speed - (1 / speed1 - slope * n1)) / slope))


def bench_generate(ws: Workspace, keys: int = DATASTORE_KEYS) -> dict:
    """generate_b16_memory_vs_decoder, generate_b16_memory_vs_knnlm: greedy generate()'s tokens/s of decoder +
    memory ÷ the decoder's and ÷ kNN-LM's over a synthetic datastore of ``keys`` keys, at batch 1 and 16."""
    seed = knnlm_scale.seed_datastore(ws)
    decoder, memory = knnlm_scale.timed_models(seed, Params().memory)
    query_at = (seed.stats["representation"], seed.stats["layer"])
    prompts = validation_prompts(open_artifact(fs.join(seed.params.artifacts_dir, "tokens")), max(BATCHES),
                                 PROMPT_TOKENS)
    k, nprobe = knnlm_scale.REFERENCE["k"], knnlm_scale.REFERENCE["nprobe"]
    smaller_keys = keys // 4
    with tempfile.TemporaryDirectory(dir=ws.root) as scratch:
        datastore = knnlm_scale.SyntheticDatastore(seed.keys, seed.values, scratch, keys)
        datastore.grow(smaller_keys)
        smaller = knnlm_tokens_per_s(decoder, datastore.searcher, datastore.rows(), prompts, query_at, k)
        datastore.grow(keys)
        figures = measure_generation(decoder, memory, datastore.searcher, datastore.rows(), prompts, query_at,
                                     query_at, k)
    for batch in BATCHES:
        prefix = f"generate_b{batch}"
        figures[f"{prefix}_knnlm_tokens_per_s_smaller"] = smaller[batch]
        figures[f"{prefix}_keys_for_10x"] = keys_for_ratio(10.0, figures[f"{prefix}_memory_tokens_per_s"], [
            (smaller_keys, smaller[batch]), (keys, figures[f"{prefix}_knnlm_tokens_per_s"])])
    return {"generate_datastore_keys": keys, "generate_smaller_keys": smaller_keys,
            "generate_index": f"{datastore.factory}, nprobe {nprobe}, exact re-ranking", **figures}
