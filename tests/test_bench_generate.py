"""The ``generate`` bench part on the tiny chain: kNN-LM as a logits processor scores what evaluate scores, adds
nothing to greedy decoding at λ 0, reads the right position through the KV cache, and the part's measurement
gives every per-batch figure its notes name."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from memforge.bench import generate
from memforge.pipelines.datastore_rows import DatastoreRows
from memforge.pipelines.encoder import load_encoder
from memforge.pipelines.sharded_index import ShardedIndex
from memforge.storage.artifact import open_artifact
from memforge.storage.shards import load_plan
from memforge.training.knnlm_generation import KNNLMLogitsProcessor

pytestmark = pytest.mark.stage

K, NPROBE, LAM, T = 8, 4, 0.25, 2.0


@pytest.fixture(scope="module")
def tiny(chain):
    """The chain's decoder, datastore (index and rows), tokens and validation keys' stats."""
    art = chain["art"]
    index = open_artifact(str(art / "index"))
    searcher = ShardedIndex(index.uri, index.fingerprint, [s.name for s in load_plan(index.uri).shards], NPROBE,
                            index.manifest["stats"]["merge"] == "ondisk")
    queries = open_artifact(str(art / "keys" / "validation"))
    stats = queries.manifest["stats"]
    return {"decoder": load_encoder(str(art / "decoder" / "model")), "searcher": searcher,
            "rows": DatastoreRows(index.uri, index.fingerprint), "tokens": open_artifact(str(art / "tokens")),
            "stats": stats, "validation_rows": queries.manifest["counts"]["rows"],
            "query_at": (stats["representation"], stats["layer"])}


def _generate(decoder, ids: torch.Tensor, new_tokens: int, processors=(), **kwargs):
    return decoder.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=decoder.generation_config.eos_token_id,
                            logits_processor=LogitsProcessorList(processors), **kwargs)


def test_the_processor_scores_evaluates_knnlm_mixture(tiny):
    """At one step, the processor's score of the next token is evaluate's kNN-LM log-probability of that token
    for the same context (its own decoder pass, search, exact re-ranking and mixture), and its scores are
    normalised log-probabilities; in a batch of contexts as alone."""
    from memforge.training.evaluate import Scorer, _mix, score_three_ways
    from memforge.training.token_stream import TokenStream

    decoder, stats = tiny["decoder"], tiny["stats"]
    scorer = Scorer(decoder, TokenStream(tiny["tokens"], "validation"), tiny["validation_rows"], stats["block_size"],
                    stats["stride"], 4)
    scored = score_three_ways(scorer, tiny["searcher"], tiny["rows"], None, K, np.array([T]), tiny["query_at"],
                              tiny["query_at"], "fp32", only=("decoder", "knnlm"))
    with np.errstate(divide="ignore"):
        mixture = _mix(scored.logp_dec, np.log(scored.p_knn[0]), LAM)
    full = [w for w in scorer.windows[1:] if w.end - w.begin == stats["block_size"]][:4]
    assert len(full) == 4
    groups = [[(0, 3)], [(0, 10)], [(w.begin, w.stop - 2) for w in full]]  # (window begin, row): row predicts row + 1
    checked = 0
    with KNNLMLogitsProcessor(decoder, tiny["searcher"], tiny["rows"], tiny["query_at"], K, LAM, T) as processor:
        for group in groups:
            ids = torch.from_numpy(np.stack([scorer.tokens[begin:row + 1] for begin, row in group]))
            with torch.no_grad():
                scores = processor(ids, decoder(input_ids=ids).logits[:, -1].float())
            rows = np.array([row for _, row in group])
            got = scores[torch.arange(len(group)), torch.from_numpy(scorer.tokens[rows + 1])].numpy()
            np.testing.assert_allclose(got, mixture[rows], rtol=0, atol=1e-5)
            np.testing.assert_allclose(torch.logsumexp(scores, -1).numpy(), 0.0, atol=1e-5)
            checked += len(group)
    assert checked == 6
    assert not [h for h in decoder.transformer.h[-1].mlp._forward_pre_hooks.values()]  # the hook is removed


def test_greedy_generation_at_lambda_0_is_the_decoders_and_cached_steps_read_the_last_position(tiny):
    """With λ 0 the processor leaves greedy decoding as the decoder's own. With λ 0.5 each step's scores, computed
    through the KV cache, equal the processor's over a full forward pass of the same context."""
    decoder = tiny["decoder"]
    ids = torch.from_numpy(generate.validation_prompts(tiny["tokens"], 3, 8))
    expected = _generate(decoder, ids, 12, min_new_tokens=12)
    args = (decoder, tiny["searcher"], tiny["rows"], tiny["query_at"], K)
    with KNNLMLogitsProcessor(*args, 0.0, T) as processor:
        assert torch.equal(_generate(decoder, ids, 12, [processor], min_new_tokens=12), expected)
    with KNNLMLogitsProcessor(*args, 0.5, T) as processor:
        out = _generate(decoder, ids, 4, [processor], output_scores=True, return_dict_in_generate=True)
        assert len(out.scores) == 4
        for step, step_scores in enumerate(out.scores):
            context = out.sequences[:, :ids.shape[1] + step]
            with torch.no_grad():
                again = processor(context, decoder(input_ids=context).logits[:, -1].float())
            torch.testing.assert_close(step_scores, again, rtol=0, atol=1e-5)


def test_the_part_measures_every_model_at_every_batch(tiny):
    """The part's measurement on the tiny chain (a fresh memory of the default shape, 8-token prompts, 8 new
    tokens, one run): every figure the notes name but the datastore's, each speed and ratio positive; the thread
    counts it sets come back."""
    from memforge.storage.params import Params
    from memforge.training.memory import build_memory

    decoder, stats = tiny["decoder"], tiny["stats"]
    torch.manual_seed(0)
    memory = build_memory(Params().memory, stats["hidden_size"], int(decoder.config.vocab_size)).eval()
    prompts = generate.validation_prompts(tiny["tokens"], max(generate.BATCHES), 8)
    saved = torch.get_num_threads()
    torch.set_num_threads(generate.THREADS + 1)
    try:
        figures = generate.measure_generation(decoder, memory, tiny["searcher"], tiny["rows"], prompts,
                                              tiny["query_at"], tiny["query_at"], K, new_tokens=8, runs=1)
        assert torch.get_num_threads() == generate.THREADS + 1
    finally:
        torch.set_num_threads(saved)
    added_by_the_part = {"generate_datastore_keys", "generate_smaller_keys", "generate_index",
                         *(f"generate_b{b}_{name}" for b in generate.BATCHES
                           for name in ("knnlm_tokens_per_s_smaller", "keys_for_10x"))}
    assert set(figures) == set(generate.NOTES) - added_by_the_part
    assert figures["generate_new_tokens"] == 8 and figures["generate_prompt_tokens"] == 8
    per_batch = {name: value for name, value in figures.items() if name.startswith("generate_b")}
    assert len(per_batch) == 6 * len(generate.BATCHES) and all(value > 0 for value in per_batch.values())
    smaller = generate.knnlm_tokens_per_s(decoder, tiny["searcher"], tiny["rows"], prompts, tiny["query_at"], K,
                                          new_tokens=8, runs=1)
    assert set(smaller) == set(generate.BATCHES) and all(value > 0 for value in smaller.values())


def test_the_extrapolation_solves_the_fitted_line():
    """kNN-LM at 100 tokens/s over 1 M keys and 50 over 3 M: 1/speed = 0.005 + 5e-9·N; decoder + memory at 1000
    tokens/s is 10x where 1/speed = 0.01, N = 1 M; a kNN-LM that does not slow with N has no such size."""
    assert generate.keys_for_ratio(10.0, 1000.0, [(1_000_000, 100.0), (3_000_000, 50.0)]) == 3_000_000  # reached
    assert generate.keys_for_ratio(40.0, 1000.0, [(1_000_000, 100.0), (3_000_000, 50.0)]) == 7_000_000
    assert generate.keys_for_ratio(10.0, 1000.0, [(1_000_000, 100.0), (3_000_000, 100.0)]) is None
